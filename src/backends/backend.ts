// The Backend interface every implementation (cpu, cuda, webgpu) provides. The operator in nsa/ validates
// inputs once and hands backends an NsaRequest they can trust; backends return host tensors.

import type { InputPattern } from '../nsa/random-inputs.js';
import type { NSAConfig } from '../config/nsa-config.js';
import type { KvCache, KvCacheOptions } from '../nsa/decode/types.js';
import type { NsaRequest } from '../nsa/validate.js';
import type { NsaGradients, NsaOutputs } from '../nsa/types.js';
import type { FloatDType } from '../tensor/dtype.js';
import type { Tensor } from '../tensor/tensor.js';

export type BackendName = 'cpu' | 'cuda' | 'webgpu';

/**
 * What a forward keeps for its backward (per-branch lse and outputs, the selected blocks, the compressed K/V),
 * on the backend that made it. `bytes` says how much memory it holds until released.
 */
export interface SavedForBackward {
  readonly backend: BackendName;
  readonly bytes: number;
  release(): void;
}

export interface BackendForwardResult {
  readonly outputs: NsaOutputs;
  readonly saved: SavedForBackward;
}

export interface TimingOptions {
  /** Untimed runs first (compilation, caches, clocks). */
  readonly warmup: number;
  /** Timed runs; the median is reported. */
  readonly iterations: number;
  /** Time forward + backward instead of forward alone. */
  readonly backward?: boolean;
  /** Called after each run (warm-up included), for progress bars. */
  readonly onIteration?: (done: number, total: number) => void;
}

export interface TimingResult {
  readonly medianMs: number;
  readonly samplesMs: readonly number[];
  /** How the time was taken (for example "CUDA events" or "wall clock"). */
  readonly clock: string;
}

/** Random inputs of a given layout for benchmarks; each backend makes them where it computes. */
export interface BenchmarkProblem {
  readonly config: NSAConfig;
  /** Sequence offsets of the packed tokens (B equal sequences: 0, T, 2T, ...). */
  readonly cuSeqlens: readonly number[];
  /** Dtype of q, k, v (gates are f32). */
  readonly dtype: FloatDType;
  readonly seed: number;
  /** Default `random` (src/nsa/random-inputs.ts). */
  readonly inputs?: InputPattern | undefined;
}

export interface Backend {
  readonly name: BackendName;
  /** One line for humans: the device and how the backend runs on it. */
  readonly description: string;
  forward(request: NsaRequest, outputDType: FloatDType): Promise<BackendForwardResult>;
  backward(request: NsaRequest, saved: SavedForBackward, dOut: Tensor, outputDType: FloatDType): Promise<NsaGradients>;
  /** A KV cache for decoding on this backend, if it has one. */
  createKvCache?(config: NSAConfig, options: KvCacheOptions): KvCache;
  /** Times the operator on random inputs made (and kept) where the backend computes. */
  time(problem: BenchmarkProblem, options: TimingOptions): Promise<TimingResult>;
  /** Times this backend's dense causal attention on inputs of the same shapes (the baseline), if it has one. */
  timeDense?(problem: BenchmarkProblem, options: TimingOptions): Promise<TimingResult>;
  dispose(): void;
}
