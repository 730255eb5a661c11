// The float64 reference on the exact values a backend received (half inputs widen exactly to f32): all rows
// for `nsa check`, or a few rows for `nsa demo`, which stays cheap at long sequence lengths.

import type { PhiParams } from '../reference/compress.js';
import type { NsaReferenceGradients } from '../reference/nsa-backward.js';
import {
  allocateOutputs,
  forwardRows,
  prepareNsaProblem,
  type NsaProblem,
  type NsaReferenceInputs,
  type NsaReferenceOutputs,
} from '../reference/nsa-forward.js';
import type { FloatArray } from '../reference/layout.js';
import type { Tensor } from '../tensor/tensor.js';
import type { NsaRequest } from '../nsa/validate.js';
import { byInterchangeName } from '../nsa/interchange.js';
import { phiParamsOf } from '../nsa/phi-params.js';

/** The request's tensors as the reference reads them (no rounding: every input dtype widens exactly). */
export function referenceInputsOf(request: NsaRequest): NsaReferenceInputs {
  const { inputs, config } = request;
  const opt = (t: Tensor | undefined): FloatArray | undefined => (t === undefined ? undefined : exactFloats(t));
  const phi = (params: Readonly<Record<string, Tensor>> | undefined): PhiParams | undefined =>
    phiParamsOf(config, params, request.phiHidden, exactFloats);
  return {
    q: exactFloats(inputs.q),
    k: exactFloats(inputs.k),
    v: exactFloats(inputs.v),
    g: exactFloats(inputs.g),
    cuSeqlens: request.cuSeqlens,
    kCmp: opt(inputs.kCmp),
    vCmp: opt(inputs.vCmp),
    kSlc: opt(inputs.kSlc),
    vSlc: opt(inputs.vSlc),
    kWin: opt(inputs.kWin),
    vWin: opt(inputs.vWin),
    phiK: phi(inputs.phiK),
    phiV: phi(inputs.phiV),
  };
}

/** Outputs of some packed rows only, compacted: row i of each array is rows[i]. */
export interface ReferenceRows {
  readonly rows: readonly number[];
  /** [rows, Hq, Dv] */
  readonly o: Float64Array;
  /** [rows, H, n] */
  readonly blockIndices: Int32Array;
}

/**
 * The reference forward for the given packed rows, with its own top-n or, when `fixedBlockIndices` ([N, H, n])
 * is given, with that selection (to check a backend's attention apart from near-tie flips in its choice). The
 * full-size output arrays forwardRows writes into are zero-filled allocations of which only the checked rows
 * are touched, so the OS maps just those pages.
 */
export function referenceRows(request: NsaRequest, rows: readonly number[], fixedBlockIndices?: Int32Array): ReferenceRows {
  const problem: NsaProblem = prepareNsaProblem(request.config, referenceInputsOf(request), fixedBlockIndices);
  const out = allocateOutputs(problem.layout, request.config.selectCount);
  const { heads: Hq, kvHeads: H, dv } = problem.layout;
  const n = request.config.selectCount;
  const o = new Float64Array(rows.length * Hq * dv);
  const blockIndices = new Int32Array(rows.length * H * n);
  rows.forEach((row, i) => {
    forwardRows(problem, row, row + 1, out);
    o.set(out.o.subarray(row * Hq * dv, (row + 1) * Hq * dv), i * Hq * dv);
    blockIndices.set(out.blockIndices.subarray(row * H * n, (row + 1) * H * n), i * H * n);
  });
  return { rows, o, blockIndices };
}

/** The reference's outputs and gradients under the interchange names tensorsFromOutputs uses. */
export function referenceTensorsByName(out: NsaReferenceOutputs, grads: NsaReferenceGradients | undefined): Map<string, Float64Array> {
  return byInterchangeName<Float64Array>(out, grads);
}

/** f32/f64 storage as is; half storage widened to f32 (exact). */
export function exactFloats(t: Tensor): FloatArray {
  return t.dtype === 'f64' ? (t.data as Float64Array) : t.toFloat32();
}
