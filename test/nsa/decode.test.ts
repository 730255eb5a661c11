// Decoding on the CPU: a decode step gives the matching rows of a prefill over the same tokens; appends in chunks
// give the same cache as one append; bad input is refused and leaves the cache unchanged.

import { describe, expect, it } from 'vitest';
import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { CacheFullError, InputValueError, ShapeError } from '../../src/errors.js';
import { CpuBackend } from '../../src/backends/cpu/cpu-backend.js';
import { createKvCache } from '../../src/nsa/decode/create.js';
import { decodeBytesPerHead, type KvCache } from '../../src/nsa/decode/types.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { Rng } from '../../src/tensor/random.js';
import { Tensor } from '../../src/tensor/tensor.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { randomPhi } from '../helpers/random-problem.js';

const backend = new CpuBackend({ threads: 1 });

/** A sequence's tokens as f32 tensors [T, heads, D] (and the reference's f64 view of them). */
function tokens(rng: Rng, T: number, heads: number, dim: number): Tensor<'f32'> {
  const a = new Float32Array(T * heads * dim);
  for (let i = 0; i < a.length; i++) a[i] = rng.normal();
  return new Tensor('f32', [T, heads, dim], a);
}

function rows(t: Tensor, from: number, to: number): Tensor {
  const width = t.shape.slice(1).reduce((a, b) => a * b, 1);
  return new Tensor(t.dtype, [to - from, ...t.shape.slice(1)], t.data.slice(from * width, to * width) as never);
}

interface Sequence {
  readonly k: Tensor;
  readonly v: Tensor;
  readonly q: Tensor;
  readonly g: Tensor;
}

function randomSequence(rng: Rng, config: NSAConfig, T: number): Sequence {
  const g = new Float32Array(T * config.heads * 3);
  for (let i = 0; i < g.length; i++) g[i] = rng.next();
  return {
    k: tokens(rng, T, config.kvHeads, config.headDim),
    v: tokens(rng, T, config.kvHeads, config.valueDim),
    q: tokens(rng, T, config.heads, config.headDim),
    g: new Tensor('f32', [T, config.heads, 3], g),
  };
}

/** Appends a sequence's tokens in random chunks. */
function appendInChunks(rng: Rng, cache: KvCache, s: number, seq: Sequence, upTo: number): void {
  for (let at = cache.length(s); at < upTo; ) {
    const size = Math.min(upTo - at, rng.int(1, 40));
    cache.append(s, rows(seq.k, at, at + size), rows(seq.v, at, at + size));
    at += size;
  }
}

async function checkDecodeMatchesPrefill(options: NSAConfigOptions, lengths: number[], speculative: number, seed: number): Promise<void> {
  const config = new NSAConfig(options);
  const rng = new Rng(seed);
  const phiK = config.phi === 'mean' ? undefined : randomPhi(rng, config, config.headDim, 6);
  const phiV = config.phi === 'mean' ? undefined : randomPhi(rng, config, config.valueDim, 6);
  const asTensors = (phi: typeof phiK, dim: number): Record<string, Tensor> | undefined => {
    if (phi === undefined) return undefined;
    const H = config.kvHeads;
    const l = config.compressBlock;
    const f32 = (a: Float64Array, shape: number[]): Tensor => Tensor.fromValues(a, shape, 'f32');
    if (phi.kind === 'linear') return { pe: f32(phi.pe as Float64Array, [H, l, dim]), w: f32(phi.w as Float64Array, [H, l * dim, dim]), b: f32(phi.b as Float64Array, [H, dim]) };
    return {
      pe: f32(phi.pe as Float64Array, [H, l, dim]),
      w1: f32(phi.w1 as Float64Array, [H, l * dim, phi.hidden]),
      b1: f32(phi.b1 as Float64Array, [H, phi.hidden]),
      w2: f32(phi.w2 as Float64Array, [H, phi.hidden, dim]),
      b2: f32(phi.b2 as Float64Array, [H, dim]),
    };
  };
  const phiKT = asTensors(phiK, config.headDim);
  const phiVT = asTensors(phiV, config.valueDim);
  const cache = await createKvCache(config, { backend, phiK: phiKT, phiV: phiVT, pageTokens: 16 });
  const sequences = lengths.map((T) => randomSequence(rng, config, T));
  for (const seq of sequences) appendInChunks(rng, cache, cache.addSequence(), seq, seq.k.shape[0]!);
  const queries = sequences.map((seq, s) => {
    const T = seq.k.shape[0]!;
    const Tq = Math.min(speculative, T);
    return { sequence: s, q: rows(seq.q, T - Tq, T), g: rows(seq.g, T - Tq, T) };
  });
  const decoded = await cache.decode(queries);

  // The prefill of each sequence alone, by the reference (f64 of the same f32 values), and its last rows.
  let row = 0;
  for (const [s, seq] of sequences.entries()) {
    const T = seq.k.shape[0]!;
    const Tq = queries[s]!.q.shape[0]!;
    const toPhi = (phi: typeof phiK): typeof phiK => (phi === undefined ? undefined : ({ ...phi } as typeof phiK));
    const ref = nsaReferenceForward(config, {
      q: seq.q.toFloat64(),
      k: seq.k.toFloat64(),
      v: seq.v.toFloat64(),
      g: seq.g.toFloat64(),
      cuSeqlens: [0, T],
      phiK: toPhi(phiK && { ...phiK, ...Object.fromEntries(Object.entries(phiKT!).map(([n, t]) => [n, t.toFloat64()])) } as typeof phiK),
      phiV: toPhi(phiV && { ...phiV, ...Object.fromEntries(Object.entries(phiVT!).map(([n, t]) => [n, t.toFloat64()])) } as typeof phiV),
    });
    const { heads: Hq, kvHeads: H, valueDim: dv, selectCount: n } = config;
    const slice = (a: ArrayLike<number>, width: number, from: number, count: number): number[] => Array.from(a).slice(from * width, (from + count) * width);
    const got = (t: Tensor, width: number): number[] => Array.from(t.toFloat64()).slice(row * width, (row + Tq) * width);
    expect(got(decoded.blockIndices, H * n), `sequence ${s}: block indices`).toEqual(slice(ref.blockIndices, H * n, T - Tq, Tq));
    expectRelativeRms(got(decoded.o, Hq * dv), slice(ref.o, Hq * dv, T - Tq, Tq), `sequence ${s}: o`, { rtol: 1e-6 });
    expectRelativeRms(got(decoded.lseCmp, Hq), slice(ref.lseCmp, Hq, T - Tq, Tq), `sequence ${s}: lse_cmp`, { rtol: 1e-6 });
    expectRelativeRms(got(decoded.lseSlc, Hq), slice(ref.lseSlc, Hq, T - Tq, Tq), `sequence ${s}: lse_slc`, { rtol: 1e-6 });
    row += Tq;
  }
}

const small = { compressBlock: 8, compressStride: 4, selectBlock: 16, selectCount: 4, window: 12 };

describe('decode step equals the last rows of a prefill (cpu)', () => {
  it('mean phi, G = 4, ragged batch with lengths not multiples of d, l or l\'', async () => {
    await checkDecodeMatchesPrefill({ ...small, heads: 8, kvHeads: 2, headDim: 8, valueDim: 6 }, [101, 37, 1, 7, 66], 1, 1);
  });
  it('speculative decoding: the last 3 positions at once', async () => {
    await checkDecodeMatchesPrefill({ ...small, heads: 4, kvHeads: 1, headDim: 8, valueDim: 8 }, [90, 23], 3, 2);
  });
  it('linear phi, G = 1', async () => {
    await checkDecodeMatchesPrefill({ ...small, phi: 'linear', heads: 2, kvHeads: 2, headDim: 4, valueDim: 4 }, [59, 13], 1, 3);
  });
  it('mlp phi, G = 16, l = d = l\'', async () => {
    await checkDecodeMatchesPrefill({ compressBlock: 8, compressStride: 8, selectBlock: 8, selectCount: 3, window: 5, phi: 'mlp', heads: 16, kvHeads: 1, headDim: 4, valueDim: 4 }, [77], 2, 4);
  });
  it('random configs: G in 1..16, odd lengths', async () => {
    const rng = new Rng(77);
    for (let trial = 0; trial < 6; trial++) {
      const d = rng.int(1, 4);
      const l = d * rng.int(1, 3);
      const kv = rng.int(1, 2);
      await checkDecodeMatchesPrefill(
        { compressBlock: l, compressStride: d, selectBlock: l * rng.int(1, 2), selectCount: rng.int(1, 5), window: rng.int(1, 20), heads: kv * rng.int(1, 16), kvHeads: kv, headDim: rng.int(1, 6), valueDim: rng.int(1, 6) },
        Array.from({ length: rng.int(1, 3) }, () => rng.int(1, 60)),
        rng.int(1, 3),
        200 + trial,
      );
    }
  });
});

describe('the KV cache', () => {
  const config = new NSAConfig({ ...small, heads: 4, kvHeads: 2, headDim: 8, valueDim: 4 });

  it('appends in chunks of any size give the same cache (and outputs) as one append', async () => {
    const rng = new Rng(5);
    const seq = randomSequence(rng, config, 83);
    const one = await createKvCache(config, { backend });
    const many = await createKvCache(config, { backend, pageTokens: 8 });
    one.append(one.addSequence(), seq.k, seq.v);
    appendInChunks(rng, many, many.addSequence(), seq, 83);
    expect(many.length(0)).toBe(83);
    expect(many.compressedLength(0)).toBe(config.compressedLength(83));
    const query = [{ sequence: 0, q: rows(seq.q, 82, 83), g: rows(seq.g, 82, 83) }];
    const [a, b] = [await one.decode(query), await many.decode(query)];
    expect(Array.from(a.o.toFloat64())).toEqual(Array.from(b.o.toFloat64()));
  });

  it('decodes without the branches\' outputs on request: the same gated sum and blocks, nothing else', async () => {
    const rng = new Rng(6);
    const seq = randomSequence(rng, config, 61);
    const cache = await createKvCache(config, { backend });
    cache.append(cache.addSequence(), seq.k, seq.v);
    const query = [{ sequence: 0, q: rows(seq.q, 59, 61), g: rows(seq.g, 59, 61) }];
    const [full, bare] = [await cache.decode(query), await cache.decode(query, { branches: false })];
    expect(Object.keys(bare).sort()).toEqual(['blockIndices', 'o']);
    expect(Array.from(bare.o.toFloat64())).toEqual(Array.from(full.o.toFloat64()));
    expect(Array.from(bare.blockIndices.data)).toEqual(Array.from(full.blockIndices.data));
    expect(Object.keys(await cache.decode(query, { branches: true }))).toContain('oSlc');
  });

  it('reports its size in bytes, growing in pages', async () => {
    const cache = await createKvCache(config, { backend, pageTokens: 16 });
    const s = cache.addSequence();
    expect(cache.bytes).toBe(0);
    cache.append(s, tokens(new Rng(1), 5, 2, 8), tokens(new Rng(2), 5, 2, 4));
    const raw = 16 * 2 * (8 + 4) * 4; // one page of 16 tokens, f32
    expect(cache.bytes).toBe(raw); // no complete compression block yet
    cache.append(s, tokens(new Rng(1), 5, 2, 8), tokens(new Rng(2), 5, 2, 4));
    const compressed = 4 * 2 * (8 + 4) * 8; // a page of ceil(16 / d) compressed rows, f64
    expect(cache.compressedLength(s)).toBe(1);
    expect(cache.bytes).toBe(raw + compressed);
  });

  it('refuses bad input and stays unchanged', async () => {
    const cache = await createKvCache(config, { backend, maxTokens: 20 });
    const s = cache.addSequence();
    cache.append(s, tokens(new Rng(1), 10, 2, 8), tokens(new Rng(2), 10, 2, 4));
    const before = { length: cache.length(s), bytes: cache.bytes, compressed: cache.compressedLength(s) };
    const unchanged = (): void => expect({ length: cache.length(s), bytes: cache.bytes, compressed: cache.compressedLength(s) }).toEqual(before);

    expect(() => cache.append(3, tokens(new Rng(1), 1, 2, 8), tokens(new Rng(2), 1, 2, 4))).toThrow(InputValueError);
    expect(() => cache.append(s, tokens(new Rng(1), 11, 2, 8), tokens(new Rng(2), 11, 2, 4))).toThrow(CacheFullError);
    expect(() => cache.append(s, tokens(new Rng(1), 1, 2, 7), tokens(new Rng(2), 1, 2, 4))).toThrow(ShapeError);
    expect(() => cache.append(s, tokens(new Rng(1), 2, 2, 8), tokens(new Rng(2), 1, 2, 4))).toThrow(/v: expected shape \[2, 2, 4\]/);
    const nan = tokens(new Rng(1), 1, 2, 8);
    (nan.data as Float32Array)[3] = NaN;
    expect(() => cache.append(s, nan, tokens(new Rng(2), 1, 2, 4))).toThrow(/k: element 3/);
    unchanged();

    const q = tokens(new Rng(3), 1, 4, 8);
    const g = Tensor.uniform([1, 4, 3], 'f32', 4);
    await expect(cache.decode([{ sequence: 9, q, g }])).rejects.toThrow(/no sequence 9/);
    await expect(cache.decode([{ sequence: s, q: tokens(new Rng(3), 11, 4, 8), g: Tensor.uniform([11, 4, 3], 'f32', 4) }])).rejects.toThrow(/11 queries/);
    await expect(cache.decode([{ sequence: s, q: tokens(new Rng(3), 1, 3, 8), g }])).rejects.toThrow(ShapeError);
    await expect(cache.decode([])).rejects.toThrow(ShapeError);
    unchanged();
  });
});

describe('decodeBytesPerHead', () => {
  it('counts each branch a step reads (compressed tokens, selected blocks, window; key and value rows) and their sum', () => {
    // Paper preset at 200 tokens: (200 - 32) / 16 + 1 = 11 compressed tokens; n l' = 1024 and w = 512 capped at 200.
    const row = (8 + 8) * 4;
    const bytes = decodeBytesPerHead(NSAConfig.paper({ heads: 2, kvHeads: 1, headDim: 8, valueDim: 8 }), 200, 4);
    expect(bytes.branches).toEqual({ cmp: 11 * row, slc: 200 * row, win: 200 * row });
    expect(bytes.nsa).toBe((11 + 200 + 200) * row);
    expect(bytes.dense).toBe(200 * row);
  });
});
