// The inverse of a selection on the device (kernels/inverse_index.cu): for each key (KV head, selection block),
// the (token, slot) pairs that chose it, in token order, built by a stable counting sort so that everything
// that walks it sums in the same order on every run. The FSA-ordered selected attention and the selected
// branch's dK/dV both read it; where the forward built one (FSA order), the backward shares its entries and
// per-key totals and only scans its own work items.

import type { CudaContext } from '../context.js';
import type { KernelArg } from '../kernel-args.js';
import type { DeviceBuffer } from '../memory.js';
import type { LayoutPlan } from './layout-plan.js';
import type { NsaPrograms } from './programs.js';

const ptr = (b: DeviceBuffer): KernelArg => ({ ptr: b.ptr });
/** Tokens per bucket of the work items' order: one selection block at the usual l' = 64. */
const BUCKET_TOKENS = 64;
/**
 * The ranked walks: tokens a chunk at least, warps a CTA, and counters a chunk at most (8 bytes each in shared memory;
 * fewer where a CTA may not have RANKED_WARPS times that).
 */
const RANKED_MIN_CHUNK = 128;
const RANKED_WARPS = 4;
const RANKED_MAX_SPAN = 4096;

/**
 * The counters a ranked walk's chunk of `chunk` tokens needs, the most over all chunks: from block 0 of its first
 * token's sequence to its last token's own block (no token chooses a later block), in global block numbers.
 */
export function rankedSpan(plan: Pick<LayoutPlan, 'totalTokens' | 'cuSeqlens' | 'cuBlocks' | 'rowSeq'>, selectBlock: number, chunk: number): number {
  let span = 1;
  for (let t0 = 0; t0 < plan.totalTokens; t0 += chunk) {
    const last = Math.min(plan.totalTokens, t0 + chunk) - 1;
    const seq = plan.rowSeq[last]!;
    const lastBlock = plan.cuBlocks[seq]! + Math.floor((last - plan.cuSeqlens[seq]!) / selectBlock);
    span = Math.max(span, lastBlock - plan.cuBlocks[plan.rowSeq[t0]!]! + 1);
  }
  return span;
}

export class InverseIndex {
  /** [keys + 1]: where each key's pairs start in `entries`. */
  readonly offsets: DeviceBuffer;
  /** [keys + 1]: where each key's work items start, an item being up to `entriesPerItem` pairs (see build). */
  readonly itemOffsets: DeviceBuffer;
  /** [N * H * n] int2 (token, slot), grouped by key. */
  readonly entries: DeviceBuffer;
  /** Pairs per key ([keys]), which the item scan reads. */
  private readonly totals: DeviceBuffer;
  /**
   * The sort's own buffers and chunks; undefined when this index shares another's entries. `span`: counters a chunk
   * needs for the ranked walks (a warp per chunk, its counters in shared memory), or undefined for one thread's walk.
   */
  private readonly sort:
    | { counts: DeviceBuffer; starts: DeviceBuffer; chunks: number; chunk: number; span: number | undefined }
    | undefined;
  /** Where the scan writes the key offsets: `offsets`, or scratch when they are a shared index's. */
  private readonly scanOffsets: DeviceBuffer;
  private readonly buffers: DeviceBuffer[];
  /** The work items' order and its scratch (orderItems), for one item size. */
  private order:
    | { items: number; itemOrder: DeviceBuffer; itemBucket: DeviceBuffer; counts: DeviceBuffer; starts: DeviceBuffer; scratch: DeviceBuffer }
    | undefined;

  /**
   * With `shared` (an index built from the same selection, e.g. the forward's), this one takes its entries,
   * offsets and totals and `build` only scans its own work items: valid while `shared` holds that selection.
   */
  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    private readonly plan: LayoutPlan,
    private readonly tables: { readonly rowSeq: DeviceBuffer; readonly cuBlocks: DeviceBuffer },
    shared?: InverseIndex,
  ) {
    const { kvHeads: H, selectCount: n } = programs.config;
    const N = plan.totalTokens;
    const keys = H * plan.totalBlocks;
    this.itemOffsets = ctx.alloc((keys + 1) * 4, 'inverse index item offsets');
    if (shared !== undefined) {
      this.entries = shared.entries;
      this.offsets = shared.offsets;
      this.totals = shared.totals;
      this.sort = undefined;
      this.scanOffsets = ctx.alloc((keys + 1) * 4, 'inverse index offsets (scratch)');
      this.buffers = [this.itemOffsets, this.scanOffsets];
      return;
    }
    // The ranked walks (a warp per (chunk, KV head), 32 tokens a round, its counters in shared memory) take chunks of
    // at least 128 tokens where every chunk's counters fit (programs.tuning.indexRanked, rankedMaxSpan). Otherwise
    // tokens are cut into chunks of at least 16 (at most 1024 chunks); one thread per (chunk, KV head) walks its
    // chunk in order. Each step of such a walk waits on its counters' read-modify-writes, so shorter walks are
    // faster: 256 chunks took 2.9 ms at 64k tokens, H = 4 (H100).
    const rankedChunks = Math.max(1, Math.min(1024, Math.ceil(N / RANKED_MIN_CHUNK)));
    const span = programs.tuning.indexRanked === false ? undefined : rankedSpan(plan, programs.config.selectBlock, Math.ceil(N / rankedChunks));
    const ranked = span !== undefined && span <= Math.min(RANKED_MAX_SPAN, Math.floor(ctx.maxSharedBytesOptin / (RANKED_WARPS * 8)));
    const chunks = ranked ? rankedChunks : Math.max(1, Math.min(1024, Math.ceil(N / 16)));
    this.sort = {
      counts: ctx.alloc(keys * chunks * 4, 'inverse index counts'),
      starts: ctx.alloc(keys * chunks * 4, 'inverse index starts'),
      chunks,
      chunk: Math.ceil(N / chunks),
      span: ranked ? span : undefined,
    };
    this.totals = ctx.alloc(keys * 4, 'inverse index totals');
    this.offsets = ctx.alloc((keys + 1) * 4, 'inverse index offsets');
    this.entries = ctx.alloc(Math.max(1, N * H * n) * 8, 'inverse index entries');
    this.scanOffsets = this.offsets;
    this.buffers = [this.sort.counts, this.sort.starts, this.totals, this.offsets, this.itemOffsets, this.entries];
  }

  /** Upper bound of the work items of `entriesPerItem` pairs over all keys (a grid size). */
  itemUpperBound(entriesPerItem: number): number {
    const { kvHeads: H, selectCount: n } = this.programs.config;
    return H * this.plan.totalBlocks + Math.ceil((this.plan.totalTokens * H * n) / entriesPerItem);
  }

  /**
   * Launches the build from block_indices [N, H, n] (asynchronous): the sort, then the scans of the per-key
   * offsets and of the work items of up to `entriesPerItem` pairs; a shared index runs only the item scan.
   */
  build(blockIndices: DeviceBuffer, entriesPerItem: number): void {
    const { ctx, programs, plan, tables, sort } = this;
    const H = programs.config.kvHeads;
    const keys = H * plan.totalBlocks;
    const N = plan.totalTokens;
    const perKey: [number, number, number] = [Math.ceil(keys / 4), 1, 1]; // a warp per key, 4 a block
    const scan = (): void => this.scan(this.totals, this.scanOffsets, this.itemOffsets, keys, entriesPerItem);
    if (sort === undefined) {
      scan();
      return;
    }
    const { counts, starts, chunk, chunks, span } = sort;
    const selection = [ptr(blockIndices), ptr(tables.rowSeq), ptr(tables.cuBlocks)];
    // A thread per (chunk, KV head), or for the ranked walks a warp with 2 * span counters of shared memory.
    const walkersPerCta = span === undefined ? 128 : RANKED_WARPS;
    const walkers = {
      grid: [Math.ceil((chunks * H) / walkersPerCta), 1, 1] as [number, number, number],
      block: [span === undefined ? 128 : 32 * RANKED_WARPS, 1, 1] as [number, number, number],
      sharedBytes: span === undefined ? 0 : RANKED_WARPS * span * 8,
    };
    const walk = [{ i32: N }, { i32: H }, { i32: plan.totalBlocks }, { i32: chunk }, { i32: chunks }, ...(span === undefined ? [] : [{ i32: span }])];
    const form = span === undefined ? '' : '_ranked';
    ctx.memset(counts, 0);
    programs.inverseIndex(`count${form}`).launch({ ...walkers, args: [...selection, ptr(counts), ...walk] });
    programs.inverseIndex('key_totals').launch({
      grid: perKey,
      block: [128, 1, 1],
      args: [ptr(counts), ptr(this.totals), { i32: keys }, { i32: chunks }],
    });
    scan();
    programs.inverseIndex('chunk_starts').launch({
      grid: perKey,
      block: [128, 1, 1],
      args: [ptr(counts), ptr(this.offsets), ptr(starts), { i32: keys }, { i32: chunks }],
    });
    programs.inverseIndex(`fill${form}`).launch({ ...walkers, args: [...selection, ptr(starts), ptr(this.entries), ...walk] });
  }

  /**
   * Launches the ordering of the work items of `entriesPerItem` pairs (after `build`, asynchronous) by KV head and
   * the token of each item's first pair, in buckets of BUCKET_TOKENS tokens, and returns the order: the selected
   * dK/dV's CTA i takes item order[i] (kernels/inverse_index.cu says why). Which item of a bucket comes first varies
   * run to run; what each item computes and writes does not.
   */
  orderItems(entriesPerItem: number): DeviceBuffer {
    const { ctx, programs, plan } = this;
    const H = programs.config.kvHeads;
    const keys = H * plan.totalBlocks;
    const items = this.itemUpperBound(entriesPerItem);
    const perHead = Math.max(1, Math.ceil(plan.totalTokens / BUCKET_TOKENS));
    const buckets = H * perHead;
    if (this.order === undefined || this.order.items !== items) {
      this.disposeOrder();
      this.order = {
        items,
        itemOrder: ctx.alloc(items * 4, 'work item order'),
        itemBucket: ctx.alloc(items * 8, 'work item buckets'),
        counts: ctx.alloc(buckets * 4, 'work item bucket counts'),
        starts: ctx.alloc((buckets + 1) * 4, 'work item bucket starts'),
        scratch: ctx.alloc((buckets + 1) * 4, 'work item bucket scan'),
      };
    }
    const o = this.order;
    const grid: [number, number, number] = [Math.ceil(items / 256), 1, 1];
    ctx.memset(o.counts, 0);
    programs.inverseIndex('item_buckets').launch({
      grid,
      block: [256, 1, 1],
      args: [
        ptr(this.offsets), ptr(this.itemOffsets), ptr(this.entries), ptr(o.counts), ptr(o.itemBucket), { i32: keys },
        { i32: plan.totalBlocks }, { i32: entriesPerItem }, { i32: perHead }, { i32: BUCKET_TOKENS },
      ],
    });
    this.scan(o.counts, o.starts, o.scratch, buckets, 1);
    programs.inverseIndex('item_order').launch({
      grid,
      block: [256, 1, 1],
      args: [ptr(this.itemOffsets), ptr(o.itemBucket), ptr(o.starts), ptr(o.itemOrder), { i32: keys }],
    });
    return o.itemOrder;
  }

  /** Device bytes this index owns (a shared index's entries and offsets are the other's). */
  get bytes(): number {
    return [...this.buffers, ...this.orderBuffers()].reduce((sum, b) => sum + b.bytes, 0);
  }

  dispose(): void {
    for (const b of this.buffers) b.dispose();
    this.disposeOrder();
  }

  /** Exclusive scans of `totals` [n] into `offsets` [n + 1] and of their ceil(total / perTile) into `tileOffsets`. */
  private scan(totals: DeviceBuffer, offsets: DeviceBuffer, tileOffsets: DeviceBuffer, n: number, perTile: number): void {
    this.programs.inverseIndex('scan').launch({
      grid: [1, 1, 1],
      block: [1024, 1, 1],
      args: [ptr(totals), ptr(offsets), ptr(tileOffsets), { i32: n }, { i32: perTile }],
    });
  }

  private orderBuffers(): DeviceBuffer[] {
    const o = this.order;
    return o === undefined ? [] : [o.itemOrder, o.itemBucket, o.counts, o.starts, o.scratch];
  }

  private disposeOrder(): void {
    for (const b of this.orderBuffers()) b.dispose();
    this.order = undefined;
  }
}
