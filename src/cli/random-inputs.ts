// Seeded random inputs for demo and check: the library's recipe (src/nsa/random-inputs.ts, which the backends'
// timers use too: q, k, v ~ N(0, 1) in the asked dtype, gates ~ U(0, 1)), packed as [1, N, ...] with the
// sequence offsets, plus the parameters of a learned phi when the config asks for one.

import type { NSAConfig } from '../config/nsa-config.js';
import { randomInputs } from '../nsa/random-inputs.js';
import type { NsaInputs } from '../nsa/types.js';
import { PHI_PARAM_NAMES } from '../reference/compress.js';
import { Tensor, type Shape } from '../tensor/tensor.js';
import type { InputDType, ProblemSpec } from './options.js';

/** The operator's inputs for a resolved problem; the same seed gives the same tensors everywhere. */
export function problemInputs(spec: ProblemSpec): NsaInputs {
  const { config, dtype, seed } = spec;
  return {
    ...randomInputs({ config, cuSeqlens: offsets(spec.seqlens), dtype, seed }),
    phiK: randomPhiParams(config, config.headDim, dtype, seed + 10),
    phiV: randomPhiParams(config, config.valueDim, dtype, seed + 20),
  };
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

// ---------------------------------------------------------------------------------------------------------------
// Implementation

/**
 * Parameters of a learned phi for a side of width D (shapes in reference/compress.ts), scaled so the compressed
 * tokens have about unit variance: pe small, weights 1/sqrt(fan-in), biases small. The mlp's hidden width is D.
 */
export function randomPhiParams(config: NSAConfig, D: number, dtype: InputDType, seed: number): Record<string, Tensor> | undefined {
  if (config.phi === 'mean') return undefined;
  const { kvHeads: H, compressBlock: l } = config;
  const M = D;
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
