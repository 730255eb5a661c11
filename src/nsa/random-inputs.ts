// Seeded random operator inputs on the host: q, k, v ~ N(0, 1) in the asked dtype, gates ~ U(0, 1) in f32.
// The demo, check and benchmark commands and the tests use the same recipe.

import type { NSAConfig } from '../config/nsa-config.js';
import type { FloatDType } from '../tensor/dtype.js';
import { Tensor } from '../tensor/tensor.js';
import type { NsaInputs } from './types.js';

export interface RandomInputsSpec {
  readonly config: NSAConfig;
  readonly cuSeqlens: readonly number[];
  readonly dtype: FloatDType;
  readonly seed: number;
}

/** Packed inputs ([1, N, ...] with cuSeqlens); a single sequence gets no cuSeqlens. */
export function randomInputs({ config, cuSeqlens, dtype, seed }: RandomInputsSpec): NsaInputs {
  const N = cuSeqlens[cuSeqlens.length - 1]!;
  const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = config;
  return {
    q: Tensor.randn([1, N, Hq, dk], dtype, seed),
    k: Tensor.randn([1, N, H, dk], dtype, seed + 1),
    v: Tensor.randn([1, N, H, dv], dtype, seed + 2),
    g: Tensor.uniform([1, N, Hq, 3], 'f32', seed + 3),
    cuSeqlens: cuSeqlens.length > 2 ? cuSeqlens : undefined,
  };
}
