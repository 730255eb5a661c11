// The cuda KV cache and decode step against the float64 reference: a decode step equals the matching rows of a
// prefill over the same tokens (attention compared given the blocks the GPU chose, the choice by scores). Each
// case runs under each of VARIANTS: the fused step (one launch; forced, as the small batches here would take three
// launches by default) over a head-major cache, in two ticket orders, and the three-launch step over a token-major
// cache (NSA_DECODE_FUSED=0, NSA_DECODE_LAYOUT=token). Skips, saying why, where no GPU is present.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { cudaAvailability } from '../../src/backends/cuda/libraries.js';
import { createCudaBackend, type CudaBackend } from '../../src/backends/cuda/cuda-backend.js';
import { CudaKvCache } from '../../src/backends/cuda/nsa/cuda-kv-cache.js';
import { createKvCache } from '../../src/nsa/decode/create.js';
import { randomPhiParams } from '../../src/nsa/random-inputs.js';
import { blockScoresAt, nsaReferenceForward, prepareNsaProblem } from '../../src/reference/nsa-forward.js';
import { Rng } from '../../src/tensor/random.js';
import { Tensor } from '../../src/tensor/tensor.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { referencePhi } from '../helpers/gpu-inputs.js';

const availability = cudaAvailability();

function bf16Tokens(rng: Rng, T: number, heads: number, dim: number): Tensor {
  const a = new Float64Array(T * heads * dim);
  for (let i = 0; i < a.length; i++) a[i] = rng.normal();
  return Tensor.fromValues(a, [T, heads, dim], 'bf16');
}

function rows(t: Tensor, from: number, to: number): Tensor {
  const width = t.shape.slice(1).reduce((a, b) => a * b, 1);
  return new Tensor(t.dtype, [to - from, ...t.shape.slice(1)], t.data.slice(from * width, to * width) as never);
}

interface Case {
  readonly name: string;
  readonly options: NSAConfigOptions;
  readonly lengths: readonly number[];
  readonly speculative: number;
}

/** The step variants every case runs under: environment settings read when the cache and the step are made. */
const VARIANTS: { name: string; env: Record<string, string | undefined> }[] = [
  { name: 'fused, head-major', env: { NSA_DECODE_FUSED: '1', NSA_DECODE_LAYOUT: undefined, NSA_DECODE_LAG: undefined } },
  { name: 'fused, slc items one row behind', env: { NSA_DECODE_FUSED: '1', NSA_DECODE_LAYOUT: undefined, NSA_DECODE_LAG: '1' } },
  { name: 'three launches, token-major', env: { NSA_DECODE_FUSED: '0', NSA_DECODE_LAYOUT: 'token', NSA_DECODE_LAG: undefined } },
];

async function withEnv<T>(env: Record<string, string | undefined>, run: () => Promise<T>): Promise<T> {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  const set = (values: Record<string, string | undefined>): void => {
    for (const [k, v] of Object.entries(values)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  };
  set(env);
  try {
    return await run();
  } finally {
    set(saved);
  }
}

const base = { compressBlock: 32, compressStride: 16, selectBlock: 64, selectCount: 6, window: 96 };
const CASES: Case[] = [
  { name: 'G = 16, ragged batch [700, 33, 1, 129]', options: { ...base, heads: 16, kvHeads: 1, headDim: 64, valueDim: 64 }, lengths: [700, 33, 1, 129], speculative: 1 },
  { name: 'G = 4, D = 128, speculative 3 tokens', options: { ...base, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, lengths: [555, 300], speculative: 3 },
  { name: 'G = 1, fla preset form', options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 4, window: 128, heads: 2, kvHeads: 2, headDim: 64, valueDim: 64 }, lengths: [1000], speculative: 2 },
  // Over 256 candidate blocks for one top-n CTA (several per thread) and two chunks of compressed keys.
  { name: 'G = 1, l = d = l\' = 16, 263 candidate blocks', options: { compressBlock: 16, compressStride: 16, selectBlock: 16, selectCount: 8, window: 64, heads: 2, kvHeads: 2, headDim: 64, valueDim: 64 }, lengths: [4200, 3001], speculative: 2 },
  // n = 16 at G = 16: the three-launch selection takes 8 CTAs a pair (their 8 lists of 16 merge from registers),
  // each merging o_cmp for two heads.
  { name: 'G = 16, n = 16, selection over 8 CTAs a pair', options: { ...base, selectCount: 16, heads: 16, kvHeads: 1, headDim: 64, valueDim: 64 }, lengths: [1500, 777], speculative: 1 },
  // Learned phi: the cache compresses on the host (phi = mean on the device), so these hold that path.
  { name: 'learned phi = linear, G = 4, dk = 128 != dv = 64', options: { ...base, phi: 'linear', heads: 8, kvHeads: 2, headDim: 128, valueDim: 64 }, lengths: [403, 50], speculative: 2 },
  { name: 'learned phi = mlp, G = 2', options: { ...base, phi: 'mlp', heads: 4, kvHeads: 2, headDim: 64, valueDim: 64 }, lengths: [333], speculative: 1 },
  // G above 16: the step takes a KV head's query heads 16 at a time (G = 24: the second 16 part-filled).
  { name: 'G = 64 (MQA), ragged batch [600, 1]', options: { ...base, heads: 64, kvHeads: 1, headDim: 64, valueDim: 64 }, lengths: [600, 1], speculative: 1 },
  { name: 'G = 24, T = 300, speculative 2 tokens', options: { ...base, heads: 24, kvHeads: 1, headDim: 64, valueDim: 64 }, lengths: [300], speculative: 2 },
];

if (!availability.available) {
  describe('cuda decode', () => {
    it.skip(`skipped: no usable CUDA GPU here (${availability.reason.split('\n')[0]})`, () => {});
  });
} else {
  describe(`cuda decode on ${availability.device.name}`, () => {
    let backend: CudaBackend;
    beforeAll(async () => {
      backend = (await createCudaBackend()) as CudaBackend;
    });
    afterAll(() => backend.dispose());

    for (const [ci, c] of CASES.entries()) for (const variant of VARIANTS) {
      it(`${c.name} (${variant.name})`, () => withEnv(variant.env, async () => {
        const config = new NSAConfig(c.options);
        const rng = new Rng(40 + ci);
        const phiK = randomPhiParams(config, config.headDim, 'f32', 60 + ci);
        const phiV = randomPhiParams(config, config.valueDim, 'f32', 70 + ci);
        const cache = await createKvCache(config, { backend, pageTokens: 128, phiK, phiV });
        const seqs = c.lengths.map((T) => ({
          k: bf16Tokens(rng, T, config.kvHeads, config.headDim),
          v: bf16Tokens(rng, T, config.kvHeads, config.valueDim),
          q: bf16Tokens(rng, T, config.heads, config.headDim),
          g: Tensor.uniform([T, config.heads, 3], 'f32', 90 + ci),
        }));
        for (const seq of seqs) {
          const s = cache.addSequence();
          const T = seq.k.shape[0]!;
          for (let at = 0; at < T; ) {
            const size = Math.min(T - at, rng.int(1, 200));
            cache.append(s, rows(seq.k, at, at + size), rows(seq.v, at, at + size));
            at += size;
          }
          expect(cache.compressedLength(s)).toBe(config.compressedLength(T));
        }
        const queries = seqs.map((seq, s) => {
          const T = seq.k.shape[0]!;
          const Tq = Math.min(c.speculative, T);
          return { sequence: s, q: rows(seq.q, T - Tq, T), g: rows(seq.g, T - Tq, T) };
        });
        const out = await cache.decode(queries);
        // Without the branches' outputs (the step a server runs, and the benchmark's): the same blocks and gated sum.
        const bare = await cache.decode(queries, { branches: false });
        expect(Object.keys(bare).sort()).toEqual(['blockIndices', 'o']);
        expect(Array.from(bare.blockIndices.data)).toEqual(Array.from(out.blockIndices.data));
        expectRelativeRms(Array.from(bare.o.toFloat64()), Array.from(out.o.toFloat64()), 'o without the branches', { rtol: 1e-6 });
        let row = 0;
        let differing = 0;
        for (const [s, seq] of seqs.entries()) {
          const T = seq.k.shape[0]!;
          const Tq = queries[s]!.q.shape[0]!;
          const ref = { q: seq.q.toFloat64(), k: seq.k.toFloat64(), v: seq.v.toFloat64(), g: seq.g.toFloat64(), cuSeqlens: [0, T], ...referencePhi(config, phiK, phiV) };
          const own = nsaReferenceForward(config, ref);
          const { heads: Hq, kvHeads: H, valueDim: dv, selectCount: n } = config;
          // The reference given the GPU's blocks on the decoded rows.
          const fixed = Int32Array.from(own.blockIndices);
          fixed.set(out.blockIndices.data.subarray(row * H * n, (row + Tq) * H * n), (T - Tq) * H * n);
          const given = nsaReferenceForward(config, ref, fixed);
          const pick = (a: ArrayLike<number>, width: number): number[] => Array.from(a).slice((T - Tq) * width, T * width);
          const mine = (t: Tensor, width: number): number[] => Array.from(t.toFloat64()).slice(row * width, (row + Tq) * width);
          expectRelativeRms(mine(out.o, Hq * dv), pick(given.o, Hq * dv), `sequence ${s}: o`, { rtol: 5e-3 });
          expectRelativeRms(mine(out.lseCmp, Hq), pick(given.lseCmp, Hq), `sequence ${s}: lse_cmp`, { rtol: 5e-3 });
          expectRelativeRms(mine(out.lseSlc, Hq), pick(given.lseSlc, Hq), `sequence ${s}: lse_slc`, { rtol: 5e-3 });
          expectRelativeRms(mine(out.lseWin, Hq), pick(given.lseWin, Hq), `sequence ${s}: lse_win`, { rtol: 5e-3 });
          const problem = prepareNsaProblem(config, ref);
          for (let j = 0; j < Tq; j++) {
            for (let h = 0; h < H; h++) {
              const got = Array.from(out.blockIndices.data.subarray(((row + j) * H + h) * n, ((row + j) * H + h + 1) * n)).filter((x) => x >= 0);
              const t = T - Tq + j;
              const want = Array.from(own.blockIndices.subarray((t * H + h) * n, (t * H + h + 1) * n)).filter((x) => x >= 0);
              if (got.join() === want.join()) continue;
              differing++;
              const scores = blockScoresAt(problem, t, h);
              const sum = (js: number[]): number => js.reduce((a, jj) => a + scores[jj]!, 0);
              expect(sum(want) - sum(got), `sequence ${s} t = ${t} head ${h}: got [${got}], reference [${want}]`).toBeLessThanOrEqual(1e-2 * sum(want));
            }
          }
          row += Tq;
        }
        expect(differing).toBeLessThanOrEqual(2);
        cache.dispose();
      }));
    }

    for (const variant of VARIANTS) it(`appendRandom and the timed step run (the benchmark path; ${variant.name})`, () => withEnv(variant.env, async () => {
      const config = new NSAConfig({ ...base, heads: 16, kvHeads: 1, headDim: 128, valueDim: 128 });
      const cache = await createKvCache(config, { backend });
      for (let s = 0; s < 3; s++) cache.appendRandom(cache.addSequence(), 5000 + s, s);
      expect(cache.compressedLength(2)).toBe(config.compressedLength(5002));
      const nsa = await cache.timeDecodeStep({ warmup: 1, iterations: 3 });
      const dense = await cache.timeDecodeStep({ warmup: 1, iterations: 3, dense: true });
      expect(nsa.medianMs).toBeGreaterThan(0);
      expect(dense.medianMs).toBeGreaterThan(0);
      // A step over the random cache (filled and compressed on the device) gives finite outputs.
      const step = await cache.decode([{ sequence: 1, q: Tensor.randn([1, 16, 128], 'f32', 5), g: Tensor.uniform([1, 16, 3], 'f32', 6) }]);
      for (const t of [step.o, step.oCmp, step.oSlc, step.oWin, step.lseCmp]) expect(Array.from(t.toFloat64()).every(Number.isFinite)).toBe(true);
      // Each launch alone (replayed as a one-launch graph where the driver has graphs).
      expect(cache).toBeInstanceOf(CudaKvCache);
      const launches = await (cache as CudaKvCache).timeDecodeLaunches({ warmup: 1, iterations: 3 });
      expect(launches.map((l) => l.name)).toEqual(variant.env['NSA_DECODE_FUSED'] === '0' ? ['cmp_win', 'select', 'slc'] : ['fused']);
      for (const l of launches) expect(l.medianMs).toBeGreaterThan(0);
      cache.dispose();
    }));
  });
}
