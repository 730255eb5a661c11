// The cuda backend's block selection where each selection block holds one compressed key (l = d = l', fla's
// preset): a tile's block scores offered straight from its head sums and through the ring of open scores choose the
// same blocks, bit for bit, and the choice is checked by the float64 reference's scores of the chosen blocks (near
// ties may flip in half precision). Apart from nsa-select.test.ts so that the GPU suite's files run side by side in
// a few minutes each. Skips, saying why, where no GPU is present.

import { it } from 'vitest';
import { describeWithBackends, type Case } from '../helpers/gpu-forward.js';
import { expectSameBlocks } from '../helpers/gpu-selection.js';

describeWithBackends('cuda NSA block selection, direct offers', (pool) => {
  // One compressed key a selection block (l = d = l'): each tile's block scores offered straight from its head sums
  // (the default there; the lists in registers at G = 4 to 16, or in shared memory with NSA_SELECT_REG_LISTS=0) or
  // through the ring of open scores (NSA_SELECT_DIRECT=0): the same rounds of offers, so the same blocks, bit for
  // bit. G = 1 (16 positions a warp), 3 (head sums through shared memory), 4, 8, 16, 32 (a position over two
  // warps); n not a power of two; packed sequences with a one-token one; T not a multiple of l'.
  it('block selection, l = d = l\': direct offers and the ring choose the same blocks (NSA_SELECT_DIRECT=0|1, NSA_SELECT_REG_LISTS=0|1)', async () => {
    const fla = { compressBlock: 64, compressStride: 64, selectBlock: 64, window: 128, headDim: 64, valueDim: 64 };
    const cases: Case[] = [
      { name: 'G = 16, n = 16, T = 3500', options: { ...fla, selectCount: 16, heads: 16, kvHeads: 1 }, seqlens: [3500], dtype: 'bf16', kernels: ['group'] },
      { name: 'G = 4, n = 16, T = 4100', options: { ...fla, selectCount: 16, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [4100], dtype: 'bf16', kernels: ['group'] },
      { name: 'G = 1, n = 7, f16, packed [2000, 1, 3333]', options: { ...fla, selectCount: 7, heads: 2, kvHeads: 2 }, seqlens: [2000, 1, 3333], dtype: 'f16', kernels: ['group'] },
      { name: 'G = 3, n = 16, l = 32, T = 2900', options: { ...fla, compressBlock: 32, compressStride: 32, selectBlock: 32, selectCount: 16, heads: 6, kvHeads: 2 }, seqlens: [2900], dtype: 'bf16', kernels: ['group'] },
      { name: 'G = 32, n = 16, T = 3000', options: { ...fla, selectCount: 16, heads: 32, kvHeads: 1 }, seqlens: [3000], dtype: 'bf16', kernels: ['group'] },
      { name: 'G = 8, n = 12, packed [1500, 2600]', options: { ...fla, selectCount: 12, heads: 16, kvHeads: 2 }, seqlens: [1500, 2600], dtype: 'bf16', kernels: ['group'] },
    ];
    await expectSameBlocks(pool, cases, 777, { NSA_SELECT_DIRECT: '0', NSA_SELECT_WARP_LOCAL: '0' }, [
      ['direct offers against the ring', { NSA_SELECT_DIRECT: '1' }],
      ['lists in shared memory against the ring', { NSA_SELECT_DIRECT: '1', NSA_SELECT_REG_LISTS: '0' }],
      ['positions dealt in turn against the ring', { NSA_SELECT_DIRECT: '1', NSA_SELECT_WARP_LOCAL: '0' }],
    ]);
  });
});
