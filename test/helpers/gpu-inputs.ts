// Inputs of the GPU tests: the half-precision values the GPU sees as the reference's doubles (a learned phi's
// parameters included), and independent K/V per branch (with compressed K/V given directly).

import type { NSAConfig } from '../../src/config/nsa-config.js';
import type { NsaReferenceInputs } from '../../src/reference/nsa-forward.js';
import { phiParamsOf } from '../../src/nsa/phi-params.js';
import type { NsaInputs } from '../../src/nsa/types.js';
import { Tensor } from '../../src/tensor/tensor.js';

/** A learned phi's parameter tensors (as the GPU takes them) as the reference's doubles; undefined for phi = mean. */
export function referencePhi(config: NSAConfig, phiK: NsaInputs['phiK'], phiV: NsaInputs['phiV']): Pick<NsaReferenceInputs, 'phiK' | 'phiV'> {
  const hidden = phiK?.['w1']?.shape[2] ?? 0;
  const phi = (params: NsaInputs['phiK']) => phiParamsOf(config, params, hidden, (t) => t.toFloat64());
  return { phiK: phi(phiK), phiV: phi(phiV) };
}

export function referenceInputs(inputs: NsaInputs, cuSeqlens: readonly number[], config: NSAConfig): NsaReferenceInputs {
  const f64 = (t: Tensor | undefined): Float64Array | undefined => t?.toFloat64();
  return {
    ...referencePhi(config, inputs.phiK, inputs.phiV),
    q: inputs.q.toFloat64(),
    k: inputs.k.toFloat64(),
    v: inputs.v.toFloat64(),
    g: inputs.g.toFloat64(),
    cuSeqlens,
    kCmp: f64(inputs.kCmp),
    vCmp: f64(inputs.vCmp),
    kSlc: f64(inputs.kSlc),
    vSlc: f64(inputs.vSlc),
    kWin: f64(inputs.kWin),
    vWin: f64(inputs.vWin),
  };
}

export function withIndependentKv(inputs: NsaInputs, config: NSAConfig, cuSeqlens: readonly number[], seed: number): NsaInputs {
  const N = cuSeqlens[cuSeqlens.length - 1]!;
  let tc = 0;
  for (let s = 0; s + 1 < cuSeqlens.length; s++) tc += config.compressedLength(cuSeqlens[s + 1]! - cuSeqlens[s]!);
  const { kvHeads: H, headDim: dk, valueDim: dv } = config;
  return {
    ...inputs,
    phiK: undefined,
    phiV: undefined,
    kCmp: Tensor.randn([1, tc, H, dk], 'bf16', seed + 10),
    vCmp: Tensor.randn([1, tc, H, dv], 'bf16', seed + 11),
    kSlc: Tensor.randn([1, N, H, dk], 'bf16', seed + 12),
    vSlc: Tensor.randn([1, N, H, dv], 'bf16', seed + 13),
    kWin: Tensor.randn([1, N, H, dk], 'bf16', seed + 14),
    vWin: Tensor.randn([1, N, H, dv], 'bf16', seed + 15),
  };
}
