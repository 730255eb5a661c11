// The NSA backward in plain TypeScript with double accumulation. The top-n choice is not differentiated (the
// spec): the selected blocks of the forward are reused, and gradients flow through the three attentions, the
// gates, and phi (into k, v and phi's parameters, or into compressed K/V given directly).

import type { NSAConfig } from '../config/nsa-config.js';
import { attendBackward } from './attention.js';
import { compressBackward, type PhiParamGrads } from './compress.js';
import {
  BranchKeys,
  branchOperands,
  forEachRow,
  prepareNsaProblem,
  type NsaProblem,
  type NsaReferenceInputs,
  type NsaReferenceOutputs,
} from './nsa-forward.js';

export interface NsaReferenceGradients {
  /** [N, Hq, Dk] */
  readonly dq: Float64Array;
  /** [N, H, Dk] and [N, H, Dv]: the shared k, v (through every branch that uses them, phi included). */
  readonly dk: Float64Array;
  readonly dv: Float64Array;
  /** [N, Hq, 3] */
  readonly dg: Float64Array;
  /** Present when the matching input was given. */
  readonly dkCmp?: Float64Array;
  readonly dvCmp?: Float64Array;
  readonly dkSlc?: Float64Array;
  readonly dvSlc?: Float64Array;
  readonly dkWin?: Float64Array;
  readonly dvWin?: Float64Array;
  /** Gradients of a learned phi's parameters, by parameter name. */
  readonly dPhiK?: PhiParamGrads;
  readonly dPhiV?: PhiParamGrads;
}

/** Per-branch accumulators of the row pass; compressed K/V gradients are reduced through phi afterwards. */
export interface BackwardAccumulators {
  readonly dq: Float64Array;
  readonly dg: Float64Array;
  readonly dkc: Float64Array;
  readonly dvc: Float64Array;
  readonly dkSlc: Float64Array;
  readonly dvSlc: Float64Array;
  readonly dkWin: Float64Array;
  readonly dvWin: Float64Array;
}

export function allocateAccumulators(problem: NsaProblem): BackwardAccumulators {
  const { totalTokens: N, totalCompressed: Nc, heads: Hq, kvHeads: H, dk, dv } = problem.layout;
  return {
    dq: new Float64Array(N * Hq * dk),
    dg: new Float64Array(N * Hq * 3),
    dkc: new Float64Array(Nc * H * dk),
    dvc: new Float64Array(Nc * H * dv),
    dkSlc: new Float64Array(N * H * dk),
    dvSlc: new Float64Array(N * H * dv),
    dkWin: new Float64Array(N * H * dk),
    dvWin: new Float64Array(N * H * dv),
  };
}

export function nsaReferenceBackward(
  config: NSAConfig,
  inputs: NsaReferenceInputs,
  forward: NsaReferenceOutputs,
  dOut: Float64Array | Float32Array,
): NsaReferenceGradients {
  const problem = prepareNsaProblem(config, inputs);
  const acc = allocateAccumulators(problem);
  backwardRows(problem, forward, dOut, 0, problem.layout.totalTokens, acc);
  return finishBackward(problem, acc);
}

/** Accumulates the gradients of packed rows [rowStart, rowEnd) into `acc`. */
export function backwardRows(
  problem: NsaProblem,
  fwd: NsaReferenceOutputs,
  dOut: Float64Array | Float32Array,
  rowStart: number,
  rowEnd: number,
  acc: BackwardAccumulators,
): void {
  const { config, layout, inputs } = problem;
  const { heads: Hq, kvHeads: H, group: G, dk, dv } = layout;
  const ops = branchOperands(problem);
  const keys = new BranchKeys(config);
  const branches = [
    { o: fwd.oCmp, lse: fwd.lseCmp, ranges: keys.cmp, ops: ops.cmp, grads: { dq: acc.dq, dKeys: acc.dkc, dValues: acc.dvc } },
    { o: fwd.oSlc, lse: fwd.lseSlc, ranges: keys.slc, ops: ops.slc, grads: { dq: acc.dq, dKeys: acc.dkSlc, dValues: acc.dvSlc } },
    { o: fwd.oWin, lse: fwd.lseWin, ranges: keys.win, ops: ops.win, grads: { dq: acc.dq, dKeys: acc.dkWin, dValues: acc.dvWin } },
  ] as const;
  const gated = new Float64Array(dv);
  forEachRow(layout, rowStart, rowEnd, (seq, row, t) => {
    for (let h = 0; h < H; h++) {
      keys.fillCompressed(seq, t);
      keys.fillSelected(seq, t, fwd.blockIndices, (row * H + h) * config.selectCount);
      keys.fillWindow(seq, t);
      for (let gi = 0; gi < G; gi++) {
        const hq = h * G + gi;
        const qo = (row * Hq + hq) * dk;
        const oo = (row * Hq + hq) * dv;
        const go = (row * Hq + hq) * 3;
        for (let b = 0; b < 3; b++) {
          const br = branches[b]!;
          const gate = inputs.g[go + b]!;
          let dGate = 0;
          let delta = 0;
          for (let c = 0; c < dv; c++) {
            const d = dOut[oo + c]!;
            const o = br.o[oo + c]!;
            dGate += d * o;
            gated[c] = gate * d;
            delta += gate * d * o;
          }
          acc.dg[go + b]! += dGate;
          attendBackward(br.ops, inputs.q, qo, h, br.ranges, br.lse[row * Hq + hq]!, gated, 0, delta, br.grads, qo);
        }
      }
    }
  });
}

/** Reduces the compressed K/V gradients through phi (or hands them out when K/V were given compressed). */
export function finishBackward(problem: NsaProblem, acc: BackwardAccumulators): NsaReferenceGradients {
  const { config, layout, inputs } = problem;
  const dk = inputs.kSlc === undefined ? acc.dkSlc : new Float64Array(acc.dkSlc.length);
  const dv = inputs.vSlc === undefined ? acc.dvSlc : new Float64Array(acc.dvSlc.length);
  if (inputs.kWin === undefined) addInto(dk, acc.dkWin);
  if (inputs.vWin === undefined) addInto(dv, acc.dvWin);
  const grads: { -readonly [K in keyof NsaReferenceGradients]: NsaReferenceGradients[K] } = {
    dq: acc.dq,
    dk,
    dv,
    dg: acc.dg,
  };
  if (inputs.kCmp !== undefined) grads.dkCmp = acc.dkc;
  else {
    const p = compressBackward(config, layout, inputs.k, config.headDim, inputs.phiK, acc.dkc, dk);
    if (inputs.phiK !== undefined) grads.dPhiK = p;
  }
  if (inputs.vCmp !== undefined) grads.dvCmp = acc.dvc;
  else {
    const p = compressBackward(config, layout, inputs.v, config.valueDim, inputs.phiV, acc.dvc, dv);
    if (inputs.phiV !== undefined) grads.dPhiV = p;
  }
  if (inputs.kSlc !== undefined) grads.dkSlc = acc.dkSlc;
  if (inputs.vSlc !== undefined) grads.dvSlc = acc.dvSlc;
  if (inputs.kWin !== undefined) grads.dkWin = acc.dkWin;
  if (inputs.vWin !== undefined) grads.dvWin = acc.dvWin;
  return grads;
}

function addInto(target: Float64Array, source: Float64Array): void {
  for (let i = 0; i < target.length; i++) target[i]! += source[i]!;
}
