// The NSA kernel programs: each names its source, its compile-time defines (the config baked in, which is also
// its cache key) and the shared memory its launch needs. Runtime sizes go in kernel arguments, never in defines,
// so one compiled module serves every sequence length.

import type { NSAConfig } from '../../../config/nsa-config.js';
import { UnsupportedConfigError } from '../../../errors.js';
import type { CudaContext, CudaModule } from '../context.js';
import type { DevicePtr } from '../driver.js';
import type { KernelArg } from '../kernel-args.js';
import type { Kernel } from '../launch.js';
import { encodeTiledTensorMap } from '../tensor-map.js';
import { kernelSource } from './kernel-source.js';

export type HalfDType = 'bf16' | 'f16';

/** Head dims with kernels: dk = dv in {64, 128}, and dk = 192 with dv = 128 (the paper's). */
export const SUPPORTED_HEAD_DIMS: readonly (readonly [number, number])[] = [
  [64, 64],
  [128, 128],
  [192, 128],
  [128, 64],
  [64, 128],
];

export const MAX_SELECT_COUNT = 32;
export const MAX_GROUP_FOR_SCORING = 128;

/** Launch shapes that trade occupancy against bytes in flight; NSA_FA_WARPS and NSA_SLC_PIPELINE override. */
export interface KernelTuning {
  /** Warps (of 16 query rows each) per flash-attention CTA: 4 or 8. */
  readonly faWarps: 4 | 8;
  /** Flash attention and block scoring with Hopper's wgmma (sm_90 only, compiled for sm_90a; NSA_FA_WGMMA=0 turns it off); else mma.sync. */
  readonly faWgmma: boolean;
  /** Warps (16 keys of a tile each) per group-centric selected-attention CTA, and its pipeline depth. */
  readonly slcWarps: 2 | 4;
  readonly slcStages: number;
  /** CTAs per SM the selected-attention kernel's registers must allow (its __launch_bounds__). */
  readonly slcMinBlocks: number;
  /** Gather the selected blocks' rows with bulk copies (sm_90 and later; NSA_SLC_BULK=0 turns it off). */
  readonly slcBulk: boolean;
  /**
   * With slcBulk, the group-centric selected attention loads each tile of keys/values as TMA boxes (BLOCK_N tokens of
   * one block, 64 columns a box) instead of a bulk copy per row: where l' is a multiple of the tile (16 * slcWarps)
   * and dk, dv of 64; NSA_SLC_TMA=0 keeps the per-row copies. Selected stage ~25% faster (docs/performance.md).
   */
  readonly slcTma?: boolean | undefined;
  /**
   * With slcTma, the group-centric selected attention takes this many consecutive positions a CTA and streams the
   * union of their blocks once (kernels/selected_attention_union.cu): 3 on sm_90 unless NSA_SLC_UNION says 2 to 8, or
   * 0 / 1 (undefined: one position a CTA, selected_attention.cu). Pays most where neighbouring positions choose alike.
   */
  readonly slcUnion?: number | undefined;
  /** The union kernel's ring depth (NSA_SLC_UNION_STAGES; default: as many stages as positions). */
  readonly slcUnionStages?: number | undefined;
  /** CTAs per SM the union kernel's registers must allow (NSA_SLC_UNION_MIN; default: Programs.unionMinBlocks). */
  readonly slcUnionMinBlocks?: number | undefined;
  /**
   * Storage of the fused selected dQ's per-slot parts (NSA_SLC_DQ_PARTS=f32|bf16): bfloat16 by default, half the
   * bytes of that pass's largest traffic for ~0.02% more relative RMS error in dQ (docs/performance.md).
   */
  readonly slcDqParts: 'f32' | 'bf16';
  /**
   * The selected dK/dV pass warp-specialised on wgmma (a gathering warpgroup, two computing ones): the default on
   * sm_90 at dk, dv <= 128 (H100, fla preset: that pass 12-21% faster, docs/performance.md); NSA_SLC_BWD=mma keeps
   * the mma.sync kernel (four warps), which other GPUs and dk = 192 take.
   */
  readonly slcBwdWs: boolean;
  /**
   * The warp-specialised selected dK/dV gathers each entry's G query and dO rows as TMA boxes (64 columns x G heads)
   * instead of 16-byte cp.async: on sm_90 where G is 8, 16, 32 or 64; NSA_SLC_BWD_TMA=0 keeps cp.async.
   */
  readonly slcBwdTma?: boolean | undefined;
  /**
   * CTAs per SM the FSA-order attention's registers must allow (NSA_FSA_MIN_BLOCKS=1..8). Default 4 at dk = dv =
   * 128: ptxas would take 137 registers, three CTAs per SM, where shared memory holds four; capped at 128 the kernel
   * was 8-9% faster at G = 4 on an H100 (docs/performance.md). Elsewhere ptxas chooses: at dk = 192 shared memory
   * allows three CTAs anyway, and at dk = 64 the cap made ptxas spend more registers (78 -> 117), not fewer.
   */
  readonly fsaMinBlocks?: number | undefined;
  /**
   * The FSA-order attention as persistent CTAs (blocks of at most 64 keys; NSA_FSA_PERSISTENT=0 turns it off): each
   * takes a contiguous run of tiles, keeps the key's K/V block while the key lasts and gathers the next tile's query
   * rows while this one computes. Measured 8-12% faster than a CTA per tile at G = 4 (docs/performance.md).
   */
  readonly fsaPersistent?: boolean | undefined;
  /**
   * The FSA-order attention writes its partial outputs through a per-warp shared-memory stage, 16 bytes a lane along
   * whole rows (NSA_FSA_STAGE=1), or straight from its accumulator fragments (0). Unset: staged where the stage's
   * shared memory costs no CTA an SM (NsaPrograms.fsaStaged).
   */
  readonly fsaStage?: boolean | undefined;
  /**
   * The persistent FSA-order attention's CTAs take their shares of one KV head's tiles at a time ('head', the
   * default), so that the query rows they gather together are one head's; 'all' (NSA_FSA_PHASES=all) shares out all
   * tiles at once. The selected stage was 2-7% faster by head on an H100 at G = 4, 16k and 64k (docs/performance.md).
   */
  readonly fsaPhases?: 'head' | 'all' | undefined;
  /**
   * The persistent FSA-order attention gathers its query rows by one bulk copy a row on sm_90 (the default there;
   * NSA_FSA_BULK_Q=0: 16-byte cp.async copies, as on older GPUs).
   */
  readonly fsaBulkQ?: boolean | undefined;
  /**
   * The inverse index's count and fill by a warp per (chunk, KV head) with the chunk's counters in shared memory
   * (the default, where they fit: InverseIndex), or by one thread's walk per chunk (NSA_INDEX_RANKED=0).
   */
  readonly indexRanked?: boolean | undefined;
  /**
   * The cmp and win branches' dQ in one launch (nsa_flash_bwd_dq_cmp_win: Q and dO read once, dq written once),
   * the default; NSA_FA_BWD_DQ_FUSED=0 runs one launch per branch.
   */
  readonly cmpWinDqFused?: boolean | undefined;
  /**
   * The flash forward as nsa_flash_attention_tma (sm_90 wgmma path; NSA_FA_TMA=0 turns it off): Q, key and value
   * tiles by TMA through rings of mbarrier stages instead of every thread's cp.async and a __syncthreads per tile.
   * Its two warpgroups take turns issuing their products (FlashAttention-3's ping-pong; NSA_FA_PINGPONG=0 lets them
   * issue freely).
   */
  readonly faTma?: boolean | undefined;
  readonly faPingpong?: boolean | undefined;
  /**
   * The flash backward's kernels in their pipelined form (`_tma` entries, sm_90 wgmma path): the walked tiles arrive
   * by TMA through a ring of mbarrier stages, and two warpgroups of a CTA take turns at the tensor cores.
   * On by default on sm_90 for both dK/dV and dQ; NSA_FA_BWD_TMA=dkdv or =dq keeps one, =0 neither (the cp.async
   * kernels). NSA_FA_BWD_STAGES=2|3|4 sets the ring's stages (default 3 with two warpgroups, 2 with one, so that two
   * CTAs still fit an SM; never more than shared memory holds).
   */
  readonly faBwdTma?: { readonly dq: boolean; readonly dkdv: boolean } | undefined;
  readonly faBwdStages?: number | undefined;
  /**
   * The pipelined flash backward lets a tile's last product (dK in dK/dV, dQ in dQ) run on while the next tile's
   * scores are issued, and releases its stage there (FB_DEFER; NSA_FA_BWD_DEFER=0 waits for it at the end of the
   * tile, as before). The cmp + win dQ launch that adds the selected parts keeps the waiting loop. Measured 2-6%
   * off the cmp dK/dV, the window's the same (docs/performance.md).
   */
  readonly faBwdDefer?: boolean | undefined;
  /** Tiles (of 64 gathered rows) per work item of the selected dK/dV (NSA_SLC_BWD_ITEM=16..256; default 64), for tuning. */
  readonly slcBwdItemTiles?: number | undefined;
  /**
   * The order the selected dK/dV runs its work items in: 'token' (default) by KV head and the token of each item's
   * first pair, so CTAs running together gather nearby rows; 'key' as they are numbered, block by block
   * (NSA_SLC_BWD_ORDER=key). Only when items run changes: the sums and their order do not.
   */
  readonly slcBwdOrder?: 'token' | 'key' | undefined;
  /**
   * Where no sequence of a batch is longer than n l', every visible block is selected and the selected branch is
   * dense causal attention: the flash kernel (mode 0, gated) computes it, and the selection is written without
   * scores (nsa_all_visible_blocks), instead of the block scoring and the gathers. NSA_SLC_DENSE=0 keeps those.
   */
  readonly slcDense?: boolean | undefined;
  /**
   * On that dense path, where the window reads the selected branch's K/V and the stash fits: one launch (flash mode
   * 4) computes all three branches, the window's keys multiplied once for both the window and the selected branch
   * (the selected branch's state over the keys before the window merged with the window's). NSA_SLC_WIN_MERGE=0
   * keeps the cmp + win launch and the dense selected launch.
   */
  readonly slcWinMerge?: boolean | undefined;
  /**
   * Smallest ring of block scores per position in the block selection (NSA_SELECT_RING=128|256|512), for tuning:
   * a larger ring offers final blocks to the top-n lists in larger, rarer batches (select_blocks.cu).
   */
  readonly selectRing?: number | undefined;
  /**
   * Final blocks the ring must hold beyond a tile's (NSA_SELECT_OFFER_MIN=16..256), and the CTAs an SM the block
   * selection's registers must allow (NSA_SELECT_MIN_BLOCKS=1..4), for tuning; by default NsaPrograms.selectShape
   * picks both from the device's shared memory.
   */
  readonly selectOfferMin?: number | undefined;
  readonly selectMinBlocks?: number | undefined;
  /**
   * The block selection's compressed key tiles by TMA (sm_90 with wgmma) rather than every thread's cp.async copies;
   * NSA_SELECT_TMA=0 keeps those.
   */
  readonly selectTma?: boolean | undefined;
  /**
   * The offered blocks above a top-n list's last that make the block selection sort a round of 32 and merge it into
   * the list instead of inserting them one at a time (NSA_SELECT_MERGE_MIN=1..33, 33: never; default 8 in
   * select_blocks.cu), for tuning.
   */
  readonly selectMergeMin?: number | undefined;
  /**
   * With one compressed key per selection block (l = d = l'), the block selection offers each tile's final block
   * scores to the top-n lists straight from the tile's head sums, without a ring of open scores (select_blocks.cu,
   * SELECT_DIRECT); NSA_SELECT_DIRECT=0 keeps the ring. Same choice either way.
   */
  readonly selectDirect?: boolean | undefined;
  /**
   * Where a warp's 16 rows are whole positions (G a power of two up to 16), the block selection's warp that sums a
   * position's heads also folds and offers its scores and keeps its list (SELECT_WARP_LOCAL); NSA_SELECT_WARP_LOCAL=0
   * deals the positions to the warps in turn, across a CTA barrier.
   */
  readonly selectWarpLocal?: boolean | undefined;
  /**
   * With selectWarpLocal and G from 4 to 16, each warp keeps its positions' top-n lists in its lanes' registers
   * instead of shared memory (SELECT_REG_LISTS; NSA_SELECT_REG_LISTS=0 keeps them in shared memory).
   */
  readonly selectRegLists?: boolean | undefined;
}

/**
 * Stages of gathered query/dO rows in the warp-specialised selected dK/dV's ring (selected_attention_bwd.cu): two
 * tiles being multiplied and three being copied; five fill an H100 CTA's shared memory at dk = dv = 128.
 */
const SLC_WS_STAGES = 5;

/** An integer from env[name] within [lo, hi]; undefined when unset or out of range. */
function envInt(env: Readonly<Record<string, string | undefined>>, name: string, lo: number, hi: number): number | undefined {
  const v = env[name];
  if (v === undefined || !/^\d+$/.test(v)) return undefined;
  const n = Number(v);
  return n >= lo && n <= hi ? n : undefined;
}

export function kernelTuning(
  config: NSAConfig,
  env: Readonly<Record<string, string | undefined>> = process.env,
  computeCapability: readonly number[] = [9, 0],
): KernelTuning {
  const fa = env['NSA_FA_WARPS'] === '4' ? 4 : 8;
  // NSA_SLC_PIPELINE=WxS or WxSxB: W warps, S pipeline stages, B CTAs per SM.
  const match = /^([24])x([1-6])(?:x([1-8]))?$/.exec(env['NSA_SLC_PIPELINE'] ?? '');
  const slcWarps = match ? (Number(match[1]) as 2 | 4) : 2;
  const fsaPersistent = env['NSA_FSA_PERSISTENT'] !== '0' && config.selectBlock <= 64;
  const hopper = computeCapability[0] === 9; // wgmma is sm_90a's alone: neither Ampere nor Blackwell has it
  const slcBulk = (computeCapability[0] ?? 0) >= 9 && env['NSA_SLC_BULK'] !== '0';
  return {
    faWarps: fa,
    faWgmma: hopper && env['NSA_FA_WGMMA'] !== '0',
    // Default 2x1x8: measured fastest at 64k, G = 16 on an H200 (docs/performance.md): the kernel is bound by
    // latency, so many small CTAs beat deep pipelines.
    slcWarps,
    slcStages: match ? Number(match[2]) : 1,
    // 8 CTAs per SM caps registers at 128 per thread: enough for dk <= 128, spills at dk = 192.
    slcMinBlocks: match?.[3] !== undefined ? Number(match[3]) : config.headDim <= 128 ? 8 : 4,
    slcBulk,
    slcTma:
      slcBulk && env['NSA_SLC_TMA'] !== '0' &&
      config.selectBlock % (16 * slcWarps) === 0 && config.headDim % 64 === 0 && config.valueDim % 64 === 0,
    // Three positions a CTA by default on sm_90 (H100, G = 16, fla, 64k: selected stage 16.75 -> 14.9-15.0 ms on
    // random inputs, 15.3 -> 11.6 ms on smooth ones, three CTAs of three an SM beating two of four by 2-5%,
    // docs/performance.md); 0 or 1 turns it off.
    slcUnion: envInt(env, 'NSA_SLC_UNION', 2, 8) ?? (hopper && !['0', '1'].includes(env['NSA_SLC_UNION'] ?? '') ? 3 : undefined),
    slcUnionStages: envInt(env, 'NSA_SLC_UNION_STAGES', 2, 8),
    slcUnionMinBlocks: envInt(env, 'NSA_SLC_UNION_MIN', 1, 4),
    slcDqParts: env['NSA_SLC_DQ_PARTS'] === 'f32' ? 'f32' : 'bf16',
    slcBwdWs: hopper && config.headDim <= 128 && config.valueDim <= 128 && env['NSA_SLC_BWD'] !== 'mma',
    slcBwdTma: hopper && [8, 16, 32, 64].includes(config.groupSize) && env['NSA_SLC_BWD_TMA'] !== '0',
    fsaMinBlocks: envInt(env, 'NSA_FSA_MIN_BLOCKS', 1, 8) ??
      (config.headDim === 128 && config.valueDim === 128
        ? (fsaPersistent ? 3 : 4) // the persistent form's loop state takes 168 registers
        : undefined),
    fsaPersistent,
    fsaStage: env['NSA_FSA_STAGE'] === '1' ? true : env['NSA_FSA_STAGE'] === '0' ? false : undefined,
    fsaPhases: env['NSA_FSA_PHASES'] === 'all' ? 'all' : 'head',
    fsaBulkQ: env['NSA_FSA_BULK_Q'] !== '0',
    indexRanked: env['NSA_INDEX_RANKED'] !== '0',
    cmpWinDqFused: env['NSA_FA_BWD_DQ_FUSED'] !== '0',
    faTma: hopper && env['NSA_FA_WGMMA'] !== '0' && env['NSA_FA_TMA'] !== '0',
    faPingpong: env['NSA_FA_PINGPONG'] !== '0',
    faBwdTma: hopper ? { dq: !['0', 'dkdv'].includes(env['NSA_FA_BWD_TMA'] ?? ''), dkdv: !['0', 'dq'].includes(env['NSA_FA_BWD_TMA'] ?? '') } : undefined,
    faBwdStages: envInt(env, 'NSA_FA_BWD_STAGES', 2, 4),
    faBwdDefer: env['NSA_FA_BWD_DEFER'] !== '0',
    slcBwdItemTiles: ['16', '32', '64', '128', '256'].includes(env['NSA_SLC_BWD_ITEM'] ?? '') ? Number(env['NSA_SLC_BWD_ITEM']) : undefined,
    slcBwdOrder: env['NSA_SLC_BWD_ORDER'] === 'key' ? 'key' : 'token',
    selectRing: ['128', '256', '512'].includes(env['NSA_SELECT_RING'] ?? '') ? Number(env['NSA_SELECT_RING']) : undefined,
    selectOfferMin: envInt(env, 'NSA_SELECT_OFFER_MIN', 16, 256),
    selectMinBlocks: envInt(env, 'NSA_SELECT_MIN_BLOCKS', 1, 4),
    selectTma: hopper && env['NSA_FA_WGMMA'] !== '0' && env['NSA_SELECT_TMA'] !== '0',
    selectMergeMin: envInt(env, 'NSA_SELECT_MERGE_MIN', 1, 33),
    selectDirect: config.compressBlock === config.compressStride && config.compressStride === config.selectBlock && env['NSA_SELECT_DIRECT'] !== '0',
    selectWarpLocal: env['NSA_SELECT_WARP_LOCAL'] !== '0',
    selectRegLists: env['NSA_SELECT_REG_LISTS'] !== '0',
    slcDense: env['NSA_SLC_DENSE'] !== '0',
    slcWinMerge: env['NSA_SLC_WIN_MERGE'] !== '0',
  };
}

/** Throws UnsupportedConfigError for a config the CUDA kernels do not cover, saying what they do cover. */
export function checkCudaSupport(config: NSAConfig): void {
  const dims = SUPPORTED_HEAD_DIMS.some(([dk, dv]) => dk === config.headDim && dv === config.valueDim);
  if (!dims) {
    const list = SUPPORTED_HEAD_DIMS.map(([dk, dv]) => `${dk}/${dv}`).join(', ');
    throw new UnsupportedConfigError(
      `cuda backend: no kernel for headDim ${config.headDim} / valueDim ${config.valueDim} (have ${list}); use the cpu backend`,
    );
  }
  if (config.selectCount > MAX_SELECT_COUNT) {
    throw new UnsupportedConfigError(`cuda backend: selectCount ${config.selectCount} > ${MAX_SELECT_COUNT} is not supported`);
  }
  if (config.groupSize > MAX_GROUP_FOR_SCORING) {
    throw new UnsupportedConfigError(
      `cuda backend: a GQA group of ${config.groupSize} query heads per KV head is above the ${MAX_GROUP_FOR_SCORING} the scoring kernel takes`,
    );
  }
}

/** The flash kernel's modes (flash_attention.cu's NSA_MODE). */
export type FlashMode = 0 | 1 | 2 | 3 | 4;

/** The compiled kernels of one (config, dtype), created lazily and memoised by the context. */
export class NsaPrograms {
  private readonly kernels = new Map<string, Kernel>();
  private readonly tileMaps = new Map<string, Uint8Array>();
  private selectShapeMemo: { readonly offerMin: number; readonly minBlocks: number | undefined } | undefined;
  constructor(
    private readonly ctx: CudaContext,
    readonly config: NSAConfig,
    readonly dtype: HalfDType,
    readonly tuning: KernelTuning = kernelTuning(config, process.env, ctx.device.computeCapability),
  ) {
    checkCudaSupport(config);
  }

  /** Query rows per flash-attention CTA (the query tile of the layout plan). */
  get queryTile(): number {
    return 16 * this.tuning.faWarps;
  }

  get compressMean(): Kernel {
    return this.kernel('compress_mean.cu', 'nsa_compress_mean', this.cmpDefines());
  }

  /** Learned phi's matrix products, column sums and the scatter of dU onto the raw rows (compress_phi.cu). */
  phi(fn: 'gemm' | 'column_sums' | 'scatter_rows'): Kernel {
    return this.kernel('compress_phi.cu', `nsa_phi_${fn}`, this.cmpDefines());
  }

  /** mode 0 dense causal, 1 cmp, 2 win, 3 cmp then win, 4 all three branches where every visible block is selected (needs cmpStash). */
  flash(mode: FlashMode): Kernel {
    return this.kernel(
      'flash_attention.cu',
      this.flashTma ? 'nsa_flash_attention_tma' : 'nsa_flash_attention',
      [
        `-DNSA_MODE=${mode}`,
        `-DFA_WARPS=${this.tuning.faWarps}`,
        ...(this.tuning.faWgmma ? ['-DFA_WGMMA'] : []),
        ...(this.flashTma && this.tuning.faPingpong === true ? ['-DFA_PINGPONG'] : []),
        ...(mode === 0 ? [] : [...this.cmpDefines(), `-DWINDOW=${this.config.window}`]),
        ...((mode === 3 && this.cmpStash) || mode === 4 ? ['-DCMP_STASH'] : []),
      ],
      this.tuning.faWgmma,
    );
  }

  /** Whether flash() is nsa_flash_attention_tma, whose launches take tensor maps after their other arguments (flashTensorMaps). */
  get flashTma(): boolean {
    return this.tuning.faWgmma && this.tuning.faTma === true;
  }

  /**
   * The tensor maps a flash() launch takes after its other arguments: none for the cp.async kernel; for
   * nsa_flash_attention_tma q [N, Hq, dk], the raw keys and values [N, H, dk|dv], and the compressed ones
   * [Nc, H, dk|dv] (the raw ones' maps stand in where there are none).
   */
  flashTensorMaps(q: DevicePtr, k: DevicePtr, v: DevicePtr, rows: number, kc?: DevicePtr, vc?: DevicePtr, cmpRows = 0): KernelArg[] {
    if (!this.flashTma) return [];
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    const qMap = this.tileMap(q, dk, Hq, rows, 'q');
    const raw = [this.tileMap(k, dk, H, rows, 'keys'), this.tileMap(v, dv, H, rows, 'values')];
    const cmp = kc === undefined || vc === undefined || cmpRows === 0 ? raw : [this.tileMap(kc, dk, H, cmpRows, 'compressed keys'), this.tileMap(vc, dv, H, cmpRows, 'compressed values')];
    return [qMap, ...raw, ...cmp];
  }

  /**
   * Whether the cmp + win launch keeps the cmp phase's gated output in shared memory for the win phase (one write of
   * `out` instead of a write, a read and a write): where the query tile's fp32 rows fit beside the tiles, e.g.
   * dk = dv = 128 on Hopper (225 of 227 KB) but not dk = 192.
   */
  get cmpStash(): boolean {
    return this.flashTileBytes() + this.cmpStashBytes() <= this.ctx.maxSharedBytesOptin;
  }

  get selectBlocks(): Kernel {
    return this.selectKernel('nsa_select_blocks');
  }

  /** The selection of a batch whose every visible block is selected (tuning.slcDense). */
  get allVisibleBlocks(): Kernel {
    return this.selectKernel('nsa_all_visible_blocks');
  }

  /** A kernel of select_blocks.cu: one module holds the block scoring and the scoreless selection. */
  private selectKernel(fn: string): Kernel {
    return this.kernel(
      'select_blocks.cu',
      fn,
      [
        ...this.cmpDefines(),
        ...this.selDefines(),
        `-DGROUP=${this.config.groupSize}`,
        ...(this.tuning.faWgmma ? ['-DFA_WGMMA'] : []),
        ...this.selectRingDefines(),
        ...(this.selectTma ? ['-DSELECT_TMA'] : []),
        ...(this.tuning.selectMergeMin === undefined ? [] : [`-DTOPK_MERGE_MIN=${this.tuning.selectMergeMin}`]),
        ...(this.tuning.selectDirect === true ? ['-DSELECT_DIRECT'] : []),
        ...(this.tuning.selectWarpLocal === true ? ['-DSELECT_WARP_LOCAL'] : []),
        ...(this.selectRegLists ? ['-DSELECT_REG_LISTS'] : []),
        ...(this.selectShape.minBlocks === undefined ? [] : [`-DSEL_MIN_BLOCKS=${this.selectShape.minBlocks}`]),
      ],
      this.tuning.faWgmma,
    );
  }

  get selectedAttention(): Kernel {
    return this.kernel('selected_attention.cu', 'nsa_selected_attention', [
      ...this.selDefines(),
      `-DSLC_WARPS=${this.tuning.slcWarps}`,
      `-DSLC_STAGES=${this.tuning.slcStages}`,
      `-DSLC_MIN_BLOCKS=${this.tuning.slcMinBlocks}`,
      ...(this.tuning.slcBulk ? ['-DSLC_BULK'] : []),
      ...(this.slcTma ? ['-DSLC_TMA'] : []),
    ]);
  }

  /** Positions a CTA of the union kernel (tuning.slcUnion where the tiles come by TMA in 32-key boxes); 0: not used. */
  get slcUnionPositions(): number {
    return this.slcTma && this.tuning.slcWarps === 2 ? (this.tuning.slcUnion ?? 0) : 0;
  }

  get selectedUnion(): Kernel {
    return this.kernel('selected_attention_union.cu', 'nsa_selected_union', [
      ...this.selDefines(),
      '-DSLC_BULK',
      `-DUNION_POSITIONS=${this.slcUnionPositions}`,
      `-DUNION_STAGES=${this.unionStages}`,
      `-DUNION_MIN_BLOCKS=${this.unionMinBlocks}`,
    ]);
  }

  /** A warp a position and the warp that issues the tiles. */
  get selectedUnionThreads(): number {
    return 32 * (this.slcUnionPositions + 1);
  }

  /** The union kernel's key/value ring (32-key tiles) and its positions' query rows, 1024-byte aligned. */
  selectedUnionSharedBytes(): number {
    const { headDim: dk, valueDim: dv } = this.config;
    return 1024 + 2 * this.unionStages * 32 * (dk + dv) + 2 * this.slcUnionPositions * 16 * dk;
  }

  /** As many stages as positions: measured best at 2, 3, 4 and 8 (H100, docs/performance.md). */
  private get unionStages(): number {
    return this.tuning.slcUnionStages ?? Math.max(2, this.slcUnionPositions);
  }

  /**
   * CTAs per SM the union kernel's registers must allow: about nine position warps an SM (4, 3, 2, 1 CTAs of 2, 3, 4,
   * 8 positions; ~168 registers a thread at dk = dv = 128), two thirds of that where dk or dv is above 128 (dk = 192
   * takes ~193 registers a thread, which three CTAs of three positions would spill).
   */
  get unionMinBlocks(): number {
    const warps = this.config.headDim <= 128 && this.config.valueDim <= 128 ? 9 : 6;
    return this.tuning.slcUnionMinBlocks ?? Math.max(1, Math.floor(warps / this.slcUnionPositions));
  }

  /** Whether the group-centric selected attention loads its tiles by TMA (its launches then take selectedTensorMaps). */
  get slcTma(): boolean {
    return this.tuning.slcBulk && this.tuning.slcTma === true;
  }

  /** The tensor maps a selected-attention launch takes after its other arguments: keys and values [N, H, dk|dv]. */
  selectedTensorMaps(k: DevicePtr, v: DevicePtr, rows: number): KernelArg[] {
    if (!this.slcTma) return [];
    const { kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    const tile = 16 * this.tuning.slcWarps;
    return [this.tileMap(k, dk, H, rows, 'keys', tile), this.tileMap(v, dv, H, rows, 'values', tile)];
  }

  fsa(fn: 'attend' | 'attend_persistent' | 'reduce'): Kernel {
    const minBlocks = this.tuning.fsaMinBlocks;
    return this.kernel('selected_attention_fsa.cu', `nsa_fsa_${fn}`, [
      ...this.selDefines(),
      `-DGROUP=${this.config.groupSize}`,
      ...(minBlocks === undefined ? [] : [`-DFSA_MIN_BLOCKS=${minBlocks}`]),
      ...(this.fsaStaged ? ['-DFSA_STAGE_OUT'] : []),
      ...(this.fsaBulkQ ? ['-DFSA_BULK_Q'] : []),
    ]);
  }

  /**
   * Whether the FSA-order attention gathers its query rows by bulk copies (tuning.fsaBulkQ): its persistent kernel
   * only, on sm_90 and later; the CTA-per-tile one (blocks of more than 64 keys) keeps its cp.async copies.
   */
  get fsaBulkQ(): boolean {
    return this.tuning.fsaBulkQ === true && this.tuning.fsaPersistent === true && this.ctx.device.computeCapability[0] >= 9;
  }

  /**
   * Decoding kernels (kernels/decode.cu). The selected blocks' key/value rows (nsa_decode_slc, the slc items of
   * nsa_decode_fused) come by bulk copies where the selected attention gathers so (sm_90 and later), unless
   * NSA_DECODE_BULK=0. The slices and partial outputs are dropped from L2 unwritten once read (DECODE_DISCARD),
   * unless NSA_DECODE_DISCARD=0 (H100, B = 64, paper preset, 64k: 0.318 -> 0.302 ms; docs/performance.md).
   */
  decode(fn: 'fused' | 'cmp_win' | 'select' | 'slc' | 'dense' | 'combine_dense' | 'compress_mean'): Kernel {
    return this.kernel('decode.cu', `nsa_decode_${fn}`, [
      ...this.cmpDefines(),
      ...this.selDefines(),
      `-DWINDOW=${this.config.window}`,
      ...(this.decodeBulk ? ['-DDECODE_BULK'] : []),
      ...(process.env['NSA_DECODE_DISCARD'] === '0' ? [] : ['-DDECODE_DISCARD']),
    ]);
  }

  private get decodeBulk(): boolean {
    return this.tuning.slcBulk && process.env['NSA_DECODE_BULK'] !== '0';
  }

  /**
   * Q rows and two stages of 64 key and value rows (nsa_decode_slc's padded by 8 elements for bulk copies). The
   * fused step's CTAs take the larger of the slc items' (padded) and the cmp items' (unpadded).
   */
  decodePartialSharedBytes(fn: 'fused' | 'cmp_win' | 'slc' | 'dense'): number {
    const { headDim: dk, valueDim: dv } = this.config;
    if (fn === 'fused') return Math.max(this.decodePartialSharedBytes('slc'), this.decodePartialSharedBytes('cmp_win'));
    const pad = fn === 'slc' && this.decodeBulk ? 8 : 0;
    return 2 * (16 * dk + 2 * 64 * (dk + dv + 2 * pad));
  }

  // Backward ------------------------------------------------------------------------------------------------

  /** The flash backward's kernels of mode 0, 1 or 2; mode 3 (cmp then win) has the one-launch dQ alone. */
  flashBackward(mode: 0 | 1 | 2, fn: 'preprocess' | 'dq' | 'dkdv' | 'reduce_splits'): Kernel;
  flashBackward(mode: 3, fn: 'dq_cmp_win'): Kernel;
  flashBackward(mode: 0 | 1 | 2 | 3, fn: 'preprocess' | 'dq' | 'dkdv' | 'reduce_splits' | 'dq_cmp_win'): Kernel {
    const walk = fn === 'dkdv' ? 'dkdv' : fn === 'dq' || fn === 'dq_cmp_win' ? 'dq' : undefined;
    const stages = walk === undefined ? undefined : this.flashBackwardStages(walk, mode);
    const name = fn === 'preprocess' || fn === 'reduce_splits' ? `nsa_bwd_${fn}` : `nsa_flash_bwd_${fn}${stages === undefined ? '' : '_tma'}`;
    const wg = this.flashBackwardWarpgroups(mode);
    // Both stage counts are compiled in, so that one module (per mode) serves the dQ and dK/dV launches alike.
    const dqStages = this.flashBackwardStages('dq', mode);
    const dkdvStages = mode === 3 ? undefined : this.flashBackwardStages('dkdv', mode);
    return this.kernel(
      'flash_attention_bwd.cu',
      name,
      [
        `-DNSA_MODE=${mode}`,
        ...(wg === undefined ? [] : ['-DFA_WGMMA', `-DFB_DQ_WG=${wg.dq}`, `-DFB_DKDV_WG=${wg.dkdv}`]),
        ...(dkdvStages === undefined ? [] : [`-DFB_STAGES=${dkdvStages}`]),
        ...(dqStages === undefined ? [] : [`-DFB_DQ_STAGES=${dqStages}`]),
        ...(this.tuning.faBwdDefer === true ? ['-DFB_DEFER'] : []),
        ...(mode === 0 ? [] : [...this.cmpDefines(), `-DWINDOW=${this.config.window}`]),
        // Mode 3's dQ also sums the selected branch's fused dQ parts (selectedDqPartBytes each) when given them.
        ...(mode === 3 ? [...this.selDefines(), ...(this.tuning.slcDqParts === 'bf16' ? ['-DSLC_DQ_PARTS_BF16'] : [])] : []),
      ],
      wg !== undefined,
    );
  }

  /**
   * Stages of the pipelined (`_tma`) form of the flash backward's dQ or dK/dV launch in a mode, or undefined where
   * that launch takes the cp.async form (no wgmma, NSA_FA_BWD_TMA off for it, or dk = 192's dK/dV). A pipelined
   * launch takes tensor maps after its other arguments (flashBackwardTensorMaps).
   */
  flashBackwardStages(walk: 'dq' | 'dkdv', mode: 0 | 1 | 2 | 3): number | undefined {
    const wg = this.flashBackwardWarpgroups(mode);
    if (wg === undefined || this.tuning.faBwdTma?.[walk] !== true || (walk === 'dkdv' && mode === 3)) return undefined;
    // dk = 192's dK/dV accumulators leave too few registers for the overlapped products (ptxas spills, serialises).
    if (walk === 'dkdv' && this.config.headDim > 128) return undefined;
    const { headDim: dk, valueDim: dv } = this.config;
    const stageBytes = 2 * 64 * (dk + dv);
    // Room beside the owned rows, the 1 KB alignment slack and the kernels' static shared memory (under 4 KB).
    const fit = Math.floor((this.ctx.maxSharedBytesOptin - 1024 - 4096 - wg[walk] * stageBytes) / stageBytes);
    return Math.max(2, Math.min(this.tuning.faBwdStages ?? (wg[walk] === 2 ? 3 : 2), fit));
  }

  /**
   * The tensor maps a flash backward launch (its walk and mode) takes after its other arguments: none where it is the
   * cp.async kernel (flashBackwardStages undefined); else q and dO ([N, Hq, dk|dv]) and, for dQ, the keys and values
   * ([rows, H, dk|dv]) of each key set it walks, in order.
   */
  flashBackwardTensorMaps(
    walk: 'dq' | 'dkdv',
    mode: 0 | 1 | 2 | 3,
    q: DevicePtr,
    dOut: DevicePtr,
    rows: number,
    keySets: readonly { readonly k: DevicePtr; readonly v: DevicePtr; readonly rows: number }[] = [],
  ): KernelArg[] {
    if (this.flashBackwardStages(walk, mode) === undefined) return [];
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = this.config;
    const maps = [this.tileMap(q, dk, Hq, rows, 'q'), this.tileMap(dOut, dv, Hq, rows, 'dO')];
    if (walk === 'dq') for (const set of keySets) maps.push(this.tileMap(set.k, dk, H, set.rows, 'keys'), this.tileMap(set.v, dv, H, set.rows, 'values'));
    return maps;
  }

  /**
   * The tensor map of a [rows, heads, cols] tensor in boxes of 64 columns x boxHeads heads x boxRows rows (default 1 x
   * 64: the flash kernels' tiles), 128-byte swizzled. A map is a pure function of these values, so encodings are memoised: a forward or backward re-run on the same
   * buffers (a benchmark, a training step) does not pay the driver call and the argument packing per launch.
   */
  private tileMap(ptr: DevicePtr, cols: number, heads: number, rows: number, what: string, boxRows = 64, boxHeads = 1): KernelArg {
    const key = `${ptr}:${cols}:${heads}:${rows}:${boxRows}:${boxHeads}`;
    let bytes = this.tileMaps.get(key);
    if (bytes === undefined) {
      const spec = { ptr, dtype: this.dtype, dims: [cols, heads, Math.max(1, rows)], strides: [cols * 2, heads * cols * 2], box: [64, boxHeads, boxRows], swizzle: '128B' } as const;
      bytes = encodeTiledTensorMap(this.ctx.driver, spec, what);
      if (this.tileMaps.size >= 256) this.tileMaps.clear();
      this.tileMaps.set(key, bytes);
    }
    return { bytes };
  }

  /**
   * Warpgroups per CTA of the flash backward's wgmma path in mode 0, 1 or 2 (dQ: 64 query rows each, dK/dV: 64 keys
   * each), or undefined where it runs mma.sync (a warp per 16 rows or keys, 64 per CTA). wgmma wherever the forward
   * uses it (sm_90), unless NSA_FA_BWD_WGMMA=0. Two dK/dV warpgroups (128 keys) halve the query-row traffic, which
   * pays over the dense and compressed keys' long query walks; the window's keys (each seen by at most w + 127 rows)
   * measured faster with one (two CTAs an SM). Two dQ warpgroups pay off over the dense baseline's long key walks,
   * one over the cmp and win branches' short ones (H100, docs/performance.md). NSA_FA_BWD_WGS=AxB sets A (dQ) and
   * B (dK/dV) warpgroups, each 1 or 2, in every mode. Modes 1, 2 and 3 take the same dQ shape: the backward runner
   * lists their query tiles once (and the cmp and win key tiles each with its own mode's size).
   */
  flashBackwardWarpgroups(
    mode: 0 | 1 | 2 | 3,
    env: Readonly<Record<string, string | undefined>> = process.env,
  ): { dq: 1 | 2; dkdv: 1 | 2 } | undefined {
    if (!this.tuning.faWgmma || env['NSA_FA_BWD_WGMMA'] === '0') return undefined;
    const match = /^([12])x([12])$/.exec(env['NSA_FA_BWD_WGS'] ?? '');
    if (match) return { dq: Number(match[1]) as 1 | 2, dkdv: Number(match[2]) as 1 | 2 };
    return { dq: mode === 0 ? 2 : 1, dkdv: mode === 2 ? 1 : 2 };
  }

  /** Query rows (dq) or keys (dkdv) a flash-backward CTA of mode `mode` owns: the size of the tiles its launch lists. */
  flashBackwardTile(fn: 'dq' | 'dkdv', mode: 0 | 1 | 2 | 3): number {
    const wg = this.flashBackwardWarpgroups(mode);
    return wg === undefined ? 64 : 64 * wg[fn];
  }

  /** Threads of a flash-backward CTA: a warp per 16 of its rows (dq) or keys (dkdv). */
  flashBackwardThreads(fn: 'dq' | 'dkdv', mode: 0 | 1 | 2 | 3): number {
    return 2 * this.flashBackwardTile(fn, mode);
  }

  /**
   * The selected branch's backward kernels. `fusedDq`: the dK/dV kernel also writes per-slot dQ parts, which
   * dq_reduce sums (the module built for it serves all four kernels, so each launch of a backward uses one module).
   */
  /** `withMean`: the reduce also adds phi = mean's backward (SLC_REDUCE_MEAN). */
  selectedBackward(fn: 'dq' | 'dkdv' | 'reduce' | 'dq_reduce', fusedDq = false, withMean = false): Kernel {
    return this.kernel('selected_attention_bwd.cu', `nsa_slc_bwd_${fn}`, [
      ...this.selDefines(),
      ...(this.tuning.slcBulk ? ['-DSLC_BULK'] : []),
      ...(fusedDq ? ['-DSLC_DQ_FUSED'] : []),
      ...(fusedDq && this.tuning.slcDqParts === 'bf16' ? ['-DSLC_DQ_PARTS_BF16'] : []),
      ...(withMean ? [...this.cmpDefines(), '-DSLC_REDUCE_MEAN'] : []),
      ...(this.tuning.slcBwdWs ? ['-DSLC_BWD_WS', `-DSLC_WS_STAGES=${SLC_WS_STAGES}`] : []),
      ...(this.slcBwdTma ? [`-DSLC_WS_TMA_GROUP=${this.config.groupSize}`] : []),
    ], this.tuning.slcBwdWs);
  }

  /** Whether the warp-specialised selected dK/dV gathers its rows by TMA (its launches then take selectedBackwardTensorMaps). */
  get slcBwdTma(): boolean {
    return this.tuning.slcBwdWs && this.tuning.slcBwdTma === true;
  }

  /** The tensor maps a selected dK/dV launch takes after its other arguments: q [N, Hq, dk] and dO [N, Hq, dv], G heads a box. */
  selectedBackwardTensorMaps(q: DevicePtr, dOut: DevicePtr, rows: number): KernelArg[] {
    if (!this.slcBwdTma) return [];
    const { heads: Hq, headDim: dk, valueDim: dv, groupSize: G } = this.config;
    return [this.tileMap(q, dk, Hq, rows, 'q', 1, G), this.tileMap(dOut, dv, Hq, rows, 'dO', 1, G)];
  }

  /** Threads of a selected backward launch: the warp-specialised dK/dV takes three warpgroups. */
  selectedBackwardThreads(fn: 'dq' | 'dkdv'): number {
    return fn === 'dkdv' && this.tuning.slcBwdWs ? 384 : 128;
  }

  /** Bytes of one of the fused selected dQ's parts (selected_attention_bwd.cu, part_t). */
  get selectedDqPartBytes(): number {
    return this.tuning.slcDqParts === 'bf16' ? 2 : 4;
  }

  inverseIndex(
    fn: 'count' | 'count_ranked' | 'key_totals' | 'scan' | 'chunk_starts' | 'fill' | 'fill_ranked' | 'item_buckets' | 'item_order',
  ): Kernel {
    return this.kernel('inverse_index.cu', `nsa_index_${fn}`, [`-DSEL_N=${this.config.selectCount}`]);
  }

  get compressMeanBackward(): Kernel {
    return this.kernel('compress_mean.cu', 'nsa_compress_mean_bwd', this.cmpDefines());
  }

  /**
   * Shared memory of a flash backward kernel (two stages, or flashBackwardStages): dK/dV holds its key/value rows
   * and stages of 64 query/dO rows, dQ its query/dO rows and stages of 64 keys/values; wgmma adds 1 KB of slack to
   * align the tiles for the 128-byte swizzle.
   */
  flashBackwardSharedBytes(fn: 'dq' | 'dkdv', mode: 0 | 1 | 2 | 3): number {
    const { headDim: dk, valueDim: dv } = this.config;
    const slack = this.flashBackwardWarpgroups(mode) === undefined ? 0 : 1024;
    const stages = this.flashBackwardStages(fn, mode) ?? 2;
    return 2 * (this.flashBackwardTile(fn, mode) + stages * 64) * (dk + dv) + slack;
  }

  selectedBackwardSharedBytes(fn: 'dq' | 'dkdv', fusedDq = false): number {
    const { headDim: dk, valueDim: dv } = this.config;
    // Gathered rows are padded by 8 elements for bulk copies.
    const pad = this.tuning.slcBulk ? 8 : 0;
    // Warp-specialised dK/dV: the key/value tile, the ring of query/dO row stages, each computing warpgroup's dS,
    // and 1 KB of slack to align the tiles for the 128-byte swizzle.
    if (fn === 'dkdv' && this.tuning.slcBwdWs) {
      return 2 * 64 * (dk + dv) * (1 + SLC_WS_STAGES) + (fusedDq ? 2 * 2 * 64 * 64 : 0) + 1024;
    }
    // dK/dV: the key/value tile, the gathered query/dO rows, and with fused dQ the tile's dS^T (64 x 64).
    if (fn === 'dkdv') return 2 * 64 * (2 * dk + 2 * dv + 2 * pad) + (fusedDq ? 2 * 64 * 64 : 0);
    // Q and dO rows, then the key/value tile, which the warps' dQ parts (fp32) reuse at the end.
    return 2 * 16 * (dk + dv) + Math.max(2 * 64 * (dk + dv + 2 * pad), 4 * 4 * 16 * dk);
  }

  /** The flash kernel's dynamic shared memory for `mode` (see flash()). */
  flashSharedBytes(mode: FlashMode = 0): number {
    return this.flashTileBytes() + ((mode === 3 && this.cmpStash) || mode === 4 ? this.cmpStashBytes() : 0);
  }

  private flashTileBytes(): number {
    const { headDim: dk, valueDim: dv } = this.config;
    // wgmma: key tiles of 128, and 1 KB of slack to align the tiles for the 128-byte swizzle.
    const [keyTile, slack] = this.tuning.faWgmma ? [128, 1024] : [64, 0];
    return 2 * (this.queryTile * dk + 2 * keyTile * dk + 2 * keyTile * dv) + slack;
  }

  private cmpStashBytes(): number {
    return 4 * this.queryTile * this.config.valueDim;
  }

  /**
   * Q (128 rows), two key stages, the per-tile head sums, and per position the ring of open block scores and the
   * list of its best n candidates (select_blocks.cu).
   */
  selectSharedBytes(positionsPerTile: number, offerMin = this.selectShape.offerMin): number {
    const G = this.config.groupSize;
    const headSums = (G & (G - 1)) === 0 ? 8 * Math.max(1, 16 / G) * 64 : 128 * 65;
    const slack = this.tuning.faWgmma ? 1024 : 0; // to align the wgmma tiles for the 128-byte swizzle
    const barriers = this.selectTma ? 16 : 0; // a key stage's mbarrier each
    return 2 * (128 * this.config.headDim + 2 * 64 * this.config.headDim) + 4 * headSums + positionsPerTile * this.selectBytesPerPosition(offerMin) + barriers + slack;
  }

  /** Whether the block selection takes its compressed key tiles by TMA (tuning.selectTma, with wgmma). */
  get selectTma(): boolean {
    return this.tuning.faWgmma && this.tuning.selectTma === true;
  }

  /** The tensor map a block-selection launch takes after its other arguments: the compressed keys' [Nc, H, dk], with TMA. */
  selectTensorMaps(kc: DevicePtr, cmpRows: number): KernelArg[] {
    return this.selectTma ? [this.tileMap(kc, this.config.headDim, this.config.kvHeads, cmpRows, 'compressed keys')] : [];
  }

  /**
   * The block selection's shape on this device. Its score ring holds a tile's blocks and at least `offerMin` final
   * ones more, so that they are offered to the top-n lists in batches: 64, or, with wgmma, 32 where the smaller ring
   * lets one more CTA share an SM. And with wgmma its registers must allow as many CTAs an SM as shared memory does
   * (`minBlocks`), up to three: the kernel is bound by issuing instructions and by the top-n's dependent warp votes,
   * so a third CTA pays, and left to itself ptxas took 72 to 110 registers a thread, two or three CTAs, as the code
   * around changed (H100, 64k, G = 16, fla: select 3.9-4.1 -> 3.4 ms with a third CTA and the smaller ring;
   * docs/performance.md). The mma.sync build (sm_80) holds the queries' fragments in registers and spills at three,
   * so it keeps ptxas's choice and the larger ring.
   */
  get selectShape(): { readonly offerMin: number; readonly minBlocks: number | undefined } {
    if (this.selectShapeMemo !== undefined) return this.selectShapeMemo;
    const ctas = (offerMin: number): number => this.ctasBySharedMemory(this.selectSharedBytes(this.positionsPerSelectTile(offerMin), offerMin));
    const wgmma = this.tuning.faWgmma;
    const offerMin = this.tuning.selectOfferMin ?? (wgmma && ctas(32) > ctas(64) ? 32 : 64);
    const fit = Math.min(3, ctas(offerMin));
    const minBlocks = this.tuning.selectMinBlocks ?? (wgmma && fit >= 2 ? fit : undefined);
    this.selectShapeMemo = { offerMin, minBlocks };
    return this.selectShapeMemo;
  }

  /** The ring of open block scores' size (select_blocks.cu); none with direct offers, which keep no ring. */
  private selectRingDefines(): string[] {
    if (this.tuning.selectDirect === true) return [];
    return [
      ...(this.tuning.selectRing === undefined ? [] : [`-DSCORE_RING_MIN=${this.tuning.selectRing}`]),
      `-DOFFER_MIN=${this.selectShape.offerMin}`,
    ];
  }

  /**
   * Whether the block selection's warps keep their positions' lists in registers (tuning.selectRegLists): where
   * each warp owns its rows' positions (tuning.selectWarpLocal), at most four of them (G a power of two from 4 to 16).
   */
  get selectRegLists(): boolean {
    const G = this.config.groupSize;
    return this.tuning.selectWarpLocal === true && this.tuning.selectRegLists === true && (G & (G - 1)) === 0 && G >= 4 && G <= 16;
  }

  /**
   * select_blocks.cu's shared memory per position: SCORE_RING floats (none with tuning.selectDirect) and SEL_N 8-byte
   * keys (none where the lists live in registers).
   */
  private selectBytesPerPosition(offerMin: number): number {
    const { compressBlock: l, compressStride: d, selectBlock: lp, selectCount: n } = this.config;
    const lists = this.selectRegLists ? 0 : 8 * n;
    if (this.tuning.selectDirect === true) return lists;
    const tileBlocks = Math.floor((63 * d + l - 1 + lp - 1) / lp) + 1;
    const ring = [128, 256, 512].find((r) => tileBlocks + offerMin <= r && r >= (this.tuning.selectRing ?? 0));
    if (ring === undefined) {
      throw new UnsupportedConfigError(`cuda backend: compressed tokens every ${d} over selection blocks of ${lp} touch too many blocks per tile (${tileBlocks}; at most 448)`);
    }
    return 4 * ring + lists;
  }

  /** Q rows and the key/value stages (rows padded by 8 elements for bulk copies), which the warps' merge reuses. */
  selectedSharedBytes(): number {
    const { headDim: dk, valueDim: dv } = this.config;
    const { slcWarps, slcStages, slcBulk } = this.tuning;
    const pad = slcBulk && !this.slcTma ? 8 : 0;
    const stages = 2 * slcStages * 16 * slcWarps * (dk + dv + 2 * pad);
    const merge = 4 * slcWarps * 16 * dv;
    // TMA's 128-byte swizzle needs 1024-byte aligned tiles: the kernel aligns its base (wgmma_aligned).
    return 2 * 16 * dk + Math.max(stages, merge) + (this.slcTma ? 1024 : 0);
  }

  get selectedThreads(): number {
    return 32 * this.tuning.slcWarps;
  }

  fsaSharedBytes(staged = this.fsaStaged): number {
    const { headDim: dk, valueDim: dv } = this.config;
    // The stage (FSA_STAGE_OUT): each of the 4 warps' 16 rows of dv + 8 elements and their 16 partial rows (i64).
    const stage = staged ? 4 * (16 * (dv + 8) * 2 + 16 * 8) : 0;
    // With bulk-copied query rows: 128 bytes for the warps' mbarriers, and the rows padded by 8 elements.
    const bulk = this.fsaBulkQ ? 128 + 2 * 64 * 8 : 0;
    return 2 * (64 * dk + 64 * dk + 64 * dv) + stage + bulk;
  }

  /**
   * Whether the FSA-order attention stages its partial outputs (tuning.fsaStage): by default where shared memory
   * holds as many of its CTAs an SM with the stage as the registers allow without it (the launch bounds' count,
   * else shared memory's): H100 at dk = dv = 128, three either way (selected stage 2-3% faster at G = 4, 16k-64k,
   * docs/performance.md); not at dk = 192 (three CTAs -> two) nor on GPUs with less shared memory.
   */
  get fsaStaged(): boolean {
    if (this.tuning.fsaStage !== undefined) return this.tuning.fsaStage;
    return this.ctasBySharedMemory(this.fsaSharedBytes(true)) >= (this.tuning.fsaMinBlocks ?? this.ctasBySharedMemory(this.fsaSharedBytes(false)));
  }

  /** CTAs of `bytes` dynamic shared memory an SM holds (the driver keeps a reserve of each resident CTA's). */
  private ctasBySharedMemory(bytes: number): number {
    const { sharedBytesPerSm, reservedSharedBytesPerBlock } = this.ctx.device;
    return Math.floor(sharedBytesPerSm / (bytes + reservedSharedBytesPerBlock));
  }

  /** Positions per block-selection tile: as many as the G heads and shared memory allow. */
  positionsPerSelectTile(offerMin = this.selectShape.offerMin): number {
    const byRows = Math.max(1, Math.floor(128 / this.config.groupSize));
    const perPosition = this.selectBytesPerPosition(offerMin);
    const byShared = perPosition === 0 ? byRows : Math.floor((this.ctx.maxSharedBytesOptin - this.selectSharedBytes(0, offerMin)) / perPosition);
    return Math.max(1, Math.min(byRows, byShared));
  }

  private cmpDefines(): string[] {
    return [`-DCMP_L=${this.config.compressBlock}`, `-DCMP_D=${this.config.compressStride}`];
  }

  private selDefines(): string[] {
    return [`-DSEL_L=${this.config.selectBlock}`, `-DSEL_N=${this.config.selectCount}`];
  }

  /**
   * The kernel `fn` of `file` compiled with `defines`, memoised here: the context's module lookup hashes the
   * source, which costs more than a launch, and decoding launches small kernels many times a step.
   */
  private kernel(file: string, fn: string, defines: readonly string[], archSpecific = false): Kernel {
    const key = `${file}:${fn}:${defines.join(' ')}${archSpecific ? ':a' : ''}`;
    const known = this.kernels.get(key);
    if (known !== undefined) return known;
    const options = [
      `-DDK=${this.config.headDim}`,
      `-DDV=${this.config.valueDim}`,
      ...(this.dtype === 'f16' ? ['-DNSA_FP16'] : []),
      ...defines,
    ];
    const module: CudaModule = this.ctx.module(file.replace('.cu', ''), kernelSource(file), { options, archSpecific });
    const kernel = this.ctx.kernel(module, fn);
    this.kernels.set(key, kernel);
    return kernel;
  }
}
