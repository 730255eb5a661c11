// The cuda backend's NSA forward against the float64 reference. Skips, saying why, where no GPU is present.
// Attention is compared given the blocks the GPU chose (relative RMS < 0.5% on o, each branch and each lse);
// the choice itself is compared by the reference scores of the chosen blocks (near ties may flip in half
// precision), and must be a valid selection: ascending, distinct, forced blocks present, nothing in the future.
// Where no sequence is longer than n l' the selected branch runs as dense attention (ForwardRunner.denseSelected):
// those cases also run the gathered path (NSA_SLC_DENSE=0) against the reference, and check that the dense path
// ran (o_slc, lse_slc the dense kernel's bits).

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { cudaAvailability } from '../../src/backends/cuda/libraries.js';
import type { CudaBackend} from '../../src/backends/cuda/cuda-backend.js';
import { selectsEveryVisibleBlock } from '../../src/backends/cuda/nsa/forward-runner.js';
import { createCudaBackend } from '../../src/backends/cuda/cuda-backend.js';
import { denseCausalAttention } from '../../src/reference/dense-oracle.js';
import { nsaReferenceForward, prepareNsaProblem, type NsaReferenceInputs } from '../../src/reference/nsa-forward.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import { validateNsaInputs } from '../../src/nsa/validate.js';
import type { NsaOutputs } from '../../src/nsa/types.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { referenceInputs, withIndependentKv } from '../helpers/gpu-inputs.js';
import { checkRowSelection } from '../helpers/selection-check.js';

const availability = cudaAvailability();
const TOL = { rtol: 5e-3 };

interface Case {
  readonly name: string;
  readonly options: NSAConfigOptions;
  readonly seqlens: readonly number[];
  readonly dtype: 'bf16' | 'f16';
  readonly kernels: readonly ('group' | 'fsa')[];
  readonly independent?: boolean;
}

const base = { compressBlock: 32, compressStride: 16, selectBlock: 64, selectCount: 6, window: 96 };
const CASES: Case[] = [
  { name: 'fla preset form, G = 16, T = 1000', options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 4, window: 128, heads: 16, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [1000], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'paper preset form, G = 4, D = 128, T = 777', options: { ...base, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [777], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'G = 1 (MHA), T = 513', options: { ...base, heads: 2, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [513], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'G = 2, f16, packed [100, 1, 300, 64, 5]', options: { ...base, selectBlock: 32, selectCount: 5, heads: 4, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [100, 1, 300, 64, 5], dtype: 'f16', kernels: ['group', 'fsa'] },
  { name: 'dk = 64 < dv = 128, G = 16, T = 345', options: { ...base, heads: 16, kvHeads: 1, headDim: 64, valueDim: 128 }, seqlens: [345], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'dk = 192, dv = 128, G = 16, T = 400', options: { ...base, heads: 16, kvHeads: 1, headDim: 192, valueDim: 128 }, seqlens: [400], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: "l' = 32 < 64-key tiles, n = 8, G = 8", options: { compressBlock: 16, compressStride: 8, selectBlock: 32, selectCount: 8, window: 40, heads: 8, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [611], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: "l' = 128 > 64-key tiles, G = 4", options: { compressBlock: 64, compressStride: 32, selectBlock: 128, selectCount: 4, window: 200, heads: 4, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [900], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'independent K/V per branch, compressed K/V given', options: { ...base, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [300, 211], dtype: 'bf16', kernels: ['group', 'fsa'], independent: true },
  { name: 'learned phi = linear, G = 4, packed [333, 70]', options: { ...base, phi: 'linear', heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [333, 70], dtype: 'bf16', kernels: ['fsa'] },
  { name: 'learned phi = mlp, dk = 128 != dv = 64, G = 16', options: { ...base, phi: 'mlp', heads: 16, kvHeads: 1, headDim: 128, valueDim: 64 }, seqlens: [301], dtype: 'bf16', kernels: ['group'] },
  // No sequence longer than n l': the selected branch is dense attention (as in the four cases above with T <= 384).
  { name: "every visible block selected (T <= n l' = 512), G = 16, D = 128, packed [512, 1, 333, 129]", options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 8, window: 256, heads: 16, kvHeads: 1, headDim: 128, valueDim: 128 }, seqlens: [512, 1, 333, 129], dtype: 'bf16', kernels: ['group'] },
  { name: "every visible block selected (T <= n l' = 384), G = 4, f16, dk = 192, dv = 128, packed [384, 5, 383]", options: { ...base, heads: 8, kvHeads: 2, headDim: 192, valueDim: 128 }, seqlens: [384, 5, 383], dtype: 'f16', kernels: ['group', 'fsa'] },
];


/** Every row's selection is valid, and where it differs from the reference its score is within tolerance. */
function checkSelection(config: NSAConfig, ref: NsaReferenceInputs, gpu: Int32Array, expected: Int32Array): { differing: number; rows: number } {
  const problem = prepareNsaProblem(config, ref);
  const H = config.kvHeads;
  let differing = 0;
  for (let row = 0; row < problem.layout.totalTokens; row++) differing += checkRowSelection(problem, row, row, gpu, expected);
  const rows = problem.layout.totalTokens * H;
  expect(differing, `rows whose selection differs from the reference: ${differing} of ${rows}`).toBeLessThanOrEqual(Math.max(2, rows * 0.02));
  return { differing, rows };
}

function compareOutputs(out: NsaOutputs, ref: ReturnType<typeof nsaReferenceForward>): void {
  expectRelativeRms(out.o.toFloat64(), ref.o, 'o', TOL);
  expectRelativeRms(out.oCmp.toFloat64(), ref.oCmp, 'o_cmp', TOL);
  expectRelativeRms(out.oSlc.toFloat64(), ref.oSlc, 'o_slc', TOL);
  expectRelativeRms(out.oWin.toFloat64(), ref.oWin, 'o_win', TOL);
  expectRelativeRms(out.lseCmp.toFloat64(), ref.lseCmp, 'lse_cmp', TOL);
  expectRelativeRms(out.lseSlc.toFloat64(), ref.lseSlc, 'lse_slc', TOL);
  expectRelativeRms(out.lseWin.toFloat64(), ref.lseWin, 'lse_win', TOL);
}

if (!availability.available) {
  describe('cuda NSA forward', () => {
    it.skip(`skipped: no usable CUDA GPU here (${availability.reason.split('\n')[0]})`, () => {});
  });
} else {
  describe(`cuda NSA forward on ${availability.device.name}`, () => {
    const backends = new Map<string, CudaBackend>();
    beforeAll(async () => {
      for (const kernel of ['group', 'fsa'] as const) {
        backends.set(kernel, (await createCudaBackend({ selectedKernel: kernel })) as CudaBackend);
      }
    });
    afterAll(() => {
      // One context per process: dispose the last one only after all are done.
      for (const b of [...backends.values()].reverse()) b.dispose();
    });

    for (const [i, c] of CASES.entries()) {
      it(c.name, async () => {
        const config = new NSAConfig(c.options);
        const cuSeqlens = [0];
        for (const len of c.seqlens) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + len);
        let inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: 1000 + 17 * i });
        if (c.independent) inputs = withIndependentKv(inputs, config, cuSeqlens, 1000 + 17 * i);
        const ref = referenceInputs(inputs, cuSeqlens, config);
        const refOwn = nsaReferenceForward(config, ref);
        for (const kernel of c.kernels) {
          const result = await nsaForward(inputs, config, { backend: backends.get(kernel)! });
          const gpuBlocks = result.blockIndices.data;
          const stats = checkSelection(config, ref, gpuBlocks, refOwn.blockIndices);
          compareOutputs(result, nsaReferenceForward(config, ref, gpuBlocks));
          console.log(`${c.name} [${kernel}]: selection differs from the reference in ${stats.differing} of ${stats.rows} rows`);
          const again = await nsaForward(inputs, config, { backend: backends.get(kernel)! });
          expect(Buffer.from(again.o.data.buffer).equals(Buffer.from(result.o.data.buffer)), 'two runs give identical o').toBe(true);
          if (!selectsEveryVisibleBlock(config, cuSeqlens)) continue;
          // The dense path ran: o_slc and lse_slc are the dense kernel's bits over the same keys.
          if (!c.independent) {
            const dense = backends.get(kernel)!.denseAttention(validateNsaInputs(inputs, config));
            expect(Buffer.from(result.oSlc.data.buffer).equals(Buffer.from(dense.o.buffer)), `${c.name} [${kernel}]: o_slc is the dense kernel's`).toBe(true);
            expect(Buffer.from(result.lseSlc.data.buffer).equals(Buffer.from(dense.lse.buffer)), `${c.name} [${kernel}]: lse_slc is the dense kernel's`).toBe(true);
          }
          // And the gathered path (scores, top-n, selected attention) agrees with the reference and selects the same blocks.
          const gathered = await withGatheredSelection(kernel, (backend) => nsaForward(inputs, config, { backend }));
          expect(Array.from(gathered.blockIndices.data), `${c.name} [${kernel}]: the gathered path's blocks`).toEqual(Array.from(gpuBlocks));
          compareOutputs(gathered, nsaReferenceForward(config, ref, gpuBlocks));
        }
      });
    }

    /** `run` on a backend whose forward takes the scores and gathers even where every visible block is selected. */
    async function withGatheredSelection<T>(kernel: 'group' | 'fsa', run: (backend: CudaBackend) => Promise<T>): Promise<T> {
      const key = `${kernel} gathered`;
      const saved = process.env['NSA_SLC_DENSE'];
      process.env['NSA_SLC_DENSE'] = '0'; // read when the backend first builds a config's kernels
      try {
        if (!backends.has(key)) backends.set(key, (await createCudaBackend({ selectedKernel: kernel })) as CudaBackend); // disposed with the others
        return await run(backends.get(key)!);
      } finally {
        if (saved === undefined) delete process.env['NSA_SLC_DENSE'];
        else process.env['NSA_SLC_DENSE'] = saved;
      }
    }

    // The group-centric kernel's TMA tiles (the default on sm_90) against its per-row bulk copies (NSA_SLC_TMA=0):
    // the same keys in the same order, the rows past t masked either way, so the same bits.
    it('group-centric selected attention by TMA tiles and by per-row copies (NSA_SLC_TMA=0) give the same bits', async () => {
      for (const i of [0, 3, 5, 7]) {
        const c = CASES[i]!;
        const config = new NSAConfig(c.options);
        const cuSeqlens = [0];
        for (const len of c.seqlens) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + len);
        const inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: 1000 + 17 * i });
        const tiles = await nsaForward(inputs, config, { backend: backends.get('group')! });
        const saved = process.env['NSA_SLC_TMA'];
        process.env['NSA_SLC_TMA'] = '0'; // read when the backend builds this config's kernels
        try {
          const backend = (await createCudaBackend({ selectedKernel: 'group' })) as CudaBackend;
          backends.set(`group rows ${i}`, backend); // disposed with the others
          const rows = await nsaForward(inputs, config, { backend });
          expect(Buffer.from(rows.blockIndices.data.buffer).equals(Buffer.from(tiles.blockIndices.data.buffer)), c.name).toBe(true);
          expect(Buffer.from(rows.oSlc.data.buffer).equals(Buffer.from(tiles.oSlc.data.buffer)), `${c.name}: o_slc bits`).toBe(true);
          expect(Buffer.from(rows.lseSlc.data.buffer).equals(Buffer.from(tiles.lseSlc.data.buffer)), `${c.name}: lse_slc bits`).toBe(true);
          expect(Buffer.from(rows.o.data.buffer).equals(Buffer.from(tiles.o.data.buffer)), `${c.name}: o bits`).toBe(true);
        } finally {
          if (saved === undefined) delete process.env['NSA_SLC_TMA'];
          else process.env['NSA_SLC_TMA'] = saved;
        }
      }
    });

    it('dense causal kernel (the benchmark baseline) against float64 attention', () => {
      const config = new NSAConfig({ heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 });
      const cuSeqlens = [0, 333, 334, 700];
      const inputs = randomInputs({ config, cuSeqlens, dtype: 'bf16', seed: 7 });
      const request = validateNsaInputs(inputs, config);
      const gpu = backends.get('group')!.denseAttention(request);
      const ref = denseCausalAttention(inputs.q.toFloat64(), inputs.k.toFloat64(), inputs.v.toFloat64(), cuSeqlens, 8, 2, 128, 128, config.scale);
      expectRelativeRms(gpu.o, ref.o, 'dense o', TOL);
      expectRelativeRms(gpu.lse, ref.lse, 'dense lse', TOL);
    });

    it('bad input is refused before any launch, and the backend stays usable', async () => {
      const config = new NSAConfig({ heads: 4, kvHeads: 1, headDim: 96, valueDim: 96 });
      const inputs = randomInputs({ config, cuSeqlens: [0, 100], dtype: 'bf16', seed: 3 });
      await expect(nsaForward(inputs, config, { backend: backends.get('group')! })).rejects.toThrow(/headDim 96/);
      const ok = new NSAConfig({ heads: 4, kvHeads: 1, headDim: 64, valueDim: 64 });
      const good = randomInputs({ config: ok, cuSeqlens: [0, 100], dtype: 'bf16', seed: 3 });
      const result = await nsaForward(good, ok, { backend: backends.get('group')! });
      expect(result.o.shape).toEqual([1, 100, 4, 64]);
    });
  });
}
