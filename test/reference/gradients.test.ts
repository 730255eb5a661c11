// Gradients of the reference backward against central finite differences of the reference forward, in float64.
// The loss is sum(dO * o) for a random dO; each input element is nudged by +-EPS.

import { describe, expect, it } from 'vitest';
import type { NSAConfigOptions } from '../../src/config/nsa-config.js';
import { phiParamArrays } from '../../src/reference/compress.js';
import { nsaReferenceBackward } from '../../src/reference/nsa-backward.js';
import { nsaReferenceForward, type NsaReferenceInputs } from '../../src/reference/nsa-forward.js';
import { Rng } from '../../src/tensor/random.js';
import { config, randomArray, randomProblem, type RandomProblemOptions } from '../helpers/random-problem.js';

const EPS = 1e-6;

function loss(cfg: ReturnType<typeof config>, inputs: NsaReferenceInputs, dO: Float64Array): number {
  const { o } = nsaReferenceForward(cfg, inputs);
  let s = 0;
  for (let i = 0; i < o.length; i++) s += o[i]! * dO[i]!;
  return s;
}

/** Checks every element of `param` (an array inside `inputs`) against the analytic gradient. */
function checkGradient(
  cfg: ReturnType<typeof config>,
  inputs: NsaReferenceInputs,
  dO: Float64Array,
  param: Float64Array,
  analytic: Float64Array,
  what: string,
): void {
  expect(analytic.length, `${what}: gradient length`).toBe(param.length);
  let maxAbs = 0;
  for (const g of analytic) maxAbs = Math.max(maxAbs, Math.abs(g));
  expect(maxAbs, `${what}: gradient is not all zero`).toBeGreaterThan(0);
  for (let i = 0; i < param.length; i++) {
    const saved = param[i]!;
    param[i] = saved + EPS;
    const up = loss(cfg, inputs, dO);
    param[i] = saved - EPS;
    const down = loss(cfg, inputs, dO);
    param[i] = saved;
    const numeric = (up - down) / (2 * EPS);
    const err = Math.abs(numeric - analytic[i]!);
    if (err > 1e-6 * Math.max(1, maxAbs)) {
      throw new Error(`${what}[${i}]: finite difference ${numeric}, backward ${analytic[i]} (|diff| ${err.toExponential(2)})`);
    }
  }
}

function checkAll(options: NSAConfigOptions, seqlens: number[], seed: number, extra: RandomProblemOptions = {}): void {
  const cfg = config(options);
  const inputs = randomProblem(cfg, seqlens, seed, extra);
  const fwd = nsaReferenceForward(cfg, inputs);
  const dO = randomArray(new Rng(seed + 7), fwd.o.length);
  const grads = nsaReferenceBackward(cfg, inputs, fwd, dO);
  const f64 = (x: unknown): Float64Array => x as Float64Array;
  checkGradient(cfg, inputs, dO, f64(inputs.q), grads.dq, 'dq');
  checkGradient(cfg, inputs, dO, f64(inputs.g), grads.dg, 'dg');
  const ind = extra.independent ?? {};
  if (!(ind.slc && ind.win && ind.cmp)) {
    checkGradient(cfg, inputs, dO, f64(inputs.k), grads.dk, 'dk');
    checkGradient(cfg, inputs, dO, f64(inputs.v), grads.dv, 'dv');
  }
  if (ind.cmp) {
    checkGradient(cfg, inputs, dO, f64(inputs.kCmp), grads.dkCmp!, 'dkCmp');
    checkGradient(cfg, inputs, dO, f64(inputs.vCmp), grads.dvCmp!, 'dvCmp');
  }
  if (ind.slc) {
    checkGradient(cfg, inputs, dO, f64(inputs.kSlc), grads.dkSlc!, 'dkSlc');
    checkGradient(cfg, inputs, dO, f64(inputs.vSlc), grads.dvSlc!, 'dvSlc');
  }
  if (ind.win) {
    checkGradient(cfg, inputs, dO, f64(inputs.kWin), grads.dkWin!, 'dkWin');
    checkGradient(cfg, inputs, dO, f64(inputs.vWin), grads.dvWin!, 'dvWin');
  }
  for (const [side, phi, dPhi] of [
    ['phiK', inputs.phiK, grads.dPhiK],
    ['phiV', inputs.phiV, grads.dPhiV],
  ] as const) {
    if (phi === undefined) continue;
    const arrays = phiParamArrays(phi);
    for (const name of Object.keys(arrays)) {
      checkGradient(cfg, inputs, dO, f64(arrays[name]), dPhi![name]!, `${side}.${name}`);
    }
  }
}

const small = { compressBlock: 4, compressStride: 2, selectBlock: 8, selectCount: 3, window: 5 };

describe('reference backward against finite differences (float64)', () => {
  it('mean phi, G = 2, every branch active, T = 29', () => {
    checkAll({ ...small, heads: 2, kvHeads: 1, headDim: 4, valueDim: 3 }, [29], 11);
  });
  it('mean phi, G = 1, two KV heads, packed [1, 13, 21]', () => {
    checkAll({ ...small, heads: 2, kvHeads: 2, headDim: 3, valueDim: 5 }, [1, 13, 21], 12);
  });
  it('l = d = l\' and n = 2', () => {
    checkAll({ compressBlock: 4, compressStride: 4, selectBlock: 4, selectCount: 2, window: 3, heads: 3, kvHeads: 1, headDim: 4, valueDim: 4 }, [26], 13);
  });
  it('linear phi: k, v and the phi parameters', () => {
    checkAll({ ...small, phi: 'linear', heads: 2, kvHeads: 1, headDim: 3, valueDim: 2 }, [22], 14);
  });
  it('mlp phi: k, v and the phi parameters', () => {
    checkAll({ ...small, phi: 'mlp', heads: 2, kvHeads: 1, headDim: 3, valueDim: 2 }, [21], 15, { phiHidden: 4 });
  });
  it('independent K/V per branch (compressed K/V given directly)', () => {
    checkAll({ ...small, heads: 2, kvHeads: 1, headDim: 3, valueDim: 4 }, [25], 16, { independent: { cmp: true, slc: true, win: true } });
  });
  it('independent slc K/V only: shared k, v still get cmp and win gradients', () => {
    checkAll({ ...small, heads: 2, kvHeads: 1, headDim: 3, valueDim: 4 }, [25], 17, { independent: { slc: true } });
  });
});
