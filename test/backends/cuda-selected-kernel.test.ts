// Which selected-attention kernel 'auto' runs: the FSA order below G = 16 while its scratch fits the device memory;
// and when the selected branch is dense attention instead (no sequence longer than n l').
import { describe, expect, it } from 'vitest';
import { NSAConfig } from '../../src/index.js';
import { autoSelectedKernel, fsaScratchBytes, GROUP_CENTRIC_MIN_G, selectsEveryVisibleBlock } from '../../src/backends/cuda/nsa/forward-runner.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { Rng } from '../../src/tensor/random.js';

const GB = 1e9;

describe('autoSelectedKernel', () => {
  it('counts the FSA scratch: a bf16 partial output and an fp32 lse per (token, head, slot), an 8-byte index entry per (token, KV head, slot)', () => {
    const config = new NSAConfig({ heads: 32, kvHeads: 8, headDim: 128, valueDim: 128, selectCount: 16 });
    expect(fsaScratchBytes(config, 1)).toBe(16 * (32 * (128 * 2 + 4) + 8 * 8));
    expect(fsaScratchBytes(config, 65536)).toBe(65536 * fsaScratchBytes(config, 1));
    const narrow = new NSAConfig({ heads: 4, kvHeads: 4, headDim: 192, valueDim: 64, selectCount: 3 });
    expect(fsaScratchBytes(narrow, 10)).toBe(10 * 3 * (4 * (64 * 2 + 4) + 4 * 8));
  });

  it('takes the FSA order below G = 16 while the scratch leaves a quarter of the available memory free', () => {
    expect(GROUP_CENTRIC_MIN_G).toBe(16);
    expect(autoSelectedKernel(4, 34 * GB, 78 * GB)).toBe('fsa');
    expect(autoSelectedKernel(1, 58.5 * GB, 78 * GB)).toBe('fsa');
    expect(autoSelectedKernel(4, 58.6 * GB, 78 * GB)).toBe('group');
    expect(autoSelectedKernel(4, 69 * GB, 78 * GB)).toBe('group');
    expect(autoSelectedKernel(16, 1, 78 * GB)).toBe('group');
    expect(autoSelectedKernel(15, 1, 78 * GB)).toBe('fsa');
  });
});

describe('selectsEveryVisibleBlock', () => {
  const config = new NSAConfig({ compressBlock: 32, compressStride: 16, selectBlock: 64, selectCount: 6, window: 96, heads: 4, kvHeads: 2, headDim: 32, valueDim: 32 });

  it('holds while no sequence of the batch is longer than n l\'', () => {
    expect(selectsEveryVisibleBlock(config, [0, 384])).toBe(true);
    expect(selectsEveryVisibleBlock(config, [0, 1, 385, 769])).toBe(true);
    expect(selectsEveryVisibleBlock(config, [0, 385])).toBe(false);
    expect(selectsEveryVisibleBlock(config, [0, 10, 396])).toBe(false);
  });

  it('is where the reference selects blocks 0 .. t / l\' of every token, ascending (what nsa_all_visible_blocks writes)', () => {
    const cuSeqlens = [0, 384, 385, 462];
    expect(selectsEveryVisibleBlock(config, cuSeqlens)).toBe(true);
    const N = cuSeqlens[cuSeqlens.length - 1]!;
    const rng = new Rng(3);
    const normal = (n: number): Float64Array => Float64Array.from({ length: n }, () => rng.normal());
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n, selectBlock } = config;
    const out = nsaReferenceForward(config, {
      q: normal(N * Hq * dk),
      k: normal(N * H * dk),
      v: normal(N * H * dv),
      g: Float64Array.from({ length: N * Hq * 3 }, () => rng.next()),
      cuSeqlens,
    });
    for (let s = 0; s + 1 < cuSeqlens.length; s++) {
      for (let t = 0; t < cuSeqlens[s + 1]! - cuSeqlens[s]!; t++) {
        const want = Array.from({ length: n }, (_, j) => (j <= Math.floor(t / selectBlock) ? j : -1));
        for (let h = 0; h < H; h++) {
          const at = ((cuSeqlens[s]! + t) * H + h) * n;
          expect(Array.from(out.blockIndices.subarray(at, at + n)), `sequence ${s}, t = ${t}, head ${h}`).toEqual(want);
        }
      }
    }
  });
});
