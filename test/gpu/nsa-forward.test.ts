// The cuda backend's NSA forward against the float64 reference. Skips, saying why, where no GPU is present.
// Attention is compared given the blocks the GPU chose (relative RMS < 0.5% on o, each branch and each lse);
// the choice itself is compared by the reference scores of the chosen blocks (near ties may flip in half
// precision), and must be a valid selection: ascending, distinct, forced blocks present, nothing in the future.
// Where no sequence is longer than n l' the selected branch runs as dense attention (ForwardRunner.denseSelected):
// those cases also run the gathered path (NSA_SLC_DENSE=0) against the reference. Where the window reads the
// selected branch's K/V the default is one launch for all three branches (flash mode 4, o_slc merged from the keys
// before the window and the window's): its o_slc must match the dense kernel's to the rounding of P (2e-3), its
// lse_slc to fp32 rounding (1e-5), and the two-launch form (NSA_SLC_WIN_MERGE=0) must give the dense kernel's bits and every other branch's bits as mode 4.
// On sm_90 the group-centric kernel takes three positions a CTA over the union of their blocks by default; unions
// of 2, 3, 4 and 8 are also checked against the one-position kernel (NSA_SLC_UNION=0), within the rounding of P.

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
import { withEnvironment } from '../helpers/env.js';
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


/** Case i's config, packed offsets and seeded inputs (its own K/V per branch where the case says so). */
function caseInputs(i: number): { config: NSAConfig; cuSeqlens: number[]; inputs: ReturnType<typeof randomInputs> } {
  const c = CASES[i]!;
  const config = new NSAConfig(c.options);
  const cuSeqlens = [0];
  for (const len of c.seqlens) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + len);
  const inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: 1000 + 17 * i });
  return { config, cuSeqlens, inputs: c.independent ? withIndependentKv(inputs, config, cuSeqlens, 1000 + 17 * i) : inputs };
}

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

/** A tensor's bytes, to compare two results bit for bit. */
const bits = (t: { data: ArrayBufferView }): Buffer => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);

/** Two forwards chose the same blocks and gave the same selected branch and output, bit for bit. */
function expectSameSelectedBits(a: NsaOutputs, b: NsaOutputs, what: string): void {
  for (const key of ['blockIndices', 'oSlc', 'lseSlc', 'o'] as const) {
    expect(bits(a[key]).equals(bits(b[key])), `${what}: ${key} bits`).toBe(true);
  }
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
        const { config, cuSeqlens, inputs } = caseInputs(i);
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
          if (!c.independent) {
            const dense = backends.get(kernel)!.denseAttention(validateNsaInputs(inputs, config));
            // The merge rounds P to the half dtype against each phase's own running maximum, so o_slc agrees with the
            // dense kernel's to that rounding (~5e-4 measured), not bit for bit; the lse sums unrounded P.
            expectRelativeRms(result.oSlc.toFloat64(), dense.o, `${c.name} [${kernel}]: o_slc against the dense kernel's`, { rtol: 2e-3 });
            expectRelativeRms(result.lseSlc.toFloat64(), dense.lse, `${c.name} [${kernel}]: lse_slc against the dense kernel's`, { rtol: 1e-5 });
            const twoLaunches = await withEnv(kernel, { NSA_SLC_WIN_MERGE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
            expect(bits(twoLaunches.oSlc).equals(Buffer.from(dense.o.buffer)), `${c.name} [${kernel}]: two launches' o_slc is the dense kernel's`).toBe(true);
            expect(bits(twoLaunches.lseSlc).equals(Buffer.from(dense.lse.buffer)), `${c.name} [${kernel}]: two launches' lse_slc is the dense kernel's`).toBe(true);
            for (const key of ['oCmp', 'lseCmp', 'oWin', 'lseWin'] as const) {
              expect(bits(twoLaunches[key]).equals(bits(result[key])), `${c.name} [${kernel}]: ${key} the same bits either way`).toBe(true);
            }
            expectRelativeRms(twoLaunches.o.toFloat64(), result.o.toFloat64(), `${c.name} [${kernel}]: o either way`, { rtol: 2e-3 });
          }
          // And the gathered path (scores, top-n, selected attention) agrees with the reference and selects the same blocks.
          const gathered = await withEnv(kernel, { NSA_SLC_DENSE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
          expect(Array.from(gathered.blockIndices.data), `${c.name} [${kernel}]: the gathered path's blocks`).toEqual(Array.from(gpuBlocks));
          compareOutputs(gathered, nsaReferenceForward(config, ref, gpuBlocks));
        }
      });
    }

    /** `run` on a backend created under `env` (read when the backend first builds a config's kernels), kept for the file. */
    function withEnv<T>(kernel: 'group' | 'fsa', env: Record<string, string>, run: (backend: CudaBackend) => Promise<T>): Promise<T> {
      const key = `${kernel} ${JSON.stringify(env)}`;
      return withEnvironment(env, async () => {
        if (!backends.has(key)) backends.set(key, (await createCudaBackend({ selectedKernel: kernel })) as CudaBackend); // disposed with the others
        return run(backends.get(key)!);
      });
    }

    /**
     * The group-centric forward's block indices under `env`, then a turn of the event loop: each variant compiles
     * its kernels synchronously, and vitest's RPC calls time out if several run back to back without one.
     */
    async function selectedBlocks(inputs: ReturnType<typeof randomInputs>, config: NSAConfig, env: Record<string, string>): Promise<number[]> {
      const blocks = Array.from((await withEnv('group', env, (backend) => nsaForward(inputs, config, { backend }))).blockIndices.data);
      await new Promise<void>((resolve) => setImmediate(resolve));
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
        const cuSeqlens = [0];
        for (const len of c.seqlens) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + len);
        const inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: seed + i });
        const expected = await selectedBlocks(inputs, config, baseline);
        for (const [what, env] of variants) expect(await selectedBlocks(inputs, config, env), `${c.name}: ${what}`).toEqual(expected);
        const ref = referenceInputs(inputs, cuSeqlens, config);
        const stats = checkSelection(config, ref, Int32Array.from(expected), nsaReferenceForward(config, ref).blockIndices);
        console.log(`${c.name}: selection differs from the reference in ${stats.differing} of ${stats.rows} rows`);
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    }

    // The group-centric kernel's TMA tiles (one position a CTA, NSA_SLC_UNION=0) against its per-row bulk copies
    // (NSA_SLC_TMA=0): the same keys in the same order, the rows past t masked either way, so the same bits.
    it('group-centric selected attention by TMA tiles and by per-row copies (NSA_SLC_TMA=0) give the same bits', async () => {
      for (const i of [0, 3, 5, 7]) {
        const c = CASES[i]!;
        const { config, inputs } = caseInputs(i);
        const tiles = await withEnv('group', { NSA_SLC_UNION: '0' }, (backend) => nsaForward(inputs, config, { backend }));
        // NSA_SLC_TMA is read when the backend builds this config's kernels (no TMA: no union kernel)
        await withEnvironment({ NSA_SLC_TMA: '0' }, async () => {
          const backend = (await createCudaBackend({ selectedKernel: 'group' })) as CudaBackend;
          backends.set(`group rows ${i}`, backend); // disposed with the others
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
        const first = await withEnv('fsa', { ...before, NSA_SLC_DENSE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
        const second = await withEnv('fsa', { ...after, NSA_SLC_DENSE: '0' }, (backend) => nsaForward(inputs, config, { backend }));
        expectSameSelectedBits(second, first, c.name);
        await new Promise<void>((resolve) => setImmediate(resolve)); // let vitest's RPC replies in between the compiles
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
    // (the packed case), past the last row, G = 1 to 16, l' of 32, 64 and 128, dk = 192.
    for (const i of [0, 1, 2, 3, 5, 6, 7, 8]) {
      it(`group-centric selected attention over unions of positions (NSA_SLC_UNION=2|3|4|8) against the reference and one position a CTA: ${CASES[i]!.name}`, async () => {
        const c = CASES[i]!;
        const { config, cuSeqlens, inputs } = caseInputs(i);
        const ref = referenceInputs(inputs, cuSeqlens, config);
        const plain = await withEnv('group', { NSA_SLC_UNION: '0' }, (backend) => nsaForward(inputs, config, { backend }));
        for (const size of ['2', '3', '4', '8']) {
          const what = `${c.name}, unions of ${size}`;
          const union = await withEnv('group', { NSA_SLC_UNION: size }, (backend) => nsaForward(inputs, config, { backend }));
          expect(Array.from(union.blockIndices.data), `${what}: blocks`).toEqual(Array.from(plain.blockIndices.data));
          compareOutputs(union, nsaReferenceForward(config, ref, union.blockIndices.data));
          expectRelativeRms(union.oSlc.toFloat64(), plain.oSlc.toFloat64(), `${what}: o_slc against one position a CTA`, { rtol: 2e-3 });
          expectRelativeRms(union.lseSlc.toFloat64(), plain.lseSlc.toFloat64(), `${what}: lse_slc against one position a CTA`, { rtol: 1e-5 });
          const again = await withEnv('group', { NSA_SLC_UNION: size }, (backend) => nsaForward(inputs, config, { backend }));
          expect(Buffer.from(again.o.data.buffer).equals(Buffer.from(union.o.data.buffer)), `${what}: two runs give identical o`).toBe(true);
        }
      });
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
        await new Promise<void>((resolve) => setImmediate(resolve));
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
