// Seeded random operator inputs on the host: q, k, v ~ N(0, 1) in the asked dtype, gates ~ U(0, 1) in f32, and
// a learned phi's parameters when the config asks for one. The demo, check and benchmark commands and the tests
// use the same recipe.

import type { NSAConfig } from '../config/nsa-config.js';
import { PHI_PARAM_NAMES } from '../reference/compress.js';
import type { FloatDType } from '../tensor/dtype.js';
import { Tensor, type Shape } from '../tensor/tensor.js';
import type { NsaInputs } from './types.js';

export interface RandomInputsSpec {
  readonly config: NSAConfig;
  readonly cuSeqlens: readonly number[];
  readonly dtype: FloatDType;
  readonly seed: number;
}

/**
 * Packed inputs ([1, N, ...] with cuSeqlens); a single sequence gets no cuSeqlens. A learned phi gets its
 * parameters (randomPhiParams, seeds seed + 10 and seed + 20).
 */
export function randomInputs({ config, cuSeqlens, dtype, seed }: RandomInputsSpec): NsaInputs {
  const N = cuSeqlens[cuSeqlens.length - 1]!;
  const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = config;
  return {
    q: Tensor.randn([1, N, Hq, dk], dtype, seed),
    k: Tensor.randn([1, N, H, dk], dtype, seed + 1),
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
