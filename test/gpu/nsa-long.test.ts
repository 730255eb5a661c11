// The cuda forward, backward and decode past 32-bit offsets (issue 3: "T up to 1M tokens must not overflow"). At
// 1.1M tokens and 16 query heads of 128 the queries hold 2.25e9 elements and each fp32 output 9 GB, so the last
// rows' q, o, lse and gate offsets lie past 2^31 elements (their byte offsets past 2^32); at G = 4 the FSA order's
// partial outputs, one per (token, query head, slot), reach 1.8e10 elements. Rows on both sides of the boundary, and
// a packed sequence that starts past it, are checked against the reference evaluated for those rows alone (the whole
// reference would take days): the selection by the reference scores, the outputs given the blocks the GPU chose. The
// backward is checked through that packed sequence: its gradients (dq, dg and its tokens' dk, dv) must be those the
// reference gives it alone, as packed sequences are independent. Decode reads a 1.1M-token cache whose keys hold
// 2.25e9 elements a sequence. Skips, saying why, where no GPU is present or the GPU or the host has too little
// memory.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { cudaAvailability } from '../../src/backends/cuda/libraries.js';
import { createCudaBackend } from '../../src/backends/cuda/cuda-backend.js';
import type { Backend } from '../../src/backends/backend.js';
import {
  allocateOutputs,
  branchOperands,
  nsaReferenceForward,
  prepareNsaProblem,
  QueryEvaluator,
  type NsaReferenceOutputs,
} from '../../src/reference/nsa-forward.js';
import { nsaReferenceBackward } from '../../src/reference/nsa-backward.js';
import { createKvCache } from '../../src/nsa/decode/create.js';
import { nsaForward } from '../../src/nsa/operator.js';
import type { NsaOutputs } from '../../src/nsa/types.js';
import { bf16ToF32 } from '../../src/tensor/dtype.js';
import { Tensor } from '../../src/tensor/tensor.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { memoryMissing, normalBf16, yieldToRunner } from '../helpers/long-inputs.js';
import { checkRowSelection } from '../helpers/selection-check.js';

const availability = cudaAvailability();
const TOL = { rtol: 5e-3 };
const CU_SEQLENS = [0, 1_099_000, 1_100_000];
const N = CU_SEQLENS[CU_SEQLENS.length - 1]!;
// Both ends, the first row whose q lies wholly past 2^31 elements at 16 heads of 128 (2^31 / 2048 = 1,048,576),
// the last row of the long sequence (68.7k compressed keys), and the packed sequence past the boundary.
const ROWS = [7, 1_048_575, 1_048_576, 1_098_999, 1_099_000, 1_099_063, 1_099_999];

interface Case {
  readonly name: string;
  readonly options: NSAConfigOptions;
  readonly kernel: 'group' | 'fsa';
  /** Device memory the case needs (inputs, fp32 outputs, the FSA scratch), with room to spare. */
  readonly deviceBytes: number;
}

const CASES: Case[] = [
  { name: 'G = 16, group-centric: 2.25e9 query elements', options: { heads: 16, kvHeads: 1, headDim: 128, valueDim: 128 }, kernel: 'group', deviceBytes: 50e9 },
  { name: 'G = 4, FSA order: 1.8e10 partial-output elements', options: { heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, kernel: 'fsa', deviceBytes: 66e9 },
];

/** Seeded inputs of `config` over CU_SEQLENS: q, k, v ~ N(0, 1) in bf16, gates ~ U(0, 1). */
async function longInputs(config: NSAConfig, seed: number): Promise<{ q: Tensor<'bf16'>; k: Tensor<'bf16'>; v: Tensor<'bf16'>; g: Tensor<'f32'> }> {
  const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = config;
  const q = new Tensor('bf16', [1, N, Hq, dk], normalBf16(N * Hq * dk, seed));
  await yieldToRunner();
  return {
    q,
    k: new Tensor('bf16', [1, N, H, dk], normalBf16(N * H * dk, seed + 1)),
    v: new Tensor('bf16', [1, N, H, dv], normalBf16(N * H * dv, seed + 2)),
    g: Tensor.uniform([1, N, Hq, 3], 'f32', seed + 3),
  };
}

/** Elements [start, end) of a tensor's storage as doubles (bf16 decoded). */
function elements(t: Tensor, start: number, end: number): Float64Array {
  const out = new Float64Array(end - start);
  const data = t.data as ArrayLike<number>;
  const decode = t.dtype === 'bf16' ? bf16ToF32 : (x: number) => x;
  for (let i = start; i < end; i++) out[i - start] = decode(data[i]!);
  return out;
}

/** The rows ROWS of a [N, heads, width] array, as doubles (`decode` turns a stored element into its value). */
function rowsOf(data: ArrayLike<number>, heads: number, width: number, decode = (x: number) => x): Float64Array {
  const out = new Float64Array(ROWS.length * heads * width);
  const size = heads * width;
  ROWS.forEach((row, i) => {
    for (let e = 0; e < size; e++) out[i * size + e] = decode(data[row * size + e]!);
  });
  return out;
}

if (!availability.available) {
  describe('cuda NSA past 32-bit offsets', () => {
    it.skip(`skipped: no usable CUDA GPU here (${availability.reason.split('\n')[0]})`, () => {});
  });
} else {
  const { device } = availability;
  describe(`cuda NSA past 32-bit offsets on ${device.name}`, () => {
    const backends = new Map<string, Backend>();
    beforeAll(async () => {
      for (const kernel of ['group', 'fsa'] as const) backends.set(kernel, await createCudaBackend({ selectedKernel: kernel }));
    });
    afterAll(() => {
      for (const b of [...backends.values()].reverse()) b.dispose();
    });

    for (const [ci, c] of CASES.entries()) {
      const missing = memoryMissing(device.totalBytes, c.deviceBytes);
      (missing === '' ? it : it.skip)(`${c.name}, T = ${N} in two sequences${missing}`, async () => {
        const config = new NSAConfig(c.options);
        const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n } = config;
        const { q, k, v, g } = await longInputs(config, 500 + 31 * ci);
        await yieldToRunner();
        const result = await nsaForward({ q, k, v, g, cuSeqlens: CU_SEQLENS }, config, {
          backend: backends.get(c.kernel)!,
          outputDType: 'f32',
          checkFinite: false, // a scan of 2.25e9 values on the host; the inputs are made finite above
        });
        await yieldToRunner();
        try {
          // The reference for the checked rows alone: their queries and gates, all keys and values.
          const problem = prepareNsaProblem(config, {
            q: rowsOf(q.data, Hq, dk, bf16ToF32),
            k: k.toFloat32(),
            v: v.toFloat32(),
            g: rowsOf(g.data, Hq, 3),
            cuSeqlens: CU_SEQLENS,
          });
          const gpuBlocks = new Int32Array(ROWS.length * H * n);
          ROWS.forEach((row, i) => gpuBlocks.set(result.blockIndices.data.subarray(row * H * n, (row + 1) * H * n), i * H * n));
          const evaluator = new QueryEvaluator(config, branchOperands(problem), problem.layout.totalCompressed, CU_SEQLENS[1]!);
          const shape = { totalTokens: ROWS.length, heads: Hq, kvHeads: H, dv };
          const own = allocateOutputs(shape, n);
          const given = allocateOutputs(shape, n);
          let differing = 0;
          for (const [i, row] of ROWS.entries()) {
            await yieldToRunner();
            const seq = problem.layout.sequences.find((s) => row >= s.start && row < s.start + s.length)!;
            const t = row - seq.start;
            evaluator.evaluate(seq, t, problem.inputs.q, problem.inputs.g, i, own, i);
            evaluator.evaluate(seq, t, problem.inputs.q, problem.inputs.g, i, given, i, gpuBlocks);
            differing += checkRowSelection(problem, row, i, gpuBlocks, own.blockIndices);
          }
          compareRows(result, given, Hq, dv);
          console.log(`${c.name}: ${ROWS.length} rows past and before 2^31 elements match; selection differs from the reference in ${differing} of ${ROWS.length * H}`);
        } finally {
          result.release();
        }
      });
    }

    const backwardCase = CASES[0]!;
    const backwardBytes = 64e9; // the forward's saved state with bf16 branch outputs, dO, dq and its parts
    const missing = memoryMissing(device.totalBytes, backwardBytes);
    (missing === '' ? it : it.skip)(`forward + backward, ${backwardCase.name}: the packed sequence past 2^31 elements gets the gradients it gets alone${missing}`, async () => {
      const config = new NSAConfig(backwardCase.options);
      const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n } = config;
      const { q, k, v, g } = await longInputs(config, 700);
      await yieldToRunner();
      const result = await nsaForward({ q, k, v, g, cuSeqlens: CU_SEQLENS }, config, { backend: backends.get('group')!, outputDType: 'bf16', checkFinite: false });
      await yieldToRunner();
      const dO = new Tensor('bf16', [1, N, Hq, dv], normalBf16(N * Hq * dv, 704));
      await yieldToRunner();
      let grads;
      try {
        grads = await result.backward(dO);
      } finally {
        result.release();
      }
      await yieldToRunner();
      // The last sequence alone, [a, b) of the packed rows, through the reference with the blocks the GPU chose.
      const a = CU_SEQLENS[1]!;
      const b = CU_SEQLENS[2]!;
      const alone = { q: elements(q, a * Hq * dk, b * Hq * dk), k: elements(k, a * H * dk, b * H * dk), v: elements(v, a * H * dv, b * H * dv), g: elements(g, a * Hq * 3, b * Hq * 3), cuSeqlens: [0, b - a] };
      const blocks = result.blockIndices.data.slice(a * H * n, b * H * n);
      const fwd = nsaReferenceForward(config, alone, blocks);
      const want = nsaReferenceBackward(config, alone, fwd, elements(dO, a * Hq * dv, b * Hq * dv));
      expectRelativeRms(elements(result.o, a * Hq * dv, b * Hq * dv), fwd.o, 'o', TOL);
      expectRelativeRms(elements(grads.dq, a * Hq * dk, b * Hq * dk), want.dq, 'dq', TOL);
      expectRelativeRms(elements(grads.dg, a * Hq * 3, b * Hq * 3), want.dg, 'dg', TOL);
      expectRelativeRms(elements(grads.dk, a * H * dk, b * H * dk), want.dk, 'dk', TOL);
      expectRelativeRms(elements(grads.dv, a * H * dv, b * H * dv), want.dv, 'dv', TOL);
    });

    // At 16 KV heads of 128 one sequence's cached keys hold 2.25e9 elements (4.5 GB), so its last blocks and its
    // window lie past 2^31 elements of the sequence's storage.
    const decodeMissing = memoryMissing(device.totalBytes, 40e9);
    (decodeMissing === '' ? it : it.skip)(`decode: the last 2 positions of a ${N}-token cache (2.25e9 key elements) and of a short sequence beside it, G = 2${decodeMissing}`, async () => {
      const config = new NSAConfig({ heads: 32, kvHeads: 16, headDim: 128, valueDim: 128 });
      const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n } = config;
      const Tq = 2; // speculative decoding's few tokens a sequence
      const cache = await createKvCache(config, { backend: backends.get('group')!, pageTokens: 65536 });
      try {
        const seqs = [];
        for (const [s, T] of [N, 1000].entries()) {
          const k = new Tensor('bf16', [T, H, dk], normalBf16(T * H * dk, 800 + 10 * s));
          await yieldToRunner();
          const v = new Tensor('bf16', [T, H, dv], normalBf16(T * H * dv, 801 + 10 * s));
          await yieldToRunner();
          const id = cache.addSequence();
          // In uneven chunks, so that compression carries across their boundaries.
          const chunk = (t: Tensor<'bf16'>, from: number, to: number): Tensor => {
            const width = t.shape[1]! * t.shape[2]!;
            return new Tensor('bf16', [to - from, t.shape[1]!, t.shape[2]!], t.data.subarray(from * width, to * width));
          };
          for (let at = 0; at < T; at += 150_001) cache.append(id, chunk(k, at, Math.min(T, at + 150_001)), chunk(v, at, Math.min(T, at + 150_001)));
          expect(cache.compressedLength(id)).toBe(config.compressedLength(T));
          const q = new Tensor('bf16', [Tq, Hq, dk], normalBf16(Tq * Hq * dk, 802 + 10 * s));
          seqs.push({ id, T, k, v, q, g: Tensor.uniform([Tq, Hq, 3], 'f32', 803 + 10 * s) });
          await yieldToRunner();
        }
        const out = await cache.decode(seqs.map((x) => ({ sequence: x.id, q: x.q, g: x.g })));
        let row = 0;
        for (const x of seqs) {
          await yieldToRunner();
          const problem = prepareNsaProblem(config, { q: x.q.toFloat64(), k: x.k.toFloat32(), v: x.v.toFloat32(), g: x.g.toFloat64(), cuSeqlens: [0, x.T] });
          const evaluator = new QueryEvaluator(config, branchOperands(problem), problem.layout.totalCompressed, x.T);
          const shape = { totalTokens: Tq, heads: Hq, kvHeads: H, dv };
          const own = allocateOutputs(shape, n);
          const given = allocateOutputs(shape, n);
          const gpuBlocks = out.blockIndices.data.slice(row * H * n, (row + Tq) * H * n);
          let differing = 0;
          for (let j = 0; j < Tq; j++) {
            const t = x.T - Tq + j;
            evaluator.evaluate(problem.layout.sequences[0]!, t, problem.inputs.q, problem.inputs.g, j, own, j);
            evaluator.evaluate(problem.layout.sequences[0]!, t, problem.inputs.q, problem.inputs.g, j, given, j, gpuBlocks);
            differing += checkRowSelection(problem, t, j, gpuBlocks, own.blockIndices);
          }
          const mine = (t: Tensor, width: number): Float64Array => t.toFloat64().slice(row * width, (row + Tq) * width);
          expectRelativeRms(mine(out.o, Hq * dv), given.o, `sequence of ${x.T}: o`, TOL);
          expectRelativeRms(mine(out.lseCmp, Hq), given.lseCmp, `sequence of ${x.T}: lse_cmp`, TOL);
          expectRelativeRms(mine(out.lseSlc, Hq), given.lseSlc, `sequence of ${x.T}: lse_slc`, TOL);
          expectRelativeRms(mine(out.lseWin, Hq), given.lseWin, `sequence of ${x.T}: lse_win`, TOL);
          console.log(`decode, sequence of ${x.T}: ${Tq} positions match; selection differs from the reference in ${differing} of ${Tq * H}`);
          row += Tq;
        }
      } finally {
        cache.dispose();
      }
    });
  });
}

function compareRows(out: NsaOutputs, ref: NsaReferenceOutputs, Hq: number, dv: number): void {
  const rows = (t: Tensor, width: number): Float64Array => {
    expect(t.dtype, 'outputs asked in f32').toBe('f32');
    return rowsOf(t.data as Float32Array, Hq, width);
  };
  expectRelativeRms(rows(out.o, dv), ref.o, 'o', TOL);
  expectRelativeRms(rows(out.oCmp, dv), ref.oCmp, 'o_cmp', TOL);
  expectRelativeRms(rows(out.oSlc, dv), ref.oSlc, 'o_slc', TOL);
  expectRelativeRms(rows(out.oWin, dv), ref.oWin, 'o_win', TOL);
  expectRelativeRms(rows(out.lseCmp, 1), ref.lseCmp, 'lse_cmp', TOL);
  expectRelativeRms(rows(out.lseSlc, 1), ref.lseSlc, 'lse_slc', TOL);
  expectRelativeRms(rows(out.lseWin, 1), ref.lseWin, 'lse_win', TOL);
}
