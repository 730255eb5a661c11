// The inverse of a selection on the device (kernels/inverse_index.cu): for each key (KV head, selection block),
// the (token, slot) pairs that chose it, in token order, built by a stable counting sort so that everything
// that walks it sums in the same order on every run. The FSA-ordered selected attention and the selected
// branch's dK/dV both read it.

import type { CudaContext } from '../context.js';
import type { KernelArg } from '../kernel-args.js';
import type { DeviceBuffer } from '../memory.js';
import type { LayoutPlan } from './layout-plan.js';
import type { NsaPrograms } from './programs.js';

const ptr = (b: DeviceBuffer): KernelArg => ({ ptr: b.ptr });

export class InverseIndex {
  /** [keys + 1]: where each key's pairs start in `entries`. */
  readonly offsets: DeviceBuffer;
  /** [keys + 1]: where each key's work items start, an item being up to `entriesPerItem` pairs (see build). */
  readonly itemOffsets: DeviceBuffer;
  /** [N * H * n] int2 (token, slot), grouped by key. */
  readonly entries: DeviceBuffer;
  private readonly counts: DeviceBuffer;
  private readonly totals: DeviceBuffer;
  private readonly starts: DeviceBuffer;
  private readonly chunks: number;
  private readonly chunk: number;
  private readonly buffers: DeviceBuffer[];

  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    private readonly plan: LayoutPlan,
    private readonly tables: { readonly rowSeq: DeviceBuffer; readonly cuBlocks: DeviceBuffer },
  ) {
    const { kvHeads: H, selectCount: n } = programs.config;
    const N = plan.totalTokens;
    const keys = H * plan.totalBlocks;
    // Tokens are cut into chunks of at least 16 (at most 1024 chunks); one thread per (chunk, KV head) walks its
    // chunk in order. Each step of a walk waits on its counter's read-modify-write, so shorter walks are faster:
    // 256 chunks took 2.9 ms at 64k tokens, H = 4 (H100).
    this.chunks = Math.max(1, Math.min(1024, Math.ceil(N / 16)));
    this.chunk = Math.ceil(N / this.chunks);
    this.counts = ctx.alloc(keys * this.chunks * 4, 'inverse index counts');
    this.totals = ctx.alloc(keys * 4, 'inverse index totals');
    this.offsets = ctx.alloc((keys + 1) * 4, 'inverse index offsets');
    this.itemOffsets = ctx.alloc((keys + 1) * 4, 'inverse index item offsets');
    this.starts = ctx.alloc(keys * this.chunks * 4, 'inverse index starts');
    this.entries = ctx.alloc(Math.max(1, N * H * n) * 8, 'inverse index entries');
    this.buffers = [this.counts, this.totals, this.offsets, this.itemOffsets, this.starts, this.entries];
  }

  /** Upper bound of the work items of `entriesPerItem` pairs over all keys (a grid size). */
  itemUpperBound(entriesPerItem: number): number {
    const { kvHeads: H, selectCount: n } = this.programs.config;
    return H * this.plan.totalBlocks + Math.ceil((this.plan.totalTokens * H * n) / entriesPerItem);
  }

  /** Launches the build from block_indices [N, H, n] (asynchronous). */
  build(blockIndices: DeviceBuffer, entriesPerItem: number): void {
    const { ctx, programs, plan, tables, chunk, chunks } = this;
    const H = programs.config.kvHeads;
    const keys = H * plan.totalBlocks;
    const N = plan.totalTokens;
    const walkers: [number, number, number] = [Math.ceil((chunks * H) / 128), 1, 1];
    const perKey: [number, number, number] = [Math.ceil(keys / 4), 1, 1]; // a warp per key, 4 a block
    const selection = [ptr(blockIndices), ptr(tables.rowSeq), ptr(tables.cuBlocks)];
    const walk = [{ i32: N }, { i32: H }, { i32: plan.totalBlocks }, { i32: chunk }, { i32: chunks }];
    ctx.memset(this.counts, 0);
    programs.inverseIndex('count').launch({ grid: walkers, block: [128, 1, 1], args: [...selection, ptr(this.counts), ...walk] });
    programs.inverseIndex('key_totals').launch({
      grid: perKey,
      block: [128, 1, 1],
      args: [ptr(this.counts), ptr(this.totals), { i32: keys }, { i32: chunks }],
    });
    programs.inverseIndex('scan').launch({
      grid: [1, 1, 1],
      block: [1024, 1, 1],
      args: [ptr(this.totals), ptr(this.offsets), ptr(this.itemOffsets), { i32: keys }, { i32: entriesPerItem }],
    });
    programs.inverseIndex('chunk_starts').launch({
      grid: perKey,
      block: [128, 1, 1],
      args: [ptr(this.counts), ptr(this.offsets), ptr(this.starts), { i32: keys }, { i32: chunks }],
    });
    programs.inverseIndex('fill').launch({ grid: walkers, block: [128, 1, 1], args: [...selection, ptr(this.starts), ptr(this.entries), ...walk] });
  }

  dispose(): void {
    for (const b of this.buffers) b.dispose();
  }
}
