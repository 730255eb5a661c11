// The cuda backend's NSA backward against the float64 reference backward (given the blocks the GPU chose), and
// its determinism: two runs give bitwise-identical gradients. Skips, saying why, where no GPU is present.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { cudaAvailability } from '../../src/backends/cuda/libraries.js';
import { createCudaBackend, type CudaBackend } from '../../src/backends/cuda/cuda-backend.js';
import { nsaReferenceBackward } from '../../src/reference/nsa-backward.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { validateNsaInputs } from '../../src/nsa/validate.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import type { NsaGradients } from '../../src/nsa/types.js';
import { Tensor } from '../../src/tensor/tensor.js';
import { expectRelativeRms, rms } from '../helpers/compare.js';
import { withEnvironment } from '../helpers/env.js';
import { referenceInputs, withIndependentKv } from '../helpers/gpu-inputs.js';

const availability = cudaAvailability();
const TOL = { rtol: 5e-3 };

interface Case {
  readonly name: string;
  readonly options: NSAConfigOptions;
  readonly seqlens: readonly number[];
  readonly independent?: boolean;
  /** Forces the selected dQ's form (NSA_SLC_DQ) for this case's backward; default: the runner's choice. */
  readonly slcDq?: 'group' | 'fused';
  /** Outputs asked in bf16: the device keeps the branch outputs in bf16 for the backward (default f32). */
  readonly outputDType?: 'bf16';
  /** Environment for this case (kernel tuning is read when a config's kernels are built: give it a config of its own). */
  readonly env?: Readonly<Record<string, string>>;
}

const base = { compressBlock: 32, compressStride: 16, selectBlock: 64, selectCount: 6, window: 96 };
const CASES: Case[] = [
  { name: 'G = 16, T = 700, fla preset form, group-centric slc dQ, bf16 outputs', options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 4, window: 128, heads: 16, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [700], slcDq: 'group', outputDType: 'bf16' },
  { name: 'G = 4, D = 128, odd T = 555, paper form, fused slc dQ', options: { ...base, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [555], slcDq: 'fused' },
  { name: 'G = 4, D = 128, odd T = 555, paper form, group-centric slc dQ', options: { ...base, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [555], slcDq: 'group' },
  { name: 'G = 4, D = 64, T = 450, fused slc dQ, the mma.sync selected dK/dV (NSA_SLC_BWD=mma)', options: { ...base, selectCount: 7, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [450], slcDq: 'fused', env: { NSA_SLC_BWD: 'mma' } },
  { name: 'G = 4, odd T = 390, fused slc dQ summed by its own reduce (cmp and win dQ apart: NSA_FA_BWD_DQ_FUSED=0)', options: { ...base, selectCount: 5, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [390], slcDq: 'fused', env: { NSA_FA_BWD_DQ_FUSED: '0' } },
  { name: 'G = 1, T = 333, fused slc dQ', options: { ...base, heads: 2, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [333], slcDq: 'fused' },
  { name: 'G = 2, packed [100, 1, 250, 64, 5], fused slc dQ, bf16 outputs', options: { ...base, selectBlock: 32, selectCount: 5, heads: 4, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [100, 1, 250, 64, 5], slcDq: 'fused', outputDType: 'bf16' },
  { name: 'dk = 128 != dv = 64, G = 8, fused slc dQ', options: { ...base, heads: 8, kvHeads: 1, headDim: 128, valueDim: 64 }, seqlens: [400], slcDq: 'fused' },
  { name: "dk = 192, dv = 128, G = 2, l' = 32, odd T = 301, fused slc dQ", options: { ...base, selectBlock: 32, selectCount: 8, heads: 4, kvHeads: 2, headDim: 192, valueDim: 128 }, seqlens: [301], slcDq: 'fused' },
  { name: "l' = 128 (two key tiles per block), G = 4, packed [650, 70], fused slc dQ", options: { compressBlock: 64, compressStride: 32, selectBlock: 128, selectCount: 4, window: 200, heads: 4, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [650, 70], slcDq: 'fused' },
  { name: 'independent K/V per branch, compressed K/V given', options: { ...base, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [300, 211], independent: true },
  { name: 'learned phi = linear, G = 4, packed [257, 90, 1]', options: { ...base, phi: 'linear', heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [257, 90, 1] },
  { name: 'learned phi = mlp, dk = 128 != dv = 64, G = 16', options: { ...base, phi: 'mlp', heads: 16, kvHeads: 1, headDim: 128, valueDim: 64 }, seqlens: [301] },
  { name: 'G = 16, D = 128, packed [300, 1, 217], fused slc dQ, the selected dK/dV rows by TMA (sm_90 default)', options: { ...base, selectCount: 5, heads: 32, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [300, 1, 217], slcDq: 'fused' },
  { name: 'G = 16, D = 128, packed [300, 1, 217], fused slc dQ, the selected dK/dV rows by cp.async (NSA_SLC_BWD_TMA=0)', options: { ...base, selectCount: 6, heads: 32, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [300, 1, 217], slcDq: 'fused', env: { NSA_SLC_BWD_TMA: '0' } },
  // No sequence longer than n l': the selected branch is dense attention, forward and backward (as in the cases above
  // whose sequences are all <= 384 = n l'); and the same batch shape through the scores and gathers.
  { name: "every visible block selected (T <= n l' = 256): the dense selected backward, G = 4, D = 128, packed [256, 1, 150]", options: { ...base, selectCount: 4, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [256, 1, 150] },
  { name: "every visible block selected (T <= n l' = 256), through the scores and gathers (NSA_SLC_DENSE=0), G = 4, packed [256, 1, 150]", options: { ...base, selectCount: 4, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [256, 1, 150], slcDq: 'fused', env: { NSA_SLC_DENSE: '0' } },
  // G above 16: the selected backward takes a position's heads 16 at a time, its dK/dV rows by TMA at G = 64.
  { name: 'G = 64 (MQA), T = 450, fused slc dQ', options: { ...base, heads: 64, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [450], slcDq: 'fused' },
  { name: 'G = 24 (a part-filled second chunk of 16 heads), T = 380, group-centric slc dQ', options: { ...base, heads: 24, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [380], slcDq: 'group' },
];

/** Runs `body` with NSA_SLC_DQ set to `mode` (left as it was when undefined), restoring it after. */
function withSlcDq<T>(mode: Case['slcDq'], body: () => Promise<T>): Promise<T> {
  return withEnvironment({ NSA_SLC_DQ: mode }, body);
}

/** Packed offsets [0, len0, len0 + len1, ...] of a case's sequences. */
function cuSeqlensOf(seqlens: readonly number[]): number[] {
  const cu = [0];
  for (const len of seqlens) cu.push(cu[cu.length - 1]! + len);
  return cu;
}

const GRADIENTS = ['dq', 'dk', 'dv', 'dg', 'dkCmp', 'dvCmp', 'dkSlc', 'dvSlc', 'dkWin', 'dvWin'] as const;

function sameBits(a: NsaGradients, b: NsaGradients): boolean {
  const same = (x: Tensor | undefined, y: Tensor | undefined): boolean => {
    if (x === undefined || y === undefined) return x === y;
    return Buffer.from(x.data.buffer, x.data.byteOffset, x.data.byteLength).equals(Buffer.from(y.data.buffer, y.data.byteOffset, y.data.byteLength));
  };
  const phiSame = (x: NsaGradients['dPhiK'], y: NsaGradients['dPhiK']): boolean =>
    x === undefined || y === undefined ? x === y : Object.keys(x).every((name) => same(x[name], y[name]));
  return GRADIENTS.every((name) => same(a[name], b[name])) && phiSame(a.dPhiK, b.dPhiK) && phiSame(a.dPhiV, b.dPhiV);
}

if (!availability.available) {
  describe('cuda NSA backward', () => {
    it.skip(`skipped: no usable CUDA GPU here (${availability.reason.split('\n')[0]})`, () => {});
  });
} else {
  describe(`cuda NSA backward on ${availability.device.name}`, () => {
    let backend: CudaBackend;
    /** Backends built under an environment of their own (kernel tuning), disposed before the first. */
    const others: CudaBackend[] = [];
    beforeAll(async () => {
      backend = (await createCudaBackend()) as CudaBackend;
    });
    afterAll(() => {
      // One context per process: dispose the first backend only after the others.
      for (const b of others.reverse()) b.dispose();
      backend.dispose();
    });

    // Dense causal attention is the window branch with w >= T: with gates (0, 0, 1) the reference NSA backward's dq,
    // dk and dv are dense attention's gradients.
    const DENSE = [
      { name: 'G = 4, D = 128, packed [333, 1, 366]', options: { heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [333, 1, 366] },
      { name: 'G = 1, D = 64, T = 257', options: { heads: 2, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [257] },
    ];
    for (const [i, c] of DENSE.entries()) {
      it(`dense causal backward (the benchmark baseline), ${c.name}, against the float64 reference`, () => {
        const config = new NSAConfig({ ...c.options, window: 1024 });
        const cuSeqlens = cuSeqlensOf(c.seqlens);
        const inputs = randomInputs({ config, cuSeqlens, dtype: 'bf16', seed: 40 + i });
        const dO = Tensor.randn([...inputs.q.shape.slice(0, 3), config.valueDim], 'bf16', 60 + i);
        const gpu = backend.denseAttentionBackward(validateNsaInputs(inputs, config), dO);
        const ref = referenceInputs(inputs, cuSeqlens, config);
        const windowOnly = { ...ref, g: ref.g.map((_, j) => (j % 3 === 2 ? 1 : 0)) };
        const want = nsaReferenceBackward(config, windowOnly, nsaReferenceForward(config, windowOnly), dO.toFloat64());
        expectRelativeRms(gpu.dq, want.dq, 'dense dq', TOL);
        expectRelativeRms(gpu.dk, want.dk, 'dense dk', TOL);
        expectRelativeRms(gpu.dv, want.dv, 'dense dv', TOL);
      });
    }

    for (const [i, c] of CASES.entries()) {
      it(c.name, () => withEnvironment(c.env ?? {}, () => runCase(c, i)));
    }

    // The inverse index by ranked warps (the default where a chunk's counters fit shared memory) and by one thread's
    // walk a chunk (NSA_INDEX_RANKED=0): a stable counting sort has one answer, so the same entries in the same order,
    // and the selected dK/dV, which sums each key's pairs in that order, the same bits. n = 4 to 7, packed sequences
    // with one-token ones, l' = 32, 64 and 128, G = 1 to 16, both selected dQ forms, the FSA forward's index shared
    // with the backward.
    it('inverse index by ranked warps and by walks (NSA_INDEX_RANKED=0) give the same gradients, bit for bit', async () => {
      for (const i of [1, 3, 4, 5, 6, 9, 11, 13]) {
        const c = CASES[i]!;
        const config = new NSAConfig(c.options);
        const inputs = randomInputs({ config, cuSeqlens: cuSeqlensOf(c.seqlens), dtype: 'bf16', seed: 700 + 31 * i });
        const dO = Tensor.randn([...inputs.q.shape.slice(0, 3), config.valueDim], 'bf16', 800 + i);
        const gradients = (env: Record<string, string>): Promise<{ blocks: Int32Array; grads: NsaGradients }> =>
          withEnvironment({ ...env, NSA_SLC_DQ: c.slcDq }, async () => {
            const b = (await createCudaBackend()) as CudaBackend; // reads the tuning when it builds this config's kernels
            others.push(b);
            const result = await nsaForward(inputs, config, { backend: b });
            const grads = await result.backward(dO);
            const blocks = Int32Array.from(result.blockIndices.data);
            result.release();
            return { blocks, grads };
          });
        const walked = await gradients({ ...c.env, NSA_INDEX_RANKED: '0' });
        const ranked = await gradients({ ...c.env });
        expect(Buffer.from(ranked.blocks.buffer).equals(Buffer.from(walked.blocks.buffer)), `${c.name}: the same blocks`).toBe(true);
        expect(sameBits(ranked.grads, walked.grads), `${c.name}: gradients bit for bit`).toBe(true);
        await new Promise<void>((resolve) => setImmediate(resolve)); // let vitest's RPC replies in between the compiles
      }
    });

    async function runCase(c: Case, i: number): Promise<void> {
      const config = new NSAConfig(c.options);
      const cuSeqlens = cuSeqlensOf(c.seqlens);
      let inputs = randomInputs({ config, cuSeqlens, dtype: 'bf16', seed: 500 + 31 * i });
      if (c.independent) inputs = withIndependentKv(inputs, config, cuSeqlens, 500 + 31 * i);
      const result = await nsaForward(inputs, config, { backend, outputDType: c.outputDType ?? 'f32' });
      const dO = Tensor.randn(result.o.shape, 'bf16', 900 + i);
      const [grads, again] = await withSlcDq(c.slcDq, async () => [await result.backward(dO), await result.backward(dO)] as const);
      expect(sameBits(grads, again), 'two backward runs give bitwise-identical gradients').toBe(true);
      result.release();

      const ref = referenceInputs(inputs, cuSeqlens, config);
      const fwd = nsaReferenceForward(config, ref, result.blockIndices.data);
      const want = nsaReferenceBackward(config, ref, fwd, dO.toFloat64());
      if (c.outputDType !== undefined) {
        for (const b of ['oCmp', 'oSlc', 'oWin'] as const) {
          expect(result[b].dtype, `${b} in the asked dtype`).toBe(c.outputDType);
          expectRelativeRms(result[b].toFloat64(), fwd[b], b, TOL);
        }
      }
      for (const name of GRADIENTS) {
        const expected = want[name];
        const got = grads[name];
        expect(got === undefined, `${name} present on both sides`).toBe(expected === undefined);
        if (expected === undefined || got === undefined) continue;
        expectRelativeRms(got.toFloat64(), expected, name, TOL);
      }
      // A learned phi's parameter gradients, each by name. The keys' bias (and pe, for linear phi) shift every
      // compressed key of a softmax alike, so their exact gradient is 0 and the GPU's is rounding noise: their
      // error is measured against the side's largest parameter gradient, a sum over the same tokens that does not
      // cancel.
      for (const side of ['dPhiK', 'dPhiV'] as const) {
        const expected = want[side];
        const got = grads[side];
        expect(got === undefined, `${side} present on both sides`).toBe(expected === undefined);
        if (expected === undefined || got === undefined) continue;
        expect(Object.keys(got).sort()).toEqual(Object.keys(expected).sort());
        const scale = Math.max(...Object.values(expected).map(rms));
        for (const [name, values] of Object.entries(expected)) {
          expectRelativeRms(got[name]!.toFloat64(), values, `${side}.${name}`, { ...TOL, scale: side === 'dPhiK' ? scale : 0 });
        }
      }
    }
  });
}
