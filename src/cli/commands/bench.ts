// `nsa bench`: NSA's median time per preset and length on a backend, against the backend's own dense causal
// attention (when it has one) and torch SDPA (on a CUDA machine with torch), all measured in the same run; with
// --decode, the decode step on a KV cache per preset, batch size and context (bench-decode.ts).

import { Option, type Command } from 'commander';
import type { Backend } from '../../backends/index.js';
import type { BenchmarkProblem, TimingOptions } from '../../backends/backend.js';
import { NSAConfig, type PresetName } from '../../config/nsa-config.js';
import { INPUT_PATTERNS, type InputPattern } from '../../nsa/random-inputs.js';
import { chooseBackend, isGpuBackend } from '../backend-choice.js';
import { newCommand, type CommandContext } from '../command.js';
import { formatLength, formatMs, formatRatio, renderTable } from '../format.js';
import { writeFileAtomic } from '../../tensor/atomic-write.js';
import { EXIT_FAILED, EXIT_OK, println, UsageError, withFile } from '../io.js';
import {
  addBackendOption,
  addConfigOptions,
  addHeadOptions,
  addInputOptions,
  configOverrides,
  DEFAULT_SEED,
  headOptions,
  parseLengthList,
  parseNonNegativeInt,
  parsePositiveInt,
  parsePositiveIntList,
  parsePresetList,
  type BackendFlags,
  type ConfigFlags,
  type HeadFlags,
  type InputDType,
  type InputFlags,
  type ProblemDefaults,
} from '../options.js';
import { createProgress } from '../progress.js';
import { offsets } from '../random-inputs.js';
import { detectTorch, timeSdpa, type TorchProbe } from '../torch-sdpa.js';
import { CPU_DECODE_DEFAULTS, GPU_DECODE_DEFAULTS, runDecodeBench, type DecodeDefaults } from './bench-decode.js';
import { attempt, benchReport, ratio, type BenchRow, type Timed } from '../bench-report.js';

interface BenchFlags extends BackendFlags, ConfigFlags, HeadFlags, InputFlags {
  readonly lengths?: readonly number[];
  readonly presets?: readonly PresetName[];
  readonly batch?: number;
  readonly backward?: boolean;
  readonly warmup?: number;
  readonly iters?: number;
  readonly json?: string;
  readonly torch: boolean;
  readonly decode?: boolean;
  readonly batches?: readonly number[];
  readonly contexts?: readonly number[];
  readonly inputs?: InputPattern;
}

interface BenchDefaults extends ProblemDefaults {
  readonly lengths: readonly number[];
  readonly warmup: number;
  readonly iters: number;
}

/** Seconds on a laptop CPU; the peers' long-context shapes (PEERS.md) on a GPU. */
const CPU_DEFAULTS: BenchDefaults = {
  lengths: [1024, 2048],
  seqlen: 1024,
  batch: 1,
  heads: 8,
  kvHeads: 1,
  headDim: 64,
  valueDim: 64,
  dtype: 'f32',
  preset: 'paper',
  warmup: 0,
  iters: 1,
};
const GPU_DEFAULTS: BenchDefaults = {
  lengths: [8192, 16384, 32768, 65536],
  seqlen: 8192,
  batch: 1,
  heads: 64,
  kvHeads: 4,
  headDim: 128,
  valueDim: 128,
  dtype: 'bf16',
  preset: 'paper',
  warmup: 3,
  iters: 10,
};
const DEFAULT_PRESETS: readonly PresetName[] = ['fla', 'paper'];

export function benchCommand(ctx: CommandContext): Command {
  const cmd = newCommand('bench', 'time NSA per preset and length against dense causal attention and torch SDPA, or decode steps with --decode', ctx.io);
  addBackendOption(cmd, 'backend to time (default: the best present, cuda before cpu)');
  cmd
    .addOption(new Option('--lengths <list>', 'sequence lengths T, e.g. 8k,16k,32k,64k').argParser(parseLengthList))
    .addOption(new Option('--presets <list>', `presets to time, e.g. ${DEFAULT_PRESETS.join(',')}`).argParser(parsePresetList));
  addConfigOptions(cmd, { preset: false });
  addHeadOptions(cmd);
  cmd.addOption(new Option('--batch <B>', 'B: sequences per run').argParser(parsePositiveInt));
  addInputOptions(cmd);
  cmd
    .option('--backward', 'time forward + backward instead of the forward alone')
    .addOption(new Option('--warmup <n>', 'untimed runs before timing').argParser(parseNonNegativeInt))
    .addOption(new Option('--iters <n>', 'timed runs (the median is reported)').argParser(parsePositiveInt))
    .option('--json <file>', 'also write every number, the device and the command line as JSON')
    .option('--no-torch', 'do not time torch SDPA')
    .addOption(
      new Option('--inputs <pattern>', 'random (default; q, k, v ~ N(0, 1), as the peers measure) or smooth (q and k plus a slow wave in the position: neighbouring queries choose alike)').choices(INPUT_PATTERNS),
    )
    .option('--decode', 'time decode steps on a KV cache (one query per sequence) instead of the prefill')
    .addOption(new Option('--batches <list>', 'with --decode: batch sizes B, e.g. 1,8,64').argParser(parsePositiveIntList))
    .addOption(new Option('--contexts <list>', 'with --decode: tokens S in each cached sequence, e.g. 8k,64k,128k').argParser(parseLengthList));
  cmd.addHelpText(
    'after',
    `
Defaults on cpu: --lengths ${CPU_DEFAULTS.lengths.map(formatLength).join(',')} --heads ${CPU_DEFAULTS.heads} --kv-heads ${CPU_DEFAULTS.kvHeads} --head-dim ${CPU_DEFAULTS.headDim} --value-dim ${CPU_DEFAULTS.valueDim}, f32, --warmup ${CPU_DEFAULTS.warmup} --iters ${CPU_DEFAULTS.iters}.
Defaults on a GPU: --lengths ${GPU_DEFAULTS.lengths.map(formatLength).join(',')} --heads ${GPU_DEFAULTS.heads} --kv-heads ${GPU_DEFAULTS.kvHeads} --head-dim ${GPU_DEFAULTS.headDim} --value-dim ${GPU_DEFAULTS.valueDim}, bf16, --warmup ${GPU_DEFAULTS.warmup} --iters ${GPU_DEFAULTS.iters}.
Presets: ${DEFAULT_PRESETS.join(' and ')}; config flags (-l, -d, ...) override every preset.
torch SDPA (causal, GQA) runs through python3 bench/torch_sdpa.py when torch sees a CUDA device and the backend
is not cpu; set NSA_PYTHON to use another interpreter. Columns: NSA and dense median ms, NSA's speedup over each
baseline, and the backend's dense attention throughput relative to SDPA (same FLOPs, so SDPA ms / dense ms).

--decode times one decode step (one query per sequence, all B sequences) on a KV cache of S tokens a sequence
filled with random keys and values, for NSA (writing the gated sum alone, not each branch's output: a server's
step) and for dense attention over the whole cache on the same backend.
Columns: median step ms, effective bandwidth (the bytes the step must read / time: per sequence and KV head the
visible compressed tokens, n selected blocks and the window for NSA, every token for dense; K and V), the measured
dense/NSA step-time ratio and the memory model's dense/NSA byte ratio. Not with --backward, --lengths, --batch
or --dtype (the cache stores f32 on cpu, bf16 on a GPU).
Defaults on cpu: ${decodeDefaultsText(CPU_DECODE_DEFAULTS)}.
Defaults on a GPU: ${decodeDefaultsText(GPU_DECODE_DEFAULTS)},
plus S = 1m at B = 1; a (B, S) whose cache would take over 60% of the device's memory is skipped (one line says so).

Examples:
  nsa bench
  nsa bench --backend cuda --lengths 8k,64k --backward --json docs/bench.json
  nsa bench --decode --backend cpu
  nsa bench --decode --backend cuda --batches 1,8,64 --contexts 8k,64k,128k --json docs/decode.json`,
  );
  return cmd.action(async () => {
    const flags = cmd.opts<BenchFlags>();
    checkModeFlags(flags);
    ctx.exitCode = flags.decode ? await runDecodeBench(flags, ctx) : await runBench(flags, ctx);
  });
}

/** Flags of the prefill bench and of --decode do not mix (UsageError: exit 2). */
function checkModeFlags(flags: BenchFlags): void {
  if (flags.decode) {
    const prefillOnly: [string, unknown, string][] = [
      ['--backward', flags.backward, 'decoding has no backward'],
      ['--lengths', flags.lengths, 'give the cached tokens per sequence with --contexts'],
      ['--batch', flags.batch, 'give the batch sizes with --batches'],
      ['--dtype', flags.dtype, 'the cache stores f32 on cpu and bf16 on a GPU'],
      ['--inputs', flags.inputs, 'the cache is filled with random keys and values'],
    ];
    for (const [flag, value, why] of prefillOnly) {
      if (value !== undefined && value !== false) throw new UsageError(`--decode cannot be used with ${flag}: ${why}`);
    }
  } else {
    for (const [flag, value] of [['--batches', flags.batches], ['--contexts', flags.contexts]] as const) {
      if (value !== undefined) throw new UsageError(`${flag} applies to --decode only (the prefill takes --lengths and --batch)`);
    }
  }
}

function decodeDefaultsText(d: DecodeDefaults): string {
  return (
    `--batches ${d.batches.join(',')} --contexts ${d.contexts.map(formatLength).join(',')} --heads ${d.heads} --kv-heads ${d.kvHeads} ` +
    `--head-dim ${d.headDim} --value-dim ${d.valueDim}, --warmup ${d.warmup} --iters ${d.iters}`
  );
}

async function runBench(flags: BenchFlags, ctx: CommandContext): Promise<number> {
  const { io } = ctx;
  const backend = await chooseBackend(flags.backend, io);
  const gpu = isGpuBackend(backend);
  const defaults = gpu ? GPU_DEFAULTS : CPU_DEFAULTS;
  const lengths = flags.lengths ?? defaults.lengths;
  const presets = flags.presets ?? DEFAULT_PRESETS;
  const dtype: InputDType = flags.dtype ?? defaults.dtype;
  const batch = flags.batch ?? defaults.batch;
  const seed = flags.seed ?? DEFAULT_SEED;
  const inputs: InputPattern = flags.inputs ?? 'random';
  const timing: TimingOptions = { warmup: flags.warmup ?? defaults.warmup, iterations: flags.iters ?? defaults.iters, backward: flags.backward ?? false };
  // Validate every config before timing anything, so a bad flag fails at once.
  const configs = new Map(presets.map((p) => [p, NSAConfig.preset(p, { ...configOverrides(flags, undefined), ...headOptions(flags, defaults) })]));
  const first = configs.get(presets[0]!)!;
  const out = (...lines: string[]): void => println(io.stdout, ...lines);

  const torch = await probeTorch(flags, backend);
  if (!torch.available && flags.torch) io.stderr(`nsa bench: torch SDPA skipped: ${torch.reason}\n`);
  out(
    `backend  ${backend.description}`,
    `shapes   B = ${batch}, Hq = ${first.heads}, H = ${first.kvHeads}, Dk = ${first.headDim}, Dv = ${first.valueDim}, ${dtype}; ` +
      `${timing.backward ? 'forward + backward' : 'forward'}; ${inputs} inputs; median of ${timing.iterations} after ${timing.warmup} warm-up`,
    `SDPA     ${torch.available ? `torch ${torch.torch} on ${torch.device}` : 'not timed'}`,
  );

  const runs = lengths.length * presets.length * (timing.warmup + timing.iterations) * (backend.timeDense ? 2 : 1);
  const progress = createProgress(io.progress, runs + (torch.available ? lengths.length : 0));
  const rows: BenchRow[] = [];
  try {
    for (const seqlen of lengths) {
      let sdpa: Timed | undefined;
      if (torch.available) {
        progress.label(`SDPA T=${formatLength(seqlen)}`);
        sdpa = await attempt(() =>
          timeSdpa(torch, { seqlen, batch, ...shapeOf(first), dtype, backward: timing.backward ?? false, warmup: timing.warmup, iters: timing.iterations }),
        );
        progress.advance(1);
      }
      for (const preset of presets) {
        const config = configs.get(preset)!;
        progress.label(`${preset} T=${formatLength(seqlen)}`);
        const problem: BenchmarkProblem = { config, cuSeqlens: offsets(Array.from({ length: batch }, () => seqlen)), dtype, seed, inputs };
        const options = { ...timing, onIteration: () => progress.advance(1) };
        const nsa = await attempt(() => backend.time(problem, options));
        const dense = backend.timeDense === undefined ? undefined : await attempt(() => backend.timeDense!(problem, options));
        rows.push({ preset, seqlen, config, nsa, dense, sdpa });
      }
    }
  } finally {
    progress.stop();
  }

  out('', ...renderTable(TABLE_HEADERS, rows.map(tableRow)));
  if (backend.timeDense === undefined) out(`(the ${backend.name} backend has no dense attention to compare with)`);
  if (flags.json !== undefined) {
    const path = flags.json;
    const json = JSON.stringify(benchReport(ctx.argv, backend, torch, { batch, seed, inputs, dtype, timing, lengths, presets }, rows), null, 2);
    await withFile('write', path, () => writeFileAtomic(path, `${json}\n`));
    out(`wrote ${path}`);
  }
  const errors = rows.flatMap((r) => [r.nsa, r.dense, r.sdpa].filter((t) => t?.error !== undefined).map((t) => `${r.preset} T=${r.seqlen}: ${t!.error}`));
  for (const e of new Set(errors)) io.stderr(`nsa bench: ${e}\n`);
  return errors.length > 0 ? EXIT_FAILED : EXIT_OK;
}

const TABLE_HEADERS = ['preset', 'T', 'NSA ms', 'dense ms', 'NSA vs dense', 'SDPA ms', 'NSA vs SDPA', 'dense/SDPA throughput'];

function tableRow(row: BenchRow): string[] {
  const nsa = row.nsa.timing?.medianMs;
  const dense = row.dense?.timing?.medianMs;
  const sdpa = row.sdpa?.timing?.medianMs;
  const cell = (t: Timed | undefined): string => (t?.error !== undefined ? 'error' : formatMs(t?.timing?.medianMs));
  return [row.preset, formatLength(row.seqlen), cell(row.nsa), cell(row.dense), formatRatio(ratio(dense, nsa)), cell(row.sdpa), formatRatio(ratio(sdpa, nsa)), formatRatio(ratio(sdpa, dense))];
}


async function probeTorch(flags: BenchFlags, backend: Backend): Promise<TorchProbe> {
  if (!flags.torch) return { available: false, reason: '--no-torch' };
  if (!isGpuBackend(backend)) return { available: false, reason: 'the backend is cpu (SDPA is timed only against a GPU backend)' };
  return detectTorch();
}

function shapeOf(config: NSAConfig): { heads: number; kvHeads: number; headDim: number; valueDim: number } {
  return { heads: config.heads, kvHeads: config.kvHeads, headDim: config.headDim, valueDim: config.valueDim };
}
