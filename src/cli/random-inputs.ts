// Seeded random inputs for demo and check: the library's recipe (src/nsa/random-inputs.ts, which the backends'
// timers use too: q, k, v ~ N(0, 1) in the asked dtype, gates ~ U(0, 1)), packed as [1, N, ...] with the
// sequence offsets, plus the parameters of a learned phi when the config asks for one.

import { randomInputs } from '../nsa/random-inputs.js';
import type { NsaInputs } from '../nsa/types.js';
import { Tensor } from '../tensor/tensor.js';
import type { ProblemSpec } from './options.js';

/** The operator's inputs for a resolved problem; the same seed gives the same tensors everywhere. */
export function problemInputs(spec: ProblemSpec): NsaInputs {
  const { config, dtype, seed } = spec;
  return randomInputs({ config, cuSeqlens: offsets(spec.seqlens), dtype, seed });
}

/** An upstream gradient for o ([1, N, Hq, Dv], f32), for the backward. */
export function randomDOut(spec: ProblemSpec): Tensor {
  const N = spec.seqlens.reduce((a, b) => a + b, 0);
  return Tensor.randn([1, N, spec.config.heads, spec.config.valueDim], 'f32', spec.seed + 4);
}

/** Sequence offsets [0, L0, L0 + L1, ...]. */
export function offsets(seqlens: readonly number[]): number[] {
  const out = [0];
  for (const n of seqlens) out.push(out[out.length - 1]! + n);
  return out;
}
