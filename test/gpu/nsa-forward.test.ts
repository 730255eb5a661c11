// The cuda backend's NSA forward against the float64 reference. Skips, saying why, where no GPU is present.
// Attention is compared given the blocks the GPU chose (relative RMS < 0.5% on o, each branch and each lse);
// the choice itself is compared by the reference scores of the chosen blocks (near ties may flip in half
// precision), and must be a valid selection: ascending, distinct, forced blocks present, nothing in the future.
// Where no sequence is longer than n l' the selected branch runs as dense attention (ForwardRunner.denseSelected):
// those cases also run the gathered path (NSA_SLC_DENSE=0) against the reference. Where the window reads the
// selected branch's K/V the default is one launch for all three branches (flash mode 4, o_slc merged from the keys
// before the window and the window's): its o_slc must match the dense kernel's to the rounding of P (2e-3), its
// lse_slc to fp32 rounding (1e-5), and the two-launch form (NSA_SLC_WIN_MERGE=0) must give the dense kernel's bits and every other branch's bits as mode 4.
// The kernels' variants that must agree live in nsa-forward-variants.test.ts, the block selection's forms in
// nsa-select.test.ts and nsa-select-direct.test.ts: files that run side by side (vitest.gpu.config.ts).

import { expect, it } from 'vitest';
import { NSAConfig } from '../../src/config/nsa-config.js';
import { selectsEveryVisibleBlock } from '../../src/backends/cuda/nsa/forward-runner.js';
import { denseCausalAttention } from '../../src/reference/dense-oracle.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import { validateNsaInputs } from '../../src/nsa/validate.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { referenceInputs } from '../helpers/gpu-inputs.js';
import { describeWithBackends, bits, CASES, caseInputs, checkSelection, compareOutputs, TOL } from '../helpers/gpu-forward.js';

describeWithBackends('cuda NSA forward', (pool) => {
  for (const [i, c] of CASES.entries()) {
    it(c.name, async () => {
      const { config, cuSeqlens, inputs } = caseInputs(i);
      const ref = referenceInputs(inputs, cuSeqlens, config);
      const refOwn = nsaReferenceForward(config, ref);
      for (const kernel of c.kernels) {
        const result = await nsaForward(inputs, config, { backend: pool.get(kernel) });
        const gpuBlocks = result.blockIndices.data;
        const stats = checkSelection(config, ref, gpuBlocks, refOwn.blockIndices);
        compareOutputs(result, nsaReferenceForward(config, ref, gpuBlocks));
        console.log(`${c.name} [${kernel}]: selection differs from the reference in ${stats.differing} of ${stats.rows} rows`);
        const again = await nsaForward(inputs, config, { backend: pool.get(kernel) });
        expect(Buffer.from(again.o.data.buffer).equals(Buffer.from(result.o.data.buffer)), 'two runs give identical o').toBe(true);
        if (!selectsEveryVisibleBlock(config, cuSeqlens)) continue;
        if (!c.independent) {
          const dense = pool.get(kernel).denseAttention(validateNsaInputs(inputs, config));
          // The merge rounds P to the half dtype against each phase's own running maximum, so o_slc agrees with the
          // dense kernel's to that rounding (~5e-4 measured), not bit for bit; the lse sums unrounded P.
          expectRelativeRms(result.oSlc.toFloat64(), dense.o, `${c.name} [${kernel}]: o_slc against the dense kernel's`, { rtol: 2e-3 });
          expectRelativeRms(result.lseSlc.toFloat64(), dense.lse, `${c.name} [${kernel}]: lse_slc against the dense kernel's`, { rtol: 1e-5 });
          const twoLaunches = await pool.withEnv(kernel, { NSA_SLC_WIN_MERGE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
          expect(bits(twoLaunches.oSlc).equals(Buffer.from(dense.o.buffer)), `${c.name} [${kernel}]: two launches' o_slc is the dense kernel's`).toBe(true);
          expect(bits(twoLaunches.lseSlc).equals(Buffer.from(dense.lse.buffer)), `${c.name} [${kernel}]: two launches' lse_slc is the dense kernel's`).toBe(true);
          for (const key of ['oCmp', 'lseCmp', 'oWin', 'lseWin'] as const) {
            expect(bits(twoLaunches[key]).equals(bits(result[key])), `${c.name} [${kernel}]: ${key} the same bits either way`).toBe(true);
          }
          expectRelativeRms(twoLaunches.o.toFloat64(), result.o.toFloat64(), `${c.name} [${kernel}]: o either way`, { rtol: 2e-3 });
        }
        // And the gathered path (scores, top-n, selected attention) agrees with the reference and selects the same blocks.
        const gathered = await pool.withEnv(kernel, { NSA_SLC_DENSE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
        expect(Array.from(gathered.blockIndices.data), `${c.name} [${kernel}]: the gathered path's blocks`).toEqual(Array.from(gpuBlocks));
        compareOutputs(gathered, nsaReferenceForward(config, ref, gpuBlocks));
      }
    });
  }

  it('dense causal kernel (the benchmark baseline) against float64 attention', () => {
    const config = new NSAConfig({ heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 });
    const cuSeqlens = [0, 333, 334, 700];
    const inputs = randomInputs({ config, cuSeqlens, dtype: 'bf16', seed: 7 });
    const request = validateNsaInputs(inputs, config);
    const gpu = pool.get('group').denseAttention(request);
    const ref = denseCausalAttention(inputs.q.toFloat64(), inputs.k.toFloat64(), inputs.v.toFloat64(), cuSeqlens, 8, 2, 128, 128, config.scale);
    expectRelativeRms(gpu.o, ref.o, 'dense o', TOL);
    expectRelativeRms(gpu.lse, ref.lse, 'dense lse', TOL);
  });

  it('bad input is refused before any launch, and the backend stays usable', async () => {
    const config = new NSAConfig({ heads: 4, kvHeads: 1, headDim: 96, valueDim: 96 });
    const inputs = randomInputs({ config, cuSeqlens: [0, 100], dtype: 'bf16', seed: 3 });
    await expect(nsaForward(inputs, config, { backend: pool.get('group') })).rejects.toThrow(/headDim 96/);
    const ok = new NSAConfig({ heads: 4, kvHeads: 1, headDim: 64, valueDim: 64 });
    const good = randomInputs({ config: ok, cuSeqlens: [0, 100], dtype: 'bf16', seed: 3 });
    const result = await nsaForward(good, ok, { backend: pool.get('group') });
    expect(result.o.shape).toEqual([1, 100, 4, 64]);
  });
});
