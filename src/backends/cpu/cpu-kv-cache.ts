// The CPU KV cache: per sequence, raw K/V (f32, grown in pages) and compressed K/V (f64, as the CPU forward keeps
// them), compressed incrementally: each append adds one compressed token every d tokens once a full block of l
// keys exists, with the same phi as the forward. A decode step evaluates each query with the reference's
// per-query code, so it matches the corresponding row of a prefill.

import type { NSAConfig } from '../../config/nsa-config.js';
import { DisposedError } from '../../errors.js';
import { BlockCompressor } from '../../reference/compress.js';
import type { FloatArray, SequenceSpan } from '../../reference/layout.js';
import { allocateOutputs, QueryEvaluator } from '../../reference/nsa-forward.js';
import { attendForward, KeyRanges, ScoreScratch } from '../../reference/attention.js';
import type { TimingOptions, TimingResult } from '../backend.js';
import { median } from '../timing.js';
import { Tensor } from '../../tensor/tensor.js';
import { checkAppend, checkDecode } from '../../nsa/decode/checks.js';
import type { DecodeOptions, DecodeOutput, DecodeOutputs, DecodeQuery, KvCache, KvCacheOptions } from '../../nsa/decode/types.js';
import { phiParamsOf } from '../../nsa/phi-params.js';
import { validatePhiParams } from '../../nsa/validate.js';

/** A growable array of rows of `width` values. */
class PagedRows<A extends Float32Array | Float64Array> {
  data: A;
  rows = 0;
  constructor(
    private readonly make: (n: number) => A,
    private readonly width: number,
    private readonly pageRows: number,
  ) {
    this.data = make(0);
  }
  /** Makes room for `more` rows (whole pages). */
  reserve(more: number): void {
    const need = (this.rows + more) * this.width;
    if (need <= this.data.length) return;
    const pages = Math.ceil((this.rows + more) / this.pageRows);
    const grown = this.make(pages * this.pageRows * this.width);
    grown.set(this.data.subarray(0, this.rows * this.width));
    this.data = grown;
  }
}

interface SequenceStore {
  readonly k: PagedRows<Float32Array>;
  readonly v: PagedRows<Float32Array>;
  readonly kc: PagedRows<Float64Array>;
  readonly vc: PagedRows<Float64Array>;
}

export class CpuKvCache implements KvCache {
  readonly backend = 'cpu' as const;
  readonly maxTokens: number;
  private readonly pageTokens: number;
  private readonly sequences: SequenceStore[] = [];
  private readonly compressK: BlockCompressor;
  private readonly compressV: BlockCompressor;
  private disposed = false;

  constructor(
    readonly config: NSAConfig,
    options: KvCacheOptions = {},
  ) {
    this.maxTokens = options.maxTokens ?? 2 ** 22;
    this.pageTokens = options.pageTokens ?? 1024;
    const hidden = validatePhiParams({ phiK: options.phiK, phiV: options.phiV }, config);
    this.compressK = new BlockCompressor(config, config.headDim, phiParamsOf(config, options.phiK, hidden));
    this.compressV = new BlockCompressor(config, config.valueDim, phiParamsOf(config, options.phiV, hidden));
  }

  get sequenceCount(): number {
    return this.sequences.length;
  }

  get bytes(): number {
    return this.sequences.reduce((s, q) => s + q.k.data.byteLength + q.v.data.byteLength + q.kc.data.byteLength + q.vc.data.byteLength, 0);
  }

  addSequence(): number {
    this.assertLive();
    const { kvHeads: H, headDim: dk, valueDim: dv, compressStride: d } = this.config;
    const page = this.pageTokens;
    const cPage = Math.max(1, Math.ceil(page / d));
    this.sequences.push({
      k: new PagedRows((n) => new Float32Array(n), H * dk, page),
      v: new PagedRows((n) => new Float32Array(n), H * dv, page),
      kc: new PagedRows((n) => new Float64Array(n), H * dk, cPage),
      vc: new PagedRows((n) => new Float64Array(n), H * dv, cPage),
    });
    return this.sequences.length - 1;
  }

  length(sequence: number): number {
    return this.sequences[sequence]?.k.rows ?? 0;
  }

  compressedLength(sequence: number): number {
    return this.sequences[sequence]?.kc.rows ?? 0;
  }

  append(sequence: number, k: Tensor, v: Tensor): void {
    this.assertLive();
    const T = checkAppend(this, sequence, k, v);
    const store = this.sequences[sequence]!;
    const { kvHeads: H, headDim: dk, valueDim: dv, compressStride: d } = this.config;
    store.k.reserve(T);
    store.v.reserve(T);
    store.k.data.set(k.toFloat32(), store.k.rows * H * dk);
    store.v.data.set(v.toFloat32(), store.v.rows * H * dv);
    store.k.rows += T;
    store.v.rows += T;
    // Compressed token i exists once the block [i*d, i*d + l) is complete.
    const target = this.config.compressedLength(store.k.rows);
    const more = target - store.kc.rows;
    if (more <= 0) return;
    store.kc.reserve(more);
    store.vc.reserve(more);
    for (let i = store.kc.rows; i < target; i++) {
      for (let h = 0; h < H; h++) {
        this.compressK.compress(store.k.data, i * d, h, H, store.kc.data, (i * H + h) * dk);
        this.compressV.compress(store.v.data, i * d, h, H, store.vc.data, (i * H + h) * dv);
      }
    }
    store.kc.rows = target;
    store.vc.rows = target;
  }

  decode(queries: readonly DecodeQuery[], options: DecodeOptions & { readonly branches: false }): Promise<DecodeOutput>;
  decode(queries: readonly DecodeQuery[], options?: DecodeOptions & { readonly branches?: true }): Promise<DecodeOutputs>;
  decode(queries: readonly DecodeQuery[], options: DecodeOptions): Promise<DecodeOutput | DecodeOutputs>;
  async decode(queries: readonly DecodeQuery[], options: DecodeOptions = {}): Promise<DecodeOutput | DecodeOutputs> {
    this.assertLive();
    const counts = checkDecode(this, queries);
    const total = counts.reduce((a, b) => a + b, 0);
    const { config } = this;
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n } = config;
    const out = allocateOutputs({ totalTokens: total, heads: Hq, kvHeads: H, dv }, n);
    let row = 0;
    for (const [i, query] of queries.entries()) {
      const store = this.sequences[query.sequence]!;
      const length = store.k.rows;
      const base = { kvHeads: H, dk, dv, scale: config.scale };
      const raw = { ...base, keys: store.k.data as FloatArray, values: store.v.data as FloatArray };
      const evaluator = new QueryEvaluator(config, { cmp: { ...base, keys: store.kc.data, values: store.vc.data }, slc: raw, win: raw }, store.kc.rows, length);
      const seq: SequenceSpan = { start: 0, length, cStart: 0, cLength: store.kc.rows };
      const q = query.q.toFloat32();
      const g = query.g.toFloat32();
      const Tq = counts[i]!;
      for (let j = 0; j < Tq; j++) evaluator.evaluate(seq, length - Tq + j, q, g, j, out, row++);
    }
    const f32 = (a: Float64Array, shape: number[]): Tensor => Tensor.fromValues(a, shape, 'f32');
    const blockIndices = new Tensor('i32', [total, H, n], out.blockIndices);
    // The branches are computed either way (the gated sum needs them); they are only not returned.
    if (options.branches === false) return { o: f32(out.o, [total, Hq, dv]), blockIndices };
    return {
      o: f32(out.o, [total, Hq, dv]),
      oCmp: f32(out.oCmp, [total, Hq, dv]),
      oSlc: f32(out.oSlc, [total, Hq, dv]),
      oWin: f32(out.oWin, [total, Hq, dv]),
      lseCmp: f32(out.lseCmp, [total, Hq]),
      lseSlc: f32(out.lseSlc, [total, Hq]),
      lseWin: f32(out.lseWin, [total, Hq]),
      blockIndices,
    };
  }

  appendRandom(sequence: number, tokens: number, seed: number): void {
    const { kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    this.append(sequence, Tensor.randn([tokens, H, dk], 'f32', seed), Tensor.randn([tokens, H, dv], 'f32', seed + 1));
  }

  async timeDecodeStep(options: TimingOptions & DecodeOptions & { readonly dense?: boolean }): Promise<TimingResult> {
    this.assertLive();
    const { heads: Hq, headDim: dk } = this.config;
    const queries = this.sequences.map((_, s) => ({
      sequence: s,
      q: Tensor.randn([1, Hq, dk], 'f32', 1000 + s),
      g: Tensor.uniform([1, Hq, 3], 'f32', 2000 + s),
    }));
    const samples: number[] = [];
    const total = options.warmup + options.iterations;
    for (let i = 0; i < total; i++) {
      const start = performance.now();
      if (options.dense) this.denseDecode(queries);
      else await this.decode(queries, { branches: options.branches ?? false });
      if (i >= options.warmup) samples.push(performance.now() - start);
      options.onIteration?.(i + 1, total);
    }
    return { medianMs: median(samples), samplesMs: samples, clock: 'wall clock' };
  }

  dispose(): void {
    this.sequences.length = 0;
    this.disposed = true;
  }

  /** Dense causal attention of each query over its whole sequence (the decode benchmark's baseline). */
  private denseDecode(queries: readonly DecodeQuery[]): Float64Array {
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, scale } = this.config;
    const G = this.config.groupSize;
    const out = new Float64Array(queries.length * Hq * dv);
    const scratch = new ScoreScratch();
    const ranges = new KeyRanges(1);
    for (const [i, query] of queries.entries()) {
      const store = this.sequences[query.sequence]!;
      const ops = { keys: store.k.data, values: store.v.data, kvHeads: H, dk, dv, scale };
      const q = query.q.toFloat32();
      ranges.clear().push(0, store.k.rows);
      for (let hq = 0; hq < Hq; hq++) attendForward(ops, q, hq * dk, Math.floor(hq / G), ranges, out, (i * Hq + hq) * dv, scratch);
    }
    return out;
  }

  private assertLive(): void {
    if (this.disposed) throw new DisposedError('the KV cache');
  }
}

