// The cuda forward's kernel variants that must agree: the group-centric kernel's TMA tiles and per-row copies, the
// FSA order's staging, bulk query rows and KV-head phases (each the same bits), and the group-centric kernel's unions
// of positions. On sm_90 the group-centric kernel takes three positions a CTA over the union of their blocks by
// default; unions of 2, 3, 4 and 8 are also checked against the one-position kernel (NSA_SLC_UNION=0), within the
// rounding of P. The cases are nsa-forward.test.ts's (test/helpers/gpu-forward.ts). Skips, saying why, where no GPU
// is present.

import { expect, it } from 'vitest';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { withEnvironment } from '../helpers/env.js';
import { referenceInputs } from '../helpers/gpu-inputs.js';
import { describeWithBackends, CASES, type Case, caseInputs, compareOutputs, expectSameSelectedBits, nextTurn } from '../helpers/gpu-forward.js';

describeWithBackends('cuda NSA forward variants', (pool) => {
  // The group-centric kernel's TMA tiles (one position a CTA, NSA_SLC_UNION=0) against its per-row bulk copies
  // (NSA_SLC_TMA=0): the same keys in the same order, the rows past t masked either way, so the same bits.
  it('group-centric selected attention by TMA tiles and by per-row copies (NSA_SLC_TMA=0) give the same bits', async () => {
    for (const i of [0, 3, 5, 7]) {
      const c = CASES[i]!;
      const { config, inputs } = caseInputs(i);
      const tiles = await pool.withEnv('group', { NSA_SLC_UNION: '0' }, (backend) => nsaForward(inputs, config, { backend }));
      // NSA_SLC_TMA is read when the backend builds this config's kernels (no TMA: no union kernel)
      await withEnvironment({ NSA_SLC_TMA: '0' }, async () => {
        const backend = await pool.fresh('group', `group rows ${i}`);
        const rows = await nsaForward(inputs, config, { backend });
        expectSameSelectedBits(rows, tiles, c.name);
      });
    }
  });

  /**
   * Each case's forward in FSA order (never as dense attention) under `before`, then under `after`: the same bits.
   * `check` states what each case must have for the comparison to cover what it claims.
   */
  async function expectSameFsaBits(cases: number[], before: Record<string, string>, after: Record<string, string>, check?: (c: Case) => void): Promise<void> {
    for (const i of cases) {
      const c = CASES[i]!;
      check?.(c);
      const { config, inputs } = caseInputs(i);
      const first = await pool.withEnv('fsa', { ...before, NSA_SLC_DENSE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
      const second = await pool.withEnv('fsa', { ...after, NSA_SLC_DENSE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
      expectSameSelectedBits(second, first, c.name);
      await nextTurn(); // let vitest's RPC replies in between the compiles
    }
  }

  // The FSA order's partial outputs written straight from the fragments (NSA_FSA_STAGE=0) or through a per-warp
  // stage along whole rows (1): the same values to the same places, so the same bits; the persistent kernel
  // (l' <= 64) and the CTA-per-tile one (l' = 128), padding rows (tiles of fewer pairs than rows), G = 1 to 16,
  // dv = 64 and 128, packed sequences.
  it('FSA-order partial outputs from the fragments and through a stage (NSA_FSA_STAGE=0|1) give the same bits', async () => {
    await expectSameFsaBits([0, 1, 2, 3, 4, 5, 6, 7, 9], { NSA_FSA_STAGE: '0' }, { NSA_FSA_STAGE: '1' }, (c) => expect(c.kernels, c.name).toContain('fsa'));
  });

  // The persistent FSA-order attention's query rows by bulk copies into padded rows (NSA_FSA_BULK_Q=1, the sm_90
  // default) or by 16-byte cp.async copies into swizzled rows (0): the same rows reach the same fragments, so the
  // same bits; padding rows (tiles of fewer pairs than rows), G = 1 to 16, dk = 64, 128 and 192, packed sequences.
  it('persistent FSA-order attention with query rows by bulk copies and by cp.async (NSA_FSA_BULK_Q=1|0) gives the same bits', async () => {
    await expectSameFsaBits([0, 1, 2, 3, 4, 5, 6, 8, 9], { NSA_FSA_BULK_Q: '0' }, { NSA_FSA_BULK_Q: '1' }, (c) => expect(c.options.selectBlock ?? 64, c.name).toBeLessThanOrEqual(64));
  });

  // The persistent FSA-order attention's tiles shared out a KV head at a time (NSA_FSA_PHASES=head, the default)
  // or all at once (all): only which CTA computes a tile changes, so the same bits; two or more KV heads, packed
  // sequences, l' = 32 and 64, independent K/V per branch, a learned phi.
  it('persistent FSA-order attention by KV-head phases and in one phase (NSA_FSA_PHASES=head|all) gives the same bits', async () => {
    await expectSameFsaBits([1, 2, 3, 8, 9], { NSA_FSA_PHASES: 'all' }, { NSA_FSA_PHASES: 'head' }, (c) => expect(c.options.kvHeads, c.name).toBeGreaterThan(1));
  });

  // CTAs of 2, 3, 4 and 8 consecutive positions over the union of their blocks (NSA_SLC_UNION), a warp a position:
  // the same blocks, each warp's keys in the same ascending order but all of a tile's in one warp (so o_slc to the
  // rounding of P against another running maximum, lse_slc to fp32's); a CTA's positions across sequence boundaries
  // (the packed case), past the last row, G = 1 to 16, 24 and 64, l' of 32, 64 and 128, dk = 192.
  for (const i of [0, 1, 2, 3, 5, 6, 7, 8, 13, 15]) {
    it(`group-centric selected attention over unions of positions (NSA_SLC_UNION=2|3|4|8) against the reference and one position a CTA: ${CASES[i]!.name}`, async () => {
      const c = CASES[i]!;
      const { config, cuSeqlens, inputs } = caseInputs(i);
      const ref = referenceInputs(inputs, cuSeqlens, config);
      const plain = await pool.withEnv('group', { NSA_SLC_UNION: '0' }, (backend) => nsaForward(inputs, config, { backend }));
      for (const size of ['2', '3', '4', '8']) {
        const what = `${c.name}, unions of ${size}`;
        const union = await pool.withEnv('group', { NSA_SLC_UNION: size }, (backend) => nsaForward(inputs, config, { backend }));
        expect(Array.from(union.blockIndices.data), `${what}: blocks`).toEqual(Array.from(plain.blockIndices.data));
        compareOutputs(union, nsaReferenceForward(config, ref, union.blockIndices.data));
        expectRelativeRms(union.oSlc.toFloat64(), plain.oSlc.toFloat64(), `${what}: o_slc against one position a CTA`, { rtol: 2e-3 });
        expectRelativeRms(union.lseSlc.toFloat64(), plain.lseSlc.toFloat64(), `${what}: lse_slc against one position a CTA`, { rtol: 1e-5 });
        const again = await pool.withEnv('group', { NSA_SLC_UNION: size }, (backend) => nsaForward(inputs, config, { backend }));
        expect(Buffer.from(again.o.data.buffer).equals(Buffer.from(union.o.data.buffer)), `${what}: two runs give identical o`).toBe(true);
      }
    });
  }
});
