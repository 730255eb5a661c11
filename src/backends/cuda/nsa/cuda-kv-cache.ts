// The cuda KV cache: per sequence, device buffers of raw K/V and compressed K/V in bf16, head-major ([H, cap, D]:
// a selected block of one KV head is one contiguous run) unless NSA_DECODE_LAYOUT=token ([cap, H, D]), grown by
// doubling (a copy on the device). A decode step (kernels/decode.cu) is one launch whose CTAs take work items in
// ticket order: cmp chunks (which also fold their probabilities into per-slice block sums; the last chunk of a
// (query, KV head) merges the cmp branch, scores the blocks and picks the top-n), window chunks, then chunks of the
// selected blocks (each waits for its pair's selection), the last of a row merging and writing the gated sum. Where
// one CTA per pair cannot select (very long contexts) or NSA_DECODE_FUSED=0, the step is three launches instead:
// cmp and win chunks, the selection spread over several CTAs per pair, slc chunks. Appends upload the rows; with
// phi = mean the completed blocks are averaged on the device (compress_mean, as appendRandom's random rows are),
// with learned phi on the host with the reference's phi (the last l - 1 tokens are kept on the host for the next
// block). The timing methods replay the step's launches as a CUDA graph.

import type { NSAConfig } from '../../../config/nsa-config.js';
import { DisposedError, UnsupportedConfigError } from '../../../errors.js';
import { checkAppend, checkDecode } from '../../../nsa/decode/checks.js';
import type { DecodeOptions, DecodeOutput, DecodeOutputs, DecodeQuery, KvCache, KvCacheOptions } from '../../../nsa/decode/types.js';
import { phiParamsOf } from '../../../nsa/phi-params.js';
import { validatePhiParams } from '../../../nsa/validate.js';
import { BlockCompressor } from '../../../reference/compress.js';
import { float64ToStorage, storageToFloat32 } from '../../../tensor/dtype.js';
import { Tensor } from '../../../tensor/tensor.js';
import type { TimingOptions, TimingResult } from '../../backend.js';
import type { CudaContext } from '../context.js';
import type { KernelArg } from '../kernel-args.js';
import type { DeviceBuffer } from '../memory.js';
import { DeviceRandom } from './device-random.js';
import type { NsaPrograms } from './programs.js';

interface SequenceStore {
  k: DeviceBuffer;
  v: DeviceBuffer;
  kc: DeviceBuffer;
  vc: DeviceBuffer;
  /** Token capacity of k/v; compressed capacity follows from it. */
  capacity: number;
  length: number;
  compressed: number;
  /**
   * Learned phi: tokens from tailStart on, as f32 [rows, H, D], what the next compression blocks still need (< l of
   * them); empty with phi = mean, whose blocks are averaged on the device from the rows the cache holds.
   */
  tailK: Float32Array;
  tailV: Float32Array;
  tailStart: number;
}

/**
 * Keys per decode CTA for a branch of `keys` keys: the largest of `smallest` .. 2048 that still gives `minCtas` CTAs over
 * `rows` (query, KV head, head chunk) triples (fewer, longer chunks mean fewer partial results to write and merge),
 * or NSA_DECODE_CHUNK (or the branch's own variable, `override`) when set.
 */
function chunkFor(keys: number, rows: number, minCtas: number, smallest: number, override?: string): number {
  const forced = Number(process.env[override ?? ''] ?? process.env['NSA_DECODE_CHUNK']);
  if (Number.isInteger(forced) && forced >= 64 && forced % 64 === 0) return forced;
  let chunk = smallest;
  while (chunk < 2048 && rows * Math.ceil(keys / (chunk * 2)) >= minCtas) chunk *= 2;
  return chunk;
}
const ptr = (b: DeviceBuffer): KernelArg => ({ ptr: b.ptr });

/**
 * The smallest chunk of compressed keys for the three-launch step (a power of two, 64 .. 256). Its cmp_win launch
 * has few rows at small batches, each chunk a chain of dependent tile loads, so the chunks shrink until about one
 * CTA per SM runs one, but never below 64 keys nor into more than 32 chunks a row, whose partials the select reads
 * (H100, 64k, fla preset: B = 1 0.0578 -> 0.0493 ms with 64-key chunks, B = 8 0.0741 -> 0.0718 with 128; the
 * paper preset's 4096 keys take 128 at B = 1, where 64 made its select slower; docs/performance.md).
 */
export function threeLaunchCmpSmallest(keys: number, rows: number, sms: number): number {
  const floor = Math.max(64, 2 ** Math.ceil(Math.log2(Math.max(1, Math.ceil(keys / 32)))));
  let chunk = 256;
  while (chunk > floor && rows * Math.ceil(keys / chunk) < sms) chunk /= 2;
  return chunk;
}

/** Words per sequence (and per query) of the decode kernels' cache table (decode.cu's SEQ_WORDS). */
const SEQ_WORDS = 8;

/** Words per work item of the fused step's trace (decode.cu's TRACE_WORDS). */
const TRACE_WORDS = 13;

/** One work item of a traced fused step: globaltimer ns from the first item's start (0 where not reached). */
export interface DecodeTraceRecord {
  kind: 'cmp' | 'win' | 'slc';
  start: number;
  /** End of the wait for the pair's selection (slc items), else 0. */
  waited: number;
  attended: number;
  end: number;
  selected: boolean;
  merged: boolean;
  sm: number;
  /** A select's phases: entry (after the chunk counter), ends of its lse, block scores and top-n; rounds of slices. */
  select: { entered: number; lse: number; scores: number; topN: number; rounds: number } | undefined;
  /** A merge's phases: entry (after the row's counter), ends of its weights (the slots' m and l) and of its outputs. */
  merge: { entered: number; weights: number; outputs: number } | undefined;
}

/** A buffer's bytes from `byteOffset` on, for copies into or out of the middle of it (owns nothing). */
function at(b: DeviceBuffer, byteOffset: number): DeviceBuffer {
  return {
    ptr: b.ptr + BigInt(byteOffset),
    bytes: b.bytes - byteOffset,
    capacity: b.capacity - byteOffset,
    what: b.what,
    disposed: b.disposed,
    dispose: () => {},
  };
}

/** Rows [T, H, D] of 16-bit elements as H runs [H, T, D] (head-major uploads). */
function headMajor(bits: Uint16Array, T: number, H: number, D: number): Uint16Array {
  const out = new Uint16Array(bits.length);
  for (let t = 0; t < T; t++) for (let h = 0; h < H; h++) out.set(bits.subarray((t * H + h) * D, (t * H + h + 1) * D), (h * T + t) * D);
  return out;
}

export class CudaKvCache implements KvCache {
  readonly backend = 'cuda' as const;
  readonly maxTokens: number;
  private readonly pageTokens: number;
  private readonly sequences: SequenceStore[] = [];
  private readonly compressK: BlockCompressor;
  private readonly compressV: BlockCompressor;
  private readonly learned: boolean;
  /** K/V (raw and compressed) stored [H, capacity, D] per sequence, else [capacity, H, D]. */
  private readonly headMajor: boolean;
  private disposed = false;

  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    readonly config: NSAConfig,
    options: KvCacheOptions = {},
  ) {
    this.maxTokens = options.maxTokens ?? 2 ** 22;
    this.pageTokens = options.pageTokens ?? 4096;
    const hidden = validatePhiParams({ phiK: options.phiK, phiV: options.phiV }, config);
    this.learned = config.phi !== 'mean';
    this.headMajor = process.env['NSA_DECODE_LAYOUT'] !== 'token';
    this.compressK = new BlockCompressor(config, config.headDim, phiParamsOf(config, options.phiK, hidden));
    this.compressV = new BlockCompressor(config, config.valueDim, phiParamsOf(config, options.phiV, hidden));
  }

  get sequenceCount(): number {
    return this.sequences.length;
  }

  get bytes(): number {
    return this.sequences.reduce((s, q) => s + q.k.bytes + q.v.bytes + q.kc.bytes + q.vc.bytes, 0);
  }

  addSequence(): number {
    this.assertLive();
    const cap = this.pageTokens;
    this.sequences.push({
      ...this.allocate(cap),
      capacity: cap,
      length: 0,
      compressed: 0,
      tailK: new Float32Array(0),
      tailV: new Float32Array(0),
      tailStart: 0,
    });
    return this.sequences.length - 1;
  }

  length(sequence: number): number {
    return this.sequences[sequence]?.length ?? 0;
  }

  compressedLength(sequence: number): number {
    return this.sequences[sequence]?.compressed ?? 0;
  }

  append(sequence: number, k: Tensor, v: Tensor): void {
    this.assertLive();
    const T = checkAppend(this, sequence, k, v);
    const store = this.sequences[sequence]!;
    const { headDim: dk, valueDim: dv } = this.config;
    this.reserve(store, store.length + T);
    const kBits = k.cast('bf16').data; // the cache holds bf16 (bf16 tokens as they are)
    const vBits = v.cast('bf16').data;
    this.uploadRows(store.k, kBits, store.length, T, store.capacity, dk);
    this.uploadRows(store.v, vBits, store.length, T, store.capacity, dv);
    const newLength = store.length + T;
    if (this.learned) this.compressOnHost(store, kBits, vBits, newLength);
    else this.compressOnDevice(store, newLength);
    store.length = newLength;
  }

  appendRandom(sequence: number, tokens: number, seed: number): void {
    this.assertLive();
    if (this.learned) throw new UnsupportedConfigError('cuda KV cache: appendRandom compresses with phi = mean only');
    const { kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    checkAppend(this, sequence, new Tensor('f32', [tokens, H, dk]), new Tensor('f32', [tokens, H, dv]));
    const store = this.sequences[sequence]!;
    if (store.length > 0) {
      throw new UnsupportedConfigError('cuda KV cache: appendRandom fills an empty sequence only');
    }
    this.reserve(store, tokens);
    const random = new DeviceRandom(this.ctx, this.programs.dtype);
    // Head-major: every head's run of the capacity (rows past `tokens` are never read, but stay finite).
    const rows = this.headMajor ? store.capacity : tokens;
    random.normal(store.k, rows * H * dk, seed);
    random.normal(store.v, rows * H * dv, seed + 1);
    this.compressOnDevice(store, tokens);
    store.length = tokens;
  }

  decode(queries: readonly DecodeQuery[], options: DecodeOptions & { readonly branches: false }): Promise<DecodeOutput>;
  decode(queries: readonly DecodeQuery[], options?: DecodeOptions & { readonly branches?: true }): Promise<DecodeOutputs>;
  decode(queries: readonly DecodeQuery[], options: DecodeOptions): Promise<DecodeOutput | DecodeOutputs>;
  async decode(queries: readonly DecodeQuery[], options: DecodeOptions = {}): Promise<DecodeOutput | DecodeOutputs> {
    this.assertLive();
    const branches = options.branches ?? true;
    const counts = checkDecode(this, queries);
    const { heads: Hq, kvHeads: H, valueDim: dv, selectCount: n } = this.config;
    const qSeq: number[] = [];
    const qPos: number[] = [];
    const qData: Float32Array[] = [];
    const gData: Float32Array[] = [];
    for (const [i, query] of queries.entries()) {
      const length = this.sequences[query.sequence]!.length;
      for (let j = 0; j < counts[i]!; j++) {
        qSeq.push(query.sequence);
        qPos.push(length - counts[i]! + j);
      }
      qData.push(query.q.toFloat32());
      gData.push(query.g.toFloat32());
    }
    const Q = qSeq.length;
    const step = new DecodeStep(this.ctx, this.programs, this.config, Q, this.maxLength(), this.seqTable(), qSeq, qPos, branches);
    try {
      this.ctx.uploadAt(step.q, 0, float64ToStorage('bf16', concatAll(qData)));
      this.ctx.uploadAt(step.gate, 0, concatAll(gData));
      step.run(false);
      this.ctx.synchronize();
      const f32 = (b: DeviceBuffer, shape: number[]): Tensor => {
        const t = new Tensor('f32', shape);
        this.ctx.download(b, t.data);
        return t;
      };
      const blocks = new Tensor('i32', [Q, H, n]);
      this.ctx.download(step.blockIndices, blocks.data);
      if (!branches) return { o: f32(step.out, [Q, Hq, dv]), blockIndices: blocks };
      return {
        o: f32(step.out, [Q, Hq, dv]),
        oCmp: f32(step.oCmp, [Q, Hq, dv]),
        oSlc: f32(step.oSlc, [Q, Hq, dv]),
        oWin: f32(step.oWin, [Q, Hq, dv]),
        lseCmp: f32(step.lseCmp, [Q, Hq]),
        lseSlc: f32(step.lseSlc, [Q, Hq]),
        lseWin: f32(step.lseWin, [Q, Hq]),
        blockIndices: blocks,
      };
    } finally {
      step.dispose();
    }
  }

  async timeDecodeStep(options: TimingOptions & DecodeOptions & { readonly dense?: boolean }): Promise<TimingResult> {
    const step = this.randomStep(options.branches ?? false);
    try {
      const dense = options.dense ?? false;
      const result = this.timeReplayed(() => step.run(dense), dense ? 'dense decode step' : 'nsa decode step', options);
      options.onIteration?.(options.warmup + options.iterations, options.warmup + options.iterations);
      return { ...result, clock: 'CUDA events' };
    } finally {
      step.dispose();
    }
  }

  /**
   * Per launch of the step (NSA, or dense with `dense`), the median of CUDA-event timings of that launch alone,
   * run after one whole step (each launch reads what the earlier ones wrote, so repeating one alone is valid).
   * Without its branches' outputs unless `branches: true`, as timeDecodeStep.
   */
  async timeDecodeLaunches(options: TimingOptions & DecodeOptions & { readonly dense?: boolean }): Promise<{ name: string; medianMs: number }[]> {
    const step = this.randomStep(options.branches ?? false);
    try {
      const dense = options.dense ?? false;
      step.run(dense);
      return step.launches(dense).map(({ name, launch }) => ({ name, medianMs: this.timeReplayed(launch, `decode ${name}`, options).medianMs }));
    } finally {
      step.dispose();
    }
  }

  /**
   * Diagnostics of the fused step (undefined where the step is three launches): after a few untraced runs, one run
   * writes per work item its kind and globaltimer stamps (ns from the first item's start): start, end of the wait
   * for the selection (slc items, else 0), end of the attention, end; whether it selected or merged; and for a select
   * or a merge the ends of its phases (DecodeTraceRecord). The step is timeDecodeStep's (no branch outputs unless
   * `branches`).
   */
  traceDecodeStep(branches = false): DecodeTraceRecord[] | undefined {
    const step = this.randomStep(branches);
    try {
      if (!step.fused) return undefined;
      const { cmp, win, slc } = step.items;
      const total = cmp + win + slc;
      const trace = this.ctx.alloc(total * TRACE_WORDS * 8, 'decode trace');
      try {
        for (let i = 0; i < 3; i++) step.run(false);
        const [launch] = step.launches(false, trace);
        launch!.launch();
        this.ctx.synchronize();
        const words = new BigUint64Array(total * TRACE_WORDS);
        this.ctx.download(trace, words);
        const t0 = words.filter((_, i) => i % TRACE_WORDS === 1).reduce((m, t) => (t < m ? t : m));
        const ns = (t: bigint): number => (t === 0n ? 0 : Number(t - t0));
        const kinds = ['cmp', 'slc', 'win'] as const;
        return Array.from({ length: total }, (_, item) => {
          const w = words.subarray(item * TRACE_WORDS, (item + 1) * TRACE_WORDS);
          const selected = (w[5]! & 1n) !== 0n;
          const merged = (w[5]! & 2n) !== 0n;
          return {
            kind: kinds[Number(w[7]!)] ?? 'cmp',
            start: ns(w[1]!),
            waited: ns(w[2]!),
            attended: ns(w[3]!),
            end: ns(w[4]!),
            selected,
            merged,
            sm: Number(w[6]!),
            select: selected
              ? { entered: ns(w[8]!), lse: ns(w[9]!), scores: ns(w[10]!), topN: ns(w[11]!), rounds: Number(w[12]!) }
              : undefined,
            merge: merged ? { entered: ns(w[8]!), weights: ns(w[9]!), outputs: ns(w[10]!) } : undefined,
          };
        });
      } finally {
        trace.dispose();
      }
    } finally {
      step.dispose();
    }
  }

  /** A step of one random query (N(0, 1)) and random gates (U(0, 1)) per sequence, at its last position. */
  private randomStep(branches: boolean): DecodeStep {
    this.assertLive();
    const S = this.sequences.length;
    const qSeq = Array.from({ length: S }, (_, s) => s);
    const qPos = this.sequences.map((s) => s.length - 1);
    const step = new DecodeStep(this.ctx, this.programs, this.config, S, this.maxLength(), this.seqTable(), qSeq, qPos, branches);
    try {
      const random = new DeviceRandom(this.ctx, this.programs.dtype);
      random.normal(step.q, S * this.config.heads * this.config.headDim, 7);
      random.uniform(step.gate, S * this.config.heads * 3, 8);
      return step;
    } catch (e) {
      step.dispose();
      throw e;
    }
  }

  /**
   * CUDA-event timings of `run`'s launches, replayed as one CUDA graph (as a serving loop replays its decode step:
   * one driver call instead of one per launch, whose host cost would otherwise dominate small batches), after one
   * direct run that compiles the kernels. NSA_DECODE_GRAPH=0, or a driver without graphs, times direct launches.
   */
  private timeReplayed(run: () => void, name: string, options: TimingOptions): { medianMs: number; samplesMs: readonly number[] } {
    const timing = { warmup: options.warmup, iterations: options.iterations };
    if (process.env['NSA_DECODE_GRAPH'] === '0' || !this.ctx.canCaptureGraphs) return this.ctx.time(run, timing);
    run();
    this.ctx.synchronize();
    const graph = this.ctx.captureGraph(run, name);
    try {
      return this.ctx.time(() => graph.launch(), timing);
    } finally {
      graph.dispose();
    }
  }

  /**
   * phi = mean: the blocks that `newLength` tokens complete are averaged on the device from the raw rows the cache
   * already holds (as the forward's compression does, fp32 sums of the bf16 tokens), so a long prefill costs the
   * host no more than its upload.
   */
  private compressOnDevice(store: SequenceStore, newLength: number): void {
    const target = this.config.compressedLength(newLength);
    if (target <= store.compressed) return;
    const { kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    const [rowStride, headStride, headStrideC] = this.strides(store.capacity);
    this.programs.decode('compress_mean').launch({
      grid: [target - store.compressed, H, 1],
      block: [(dk + dv) / 8, 1, 1],
      args: [ptr(store.k), ptr(store.v), ptr(store.kc), ptr(store.vc), { i32: store.compressed }, { i64: rowStride }, { i64: headStride }, { i64: headStrideC }],
    });
    this.ctx.synchronize();
    store.compressed = target;
  }

  /**
   * Learned phi: the blocks this append completes are compressed on the host with the reference's phi, from the
   * kept tail and the new tokens as the cache holds them (bf16), and uploaded; the tokens the next blocks still
   * need stay on the host.
   */
  private compressOnHost(store: SequenceStore, kBits: Uint16Array, vBits: Uint16Array, newLength: number): void {
    const { kvHeads: H, headDim: dk, valueDim: dv, compressStride: d } = this.config;
    const allK = concat(store.tailK, storageToFloat32('bf16', kBits));
    const allV = concat(store.tailV, storageToFloat32('bf16', vBits));
    const target = this.config.compressedLength(newLength);
    if (target > store.compressed) {
      const rows = target - store.compressed;
      const kc = new Float64Array(rows * H * dk);
      const vc = new Float64Array(rows * H * dv);
      for (let i = store.compressed; i < target; i++) {
        const first = i * d - store.tailStart; // row of the block's first token in allK/allV
        for (let h = 0; h < H; h++) {
          this.compressK.compress(allK, first, h, H, kc, ((i - store.compressed) * H + h) * dk);
          this.compressV.compress(allV, first, h, H, vc, ((i - store.compressed) * H + h) * dv);
        }
      }
      const ccap = this.compressedCapacity(store.capacity);
      this.uploadRows(store.kc, float64ToStorage('bf16', kc), store.compressed, rows, ccap, dk);
      this.uploadRows(store.vc, float64ToStorage('bf16', vc), store.compressed, rows, ccap, dv);
      store.compressed = target;
    }
    // Keep the tokens the next blocks still need: from the next block's first token on (at most l - 1 of them).
    const keepFrom = Math.max(store.tailStart, Math.min(newLength, target * d));
    const drop = keepFrom - store.tailStart;
    store.tailK = allK.slice(drop * H * dk);
    store.tailV = allV.slice(drop * H * dv);
    store.tailStart = keepFrom;
  }

  dispose(): void {
    for (const s of this.sequences) for (const b of [s.k, s.v, s.kc, s.vc]) b.dispose();
    this.sequences.length = 0;
    this.disposed = true;
  }

  private maxLength(): number {
    return this.sequences.reduce((m, s) => Math.max(m, s.length), 1);
  }

  private compressedCapacity(capacity: number): number {
    return Math.max(1, this.config.compressedLength(capacity));
  }

  /** Rows between a head's consecutive tokens, and before head h's first raw / compressed token (times h). */
  private strides(capacity: number): [number, number, number] {
    return this.headMajor ? [1, capacity, this.compressedCapacity(capacity)] : [this.config.kvHeads, 1, 1];
  }

  /**
   * Per sequence, the SEQ_WORDS words the kernels read for each of its queries (decode.cu): the buffers' addresses,
   * the strides and the tokens held.
   */
  private seqTable(): BigUint64Array {
    const ptrs = new BigUint64Array(this.sequences.length * SEQ_WORDS);
    this.sequences.forEach((s, i) => {
      const [rowStride, headStride, headStrideC] = this.strides(s.capacity);
      const words = [s.k.ptr, s.v.ptr, s.kc.ptr, s.vc.ptr, BigInt(rowStride), BigInt(headStride), BigInt(headStrideC), BigInt(s.length)];
      ptrs.set(words, i * SEQ_WORDS);
    });
    return ptrs;
  }

  /** Uploads rows [from, from + T) of every head, `bits` [T, H, D], into a buffer of `capacity` rows per head. */
  private uploadRows(buffer: DeviceBuffer, bits: Uint16Array, from: number, T: number, capacity: number, D: number): void {
    const H = this.config.kvHeads;
    if (!this.headMajor) {
      this.ctx.uploadAt(buffer, from * H * D * 2, bits);
      return;
    }
    const runs = headMajor(bits, T, H, D);
    for (let h = 0; h < H; h++) this.ctx.uploadAt(buffer, (h * capacity + from) * D * 2, runs.subarray(h * T * D, (h + 1) * T * D));
  }

  /** Copies the first `rows` rows of every head from a buffer of `fromCap` rows per head into one of `toCap`. */
  private copyRows(dst: DeviceBuffer, src: DeviceBuffer, rows: number, fromCap: number, toCap: number, D: number): void {
    const H = this.config.kvHeads;
    if (!this.headMajor) {
      this.ctx.copy(dst, src, rows * H * D * 2);
      return;
    }
    if (rows === 0) return;
    for (let h = 0; h < H; h++) this.ctx.copy(at(dst, h * toCap * D * 2), at(src, h * fromCap * D * 2), rows * D * 2);
  }

  private allocate(capacity: number): Pick<SequenceStore, 'k' | 'v' | 'kc' | 'vc'> {
    const { kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    const ccap = this.compressedCapacity(capacity);
    return {
      k: this.ctx.alloc(capacity * H * dk * 2, 'cache keys'),
      v: this.ctx.alloc(capacity * H * dv * 2, 'cache values'),
      kc: this.ctx.alloc(ccap * H * dk * 2, 'cache compressed keys'),
      vc: this.ctx.alloc(ccap * H * dv * 2, 'cache compressed values'),
    };
  }

  /** Grows a sequence's buffers (doubling, a device copy) to hold `tokens`. */
  private reserve(store: SequenceStore, tokens: number): void {
    if (tokens <= store.capacity) return;
    let capacity = store.capacity;
    while (capacity < tokens) capacity *= 2;
    capacity = Math.min(capacity, Math.max(tokens, this.maxTokens));
    const grown = this.allocate(capacity);
    const { headDim: dk, valueDim: dv } = this.config;
    const [cap, ccap] = [store.capacity, this.compressedCapacity(store.capacity)];
    const ccapGrown = this.compressedCapacity(capacity);
    this.copyRows(grown.k, store.k, store.length, cap, capacity, dk);
    this.copyRows(grown.v, store.v, store.length, cap, capacity, dv);
    this.copyRows(grown.kc, store.kc, store.compressed, ccap, ccapGrown, dk);
    this.copyRows(grown.vc, store.vc, store.compressed, ccap, ccapGrown, dv);
    for (const b of [store.k, store.v, store.kc, store.vc]) b.dispose();
    Object.assign(store, grown, { capacity });
  }

  private assertLive(): void {
    if (this.disposed) throw new DisposedError('the KV cache');
  }
}

/** Selection blocks a slice of 16 compressed keys touches, plus one: the floats per (slice, head) (decode.cu). */
function sliceWidth(config: NSAConfig): number {
  const { compressBlock: l, compressStride: d, selectBlock: ls } = config;
  return Math.floor((15 * d + l - 1) / ls) + ((16 * d) % ls === 0 ? 1 : 2) + 1;
}

/** Floats of a slice record: G heads' slice widths rounded up to a multiple of 4 (decode.cu, slice_record). */
function sliceRecord(config: NSAConfig): number {
  return Math.ceil((config.groupSize * sliceWidth(config)) / 4) * 4;
}

/** nsa_decode_select's threads, the candidate blocks one of its CTAs scores at most, its staging floats (decode.cu). */
const SELECT_THREADS = 256;
const SELECT_CANDIDATES = 4 * SELECT_THREADS;
/** (score, block) pairs nsa_decode_select's last CTA merges in registers: 32 lanes x 4 (warp_best_listed<4>). */
const SELECT_MERGE_ENTRIES = 32 * 4;
const SELECT_STAGE = 8192;
/** fused_select's fixed floats (decode.cu FUSED_SELECT_FIXED: MAX_G = 128, FUSED_ML = 2048). */
const fusedSelectFixed = (n: number): number => (128 + 2048 + 10 * n + 3) & ~3;
/**
 * Slice floats per (query, KV head) above which one CTA per pair selects too slowly and the step takes three
 * launches (the selection spread over several CTAs): 64k floats is 128k tokens with the paper's preset and G = 16.
 */
const FUSED_MAX_SLICE_FLOATS = 65536;

/** The device buffers and launches of one decode step for Q queries. */
class DecodeStep {
  readonly q: DeviceBuffer;
  readonly gate: DeviceBuffer;
  readonly out: DeviceBuffer;
  readonly oCmp: DeviceBuffer;
  readonly oSlc: DeviceBuffer;
  readonly oWin: DeviceBuffer;
  readonly lseCmp: DeviceBuffer;
  readonly lseSlc: DeviceBuffer;
  readonly lseWin: DeviceBuffer;
  readonly blockIndices: DeviceBuffer;
  private readonly buffers: DeviceBuffer[] = [];
  private readonly tables: Record<'queryPtrs' | 'qPos', DeviceBuffer>;
  private readonly partial: Record<'m' | 'l' | 'o', DeviceBuffer>;
  /** Branch 0's per-slice block sums [Q, H, sliceStride]; the select step's candidate lists; last-CTA counters. */
  private readonly slices: DeviceBuffer;
  private readonly candidates: Record<'s' | 'j', DeviceBuffer>;
  private readonly counters: Record<'select' | 'slc' | 'fused', DeviceBuffer>;
  /** One launch (nsa_decode_fused) rather than three. */
  readonly fused: boolean;
  /** Chunks (partial slots) per row of each branch, and the keys per chunk; NSA's slots are laid out cmp, slc, win. */
  private readonly slots: { cmp: number; slc: number; win: number; nsa: number; dense: number };
  private readonly chunks: { cmp: number; slc: number; win: number; dense: number };
  private readonly sliceStride: number;
  /** nsa_decode_select CTAs per (query, KV head). */
  private readonly selectCtas: number;
  /** Floats of the fused launch's dynamic shared memory (fused_select's work area). */
  private readonly workFloats: number;
  /** Rows (query, KV head, 16 heads) by which the fused launch's slc items trail the cmp items (decode.cu). */
  private readonly lag: number;

  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    private readonly config: NSAConfig,
    private readonly Q: number,
    maxLength: number,
    /** seqTable(): SEQ_WORDS words per sequence, the last its tokens held. */
    table: BigUint64Array,
    qSeq: readonly number[],
    qPos: readonly number[],
    /** Write each branch's output and lse (else the gated sum alone; o_cmp still where the three-launch merges read it). */
    private readonly branches: boolean,
  ) {
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n, selectBlock, window } = config;
    const G = config.groupSize;
    const f32 = (count: number, what: string): DeviceBuffer => this.keep(ctx.alloc(Math.max(1, count) * 4, what));
    this.q = this.keep(ctx.alloc(Q * Hq * dk * 2, 'decode q'));
    this.gate = f32(Q * Hq * 3, 'decode gates');
    this.out = f32(Q * Hq * dv, 'decode o');
    // The branches' outputs take room only where they are written (a step without them passes null for each; its
    // o_cmp is allocated below where the three-launch merges read it).
    const branchOut = (count: number, what: string): DeviceBuffer => f32(branches ? count : 0, what);
    this.oSlc = branchOut(Q * Hq * dv, 'decode o_slc');
    this.oWin = branchOut(Q * Hq * dv, 'decode o_win');
    this.lseCmp = branchOut(Q * Hq, 'decode lse_cmp');
    this.lseSlc = branchOut(Q * Hq, 'decode lse_slc');
    this.lseWin = branchOut(Q * Hq, 'decode lse_win');
    this.blockIndices = this.keep(ctx.alloc(Q * H * n * 4, 'decode block indices'));
    const maxCompressed = Math.max(1, config.compressedLength(maxLength));
    const gchunks = Math.ceil(G / 16);
    const ctaRows = Q * H * gchunks;
    const minCtas = 4 * ctx.device.smCount;
    // One launch where one CTA per (query, KV head) can select: its scores and a round of at least 8 slices fit in
    // the launch's shared memory, and the pair's slices are few enough.
    const { compressBlock: l, compressStride: d } = config;
    const record = sliceRecord(config);
    const maxSlices = Math.ceil(maxCompressed / 16);
    const workFloats = programs.decodePartialSharedBytes('fused') / 4;
    const scoreFloats = Math.ceil((Math.floor((maxLength - 1) / selectBlock) + 1) / 4) * 4;
    const fits = workFloats - fusedSelectFixed(n) - scoreFloats >= Math.min(maxSlices, 8) * (record + sliceWidth(config) - 1);
    // Unless NSA_DECODE_FUSED says (0: three launches, 1: fused wherever it fits), fused takes batches of at least
    // one row of heads per SM: below, the one CTA per pair that selects sits on the critical path (H100, paper
    // preset, 64k, fused against three launches: 0.070 against 0.061 ms at B = 1, 0.107 against 0.103 ms at B = 8;
    // 0.334 against 0.396 ms at B = 64).
    const wanted = process.env['NSA_DECODE_FUSED'];
    const worth = ctaRows >= ctx.device.smCount && maxSlices * record <= FUSED_MAX_SLICE_FLOATS;
    this.fused = wanted !== '0' && fits && (wanted === '1' || worth);
    this.oCmp = this.fused ? branchOut(Q * Hq * dv, 'decode o_cmp') : f32(Q * Hq * dv, 'decode o_cmp');
    // The fused step has work items enough without splitting the compressed keys finely: at least 512 per chunk
    // there where that still makes two chunks a row (H100, B = 64, fla preset, 64k: 0.1791 against 0.1858 ms; but
    // paper preset, 8k, one chunk of 512 against two of 256: 0.1555 against 0.1485 ms).
    const cmpSmallest = this.fused ? (maxCompressed >= 1024 ? 512 : 256) : threeLaunchCmpSmallest(maxCompressed, ctaRows, ctx.device.smCount);
    // The compressed keys in chunks of >= cmpSmallest (each chunk writes a partial output); the selected blocks and the
    // window, short, in chunks down to two tiles (slc) or one (win) when the batch is small, so that their launches spread.
    const cmpChunk = chunkFor(maxCompressed, ctaRows, minCtas, cmpSmallest, 'NSA_DECODE_CMP_CHUNK');
    this.chunks = {
      cmp: cmpChunk,
      // Two tiles at least, so that a CTA's double buffer overlaps (one-tile chunks measured slower: paper preset,
      // 64k, H100: slc launch 0.033 -> 0.022 ms at B = 8 with 128 keys; 0.087 -> 0.147 ms at B = 64 with 64). The
      // fused step's slc items run last, where fewer, longer ones leave fewer prologues and slots to merge: at least
      // 512 keys up to 4096 compressed keys (H100, 64k, B = 64, 512 against 256 keys: paper 0.2953 / 0.2979 against
      // 0.3009 / 0.2991 ms, fla 0.1662 / 0.1656 against 0.1698 / 0.1711), but not beyond, where the selects take
      // more rounds of slices and the chain after the last cmp item is longer (paper 128k, B = 64, one A/B: 0.5126
      // ms with 512 keys against 0.5002 with 256).
      slc: chunkFor(n * selectBlock, ctaRows, minCtas, this.fused && maxCompressed <= 4096 ? 512 : 128, 'NSA_DECODE_SLC_CHUNK'),
      // The window shares its launch with the compressed keys: it needs only the CTAs those leave short.
      win: chunkFor(window, ctaRows, minCtas - ctaRows * Math.ceil(maxCompressed / cmpChunk), 64),
      dense: chunkFor(maxLength, ctaRows, minCtas, 256),
    };
    const cmp = Math.ceil(maxCompressed / this.chunks.cmp);
    const slc = Math.ceil((n * selectBlock) / this.chunks.slc);
    const win = Math.ceil(window / this.chunks.win);
    const dense = Math.ceil(maxLength / this.chunks.dense);
    this.slots = { cmp, slc, win, nsa: cmp + slc + win, dense };
    this.workFloats = workFloats;
    const lag = Number(process.env['NSA_DECODE_LAG']);
    this.lag = Number.isInteger(lag) && lag >= 0 ? Math.min(lag, ctaRows) : ctaRows;
    // The last slc (or win) CTA of a row keeps a weight per (row, merged slot) in its dynamic shared memory: the
    // slc and win slots, and the cmp slots too in the fused step.
    if (2 * 16 * (cmp + slc + win) * 4 > programs.decodePartialSharedBytes('slc')) {
      throw new UnsupportedConfigError(`cuda decode: ${cmp + slc + win} chunks per row are more than the merge holds`);
    }
    const rows = Q * Hq * Math.max(this.slots.nsa, dense);
    this.partial = { m: f32(rows, 'decode partial m'), l: f32(rows, 'decode partial l'), o: f32(rows * dv, 'decode partial o') };
    this.sliceStride = Math.ceil(maxCompressed / 64) * 4 * record;
    // nsa_decode_select stages the slices of SELECT_THREADS candidate blocks, one head at least, in SELECT_STAGE floats.
    const stagedSlices = Math.floor(((SELECT_THREADS * selectBlock + l - d) / d + 1) / 16) + 2;
    if (stagedSlices * sliceWidth(config) > SELECT_STAGE) {
      throw new UnsupportedConfigError(`cuda decode: selection blocks of ${selectBlock} over compressed tokens every ${d} are too many to score`);
    }
    this.slices = f32(Q * H * this.sliceStride, 'decode cmp slices');
    const maxCandidates = Math.ceil(maxLength / selectBlock) + 1;
    // At least what SELECT_CANDIDATES a CTA allows; with few (query, KV head) pairs, up to one per head (each
    // merges o_cmp of G / selectCtas heads) for about 2 CTAs per SM. More CTAs than that measured slower at B = 64
    // (5 per pair: 0.10 against 0.073 ms for this launch alone, H100): its fixed per-CTA work is a latency chain.
    // And no more lists than the last CTA merges from registers (SELECT_MERGE_ENTRIES); more fall back to a scan of
    // shared memory a pick (H100, 64k, G = 16: 8 CTAs a pair instead of 16 at B = 1 and 9 at B = 8 took the step
    // 3-9% faster). NSA_DECODE_SELECT_CTAS=n sets the count (tuning).
    const forcedCtas = Number(process.env['NSA_DECODE_SELECT_CTAS']);
    const spread = Math.min(G, Math.max(1, Math.floor(SELECT_MERGE_ENTRIES / n)), Math.ceil((2 * ctx.device.smCount) / (Q * H)));
    this.selectCtas = Math.max(Math.ceil(maxCandidates / SELECT_CANDIDATES), Number.isInteger(forcedCtas) && forcedCtas >= 1 ? forcedCtas : spread);
    this.candidates = {
      s: f32(Q * H * this.selectCtas * n, 'decode candidate scores'),
      j: f32(Q * H * this.selectCtas * n, 'decode candidate blocks'),
    };
    this.counters = {
      select: f32(Q * H, 'decode select counters'),
      slc: f32(ctaRows, 'decode slc counters'),
      // Tickets, CTAs done, generation, unused; per pair the cmp chunks done and the selection flag; per row the merge.
      fused: f32(4 + 2 * Q * H + ctaRows, 'decode fused counters'),
    };
    for (const c of Object.values(this.counters)) ctx.memset(c, 0);
    // Each query's copy of its sequence's words, so that a kernel reaches a query's cache in one round trip
    // instead of reading its sequence first.
    const queryPtrs = new BigUint64Array(Q * SEQ_WORDS);
    qSeq.forEach((seq, r) => queryPtrs.set(table.subarray(seq * SEQ_WORDS, (seq + 1) * SEQ_WORDS), r * SEQ_WORDS));
    this.tables = {
      queryPtrs: this.keep(ctx.upload(queryPtrs, 'decode query cache pointers')),
      qPos: this.keep(ctx.upload(Int32Array.from(qPos), 'decode query positions')),
    };
  }

  /** Work items of the fused launch, by kind, in ticket order (cmp, win, slc), for reading a trace. */
  get items(): { cmp: number; win: number; slc: number } {
    const rows = this.Q * this.config.kvHeads * Math.ceil(this.config.groupSize / 16);
    return { cmp: rows * this.slots.cmp, win: rows * this.slots.win, slc: rows * this.slots.slc };
  }

  /**
   * The launches of the NSA step (or of dense attention over the whole cache), in order, by name. `trace` (the
   * fused step only): TRACE_WORDS words per work item written by the kernel (decode.cu, nsa_decode_fused).
   */
  launches(dense: boolean, trace?: DeviceBuffer): { readonly name: string; readonly launch: () => void }[] {
    const { programs, config, Q, tables, partial, slots, chunks } = this;
    const { heads: Hq, kvHeads: H } = config;
    const gchunks = Math.ceil(config.groupSize / 16);
    const scaleLog2 = { f32: config.scale * Math.LOG2E };
    const cache = [ptr(this.q), ptr(tables.queryPtrs), ptr(tables.qPos)];
    const parts = [ptr(partial.m), ptr(partial.l), ptr(partial.o)];
    const branch = (b: DeviceBuffer): KernelArg => (this.branches ? ptr(b) : { ptr: 0n }); // null: not written
    const rows = Q * Hq;
    if (dense) {
      return [
        {
          name: 'dense',
          launch: () =>
            programs.decode('dense').launch({
              grid: [Q, H * gchunks, slots.dense],
              block: [128, 1, 1],
              sharedBytes: programs.decodePartialSharedBytes('dense'),
              args: [...cache, ...parts, { i32: slots.dense }, { i32: chunks.dense }, { i32: Hq }, { i32: H }, scaleLog2],
            }),
        },
        {
          name: 'combine_dense',
          launch: () =>
            programs.decode('combine_dense').launch({
              grid: [Math.ceil(rows / 4), 1, 1],
              block: [128, 1, 1],
              args: [...parts, ptr(this.out), { i64: rows }, { i32: slots.dense }],
            }),
        },
      ];
    }
    const winSlot0 = slots.cmp + slots.slc;
    if (this.fused) {
      return [
        {
          name: 'fused',
          launch: () =>
            programs.decode('fused').launch({
              grid: [Q * H * gchunks * (slots.cmp + slots.win + slots.slc), 1, 1],
              block: [128, 1, 1],
              sharedBytes: programs.decodePartialSharedBytes('fused'),
              args: [
                ...cache, ...parts, { i32: slots.nsa }, { i32: slots.cmp }, { i32: chunks.cmp }, { i32: slots.cmp }, { i32: slots.slc },
                { i32: chunks.slc }, { i32: winSlot0 }, { i32: slots.win }, { i32: chunks.win }, ptr(this.slices), { i64: this.sliceStride },
                { i32: Q }, { i32: Hq }, { i32: H }, scaleLog2, ptr(this.gate), branch(this.oCmp), branch(this.oSlc), branch(this.oWin), ptr(this.out),
                branch(this.lseCmp), branch(this.lseSlc), branch(this.lseWin), ptr(this.blockIndices), ptr(this.counters.fused), { i32: this.workFloats },
                { i32: this.lag }, { ptr: trace?.ptr ?? 0n },
              ],
            }),
        },
      ];
    }
    return [
      {
        name: 'cmp_win',
        launch: () =>
          programs.decode('cmp_win').launch({
            grid: [Q, H * gchunks, slots.cmp + slots.win],
            block: [128, 1, 1],
            sharedBytes: programs.decodePartialSharedBytes('cmp_win'),
            args: [
              ...cache, ...parts, { i32: slots.nsa }, { i32: slots.cmp }, { i32: chunks.cmp }, { i32: winSlot0 }, { i32: chunks.win },
              ptr(this.slices), { i64: this.sliceStride }, { i32: Hq }, { i32: H }, scaleLog2,
            ],
          }),
      },
      {
        name: 'select',
        launch: () =>
          programs.decode('select').launch({
            grid: [Q, H, this.selectCtas],
            block: [256, 1, 1],
            sharedBytes: Math.max(SELECT_STAGE * 4, this.selectCtas * config.selectCount * 8),
            args: [
              ...parts, ptr(this.slices), { i64: this.sliceStride }, ptr(tables.queryPtrs), ptr(tables.qPos),
              ptr(this.oCmp), branch(this.lseCmp), ptr(this.blockIndices), ptr(this.candidates.s), ptr(this.candidates.j),
              ptr(this.counters.select), { i32: Hq }, { i32: H }, { i32: slots.nsa }, { i32: slots.cmp },
            ],
          }),
      },
      {
        name: 'slc',
        launch: () =>
          programs.decode('slc').launch({
            grid: [Q, H * gchunks, slots.slc],
            block: [128, 1, 1],
            sharedBytes: programs.decodePartialSharedBytes('slc'),
            args: [
              ...cache, ptr(this.blockIndices), ...parts, { i32: slots.nsa }, { i32: slots.cmp }, { i32: chunks.slc }, { i32: winSlot0 },
              { i32: Hq }, { i32: H }, scaleLog2, ptr(this.gate), ptr(this.oCmp), branch(this.oSlc), branch(this.oWin), ptr(this.out),
              branch(this.lseSlc), branch(this.lseWin), ptr(this.counters.slc),
            ],
          }),
      },
    ];
  }

  /** The NSA step (or dense attention over the whole cache). */
  run(dense: boolean): void {
    for (const l of this.launches(dense)) l.launch();
  }

  dispose(): void {
    for (const b of this.buffers) b.dispose();
    this.buffers.length = 0;
  }

  private keep(b: DeviceBuffer): DeviceBuffer {
    this.buffers.push(b);
    return b;
  }
}

function concat(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function concatAll(parts: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
