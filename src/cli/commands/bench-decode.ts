// `nsa bench --decode`: the median time of one decode step (one query per sequence, every sequence of the batch)
// per preset, batch size B and context S, against dense attention over the whole cache on the same backend, with
// the effective bandwidth of each (the bytes the step must read / its time) and the memory model's dense/NSA
// byte ratio.

import type { Backend } from '../../backends/index.js';
import { getBackend } from '../../backends/index.js';
import type { TimingOptions } from '../../backends/backend.js';
import { NSAConfig, PRESETS, type PresetName } from '../../config/nsa-config.js';
import { NsaError } from '../../errors.js';
import { createKvCache } from '../../nsa/decode/create.js';
import { decodeBytesPerHead, type KvCache } from '../../nsa/decode/types.js';
import { backendMemoryBytes, chooseBackend, isGpuBackend } from '../backend-choice.js';
import { attempt, flatten, ratio, reportHeader, type Timed } from '../bench-report.js';
import type { CommandContext } from '../command.js';
import { errorMessage, exitCodeFor } from '../exit.js';
import { writeFileAtomic } from '../../tensor/atomic-write.js';
import { formatLength, formatMs, formatRatio, renderTable } from '../format.js';
import { EXIT_FAILED, EXIT_OK, EXIT_USAGE, println, withFile } from '../io.js';
import { configOverrides, DEFAULT_SEED, headOptions, type BackendFlags, type ConfigFlags, type HeadFlags } from '../options.js';
import { createProgress } from '../progress.js';
import { randomPhiParams } from '../../nsa/random-inputs.js';

export interface DecodeBenchFlags extends BackendFlags, ConfigFlags, HeadFlags {
  readonly presets?: readonly PresetName[];
  readonly batches?: readonly number[];
  readonly contexts?: readonly number[];
  readonly seed?: number;
  readonly warmup?: number;
  readonly iters?: number;
  readonly json?: string;
}

export interface DecodeDefaults {
  readonly batches: readonly number[];
  readonly contexts: readonly number[];
  /** Contexts timed for batch 1 only, when neither --batches nor --contexts is given (and memory allows). */
  readonly batchOneContexts: readonly number[];
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly valueDim: number;
  readonly warmup: number;
  readonly iters: number;
}

/** Seconds on 2 CPU cores. */
export const CPU_DECODE_DEFAULTS: DecodeDefaults = {
  batches: [1, 4],
  contexts: [2048, 8192],
  batchOneContexts: [],
  heads: 8,
  kvHeads: 1,
  headDim: 64,
  valueDim: 64,
  warmup: 1,
  iters: 3,
};
/** Issue 5's grid: batch 1..64, contexts 8k..128k, and 1m for batch 1. */
export const GPU_DECODE_DEFAULTS: DecodeDefaults = {
  batches: [1, 8, 64],
  contexts: [8192, 65536, 131072],
  batchOneContexts: [1 << 20],
  heads: 64,
  kvHeads: 4,
  headDim: 128,
  valueDim: 128,
  warmup: 5,
  iters: 20,
};
const DEFAULT_PRESETS: readonly PresetName[] = ['fla', 'paper'];
/** A cache may take at most this share of the memory the backend computes in (its size is estimated x 1.2). */
const MEMORY_SHARE = 0.6;
const MEMORY_SLACK = 1.2;

export interface Shape {
  readonly batch: number;
  readonly context: number;
}

interface DecodeRow extends Shape {
  readonly preset: PresetName;
  readonly config: NSAConfig;
  readonly elementBytes: number;
  readonly nsa: Timed;
  readonly dense: Timed;
  /** The cache's storage once filled (undefined when it could not be made). */
  readonly cacheBytes: number | undefined;
}

/** Bytes of K/V an element of the backend's cache takes: f32 on the cpu, bf16 on a GPU. */
function elementBytesOf(backend: string): number {
  return backend === 'cpu' ? 4 : 2;
}

export async function runDecodeBench(flags: DecodeBenchFlags, ctx: CommandContext): Promise<number> {
  const { io } = ctx;
  const backend = await chooseDecodeBackend(flags, ctx);
  if (backend === undefined) return EXIT_FAILED;
  const defaults = isGpuBackend(backend) ? GPU_DECODE_DEFAULTS : CPU_DECODE_DEFAULTS;
  const presets = flags.presets ?? DEFAULT_PRESETS;
  const seed = flags.seed ?? DEFAULT_SEED;
  const timing: TimingOptions = { warmup: flags.warmup ?? defaults.warmup, iterations: flags.iters ?? defaults.iters };
  // Validate every config before timing anything, so a bad flag fails at once.
  const configs = new Map(presets.map((p) => [p, NSAConfig.preset(p, { ...configOverrides(flags, undefined), ...headOptions(flags, defaults) })]));
  const first = configs.get(presets[0]!)!;
  const phi = (config: NSAConfig) => ({
    phiK: randomPhiParams(config, config.headDim, 'f32', seed + 10),
    phiV: randomPhiParams(config, config.valueDim, 'f32', seed + 20),
  });
  // A cache that cannot hold or fill this config says so here, before anything is printed (UnsupportedConfigError:
  // one line, exit 1).
  const probe = await createKvCache(first, { backend, maxTokens: 1, ...phi(first) });
  try {
    probe.appendRandom(probe.addSequence(), 1, seed);
  } finally {
    probe.dispose();
  }

  const { shapes, skipped, memory } = planDecodeShapes(flags, defaults, first, backend);
  const out = (...lines: string[]): void => println(io.stdout, ...lines);
  const elementBytes = elementBytesOf(backend.name);
  out(
    `backend  ${backend.description}`,
    `shapes   Hq = ${first.heads}, H = ${first.kvHeads}, Dk = ${first.headDim}, Dv = ${first.valueDim}; ` +
      `cache ${elementBytes === 4 ? 'f32' : 'bf16'}; one query per sequence a step; ` +
      `median of ${timing.iterations} after ${timing.warmup} warm-up`,
  );
  if (skipped.length > 0) {
    const list = skipped.map((s) => `B = ${s.batch}, S = ${formatLength(s.context)} (~${gib(cacheEstimate(first, s, elementBytes))} GiB)`).join('; ');
    out(`skipped  ${list}: over ${MEMORY_SHARE * 100}% of the ${gib(memory!)} GiB ${isGpuBackend(backend) ? 'of the device' : 'of host memory'}`);
  }
  if (shapes.length === 0) {
    io.stderr('nsa bench: every batch and context was skipped for memory; nothing to time\n');
    return EXIT_FAILED;
  }

  const steps = timing.warmup + timing.iterations;
  const total = presets.length * shapes.reduce((sum, s) => sum + s.batch + 2 * steps, 0);
  const progress = createProgress(io.progress, total);
  const rows: DecodeRow[] = [];
  try {
    for (const shape of shapes) {
      for (const preset of presets) {
        const config = configs.get(preset)!;
        const where = `${preset} B=${shape.batch} S=${formatLength(shape.context)}`;
        let cache: KvCache | undefined;
        let nsa: Timed;
        let dense: Timed;
        try {
          cache = await createKvCache(config, { backend, maxTokens: shape.context, ...phi(config) });
          progress.label(`${where}: filling the cache`);
          for (let i = 0; i < shape.batch; i++) {
            const s = cache.addSequence();
            cache.appendRandom(s, shape.context, seed + s);
            progress.advance(1);
            await new Promise((resolve) => setImmediate(resolve)); // let the progress bar draw
          }
          const options = (dense: boolean) => ({ ...timing, dense, onIteration: () => progress.advance(1) });
          const filled = cache;
          progress.label(`${where}: NSA`);
          nsa = await attempt(() => filled.timeDecodeStep(options(false)));
          progress.label(`${where}: dense`);
          dense = await attempt(() => filled.timeDecodeStep(options(true)));
        } catch (e) {
          if (e instanceof NsaError && exitCodeFor(e) === EXIT_USAGE) throw e;
          nsa = dense = { error: errorMessage(e) };
        }
        const cacheBytes = cache?.bytes;
        cache?.dispose();
        rows.push({ preset, config, ...shape, elementBytes, nsa, dense, cacheBytes });
      }
    }
  } finally {
    progress.stop();
  }

  out('', ...renderTable(DECODE_HEADERS, rows.map(tableRow)));
  out(
    '',
    'BW: bytes the step must read / median step time; NSA reads per sequence and KV head the visible compressed',
    "tokens, the n selected blocks of l' and the window (K and V each), dense every cached token.",
    'dense/NSA time is the measured speedup; dense/NSA bytes is what the memory model predicts.',
  );
  if (flags.json !== undefined) {
    const path = flags.json;
    const report = decodeReport(ctx.argv, backend, { seed, timing, presets, shapes, skipped, memory }, rows);
    await withFile('write', path, () => writeFileAtomic(path, `${JSON.stringify(report, null, 2)}\n`));
    out(`wrote ${path}`);
  }
  const errors = rows.flatMap((r) =>
    [r.nsa, r.dense].filter((t) => t.error !== undefined).map((t) => `${r.preset} B=${r.batch} S=${r.context}: ${t.error}`),
  );
  for (const e of new Set(errors)) io.stderr(`nsa bench: ${e}\n`);
  return errors.length > 0 ? EXIT_FAILED : EXIT_OK;
}

/**
 * The named backend, or the best present; unnamed, a best backend without a KV cache gives way to the cpu (as
 * createKvCache does), saying so. A named one without a cache: one line on stderr and undefined (exit 1).
 */
async function chooseDecodeBackend(flags: DecodeBenchFlags, ctx: CommandContext): Promise<Backend | undefined> {
  const backend = await chooseBackend(flags.backend, ctx.io);
  if (backend.createKvCache !== undefined) return backend;
  if (flags.backend === undefined && backend.name !== 'cpu') {
    ctx.io.stderr(`nsa bench: the ${backend.name} backend has no KV cache for decoding yet; using cpu\n`);
    return getBackend('cpu');
  }
  ctx.io.stderr(`nsa bench: the ${backend.name} backend has no KV cache for decoding yet (--backend cpu has one)\n`);
  return undefined;
}

/** The (B, S) pairs to time, in order, and those skipped because the cache would not fit (exported for tests). */
export function planDecodeShapes(
  flags: DecodeBenchFlags,
  defaults: DecodeDefaults,
  config: NSAConfig,
  backend: Backend,
): { shapes: Shape[]; skipped: Shape[]; memory: number | undefined } {
  const batches = flags.batches ?? defaults.batches;
  const contexts = flags.contexts ?? defaults.contexts;
  const all: Shape[] = batches.flatMap((batch) => contexts.map((context) => ({ batch, context })));
  if (flags.batches === undefined && flags.contexts === undefined && batches.includes(1)) {
    const at = all.findIndex((s) => s.batch !== 1);
    const extra = defaults.batchOneContexts.filter((c) => !contexts.includes(c)).map((context) => ({ batch: 1, context }));
    all.splice(at === -1 ? all.length : at, 0, ...extra);
  }
  const memory = backendMemoryBytes(backend);
  const elementBytes = elementBytesOf(backend.name);
  const fits = (s: Shape): boolean => memory === undefined || cacheEstimate(config, s, elementBytes) <= MEMORY_SHARE * memory;
  return { shapes: all.filter(fits), skipped: all.filter((s) => !fits(s)), memory };
}

/** The raw K/V of a batch, with room for the compressed K/V and pages: B * S * H * (Dk + Dv) * bytes * 1.2. */
function cacheEstimate(config: NSAConfig, s: Shape, elementBytes: number): number {
  return s.batch * s.context * config.kvHeads * (config.headDim + config.valueDim) * elementBytes * MEMORY_SLACK;
}

function gib(bytes: number): string {
  const g = bytes / 2 ** 30;
  return g >= 10 ? g.toFixed(0) : g.toFixed(1);
}

/** Bytes one step must read for the whole batch, NSA and dense. */
function stepBytes(row: Pick<DecodeRow, 'config' | 'batch' | 'context' | 'elementBytes'>): { nsa: number; dense: number } {
  const perHead = decodeBytesPerHead(row.config, row.context, row.elementBytes);
  const heads = row.batch * row.config.kvHeads;
  return { nsa: heads * perHead.nsa, dense: heads * perHead.dense };
}

/** Bytes per second, undefined without a time. */
function bandwidth(bytes: number, ms: number | undefined): number | undefined {
  return ms === undefined || !(ms > 0) ? undefined : bytes / (ms * 1e-3);
}

const DECODE_HEADERS = ['preset', 'B', 'S', 'NSA ms', 'NSA BW', 'dense ms', 'dense BW', 'BW unit', 'dense/NSA time', 'dense/NSA bytes'];

function tableRow(row: DecodeRow): string[] {
  const bytes = stepBytes(row);
  const nsaMs = row.nsa.timing?.medianMs;
  const denseMs = row.dense.timing?.medianMs;
  const nsaBw = bandwidth(bytes.nsa, nsaMs);
  const denseBw = bandwidth(bytes.dense, denseMs);
  // One unit per row, for the faster of the two: TB/s from 1 TB/s up, GB/s below (decimal, as GPU specs are).
  const tera = Math.max(nsaBw ?? 0, denseBw ?? 0) >= 1e12;
  const scale = tera ? 1e12 : 1e9;
  const bw = (x: number | undefined): string => (x === undefined ? '-' : formatSignificant(x / scale));
  const ms = (t: Timed): string => (t.error !== undefined ? 'error' : formatMs(t.timing?.medianMs));
  return [
    row.preset,
    String(row.batch),
    formatLength(row.context),
    ms(row.nsa),
    bw(nsaBw),
    ms(row.dense),
    bw(denseBw),
    tera ? 'TB/s' : 'GB/s',
    formatRatio(ratio(denseMs, nsaMs)),
    formatRatio(bytes.dense / bytes.nsa),
  ];
}

/** Three significant digits: 2.71, 27.1, 271 (and 2712 for larger). */
function formatSignificant(x: number): string {
  if (!Number.isFinite(x)) return '-';
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x >= 1 ? x.toFixed(2) : x.toPrecision(3);
}

interface DecodeSettings {
  readonly seed: number;
  readonly timing: TimingOptions;
  readonly presets: readonly PresetName[];
  readonly shapes: readonly Shape[];
  readonly skipped: readonly Shape[];
  readonly memory: number | undefined;
}

/** The JSON report: settings, device, and per row every timing with its bytes, bandwidths and ratios. */
function decodeReport(argv: readonly string[], backend: Backend, s: DecodeSettings, rows: readonly DecodeRow[]): unknown {
  return {
    ...reportHeader(argv, backend),
    mode: 'decode',
    settings: {
      seed: s.seed,
      warmup: s.timing.warmup,
      iterations: s.timing.iterations,
      elementBytes: elementBytesOf(backend.name),
      presets: s.presets,
      shapes: s.shapes,
      skippedForMemory: s.skipped,
      memoryBytes: s.memory ?? null,
    },
    results: rows.map((row) => {
      const bytes = stepBytes(row);
      const nsa = row.nsa.timing?.medianMs;
      const dense = row.dense.timing?.medianMs;
      return {
        preset: row.preset,
        presetValues: PRESETS[row.preset],
        config: { ...row.config.toOptions(), scale: row.config.scale },
        batch: row.batch,
        context: row.context,
        cacheBytes: row.cacheBytes ?? null,
        nsa: flatten(row.nsa),
        dense: flatten(row.dense),
        nsaStepBytes: bytes.nsa,
        denseStepBytes: bytes.dense,
        nsaBytesPerSecond: bandwidth(bytes.nsa, nsa) ?? null,
        denseBytesPerSecond: bandwidth(bytes.dense, dense) ?? null,
        denseOverNsaTime: ratio(dense, nsa) ?? null,
        denseOverNsaBytes: bytes.dense / bytes.nsa,
      };
    }),
  };
}
