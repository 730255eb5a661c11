// The cuda backend's block selection in its forms of top-n (rounds of offers merged, or inserted one at a time) and,
// where compressed keys overlap blocks, of the ring of open scores (positions owned by the warps that summed them or
// dealt in turn, lists in registers or shared memory): each chooses the same blocks, bit for bit, and the choice is
// checked by the float64 reference's scores of the chosen blocks (near ties may flip in half precision; with all
// ties the tie rule alone decides, exactly). The direct offers of l = d = l' are nsa-select-direct.test.ts's. Skips,
// saying why, where no GPU is present.

import { expect, it } from 'vitest';
import { NSAConfig } from '../../src/config/nsa-config.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import { referenceInputs } from '../helpers/gpu-inputs.js';
import { describeWithBackends, base, type Case, nextTurn } from '../helpers/gpu-forward.js';
import { expectSameBlocks, selectedBlocks } from '../helpers/gpu-selection.js';

describeWithBackends('cuda NSA block selection', (pool) => {
  // The block selection's top-n: rounds of offered blocks sorted and merged into each position's list
  // (NSA_SELECT_MERGE_MIN=1), or inserted one at a time (33), or the default mix, over sequences with 55-160
  // candidate blocks a position (a non-power-of-two n included): the same keys, so the same blocks, which the
  // reference's scores confirm.
  it('block selection: top-n by sort-and-merge and by one-at-a-time inserts choose the same blocks (NSA_SELECT_MERGE_MIN=1|33)', async () => {
    const long: Case[] = [
      { name: 'fla form, G = 16, n = 16, T = 3500', options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 16, window: 128, heads: 16, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [3500], dtype: 'bf16', kernels: ['group'] },
      { name: "l' = 32, n = 8, G = 8, T = 5000", options: { compressBlock: 16, compressStride: 8, selectBlock: 32, selectCount: 8, window: 40, heads: 8, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [5000], dtype: 'bf16', kernels: ['group'] },
      { name: 'n = 5, G = 2, f16, packed [3000, 1, 2047]', options: { ...base, selectBlock: 32, selectCount: 5, heads: 4, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [3000, 1, 2047], dtype: 'f16', kernels: ['group'] },
    ];
    await expectSameBlocks(pool, long, 4242, { NSA_SELECT_MERGE_MIN: '1' }, [
      ['inserts against merges', { NSA_SELECT_MERGE_MIN: '33' }],
      ['the default against merges', {}],
    ]);
    // Ties everywhere: with zero queries every visible compressed key has the same probability, and with fla's form
    // (one compressed key a block, so each block's score is one sum, in the same order for every block) the blocks
    // score the same bits on the GPU and in the reference: the tie rule (the lower block first) alone decides, and
    // merges, inserts (ties within a round included) and the default must pick exactly the reference's blocks. (Where
    // compressed keys overlap blocks, a block whose keys straddle two score tiles sums in another order, so its
    // score may differ in the last bit: those near-ties may flip, which the checks above allow.)
    const ties: Case[] = [
      long[0]!,
      { name: 'fla form, G = 4, n = 16, T = 2500', options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 16, window: 128, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [2500], dtype: 'bf16', kernels: ['group'] },
    ];
    for (const [i, c] of ties.entries()) {
      const config = new NSAConfig(c.options);
      const cuSeqlens = [0, c.seqlens[0]!];
      const inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: 99 + i });
      (inputs.q.data as Uint16Array).fill(0); // bf16 zeros
      const expected = Array.from(nsaReferenceForward(config, referenceInputs(inputs, cuSeqlens, config)).blockIndices);
      for (const env of [{ NSA_SELECT_MERGE_MIN: '1' }, { NSA_SELECT_MERGE_MIN: '33' }, { NSA_SELECT_DIRECT: '0' }, { NSA_SELECT_REG_LISTS: '0' }, { NSA_SELECT_WARP_LOCAL: '0' }, {}]) {
        const got = await selectedBlocks(pool, inputs, config, env);
        expect(got, `${c.name}, zero queries, ${JSON.stringify(env)}: the tie rule's blocks`).toEqual(expected);
      }
      await nextTurn();
    }
  });

  // Compressed keys that overlap blocks (the paper's l = 32, d = 16 and others): the ring's fold and offers by the
  // warp that summed each position's heads, its list in registers (G = 4 to 16) or shared memory, against the
  // positions dealt to the warps in turn (NSA_SELECT_WARP_LOCAL=0): the same sums in the same order, so the same
  // blocks, bit for bit. G = 1, 2, 4, 8, 16; packed sequences with a one-token one.
  it('block selection, the ring: positions owned by the warps that sum their heads choose the same blocks (NSA_SELECT_WARP_LOCAL=0|1, NSA_SELECT_REG_LISTS=0|1)', async () => {
    const paper = { compressBlock: 32, compressStride: 16, selectBlock: 64, window: 128 };
    const cases: Case[] = [
      { name: 'paper, G = 4, dk = 128, T = 4100', options: { ...paper, selectCount: 16, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [4100], dtype: 'bf16', kernels: ['group'] },
      { name: 'paper, G = 16, T = 3000', options: { ...paper, selectCount: 16, heads: 16, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [3000], dtype: 'bf16', kernels: ['group'] },
      { name: "l' = 32, d = 8, n = 8, G = 8, packed [2500, 1, 900]", options: { compressBlock: 16, compressStride: 8, selectBlock: 32, selectCount: 8, window: 40, heads: 16, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [2500, 1, 900], dtype: 'bf16', kernels: ['group'] },
      { name: 'paper, n = 5, G = 2, f16, T = 3001', options: { ...paper, selectBlock: 32, selectCount: 5, heads: 4, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [3001], dtype: 'f16', kernels: ['group'] },
      { name: 'paper, G = 1, T = 2222', options: { ...paper, selectCount: 16, heads: 2, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [2222], dtype: 'bf16', kernels: ['group'] },
    ];
    await expectSameBlocks(pool, cases, 555, { NSA_SELECT_WARP_LOCAL: '0' }, [
      ['owned positions against dealt ones', { NSA_SELECT_WARP_LOCAL: '1' }],
      ['lists in shared memory against dealt positions', { NSA_SELECT_WARP_LOCAL: '1', NSA_SELECT_REG_LISTS: '0' }],
    ]);
  });
});
