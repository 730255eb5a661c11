// The NSA forward on the GPU, on device-resident tensors:
//   1. compress K and V into Kc, Vc: phi = mean                      nsa_compress_mean
//                                    learned phi (linear, mlp)        nsa_phi_gemm (phi-runner.ts)
//   2. cmp then win attention per 64-row query tile; out = g_cmp*o_cmp + g_win*o_win, lse of both
//   3. block scores from the cmp probabilities (kept on chip) and top-n   nsa_select_blocks
//   4. selected attention; out += g_slc*o_slc (final dtype if asked)     group-centric, or FSA for small G
// Where no sequence is longer than n l' (every visible block selected: `denseSelected`), 3 writes the blocks
// without scores (nsa_all_visible_blocks) and 4 is dense causal attention by the flash kernel (mode 0, gated); where
// the window also reads the selected branch's K/V, 2 computes all three branches at once (flash mode 4: the window's
// keys multiplied once for both branches; `mergesSelectedWithWindow`) and 4 has nothing left to do.
// Index tables come from the layout plan and are uploaded once per runner.

import type { NSAConfig } from '../../../config/nsa-config.js';
import type { CudaContext } from '../context.js';
import type { KernelArg } from '../kernel-args.js';
import type { DeviceBuffer } from '../memory.js';
import { InverseIndex } from './inverse-index.js';
import { buildLayoutPlan, type LayoutPlan } from './layout-plan.js';
import { PhiRunner, type DevicePhiParams } from './phi-runner.js';
import type { HalfDType, NsaPrograms } from './programs.js';

export type SelectedKernelChoice = 'auto' | 'group' | 'fsa';

/** From this G on, 'auto' picks the group-centric kernel (measured at G = 4, 8, 16: docs/performance.md, session 35). */
export const GROUP_CENTRIC_MIN_G = 16;

/**
 * The device bytes the FSA-order selected attention keeps: a half-precision partial output and an fp32 lse per
 * (token, head, slot), and the inverse index's entries (8 bytes per (token, KV head, slot)).
 */
export function fsaScratchBytes(config: NSAConfig, totalTokens: number): number {
  const { heads: Hq, kvHeads: H, valueDim: dv, selectCount: n } = config;
  return totalTokens * n * (Hq * (dv * 2 + 4) + H * 8);
}

/**
 * What 'auto' picks: the FSA order below GROUP_CENTRIC_MIN_G where its scratch leaves a quarter of the available
 * device memory free, else the group-centric kernel (no scratch). At G = 4, Hq = 32, n = 16, dv = 128 the scratch
 * is 131 KiB per token: a 256k-token batch (34 GB) takes the FSA order on an 80 GB GPU, a 512k-token one (69 GB)
 * the group-centric kernel.
 */
export function autoSelectedKernel(groupSize: number, scratchBytes: number, availableBytes: number): 'group' | 'fsa' {
  return groupSize < GROUP_CENTRIC_MIN_G && scratchBytes <= 0.75 * availableBytes ? 'fsa' : 'group';
}

export const FORWARD_STAGES = ['compress', 'cmp+win', 'select', 'selected'] as const;
export type ForwardStage = (typeof FORWARD_STAGES)[number];

/** Inputs on the device: q, k, v (and the optional ones) in the half dtype, gates in fp32. */
export interface DeviceNsaInputs {
  readonly q: DeviceBuffer;
  readonly k: DeviceBuffer;
  readonly v: DeviceBuffer;
  readonly gate: DeviceBuffer;
  readonly kCmp?: DeviceBuffer | undefined;
  readonly vCmp?: DeviceBuffer | undefined;
  readonly kSlc?: DeviceBuffer | undefined;
  readonly vSlc?: DeviceBuffer | undefined;
  readonly kWin?: DeviceBuffer | undefined;
  readonly vWin?: DeviceBuffer | undefined;
  /** A learned phi's parameters (fp32) for keys and values; config.phi = linear or mlp without kCmp/vCmp. */
  readonly phiK?: DevicePhiParams | undefined;
  readonly phiV?: DevicePhiParams | undefined;
}

/** Outputs on the device; the ungated per-branch outputs and the final half-precision output are optional. */
export interface DeviceNsaOutputs {
  /** [N, Hq, Dv] fp32: the gated sum. */
  readonly out: DeviceBuffer;
  /** [N, Hq, Dv] in the half dtype: the gated sum rounded once, when asked. */
  readonly outFinal?: DeviceBuffer | undefined;
  readonly oCmp?: DeviceBuffer | undefined;
  readonly oSlc?: DeviceBuffer | undefined;
  readonly oWin?: DeviceBuffer | undefined;
  /** oCmp, oSlc, oWin hold the half dtype (elem_t) rather than fp32. */
  readonly branchHalf?: boolean | undefined;
  readonly lseCmp: DeviceBuffer;
  readonly lseSlc: DeviceBuffer;
  readonly lseWin: DeviceBuffer;
  /** [N, H, n] int32 */
  readonly blockIndices: DeviceBuffer;
}

const NULL: KernelArg = { ptr: 0n };
const ptr = (b: DeviceBuffer | undefined): KernelArg => (b === undefined ? NULL : { ptr: b.ptr });

/**
 * Whether the selected branch of a batch is dense causal attention: where no sequence is longer than n l', a token
 * sees at most n blocks and the top-n takes them all.
 */
export function selectsEveryVisibleBlock(config: NSAConfig, cuSeqlens: ArrayLike<number>): boolean {
  for (let s = 0; s + 1 < cuSeqlens.length; s++) {
    if (cuSeqlens[s + 1]! - cuSeqlens[s]! > config.selectCount * config.selectBlock) return false;
  }
  return true;
}

export class ForwardRunner {
  readonly plan: LayoutPlan;
  readonly selectedKernel: 'group' | 'fsa';
  /** The selected branch runs as dense causal attention (selectsEveryVisibleBlock, unless NSA_SLC_DENSE=0). */
  readonly denseSelected: boolean;
  private readonly tables: Record<
    'cuSeqlens' | 'cuCmp' | 'cuBlocks' | 'rowSeq' | 'cmpRowSeq' | 'blockSeq' | 'queryTiles' | 'selectTiles',
    DeviceBuffer
  >;
  private readonly scratch: DeviceBuffer[] = [];
  private readonly kc: DeviceBuffer;
  private readonly vc: DeviceBuffer;
  private readonly fsa: { index: InverseIndex; partialO: DeviceBuffer; partialLse: DeviceBuffer } | undefined;
  /** Learned phi's products (and the mlp's hidden state, which its backward reads). */
  readonly phi: PhiRunner | undefined;

  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    cuSeqlens: readonly number[],
    choice: SelectedKernelChoice = 'auto',
  ) {
    const config = programs.config;
    this.plan = buildLayoutPlan(config, cuSeqlens, programs.queryTile, programs.positionsPerSelectTile());
    this.selectedKernel =
      choice === 'auto' ? autoSelectedKernel(config.groupSize, fsaScratchBytes(config, this.plan.totalTokens), ctx.availableBytes()) : choice;
    this.denseSelected = programs.tuning.slcDense === true && selectsEveryVisibleBlock(config, cuSeqlens);
    const up = (a: Int32Array, what: string): DeviceBuffer => this.keep(ctx.upload(a, what));
    this.tables = {
      cuSeqlens: up(this.plan.cuSeqlens, 'cu_seqlens'),
      cuCmp: up(this.plan.cuCmp, 'cu_cmp'),
      cuBlocks: up(this.plan.cuBlocks, 'cu_blocks'),
      rowSeq: up(this.plan.rowSeq, 'row_seq'),
      cmpRowSeq: up(nonEmpty(this.plan.cmpRowSeq), 'cmp_row_seq'),
      blockSeq: up(this.plan.blockSeq, 'block_seq'),
      queryTiles: up(this.plan.queryTiles, 'query tiles'),
      selectTiles: up(this.plan.selectTiles, 'select tiles'),
    };
    const { kvHeads: H, headDim: dk, valueDim: dv, heads: Hq, selectCount: n } = config;
    const half = 2;
    this.kc = this.keep(ctx.alloc(Math.max(1, this.plan.totalCompressed) * H * dk * half, 'compressed keys'));
    this.vc = this.keep(ctx.alloc(Math.max(1, this.plan.totalCompressed) * H * dv * half, 'compressed values'));
    if (this.selectedKernel === 'fsa' && !this.denseSelected) {
      const N = this.plan.totalTokens;
      this.fsa = {
        index: new InverseIndex(ctx, programs, this.plan, this.tables),
        partialO: this.keep(ctx.alloc(N * Hq * n * dv * 2, 'fsa partial outputs (half)')),
        partialLse: this.keep(ctx.alloc(N * Hq * n * 4, 'fsa partial lse')),
      };
    } else {
      this.fsa = undefined;
    }
    this.phi = config.phi === 'mean' ? undefined : new PhiRunner(ctx, programs, this.plan, this.tables);
  }

  get config(): NSAConfig {
    return this.programs.config;
  }

  /** The inverse index of the last run's selection, where the FSA-order attention built one (not when denseSelected). */
  get selectionIndex(): InverseIndex | undefined {
    return this.fsa?.index;
  }

  /** The index tables on the device (the backward reads them too). */
  get deviceTables(): Readonly<Record<'cuSeqlens' | 'cuCmp' | 'cuBlocks' | 'rowSeq' | 'cmpRowSeq' | 'blockSeq', DeviceBuffer>> {
    return this.tables;
  }

  get dtype(): HalfDType {
    return this.programs.dtype;
  }

  /** The compressed K/V the last run attended (computed, or the given ones). */
  compressed(inputs: DeviceNsaInputs): { kc: DeviceBuffer; vc: DeviceBuffer } {
    return { kc: inputs.kCmp ?? this.kc, vc: inputs.vCmp ?? this.vc };
  }

  /** Launches the whole forward on the context's stream (asynchronous). */
  run(inputs: DeviceNsaInputs, outputs: DeviceNsaOutputs): void {
    for (const stage of FORWARD_STAGES) this.runStage(stage, inputs, outputs);
  }

  /** One stage alone (for profiling; each reads what the stages before it wrote). */
  runStage(stage: ForwardStage, inputs: DeviceNsaInputs, outputs: DeviceNsaOutputs): void {
    const { config, plan, programs, tables } = this;
    const { heads: Hq, kvHeads: H } = config;
    const scaleLog2 = config.scale * Math.LOG2E;
    const N = plan.totalTokens;
    const { kc, vc } = this.compressed(inputs);
    if (stage === 'compress' && inputs.kCmp === undefined && plan.totalCompressed > 0 && this.phi !== undefined) {
      if (inputs.phiK === undefined || inputs.phiV === undefined) {
        throw new TypeError(`phi = ${config.phi} needs its parameters (phiK, phiV) or the compressed K/V`);
      }
      this.phi.forward('k', inputs.k, inputs.phiK, kc);
      this.phi.forward('v', inputs.v, inputs.phiV, vc);
    } else if (stage === 'compress' && inputs.kCmp === undefined && plan.totalCompressed > 0) {
      programs.compressMean.launch({
        grid: [plan.totalCompressed, H, 1],
        block: [(config.headDim + config.valueDim) / 8, 1, 1],
        args: [ptr(inputs.k), ptr(inputs.v), ptr(kc), ptr(vc), ptr(tables.cmpRowSeq), ptr(tables.cuSeqlens), ptr(tables.cuCmp), { i32: H }],
      });
    }
    const merged = this.mergesSelectedWithWindow(inputs);
    const mode = merged ? 4 : 3;
    if (stage === 'cmp+win') programs.flash(mode).launch({
      grid: [plan.queryTiles.length / 2, Hq, 1],
      block: [2 * programs.queryTile, 1, 1],
      sharedBytes: programs.flashSharedBytes(mode),
      args: [
        ptr(inputs.q),
        ptr(inputs.kWin ?? inputs.k),
        ptr(inputs.vWin ?? inputs.v),
        ptr(kc),
        ptr(vc),
        ptr(inputs.gate),
        ptr(outputs.out),
        ptr(outputs.oCmp),
        ptr(outputs.oWin),
        { i32: outputs.branchHalf === true ? 1 : 0 },
        ptr(outputs.lseCmp),
        ptr(outputs.lseWin),
        ptr(tables.cuSeqlens),
        ptr(tables.cuCmp),
        ptr(tables.queryTiles),
        { i32: Hq },
        { i32: H },
        { f32: scaleLog2 },
        { i32: 0 },
        merged ? ptr(outputs.outFinal) : NULL,
        merged ? ptr(outputs.oSlc) : NULL,
        merged ? ptr(outputs.lseSlc) : NULL,
        ...programs.flashTensorMaps(inputs.q.ptr, (inputs.kWin ?? inputs.k).ptr, (inputs.vWin ?? inputs.v).ptr, plan.totalTokens, kc.ptr, vc.ptr, plan.totalCompressed),
      ],
    });
    if (stage === 'select' && this.denseSelected) {
      programs.allVisibleBlocks.launch({
        grid: [Math.max(1, Math.ceil((N * H) / 256)), 1, 1],
        block: [256, 1, 1],
        args: [ptr(outputs.blockIndices), ptr(tables.rowSeq), ptr(tables.cuSeqlens), { i32: N }, { i32: H }],
      });
    } else if (stage === 'select') programs.selectBlocks.launch({
      grid: [plan.selectTiles.length / 2, H, 1],
      block: [256, 1, 1],
      sharedBytes: programs.selectSharedBytes(plan.positionsPerTile),
      args: [
        ptr(inputs.q),
        ptr(kc),
        ptr(outputs.lseCmp),
        ptr(tables.cuSeqlens),
        ptr(tables.cuCmp),
        ptr(tables.selectTiles),
        ptr(outputs.blockIndices),
        { i32: Hq },
        { i32: H },
        { i32: plan.positionsPerTile },
        { f32: scaleLog2 },
        ...programs.selectTensorMaps(kc.ptr, plan.totalCompressed),
      ],
    });
    if (stage !== 'selected' || merged) return;
    const kSlc = inputs.kSlc ?? inputs.k;
    const vSlc = inputs.vSlc ?? inputs.v;
    if (this.denseSelected) {
      this.runDenseSelected(inputs.q, kSlc, vSlc, inputs.gate, outputs, scaleLog2);
    } else if (this.selectedKernel === 'group') {
      // Both group-centric kernels take the selection's rows and the epilogue's outputs alike.
      const rowsAndOutputs: KernelArg[] = [
        ptr(outputs.blockIndices),
        ptr(tables.rowSeq),
        ptr(tables.cuSeqlens),
        ptr(outputs.out),
        ptr(outputs.outFinal),
        ptr(outputs.oSlc),
        { i32: outputs.branchHalf === true ? 1 : 0 },
        ptr(outputs.lseSlc),
        { i32: Hq },
        { i32: H },
        { f32: scaleLog2 },
      ];
      const tensorMaps = programs.selectedTensorMaps(kSlc.ptr, vSlc.ptr, N);
      const positions = programs.slcUnionPositions;
      if (positions > 0) {
        programs.selectedUnion.launch({
          grid: [Math.ceil(N / positions), H, Math.ceil(config.groupSize / 16)],
          block: [programs.selectedUnionThreads, 1, 1],
          sharedBytes: programs.selectedUnionSharedBytes(),
          args: [ptr(inputs.q), ptr(inputs.gate), ...rowsAndOutputs, { i32: N }, ...tensorMaps],
        });
      } else {
        programs.selectedAttention.launch({
          grid: [N, H, Math.ceil(config.groupSize / 16)],
          block: [programs.selectedThreads, 1, 1],
          sharedBytes: programs.selectedSharedBytes(),
          args: [ptr(inputs.q), ptr(kSlc), ptr(vSlc), ptr(inputs.gate), ...rowsAndOutputs, ...tensorMaps],
        });
      }
    } else {
      this.runFsa(inputs.q, kSlc, vSlc, inputs.gate, outputs, scaleLog2);
    }
  }

  /**
   * Whether the cmp + win launch computes the selected branch too (flash mode 4): on the dense path, where the window
   * reads the selected branch's K/V and the query tile's fp32 rows fit in shared memory beside the tiles.
   */
  mergesSelectedWithWindow(inputs: Pick<DeviceNsaInputs, 'k' | 'v' | 'kSlc' | 'vSlc' | 'kWin' | 'vWin'>): boolean {
    const sameKv = (inputs.kSlc ?? inputs.k).ptr === (inputs.kWin ?? inputs.k).ptr && (inputs.vSlc ?? inputs.v).ptr === (inputs.vWin ?? inputs.v).ptr;
    return this.denseSelected && sameKv && this.programs.tuning.slcWinMerge === true && this.programs.cmpStash;
  }

  /** Device bytes this runner holds (index tables, compressed K/V, FSA buffers and inverse index). */
  get bytes(): number {
    return this.scratch.reduce((sum, b) => sum + b.bytes, 0) + (this.fsa?.index.bytes ?? 0) + (this.phi?.bytes ?? 0);
  }

  dispose(): void {
    for (const b of this.scratch) b.dispose();
    this.scratch.length = 0;
    this.fsa?.index.dispose();
    this.phi?.dispose();
  }

  /** The selected branch as dense causal attention: out += g_slc * o_slc, o_slc and lse_slc, out rounded once where asked. */
  private runDenseSelected(q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, gate: DeviceBuffer, outputs: DeviceNsaOutputs, scaleLog2: number): void {
    const { config, plan, programs, tables } = this;
    programs.flash(0).launch({
      grid: [plan.queryTiles.length / 2, config.heads, 1],
      block: [2 * programs.queryTile, 1, 1],
      sharedBytes: programs.flashSharedBytes(),
      args: [
        ptr(q),
        ptr(k),
        ptr(v),
        NULL,
        NULL,
        ptr(gate),
        ptr(outputs.out),
        ptr(outputs.oSlc),
        NULL,
        { i32: outputs.branchHalf === true ? 1 : 0 },
        ptr(outputs.lseSlc),
        NULL,
        ptr(tables.cuSeqlens),
        NULL,
        ptr(tables.queryTiles),
        { i32: config.heads },
        { i32: config.kvHeads },
        { f32: scaleLog2 },
        { i32: 1 },
        ptr(outputs.outFinal),
        NULL,
        NULL,
        ...programs.flashTensorMaps(q.ptr, k.ptr, v.ptr, plan.totalTokens),
      ],
    });
  }

  private runFsa(q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, gate: DeviceBuffer, outputs: DeviceNsaOutputs, scaleLog2: number): void {
    const { config, plan, programs, tables } = this;
    const { index, partialO, partialLse } = this.fsa!;
    const { heads: Hq, kvHeads: H, groupSize: G } = config;
    const N = plan.totalTokens;
    const perTile = Math.max(1, Math.floor(64 / G)); // positions per tile: their G heads fill 64 MMA rows
    index.build(outputs.blockIndices, perTile);
    // Persistent: as many CTAs as fit at once (each takes a contiguous run of the tiles the device counted).
    const persistent = programs.tuning.fsaPersistent === true;
    const attend = programs.fsa(persistent ? 'attend_persistent' : 'attend');
    const tiles = index.itemUpperBound(perTile);
    const sharedBytes = programs.fsaSharedBytes();
    const resident = persistent ? this.ctx.device.smCount * Math.max(1, attend.residentBlocksPerSM(128, sharedBytes)) : tiles;
    attend.launch({
      grid: [Math.min(tiles, resident), 1, 1],
      block: [128, 1, 1],
      sharedBytes,
      args: [
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(index.offsets),
        ptr(index.itemOffsets),
        ptr(index.entries),
        ptr(tables.blockSeq),
        ptr(tables.cuBlocks),
        ptr(tables.cuSeqlens),
        ptr(partialO),
        ptr(partialLse),
        { i32: Hq },
        { i32: H },
        { i32: plan.totalBlocks },
        { i32: perTile },
        { f32: scaleLog2 },
        ...(persistent ? [{ i32: programs.tuning.fsaPhases === 'all' ? H * plan.totalBlocks : plan.totalBlocks }] : []), // keys a phase
      ],
    });
    const rows = N * Hq;
    programs.fsa('reduce').launch({
      grid: [Math.ceil(rows / 4), 1, 1],
      block: [128, 1, 1],
      args: [
        ptr(partialO),
        ptr(partialLse),
        ptr(outputs.blockIndices),
        ptr(gate),
        ptr(outputs.out),
        ptr(outputs.outFinal),
        ptr(outputs.oSlc),
        { i32: outputs.branchHalf === true ? 1 : 0 },
        ptr(outputs.lseSlc),
        { i64: rows },
        { i32: Hq },
        { i32: H },
      ],
    });
  }

  private keep(b: DeviceBuffer): DeviceBuffer {
    this.scratch.push(b);
    return b;
  }
}

/** A device buffer must not be empty; a table with no entries still uploads one (unused) word. */
function nonEmpty(a: Int32Array): Int32Array {
  return a.length > 0 ? a : new Int32Array(1);
}
