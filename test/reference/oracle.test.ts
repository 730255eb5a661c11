import { describe, expect, it } from 'vitest';
import { denseOracleForward } from '../../src/reference/dense-oracle.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { Rng } from '../../src/tensor/random.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { config, randomProblem } from '../helpers/random-problem.js';
import type { NSAConfigOptions } from '../../src/config/nsa-config.js';

const TOL = { rtol: 1e-10 };

function compareWithOracle(options: NSAConfigOptions, seqlens: number[], seed: number, extra = {}): void {
  const cfg = config(options);
  const inputs = randomProblem(cfg, seqlens, seed, extra);
  const ref = nsaReferenceForward(cfg, inputs);
  const oracle = denseOracleForward(cfg, inputs);
  expect(Array.from(ref.blockIndices)).toEqual(Array.from(oracle.blockIndices));
  for (const name of ['o', 'oCmp', 'oSlc', 'oWin', 'lseCmp', 'lseSlc', 'lseWin'] as const) {
    expectRelativeRms(ref[name], oracle[name], name, TOL);
  }
}

describe('reference forward against the dense oracle (float64)', () => {
  it('paper preset shape, G = 4, T not a multiple of any block', () => {
    compareWithOracle({ compressBlock: 8, compressStride: 4, selectBlock: 16, selectCount: 4, window: 12, heads: 4, kvHeads: 1, headDim: 8, valueDim: 8 }, [77], 1);
  });
  it('l = d = l\' (fla preset form), G = 1, dk != dv', () => {
    compareWithOracle({ compressBlock: 8, compressStride: 8, selectBlock: 8, selectCount: 3, window: 5, heads: 2, kvHeads: 2, headDim: 6, valueDim: 10 }, [50], 2);
  });
  it('packed variable-length batch with one-token and shorter-than-l sequences', () => {
    compareWithOracle({ compressBlock: 4, compressStride: 2, selectBlock: 8, selectCount: 3, window: 6, heads: 6, kvHeads: 2, headDim: 4, valueDim: 3 }, [1, 3, 40, 17, 2], 3);
  });
  it('n = 1 and n = 2 (forced blocks truncated)', () => {
    compareWithOracle({ compressBlock: 4, compressStride: 4, selectBlock: 4, selectCount: 1, window: 3, heads: 2, kvHeads: 1, headDim: 4, valueDim: 4 }, [30], 4);
    compareWithOracle({ compressBlock: 4, compressStride: 2, selectBlock: 8, selectCount: 2, window: 3, heads: 2, kvHeads: 1, headDim: 4, valueDim: 4 }, [45], 5);
  });
  it('linear and mlp phi, and independent K/V per branch', () => {
    const base = { compressBlock: 4, compressStride: 2, selectBlock: 8, selectCount: 3, window: 7, heads: 4, kvHeads: 2, headDim: 5, valueDim: 3 };
    compareWithOracle({ ...base, phi: 'linear' }, [33, 9], 6);
    compareWithOracle({ ...base, phi: 'mlp' }, [41], 7);
    compareWithOracle(base, [38, 20], 8, { independent: { cmp: true, slc: true, win: true } });
    compareWithOracle(base, [38], 9, { independent: { slc: true } });
  });
  it('random configs: G in 1..16, odd T, dk != dv, packed batches', () => {
    const rng = new Rng(2026);
    for (let trial = 0; trial < 25; trial++) {
      const d = rng.int(1, 4);
      const l = d * rng.int(1, 3);
      const ls = l * rng.int(1, 2) + (rng.next() < 0.3 ? d : 0);
      const kvHeads = rng.int(1, 2);
      const G = rng.int(1, 16);
      const options = {
        compressBlock: l,
        compressStride: d,
        selectBlock: ls,
        selectCount: rng.int(1, 6),
        window: rng.int(1, 20),
        heads: G * kvHeads,
        kvHeads,
        headDim: rng.int(1, 9),
        valueDim: rng.int(1, 9),
        phi: (['mean', 'linear', 'mlp'] as const)[rng.int(0, 2)]!,
      };
      const seqlens = Array.from({ length: rng.int(1, 3) }, () => rng.int(1, 70));
      compareWithOracle(options, seqlens, 100 + trial, { std: 0.5 + 2 * rng.next() });
    }
  });
});
