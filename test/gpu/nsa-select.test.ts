// The cuda backend's block selection in each of its forms (merges or inserts, the ring or direct offers, lists in
// registers or shared memory, positions owned by warps or dealt in turn) chooses the same blocks, bit for bit, and
// the choice is checked by the float64 reference's scores of the chosen blocks (near ties may flip in half precision;
// with all ties the tie rule alone decides, exactly). Skips, saying why, where no GPU is present.

import { expect, it } from 'vitest';
import { NSAConfig } from '../../src/config/nsa-config.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import { referenceInputs } from '../helpers/gpu-inputs.js';
import { describeWithBackends, base, type Case, checkSelection, nextTurn, packedOffsets } from '../helpers/gpu-forward.js';

describeWithBackends('cuda NSA block selection', (pool) => {
  /**
   * The group-centric forward's block indices under `env`, then a turn of the event loop: each variant compiles
   * its kernels synchronously, and vitest's RPC calls time out if several run back to back without one.
   */
  async function selectedBlocks(inputs: ReturnType<typeof randomInputs>, config: NSAConfig, env: Record<string, string>): Promise<number[]> {
    const blocks = Array.from((await pool.withEnv('group', env, (backend) => nsaForward(inputs, config, { backend }))).blockIndices.data);
    await nextTurn();
    return blocks;
  }

  /**
   * For each case (inputs seeded seed + its index): the blocks chosen under every variant's settings must be those
   * chosen under `baseline`, bit for bit; the baseline's are checked by the reference's scores (rows whose choice
   * differs only among near-ties are counted and logged).
   */
  async function expectSameBlocks(cases: Case[], seed: number, baseline: Record<string, string>, variants: [string, Record<string, string>][]): Promise<void> {
    for (const [i, c] of cases.entries()) {
      const config = new NSAConfig(c.options);
      const cuSeqlens = packedOffsets(c.seqlens);
      const inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: seed + i });
      const expected = await selectedBlocks(inputs, config, baseline);
      for (const [what, env] of variants) expect(await selectedBlocks(inputs, config, env), `${c.name}: ${what}`).toEqual(expected);
      const ref = referenceInputs(inputs, cuSeqlens, config);
      const stats = checkSelection(config, ref, Int32Array.from(expected), nsaReferenceForward(config, ref).blockIndices);
      console.log(`${c.name}: selection differs from the reference in ${stats.differing} of ${stats.rows} rows`);
      await nextTurn();
    }
  }

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
    await expectSameBlocks(long, 4242, { NSA_SELECT_MERGE_MIN: '1' }, [
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
        const got = await selectedBlocks(inputs, config, env);
        expect(got, `${c.name}, zero queries, ${JSON.stringify(env)}: the tie rule's blocks`).toEqual(expected);
      }
      await nextTurn();
    }
  });

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
    await expectSameBlocks(cases, 777, { NSA_SELECT_DIRECT: '0', NSA_SELECT_WARP_LOCAL: '0' }, [
      ['direct offers against the ring', { NSA_SELECT_DIRECT: '1' }],
      ['lists in shared memory against the ring', { NSA_SELECT_DIRECT: '1', NSA_SELECT_REG_LISTS: '0' }],
      ['positions dealt in turn against the ring', { NSA_SELECT_DIRECT: '1', NSA_SELECT_WARP_LOCAL: '0' }],
    ]);
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
    await expectSameBlocks(cases, 555, { NSA_SELECT_WARP_LOCAL: '0' }, [
      ['owned positions against dealt ones', { NSA_SELECT_WARP_LOCAL: '1' }],
      ['lists in shared memory against dealt positions', { NSA_SELECT_WARP_LOCAL: '1', NSA_SELECT_REG_LISTS: '0' }],
    ]);
  });
});
