// The cuda KV cache: per sequence, device buffers of raw K/V and compressed K/V in bf16, grown by doubling (a
// copy on the device), and a decode step of three launches (kernels/decode.cu): cmp and win chunks (the cmp
// chunks also fold their probabilities into per-slice block sums), cmp merge + block scores + top-n spread over
// several CTAs per (query, KV head), slc chunks whose last CTA merges and writes the gated sum. Appends from the host compress on the host with the
// same phi as the reference (the last l - 1 tokens are kept on the host for the next block) and upload the rows;
// appendRandom (benchmarks) fills and compresses on the device. The timing methods replay the step's launches as
// a CUDA graph.

import type { NSAConfig } from '../../../config/nsa-config.js';
import { DisposedError, UnsupportedConfigError } from '../../../errors.js';
import { checkAppend, checkDecode } from '../../../nsa/decode/checks.js';
import type { DecodeOutputs, DecodeQuery, KvCache, KvCacheOptions } from '../../../nsa/decode/types.js';
import { phiParamsOf } from '../../../nsa/phi-params.js';
import { validatePhiParams } from '../../../nsa/validate.js';
import { BlockCompressor } from '../../../reference/compress.js';
import { bf16ToF32, float64ToStorage } from '../../../tensor/dtype.js';
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
  /** Tokens from tailStart on, as f32 [rows, H, D]: what the next compression blocks still need (< l of them). */
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

export class CudaKvCache implements KvCache {
  readonly backend = 'cuda' as const;
  readonly maxTokens: number;
  private readonly pageTokens: number;
  private readonly sequences: SequenceStore[] = [];
  private readonly compressK: BlockCompressor;
  private readonly compressV: BlockCompressor;
  private readonly learned: boolean;
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
    const { kvHeads: H, headDim: dk, valueDim: dv, compressStride: d } = this.config;
    this.reserve(store, store.length + T);
    const kBits = float64ToStorage('bf16', k.toFloat32());
    const vBits = float64ToStorage('bf16', v.toFloat32());
    this.ctx.uploadAt(store.k, store.length * H * dk * 2, kBits);
    this.ctx.uploadAt(store.v, store.length * H * dv * 2, vBits);
    // Compress the blocks this append completes, from the kept tail and the new tokens as the cache holds them
    // (bf16), as the forward's compression reads them.
    const roundedK = Float32Array.from(kBits, bf16ToF32);
    const roundedV = Float32Array.from(vBits, bf16ToF32);
    const allK = concat(store.tailK, roundedK);
    const allV = concat(store.tailV, roundedV);
    const newLength = store.length + T;
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
      this.ctx.uploadAt(store.kc, store.compressed * H * dk * 2, float64ToStorage('bf16', kc));
      this.ctx.uploadAt(store.vc, store.compressed * H * dv * 2, float64ToStorage('bf16', vc));
      store.compressed = target;
    }
    // Keep the tokens the next blocks still need: from the next block's first token on (at most l - 1 of them).
    const keepFrom = Math.max(store.tailStart, Math.min(newLength, target * d));
    const drop = keepFrom - store.tailStart;
    store.tailK = allK.slice(drop * H * dk);
    store.tailV = allV.slice(drop * H * dv);
    store.tailStart = keepFrom;
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
    random.normal(store.k, tokens * H * dk, seed);
    random.normal(store.v, tokens * H * dv, seed + 1);
    const compressed = this.config.compressedLength(tokens);
    if (compressed > 0) {
      const tables = {
        rowSeq: this.ctx.upload(new Int32Array(compressed), 'cmp_row_seq'),
        cu: this.ctx.upload(Int32Array.from([0, tokens]), 'cu_seqlens'),
        cuCmp: this.ctx.upload(Int32Array.from([0, compressed]), 'cu_cmp'),
      };
      this.programs.compressMean.launch({
        grid: [compressed, H, 1],
        block: [(dk + dv) / 8, 1, 1],
        args: [ptr(store.k), ptr(store.v), ptr(store.kc), ptr(store.vc), ptr(tables.rowSeq), ptr(tables.cu), ptr(tables.cuCmp), { i32: H }],
      });
      this.ctx.synchronize();
      for (const b of Object.values(tables)) b.dispose();
    }
    store.length = tokens;
    store.compressed = compressed;
  }

  async decode(queries: readonly DecodeQuery[]): Promise<DecodeOutputs> {
    this.assertLive();
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
    const step = new DecodeStep(this.ctx, this.programs, this.config, Q, this.maxLength(), this.sequences, qSeq, qPos);
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

  async timeDecodeStep(options: TimingOptions & { readonly dense?: boolean }): Promise<TimingResult> {
    const step = this.randomStep();
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
   */
  async timeDecodeLaunches(options: TimingOptions & { readonly dense?: boolean }): Promise<{ name: string; medianMs: number }[]> {
    const step = this.randomStep();
    try {
      const dense = options.dense ?? false;
      step.run(dense);
      return step.launches(dense).map(({ name, launch }) => ({ name, medianMs: this.timeReplayed(launch, `decode ${name}`, options).medianMs }));
    } finally {
      step.dispose();
    }
  }

  /** A step of one random query (N(0, 1)) and random gates (U(0, 1)) per sequence, at its last position. */
  private randomStep(): DecodeStep {
    this.assertLive();
    const S = this.sequences.length;
    const qSeq = Array.from({ length: S }, (_, s) => s);
    const qPos = this.sequences.map((s) => s.length - 1);
    const step = new DecodeStep(this.ctx, this.programs, this.config, S, this.maxLength(), this.sequences, qSeq, qPos);
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

  dispose(): void {
    for (const s of this.sequences) for (const b of [s.k, s.v, s.kc, s.vc]) b.dispose();
    this.sequences.length = 0;
    this.disposed = true;
  }

  private maxLength(): number {
    return this.sequences.reduce((m, s) => Math.max(m, s.length), 1);
  }

  private allocate(capacity: number): Pick<SequenceStore, 'k' | 'v' | 'kc' | 'vc'> {
    const { kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    const ccap = Math.max(1, this.config.compressedLength(capacity));
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
    const { kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    this.ctx.copy(grown.k, store.k, store.length * H * dk * 2);
    this.ctx.copy(grown.v, store.v, store.length * H * dv * 2);
    this.ctx.copy(grown.kc, store.kc, store.compressed * H * dk * 2);
    this.ctx.copy(grown.vc, store.vc, store.compressed * H * dv * 2);
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

/** nsa_decode_select's threads, the candidate blocks one of its CTAs scores at most, its staging floats (decode.cu). */
const SELECT_THREADS = 256;
const SELECT_CANDIDATES = 4 * SELECT_THREADS;
const SELECT_STAGE = 8192;

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
  private readonly tables: Record<'seqPtrs' | 'seqLen' | 'qSeq' | 'qPos', DeviceBuffer>;
  private readonly partial: Record<'m' | 'l' | 'o', DeviceBuffer>;
  /** Branch 0's per-slice block sums [Q, H, sliceStride]; the select step's candidate lists; last-CTA counters. */
  private readonly slices: DeviceBuffer;
  private readonly candidates: Record<'s' | 'j', DeviceBuffer>;
  private readonly counters: Record<'select' | 'slc', DeviceBuffer>;
  /** Chunks (partial slots) per row of each branch, and the keys per chunk; NSA's slots are laid out cmp, slc, win. */
  private readonly slots: { cmp: number; slc: number; win: number; nsa: number; dense: number };
  private readonly chunks: { cmp: number; slc: number; win: number; dense: number };
  private readonly sliceStride: number;
  /** nsa_decode_select CTAs per (query, KV head). */
  private readonly selectCtas: number;

  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    private readonly config: NSAConfig,
    private readonly Q: number,
    maxLength: number,
    sequences: readonly SequenceStore[],
    qSeq: readonly number[],
    qPos: readonly number[],
  ) {
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n, selectBlock, window } = config;
    const G = config.groupSize;
    const f32 = (count: number, what: string): DeviceBuffer => this.keep(ctx.alloc(Math.max(1, count) * 4, what));
    this.q = this.keep(ctx.alloc(Q * Hq * dk * 2, 'decode q'));
    this.gate = f32(Q * Hq * 3, 'decode gates');
    this.out = f32(Q * Hq * dv, 'decode o');
    this.oCmp = f32(Q * Hq * dv, 'decode o_cmp');
    this.oSlc = f32(Q * Hq * dv, 'decode o_slc');
    this.oWin = f32(Q * Hq * dv, 'decode o_win');
    this.lseCmp = f32(Q * Hq, 'decode lse_cmp');
    this.lseSlc = f32(Q * Hq, 'decode lse_slc');
    this.lseWin = f32(Q * Hq, 'decode lse_win');
    this.blockIndices = this.keep(ctx.alloc(Q * H * n * 4, 'decode block indices'));
    const maxCompressed = Math.max(1, config.compressedLength(maxLength));
    const gchunks = Math.ceil(G / 16);
    const ctaRows = Q * H * gchunks;
    const minCtas = 4 * ctx.device.smCount;
    // The compressed keys in chunks of >= 256 (each chunk writes a partial output); the selected blocks and the
    // window, short, in chunks down to two tiles (slc) or one (win) when the batch is small, so that their launches spread.
    this.chunks = {
      cmp: chunkFor(maxCompressed, ctaRows, minCtas, 256, 'NSA_DECODE_CMP_CHUNK'),
      // Two tiles at least, so that a CTA's double buffer overlaps (one-tile chunks measured slower: paper preset,
      // 64k, H100: slc launch 0.033 -> 0.022 ms at B = 8 with 128 keys; 0.087 -> 0.147 ms at B = 64 with 64).
      slc: chunkFor(n * selectBlock, ctaRows, minCtas, 128, 'NSA_DECODE_SLC_CHUNK'),
      // The window shares its launch with the compressed keys: it needs only the CTAs those leave short.
      win: chunkFor(window, ctaRows, minCtas - ctaRows * Math.ceil(maxCompressed / chunkFor(maxCompressed, ctaRows, minCtas, 256, 'NSA_DECODE_CMP_CHUNK')), 64),
      dense: chunkFor(maxLength, ctaRows, minCtas, 256),
    };
    const cmp = Math.ceil(maxCompressed / this.chunks.cmp);
    const slc = Math.ceil((n * selectBlock) / this.chunks.slc);
    const win = Math.ceil(window / this.chunks.win);
    const dense = Math.ceil(maxLength / this.chunks.dense);
    this.slots = { cmp, slc, win, nsa: cmp + slc + win, dense };
    // nsa_decode_slc's last CTA keeps a weight per (row, slc or win slot) in its dynamic shared memory.
    if (2 * 16 * (slc + win) * 4 > programs.decodePartialSharedBytes('slc')) {
      throw new UnsupportedConfigError(`cuda decode: ${slc + win} slc and win chunks per row are more than the merge holds`);
    }
    const rows = Q * Hq * Math.max(this.slots.nsa, dense);
    this.partial = { m: f32(rows, 'decode partial m'), l: f32(rows, 'decode partial l'), o: f32(rows * dv, 'decode partial o') };
    this.sliceStride = Math.ceil(maxCompressed / 64) * 4 * G * sliceWidth(config);
    // nsa_decode_select stages the slices of SELECT_THREADS candidate blocks, one head at least, in SELECT_STAGE floats.
    const { compressBlock: l, compressStride: d } = config;
    const stagedSlices = Math.floor(((SELECT_THREADS * selectBlock + l - d) / d + 1) / 16) + 2;
    if (stagedSlices * sliceWidth(config) > SELECT_STAGE) {
      throw new UnsupportedConfigError(`cuda decode: selection blocks of ${selectBlock} over compressed tokens every ${d} are too many to score`);
    }
    this.slices = f32(Q * H * this.sliceStride, 'decode cmp slices');
    const maxCandidates = Math.ceil(maxLength / selectBlock) + 1;
    // At least what SELECT_CANDIDATES a CTA allows; with few (query, KV head) pairs, up to one per head (each
    // merges o_cmp of G / selectCtas heads) for about 2 CTAs per SM. More CTAs than that measured slower at B = 64
    // (5 per pair: 0.10 against 0.073 ms for this launch alone, H100): its fixed per-CTA work is a latency chain.
    this.selectCtas = Math.max(Math.ceil(maxCandidates / SELECT_CANDIDATES), Math.min(G, Math.ceil((2 * ctx.device.smCount) / (Q * H))));
    this.candidates = {
      s: f32(Q * H * this.selectCtas * n, 'decode candidate scores'),
      j: f32(Q * H * this.selectCtas * n, 'decode candidate blocks'),
    };
    this.counters = { select: f32(Q * H, 'decode select counters'), slc: f32(ctaRows, 'decode slc counters') };
    ctx.memset(this.counters.select, 0);
    ctx.memset(this.counters.slc, 0);
    const ptrs = new BigUint64Array(sequences.length * 4);
    sequences.forEach((s, i) => ptrs.set([s.k.ptr, s.v.ptr, s.kc.ptr, s.vc.ptr], i * 4));
    this.tables = {
      seqPtrs: this.keep(ctx.upload(ptrs, 'decode sequence pointers')),
      seqLen: this.keep(ctx.upload(Int32Array.from(sequences.map((s) => s.length)), 'decode sequence lengths')),
      qSeq: this.keep(ctx.upload(Int32Array.from(qSeq), 'decode query sequences')),
      qPos: this.keep(ctx.upload(Int32Array.from(qPos), 'decode query positions')),
    };
  }

  /** The launches of the NSA step (or of dense attention over the whole cache), in order, by name. */
  launches(dense: boolean): { readonly name: string; readonly launch: () => void }[] {
    const { programs, config, Q, tables, partial, slots, chunks } = this;
    const { heads: Hq, kvHeads: H } = config;
    const gchunks = Math.ceil(config.groupSize / 16);
    const scaleLog2 = { f32: config.scale * Math.LOG2E };
    const cache = [ptr(this.q), ptr(tables.seqPtrs), ptr(tables.seqLen), ptr(tables.qSeq), ptr(tables.qPos)];
    const parts = [ptr(partial.m), ptr(partial.l), ptr(partial.o)];
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
              ...parts, ptr(this.slices), { i64: this.sliceStride }, ptr(tables.seqLen), ptr(tables.qSeq), ptr(tables.qPos),
              ptr(this.oCmp), ptr(this.lseCmp), ptr(this.blockIndices), ptr(this.candidates.s), ptr(this.candidates.j),
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
              { i32: Hq }, { i32: H }, scaleLog2, ptr(this.gate), ptr(this.oCmp), ptr(this.oSlc), ptr(this.oWin), ptr(this.out),
              ptr(this.lseSlc), ptr(this.lseWin), ptr(this.counters.slc),
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
