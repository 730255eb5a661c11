// What `nsa bench` measures and how it is reported: the rows of timings, the ratios of the table, and the JSON
// document (every number, the device and the exact command line) that docs quote.

import type { Backend } from '../backends/index.js';
import type { TimingOptions, TimingResult } from '../backends/backend.js';
import { PRESETS, type NSAConfig, type PresetName } from '../config/nsa-config.js';
import { NsaError } from '../errors.js';
import type { InputPattern } from '../nsa/random-inputs.js';
import { errorMessage, exitCodeFor } from './exit.js';
import { EXIT_USAGE } from './io.js';
import type { InputDType } from './options.js';
import type { SdpaTiming, TorchProbe } from './torch-sdpa.js';

/** One timed run, or why it failed. */
export interface Timed {
  readonly timing?: TimingResult | SdpaTiming;
  readonly error?: string;
}

export interface BenchRow {
  readonly preset: PresetName;
  readonly seqlen: number;
  readonly config: NSAConfig;
  readonly nsa: Timed;
  /** The backend's own dense causal attention, when it has one. */
  readonly dense: Timed | undefined;
  /** torch SDPA, when it ran. */
  readonly sdpa: Timed | undefined;
}

export interface BenchSettings {
  readonly batch: number;
  readonly seed: number;
  readonly inputs: InputPattern;
  readonly dtype: InputDType;
  readonly timing: TimingOptions;
  readonly lengths: readonly number[];
  readonly presets: readonly PresetName[];
}

/** a / b, undefined when either is missing. */
export function ratio(a: number | undefined, b: number | undefined): number | undefined {
  return a === undefined || b === undefined || b <= 0 ? undefined : a / b;
}

/** Dense causal attention FLOPs: 2 * B * Hq * T(T+1)/2 * (Dk + Dv) forward; the backward adds 2.5x. */
export function denseFlops(config: NSAConfig, batch: number, seqlen: number, backward: boolean): number {
  const forward = batch * config.heads * seqlen * (seqlen + 1) * (config.headDim + config.valueDim);
  return backward ? forward * 3.5 : forward;
}

/** What every JSON report of a benchmark opens with: the exact command line, when, where and on what it ran. */
export function reportHeader(argv: readonly string[], backend: Backend): Record<string, string> {
  return {
    command: ['nsa', ...argv].map(shellQuote).join(' '),
    date: new Date().toISOString(),
    node: process.version,
    platform: `${process.platform} ${process.arch}`,
    backend: backend.name,
    device: backend.description,
  };
}

/** The JSON report: settings, device, torch, and per row every timing with its FLOP rates and ratios. */
export function benchReport(argv: readonly string[], backend: Backend, torch: TorchProbe, s: BenchSettings, rows: readonly BenchRow[]): unknown {
  const backward = s.timing.backward ?? false;
  const tflops = (flops: number, ms: number | undefined): number | null => (ms === undefined ? null : flops / (ms * 1e-3) / 1e12);
  return {
    ...reportHeader(argv, backend),
    torch: torch.available ? { available: true, version: torch.torch, device: torch.device } : { available: false, reason: torch.reason },
    settings: {
      batch: s.batch,
      dtype: s.dtype,
      seed: s.seed,
      inputs: s.inputs,
      backward,
      warmup: s.timing.warmup,
      iterations: s.timing.iterations,
      lengths: s.lengths,
      presets: s.presets,
    },
    results: rows.map((row) => {
      const flops = denseFlops(row.config, s.batch, row.seqlen, backward);
      const nsa = row.nsa.timing?.medianMs;
      const dense = row.dense?.timing?.medianMs;
      const sdpa = row.sdpa?.timing?.medianMs;
      return {
        preset: row.preset,
        presetValues: PRESETS[row.preset],
        config: { ...row.config.toOptions(), scale: row.config.scale },
        seqlen: row.seqlen,
        nsa: flatten(row.nsa),
        dense: row.dense === undefined ? null : flatten(row.dense),
        sdpa: row.sdpa === undefined ? null : flatten(row.sdpa),
        denseFlops: flops,
        denseTflops: tflops(flops, dense),
        sdpaTflops: tflops(flops, sdpa),
        nsaSpeedupOverDense: ratio(dense, nsa) ?? null,
        nsaSpeedupOverSdpa: ratio(sdpa, nsa) ?? null,
        denseThroughputVsSdpa: ratio(sdpa, dense) ?? null,
      };
    }),
  };
}

/** A run's timing, or its error message when the run failed for a reason other than bad input. */
export async function attempt(run: () => Promise<TimingResult | SdpaTiming>): Promise<Timed> {
  try {
    return { timing: await run() };
  } catch (e) {
    if (e instanceof NsaError && exitCodeFor(e) === EXIT_USAGE) throw e;
    return { error: errorMessage(e) };
  }
}

/** A timing's numbers, or its error, as one JSON object. */
export function flatten(t: Timed): object {
  return t.error !== undefined ? { error: t.error } : { ...t.timing };
}

/** An argument as a POSIX shell would need it quoted. */
export function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}
