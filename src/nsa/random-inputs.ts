// Seeded random operator inputs on the host: q, k, v ~ N(0, 1) in the asked dtype, gates ~ U(0, 1) in f32, and
// a learned phi's parameters when the config asks for one. The demo, check and benchmark commands and the tests
// use the same recipe.

import type { NSAConfig } from '../config/nsa-config.js';
import { PHI_PARAM_NAMES } from '../reference/compress.js';
import type { FloatDType } from '../tensor/dtype.js';
import { Tensor, type Shape } from '../tensor/tensor.js';
import type { NsaInputs } from './types.js';

/**
 * What benchmark inputs look like: `random`, q, k, v ~ N(0, 1) (the peers' benchmarks' inputs: neighbouring queries
 * choose unrelated blocks); `smooth`, the same plus a slowly varying component of each position added to q and k
 * (addSmoothWave), so that neighbouring queries choose alike, a stand-in for a trained model's locality.
 */
export type InputPattern = 'random' | 'smooth';
export const INPUT_PATTERNS: readonly InputPattern[] = ['random', 'smooth'];

/** Amplitude of the smooth inputs' positional component (q and k's noise has unit variance). */
export const SMOOTH_WAVE_AMPLITUDE = 1;

/** The seeds of q's and k's waves, from the inputs' seed (every backend's smooth inputs take these). */
export function smoothWaveSeeds(seed: number): { readonly q: number; readonly k: number } {
  return { q: seed + 100, k: seed + 101 };
}

export interface RandomInputsSpec {
  readonly config: NSAConfig;
  readonly cuSeqlens: readonly number[];
  readonly dtype: FloatDType;
  readonly seed: number;
  /** Default `random`. */
  readonly pattern?: InputPattern | undefined;
}

/**
 * Packed inputs ([1, N, ...] with cuSeqlens); a single sequence gets no cuSeqlens. A learned phi gets its
 * parameters (randomPhiParams, seeds seed + 10 and seed + 20).
 */
export function randomInputs({ config, cuSeqlens, dtype, seed, pattern = 'random' }: RandomInputsSpec): NsaInputs {
  const N = cuSeqlens[cuSeqlens.length - 1]!;
  const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = config;
  const q = Tensor.randn([1, N, Hq, dk], dtype, seed);
  const k = Tensor.randn([1, N, H, dk], dtype, seed + 1);
  if (pattern === 'smooth') {
    const waves = smoothWaveSeeds(seed);
    addSmoothWave(q, waves.q);
    addSmoothWave(k, waves.k);
  }
  return {
    q,
    k,
    v: Tensor.randn([1, N, H, dv], dtype, seed + 2),
    g: Tensor.uniform([1, N, Hq, 3], 'f32', seed + 3),
    cuSeqlens: cuSeqlens.length > 2 ? cuSeqlens : undefined,
    phiK: randomPhiParams(config, dk, dtype, seed + 10),
    phiV: randomPhiParams(config, dv, dtype, seed + 20),
  };
}

/**
 * Parameters of a learned phi for a side of width D (shapes in reference/compress.ts), scaled so the compressed
 * tokens have about unit variance: pe small, weights 1/sqrt(fan-in), biases small. The mlp's hidden width is Dk
 * on both sides (validatePhiParams asks the two sides for the same width).
 * Undefined for phi = mean.
 */
export function randomPhiParams(config: NSAConfig, D: number, dtype: FloatDType, seed: number): Record<string, Tensor> | undefined {
  if (config.phi === 'mean') return undefined;
  const { kvHeads: H, compressBlock: l } = config;
  const M = config.headDim;
  const shapes: Record<string, { shape: Shape; std: number }> = {
    pe: { shape: [H, l, D], std: 0.1 },
    w: { shape: [H, l * D, D], std: 1 / Math.sqrt(l * D) },
    b: { shape: [H, D], std: 0.01 },
    w1: { shape: [H, l * D, M], std: 1 / Math.sqrt(l * D) },
    b1: { shape: [H, M], std: 0.01 },
    w2: { shape: [H, M, D], std: 1 / Math.sqrt(M) },
    b2: { shape: [H, D], std: 0.01 },
  };
  return Object.fromEntries(
    PHI_PARAM_NAMES[config.phi].map((name, i) => {
      const { shape, std } = shapes[name]!;
      return [name, Tensor.randn(shape, dtype, seed + i, std)];
    }),
  );
}

/**
 * Adds SMOOTH_WAVE_AMPLITUDE * sin(2 pi (t / P_d + u_d)) to element (t, ., d) of a [1, N, rows, D] tensor, t the
 * packed token: periods P_d = 256 * 2^(8 d / D) tokens (256 to 65536), phases u_d uniform from the seed, the same for
 * every row (head). q and k take it with different seeds, so q_t . k_j gains sum_d (cos(2 pi (t - j) / P_d + a_d) -
 * cos(2 pi (t + j) / P_d + b_d)) / 2 with random offsets a_d, b_d: scores vary slowly with both positions, so
 * neighbouring queries rank the blocks alike and adjacent blocks score alike, without favouring the nearest ones
 * (fla preset, G = 16, T = 8k: 2, 4 and 8 consecutive queries have 11.2, 8.0 and 6.2 of their 16 blocks in common;
 * 4.5, 3.0 and 3.0, the forced blocks, with random inputs). The CUDA backend's device inputs add the same wave
 * (kernels/random_fill.cu, nsa_add_wave), its phases from its own hash of the seed.
 */
export function addSmoothWave(x: Tensor, seed: number): void {
  const [, N, rows, D] = x.shape as [number, number, number, number];
  const phases = Tensor.uniform([D], 'f64', seed).data as Float64Array;
  const values = x.toFloat64();
  for (let t = 0; t < N; t++) {
    for (let d = 0; d < D; d++) {
      const period = 256 * 2 ** ((8 * d) / D);
      const wave = SMOOTH_WAVE_AMPLITUDE * Math.sin(2 * Math.PI * ((t % period) / period + phases[d]!));
      for (let r = 0; r < rows; r++) values[(t * rows + r) * D + d]! += wave;
    }
  }
  x.data.set(Tensor.fromValues(values, x.shape, x.dtype).data as never);
}
