// The NSA backward on the GPU, on what the forward kept on the device (inputs, compressed K/V, each branch's
// output and lse, the selected blocks). Every gradient is summed in a fixed order (no atomics on values), so two
// runs give the same bits:
//   1. per (row, head): dg_b = dO . o_b, delta_b = g_b * dg_b                      nsa_bwd_preprocess
//   2. cmp: dQ (query-centric) and dKc, dVc (key-centric) over the compressed keys  flash backward, mode 1
//   3. win: dQ and dK, dV of the window                                             flash backward, mode 2
//   4. slc: dK, dV key-centric through a deterministic inverse index of the selection; dQ fused into that pass
//      (per-slot parts, summed in slot order) where its buffer fits, else group-centric (see selectedDqMode).
//      With cmp and win in one dQ launch, that launch runs after this pass and adds the parts itself.
//      Where the forward's selected branch was dense attention (ForwardRunner.denseSelected: every visible block
//      selected), its dQ and dK, dV are the flash backward's dense mode with the slc gate instead
//   5. phi: dK, dV += the compressed gradients through phi (mean: spread over their blocks; learned: the
//      products of phi-runner.ts, which also give phi's parameter gradients); given compressed K/V keep theirs

import type { CudaContext } from '../context.js';
import type { KernelArg } from '../kernel-args.js';
import type { DeviceBuffer } from '../memory.js';
import type { DeviceNsaInputs, DeviceNsaOutputs, ForwardRunner } from './forward-runner.js';
import { InverseIndex } from './inverse-index.js';
import type { NsaPrograms } from './programs.js';
import { chooseSplits, cmpKeyTileIterations } from './split-balance.js';

/** fp32 gradients on the device. */
export interface DeviceNsaGradients {
  readonly dq: DeviceBuffer;
  /** Gradients of the shared k, v. */
  readonly dk: DeviceBuffer;
  readonly dv: DeviceBuffer;
  /** [N, Hq, 3] */
  readonly dg: DeviceBuffer;
  /** Compressed K/V gradients [Nc, H, D]. */
  readonly dkc: DeviceBuffer;
  readonly dvc: DeviceBuffer;
  /** Present when the forward had independent K/V for the branch. */
  readonly dkSlc?: DeviceBuffer | undefined;
  readonly dvSlc?: DeviceBuffer | undefined;
  readonly dkWin?: DeviceBuffer | undefined;
  readonly dvWin?: DeviceBuffer | undefined;
  /** A learned phi's parameter gradients, by name (shaped as the parameters). */
  readonly dPhiK?: Readonly<Record<string, DeviceBuffer>> | undefined;
  readonly dPhiV?: Readonly<Record<string, DeviceBuffer>> | undefined;
}

export type BackwardStage =
  | 'preprocess'
  | 'cmp+win dq'
  | 'cmp dq'
  | 'cmp dkdv'
  | 'win dq'
  | 'win dkdv'
  | 'slc dq'
  | 'slc index'
  | 'slc dkdv'
  | 'compress';

/**
 * How the selected branch's dQ runs. 'group': a CTA per (token, KV head, 16 heads) streams the token's blocks
 * (L2-bound, and at G < 16 most of its MMA rows are empty). 'fused': the dK/dV pass, which has dS and K of each
 * (block, choosing rows) tile at hand, writes a dQ part per (token, head, slot), summed in slot order by the cmp +
 * win dQ launch (or, with those branches' dQ apart, by a reduce of their own), at the cost of a buffer of
 * N * Hq * n * ceil(l'/64) * dk parts (bf16, or fp32 with NSA_SLC_DQ_PARTS=f32).
 * Fused was faster at every G measured (H100, 64k, fla preset, fp32 parts: fwd+bwd 82.0 against 129.0 ms at
 * G = 4, 121.1 against 129.9 ms at G = 16), so it is the default wherever that buffer leaves a quarter of the free
 * device memory free (at 64k tokens, Hq = 64, n = 16, dk = 128 it is 16 GiB, 32 GiB in fp32); it is freed (to the pool,
 * which gives cached blocks back to the driver before an allocation fails) when the backward returns.
 * NSA_SLC_DQ=group|fused forces either.
 */
export type SelectedDqMode = 'group' | 'fused';

export function selectedDqMode(
  partialBytes: number,
  availableBytes: number,
  env: Readonly<Record<string, string | undefined>> = process.env,
): SelectedDqMode {
  const forced = env['NSA_SLC_DQ'];
  if (forced === 'group' || forced === 'fused') return forced;
  return partialBytes <= 0.75 * availableBytes ? 'fused' : 'group';
}

/** The flash backward's query and key tile lists (and their counts) over the whole batch, for its dense mode. */
interface DenseTiles {
  readonly queries: DeviceBuffer;
  readonly keys: DeviceBuffer;
  readonly queryCount: number;
  readonly keyCount: number;
}

const NULL: KernelArg = { ptr: 0n };
const ptr = (b: DeviceBuffer | undefined): KernelArg => (b === undefined ? NULL : { ptr: b.ptr });
const TILE = 64;

export class BackwardRunner {
  private readonly buffers: DeviceBuffer[] = [];
  private readonly queryTiles: DeviceBuffer;
  private readonly keyTiles: DeviceBuffer;
  private readonly cmpKeyTiles: DeviceBuffer;
  private readonly counts: { queryTiles: number; keyTiles: number; cmpKeyTiles: number };
  private readonly delta: DeviceBuffer;
  /**
   * How the selected branch's backward runs: through the selection's inverse index (the gathered backward), or, where
   * the forward's selected branch was dense attention, as the flash backward's dense mode over these query and key tiles.
   */
  private readonly slc: { index: InverseIndex } | { dense: DenseTiles };
  /** (token, slot) pairs per work item of the selected dK/dV: 64 tiles (NSA_SLC_BWD_ITEM) of 64 / G positions, at least 4 a tile. */
  private readonly itemEntries: number;
  private readonly cmpSplits: number;
  /** Partial sums of the split cmp dK/dV and of the selected dK/dV's work items (one after the other). */
  private readonly partial: DeviceBuffer;
  /** How the gathered selected backward's dQ runs; undefined where the selected branch is dense (forward.denseSelected). */
  readonly selectedDq: SelectedDqMode | undefined;
  /** The fused selected dQ's parts [N, Hq, n, subs, dk] (bf16, or fp32 with NSA_SLC_DQ_PARTS=f32), when selectedDq is 'fused'. */
  private readonly partialQ: DeviceBuffer | undefined;

  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    private readonly forward: ForwardRunner,
  ) {
    const { plan } = forward;
    const { heads: Hq, kvHeads: H } = programs.config;
    const up = (a: Int32Array, what: string): DeviceBuffer => this.keep(ctx.upload(a.length > 0 ? a : new Int32Array(2), what));
    const cu = Array.from(plan.cuSeqlens);
    // The flash backward's CTAs own 64 query rows (dQ) or keys (dK/dV), or 128 with two wgmma warpgroups; cmp
    // (mode 1) and win (mode 2) take the same shapes.
    const q = tileList(cu, programs.flashBackwardTile('dq', 2), 'latest first');
    const k = tileList(cu, programs.flashBackwardTile('dkdv', 2), 'earliest first');
    const c = tileList(Array.from(plan.cuCmp), programs.flashBackwardTile('dkdv', 1), 'earliest first');
    this.counts = { queryTiles: q.length / 2, keyTiles: k.length / 2, cmpKeyTiles: c.length / 2 };
    this.queryTiles = up(q, 'backward query tiles');
    this.keyTiles = up(k, 'backward key tiles');
    this.cmpKeyTiles = up(c, 'backward compressed key tiles');
    const N = plan.totalTokens;
    this.delta = this.keep(ctx.alloc(N * Hq * 3 * 4, 'delta'));
    const itemTiles = programs.tuning.slcBwdItemTiles ?? 64;
    this.itemEntries = Math.max(4 * itemTiles, itemTiles * Math.max(1, Math.floor(64 / programs.config.groupSize)));
    // Few compressed key tiles would leave most SMs idle in the cmp dK/dV: split their query walks, at least enough
    // for two CTAs an SM, as many more as leave the least idle tail (split-balance.ts). The schedule is simulated
    // with one CTA an SM at a time, as the wgmma dK/dV's 255 registers allow on sm_90; where more fit (mma.sync
    // builds), it balances a schedule that is not the real one, but never goes below the old count.
    const cmpIterations = cmpKeyTileIterations(cu, Array.from(plan.cuCmp), programs.flashBackwardTile('dkdv', 1), programs.config);
    const minSplits = Math.ceil((2 * ctx.device.smCount) / Math.max(1, this.counts.cmpKeyTiles * H));
    this.cmpSplits = chooseSplits(cmpIterations, H, ctx.device.smCount, minSplits);
    // The forward's index (FSA order) holds this selection already: only the work items are the backward's own.
    if (forward.denseSelected) {
      const dq = tileList(cu, programs.flashBackwardTile('dq', 0), 'latest first');
      const dkdv = tileList(cu, programs.flashBackwardTile('dkdv', 0), 'earliest first');
      this.slc = { dense: { queries: up(dq, 'dense backward query tiles'), keys: up(dkdv, 'dense backward key tiles'), queryCount: dq.length / 2, keyCount: dkdv.length / 2 } };
    } else {
      this.slc = { index: new InverseIndex(ctx, programs, plan, forward.deviceTables, forward.selectionIndex) };
    }
    const { headDim: dk, valueDim: dv, selectBlock } = programs.config;
    const partialFloats = Math.max(
      this.cmpSplits > 1 ? this.cmpSplits * plan.totalCompressed * H * (dk + dv) : 0,
      'index' in this.slc ? this.slc.index.itemUpperBound(this.itemEntries) * Math.ceil(selectBlock / TILE) * TILE * (dk + dv) : 0,
    );
    this.partial = this.keep(ctx.alloc(Math.max(1, partialFloats) * 4, 'backward partial sums'));
    const partialQBytes = N * Hq * programs.config.selectCount * Math.ceil(selectBlock / TILE) * dk * programs.selectedDqPartBytes;
    this.selectedDq = forward.denseSelected ? undefined : selectedDqMode(partialQBytes, ctx.availableBytes());
    this.partialQ = this.selectedDq === 'fused' ? this.keep(ctx.alloc(Math.max(4, partialQBytes), 'selected dQ parts')) : undefined;
  }

  /**
   * Launches the whole backward (asynchronous); `grads` are overwritten: zeroed first, except those whose first
   * writer stores rather than adds (dQ, the window's dK/dV, dKc/dVc unsplit), which would cost a memset and a read
   * of each (at 64k, Hq = 64, dQ alone is 2 GB).
   */
  run(inputs: DeviceNsaInputs, fwd: DeviceNsaOutputs, dOut: DeviceBuffer, grads: DeviceNsaGradients): void {
    const { stages, stored } = this.launches(inputs, fwd, dOut, grads);
    const phiGrads = [...Object.values(grads.dPhiK ?? {}), ...Object.values(grads.dPhiV ?? {})];
    for (const b of [grads.dq, grads.dk, grads.dv, grads.dg, grads.dkc, grads.dvc, grads.dkSlc, grads.dvSlc, grads.dkWin, grads.dvWin, ...phiGrads]) {
      if (b !== undefined && !stored.has(b)) this.ctx.memset(b, 0);
    }
    for (const [, launch] of stages) launch();
  }

  /** The backward's launches in order, by name (for profiling one at a time). */
  stages(inputs: DeviceNsaInputs, fwd: DeviceNsaOutputs, dOut: DeviceBuffer, grads: DeviceNsaGradients): [BackwardStage, () => void][] {
    return this.launches(inputs, fwd, dOut, grads).stages;
  }

  /** The launches in order, and the gradient buffers their first writer stores into (every row) rather than adds to. */
  private launches(
    inputs: DeviceNsaInputs,
    fwd: DeviceNsaOutputs,
    dOut: DeviceBuffer,
    grads: DeviceNsaGradients,
  ): { stages: [BackwardStage, () => void][]; stored: Set<DeviceBuffer> } {
    const { programs, forward } = this;
    const { plan } = forward;
    const config = programs.config;
    const { heads: Hq, kvHeads: H, groupSize: G } = config;
    const N = plan.totalTokens;
    const tables = forward.deviceTables;
    const scaleLog2 = config.scale * Math.LOG2E;
    const common = [{ i32: Hq }, { i32: H }] as const;
    const { kc, vc } = forward.compressed(inputs);
    const stages: [BackwardStage, () => void][] = [];
    // The accumulate flag of a launch that writes every row of `buffers`: 0 (store) where it is their first writer.
    const stored = new Set<DeviceBuffer>();
    const written = new Set<DeviceBuffer>();
    const accumulateInto = (buffers: DeviceBuffer[], canStore = true): KernelArg => {
      const first = canStore && buffers.every((b) => !written.has(b));
      for (const b of buffers) {
        written.add(b);
        if (first) stored.add(b);
      }
      return { i32: first ? 0 : 1 };
    };

    stages.push(['preprocess', () =>
      programs.flashBackward(1, 'preprocess').launch({
        grid: [Math.ceil((N * Hq) / 4), 1, 1],
        block: [128, 1, 1],
        args: [
          ptr(dOut), ptr(fwd.oCmp), ptr(fwd.oSlc), ptr(fwd.oWin), { i32: fwd.branchHalf === true ? 1 : 0 }, ptr(inputs.gate), ptr(grads.dg),
          ptr(this.delta), { i64: N * Hq },
        ],
      })]);

    // cmp (branch 0) over the compressed keys, and win (branch 2) over the raw ones.
    const branches = [
      { name: 'cmp' as const, mode: 1 as const, branch: 0, k: kc, v: vc, lse: fwd.lseCmp, cuKeys: tables.cuCmp, keyTiles: this.cmpKeyTiles, nKeyTiles: this.counts.cmpKeyTiles, keyRows: plan.totalCompressed * H, dk: grads.dkc, dv: grads.dvc },
      { name: 'win' as const, mode: 2 as const, branch: 2, k: inputs.kWin ?? inputs.k, v: inputs.vWin ?? inputs.v, lse: fwd.lseWin, cuKeys: tables.cuSeqlens, keyTiles: this.keyTiles, nKeyTiles: this.counts.keyTiles, keyRows: N * H, dk: grads.dkWin ?? grads.dk, dv: grads.dvWin ?? grads.dv },
    ];
    const dqFused = programs.tuning.cmpWinDqFused === true;
    // The selected dQ's fused parts are summed by the cmp + win dQ launch, which then runs after the dK/dV pass
    // that writes them (no separate reduce reading and writing dq); else by their own reduce.
    const fused = this.selectedDq === 'fused';
    const partsInCmpWinDq = fused && dqFused;
    let cmpWinDq: [BackwardStage, () => void] | undefined;
    // The pipelined (`_tma`) launches read their walked tiles through tensor maps, passed after the other arguments.
    const keySet = (b: (typeof branches)[number]) => ({ k: b.k.ptr, v: b.v.ptr, rows: b.mode === 1 ? plan.totalCompressed : N });
    const maps = (walk: 'dq' | 'dkdv', mode: 1 | 2 | 3, walked: (typeof branches)[number][] = []): KernelArg[] =>
      programs.flashBackwardTensorMaps(walk, mode, inputs.q.ptr, dOut.ptr, N, walked.map(keySet));
    if (dqFused) {
      const win = branches[1]!;
      const dqAccumulate = accumulateInto([grads.dq]);
      const dqMaps = maps('dq', 3, branches);
      cmpWinDq = ['cmp+win dq', () =>
        programs.flashBackward(3, 'dq_cmp_win').launch({
          grid: [this.counts.queryTiles, Hq, 1],
          block: [programs.flashBackwardThreads('dq', 3), 1, 1],
          sharedBytes: programs.flashBackwardSharedBytes('dq', 3),
          args: [
            ptr(inputs.q), ptr(kc), ptr(vc), ptr(win.k), ptr(win.v), ptr(dOut), ptr(fwd.lseCmp), ptr(fwd.lseWin), ptr(inputs.gate),
            ptr(this.delta), ptr(grads.dq), ptr(tables.cuSeqlens), ptr(tables.cuCmp), ptr(this.queryTiles), ...common,
            { f32: scaleLog2 }, { f32: config.scale }, dqAccumulate, ...(partsInCmpWinDq ? [ptr(this.partialQ), ptr(fwd.blockIndices)] : [NULL, NULL]),
            ...dqMaps,
          ],
        })];
      if (!partsInCmpWinDq) stages.push(cmpWinDq);
    }
    for (const b of branches) {
      const tail = [...common, { i32: b.branch }, { f32: scaleLog2 }, { f32: config.scale }];
      const dqMaps = dqFused ? [] : maps('dq', b.mode, [b]);
      if (!dqFused) {
        const dqAccumulate = accumulateInto([grads.dq]);
        stages.push([`${b.name} dq`, () =>
          programs.flashBackward(b.mode, 'dq').launch({
            grid: [this.counts.queryTiles, Hq, 1],
            block: [programs.flashBackwardThreads('dq', b.mode), 1, 1],
            sharedBytes: programs.flashBackwardSharedBytes('dq', b.mode),
            args: [ptr(inputs.q), ptr(b.k), ptr(b.v), ptr(dOut), ptr(b.lse), ptr(inputs.gate), ptr(this.delta), ptr(grads.dq), ptr(tables.cuSeqlens), ptr(b.cuKeys), ptr(this.queryTiles), ...tail, dqAccumulate, ...dqMaps],
          })]);
      }
      if (b.nKeyTiles === 0) continue;
      // Few key tiles (the compressed ones) would leave most SMs idle: split their query walk and sum in order.
      const splits = b.mode === 1 ? this.cmpSplits : 1;
      // Split, the walk's partial sums are added in by reduce_splits.
      const dkdvAccumulate = accumulateInto([b.dk, b.dv], splits === 1);
      const pk = splits > 1 ? this.partial : undefined;
      const pvOffset = splits * b.keyRows * config.headDim * 4;
      const dkdvMaps = maps('dkdv', b.mode);
      stages.push([`${b.name} dkdv`, () => {
        programs.flashBackward(b.mode, 'dkdv').launch({
          grid: [b.nKeyTiles, H, splits],
          block: [programs.flashBackwardThreads('dkdv', b.mode), 1, 1],
          sharedBytes: programs.flashBackwardSharedBytes('dkdv', b.mode),
          args: [
            ptr(inputs.q), ptr(b.k), ptr(b.v), ptr(dOut), ptr(b.lse), ptr(inputs.gate), ptr(this.delta), ptr(b.dk), ptr(b.dv),
            ptr(tables.cuSeqlens), ptr(b.cuKeys), ptr(b.keyTiles), ...tail, dkdvAccumulate,
            pk === undefined ? NULL : { ptr: pk.ptr }, pk === undefined ? NULL : { ptr: pk.ptr + BigInt(pvOffset) }, { i64: b.keyRows },
            ...dkdvMaps,
          ],
        });
        if (pk === undefined) return;
        for (const [dst, offset, dim] of [[b.dk, 0, config.headDim], [b.dv, pvOffset, config.valueDim]] as const) {
          const n = b.keyRows * dim;
          programs.flashBackward(b.mode, 'reduce_splits').launch({
            grid: [Math.min(65535, Math.ceil(n / 256)), 1, 1],
            block: [256, 1, 1],
            args: [{ ptr: pk.ptr + BigInt(offset) }, ptr(dst), { i64: n }, { i32: splits }],
          });
        }
      }]);
    }

    // slc (branch 1): dQ group-centric, then dK/dV through the inverse index; or, fused, the dK/dV pass writes
    // dQ parts too, summed after it by the cmp + win dQ launch or, with the branches' dQ apart, by 'slc dq'.
    const kSlc = inputs.kSlc ?? inputs.k;
    const vSlc = inputs.vSlc ?? inputs.v;
    const phi = forward.phi;
    if ('dense' in this.slc) {
      // The forward's selected branch was dense attention: its backward is the flash backward's dense mode.
      this.pushDenseSelected(stages, this.slc.dense, inputs, fwd, dOut, grads, kSlc, vSlc, accumulateInto);
      this.pushCompress(stages, inputs, grads, phi, false);
      return { stages, stored };
    }
    const index = this.slc.index;
    const slcDq: [BackwardStage, () => void] = fused
      ? ['slc dq', () => {
          const rows = N * Hq;
          programs.selectedBackward('dq_reduce', true).launch({
            grid: [Math.ceil((rows * (config.headDim / 4)) / 256), 1, 1],
            block: [256, 1, 1],
            args: [ptr(this.partialQ), ptr(fwd.blockIndices), ptr(tables.rowSeq), ptr(tables.cuSeqlens), ptr(grads.dq), ...common, { i64: rows }, { f32: config.scale }],
          });
        }]
      : ['slc dq', () =>
          programs.selectedBackward('dq').launch({
            grid: [N, H, Math.ceil(G / 16)],
            block: [128, 1, 1],
            sharedBytes: programs.selectedBackwardSharedBytes('dq'),
            args: [ptr(inputs.q), ptr(kSlc), ptr(vSlc), ptr(dOut), ptr(fwd.lseSlc), ptr(inputs.gate), ptr(this.delta), ptr(fwd.blockIndices), ptr(tables.rowSeq), ptr(tables.cuSeqlens), ptr(grads.dq), ...common, { f32: scaleLog2 }, { f32: config.scale }],
          })];
    if (!fused) stages.push(slcDq);
    // The work items' order (by KV head and token, for L2 reuse of the gathered rows) is the index stage's too.
    let itemOrder: DeviceBuffer | undefined;
    stages.push(['slc index', () => {
      index.build(fwd.blockIndices, this.itemEntries);
      itemOrder = programs.tuning.slcBwdOrder === 'key' ? undefined : index.orderItems(this.itemEntries);
    }]);
    // Work items of up to itemEntries (token, slot) pairs per block, partial sums reduced in item order. With
    // phi = mean and the selected branch on the shared k, v, the reduce also adds the mean's backward (one read and
    // write of dk, dv fewer); there is then no 'compress' stage.
    const meanInReduce = inputs.kCmp === undefined && plan.totalCompressed > 0 && phi === undefined && inputs.kSlc === undefined;
    const subs = Math.ceil(config.selectBlock / TILE);
    const itemUpperBound = index.itemUpperBound(this.itemEntries);
    stages.push(['slc dkdv', () => {
      const partial = this.partial;
      const pv = partial.ptr + BigInt(itemUpperBound * subs * TILE * config.headDim * 4);
      programs.selectedBackward('dkdv', fused).launch({
        grid: [itemUpperBound, subs, 1],
        block: [programs.selectedBackwardThreads('dkdv'), 1, 1],
        sharedBytes: programs.selectedBackwardSharedBytes('dkdv', fused),
        args: [
          ptr(inputs.q), ptr(kSlc), ptr(vSlc), ptr(dOut), ptr(fwd.lseSlc), ptr(inputs.gate), ptr(this.delta),
          ptr(index.offsets), ptr(index.itemOffsets), ptr(itemOrder), ptr(index.entries), ptr(tables.blockSeq), ptr(tables.cuBlocks),
          ptr(tables.cuSeqlens), { ptr: partial.ptr }, { ptr: pv }, ptr(this.partialQ), ...common, { i32: plan.totalBlocks },
          { i32: this.itemEntries }, { f32: scaleLog2 }, { f32: config.scale },
          ...programs.selectedBackwardTensorMaps(inputs.q.ptr, dOut.ptr, N),
        ],
      });
      programs.selectedBackward('reduce', fused, meanInReduce).launch({
        grid: [N * H, 1, 1],
        block: [128, 1, 1],
        args: [
          { ptr: partial.ptr }, { ptr: pv }, ptr(index.itemOffsets), ptr(tables.rowSeq), ptr(tables.cuSeqlens), ptr(tables.cuBlocks),
          ptr(grads.dkSlc ?? grads.dk), ptr(grads.dvSlc ?? grads.dv), { i32: H }, { i32: plan.totalBlocks }, { i32: subs },
          ...(meanInReduce ? [ptr(grads.dkc), ptr(grads.dvc), ptr(tables.cuCmp)] : [NULL, NULL, NULL]),
        ],
      });
    }]);
    if (partsInCmpWinDq && cmpWinDq !== undefined) stages.push(cmpWinDq);
    else if (fused) stages.push(slcDq);

    this.pushCompress(stages, inputs, grads, phi, meanInReduce);
    return { stages, stored };
  }

  /**
   * The selected branch's backward where the forward computed it as dense attention (every visible block
   * selected): dQ, then dK/dV, by the flash backward's dense mode with the slc gate and delta (branch 1).
   */
  private pushDenseSelected(
    stages: [BackwardStage, () => void][],
    tiles: DenseTiles,
    inputs: DeviceNsaInputs,
    fwd: DeviceNsaOutputs,
    dOut: DeviceBuffer,
    grads: DeviceNsaGradients,
    kSlc: DeviceBuffer,
    vSlc: DeviceBuffer,
    accumulateInto: (buffers: DeviceBuffer[]) => KernelArg,
  ): void {
    const { programs, forward } = this;
    const config = programs.config;
    const { heads: Hq, kvHeads: H } = config;
    const N = forward.plan.totalTokens;
    const cu = forward.deviceTables.cuSeqlens;
    // Both passes take the same operands first (the slc branch's lse and delta) and the same scalars after their tiles.
    const operands = [ptr(inputs.q), ptr(kSlc), ptr(vSlc), ptr(dOut), ptr(fwd.lseSlc), ptr(inputs.gate), ptr(this.delta)];
    const tail = [{ i32: Hq }, { i32: H }, { i32: 1 }, { f32: config.scale * Math.LOG2E }, { f32: config.scale }];
    const dqAccumulate = accumulateInto([grads.dq]);
    const dqMaps = programs.flashBackwardTensorMaps('dq', 0, inputs.q.ptr, dOut.ptr, N, [{ k: kSlc.ptr, v: vSlc.ptr, rows: N }]);
    // The dense mode (0) of the flash backward's dQ or dK/dV pass over the given grid.
    const launch = (pass: 'dq' | 'dkdv', grid: [number, number, number], args: KernelArg[]): void =>
      programs.flashBackward(0, pass).launch({
        grid,
        block: [programs.flashBackwardThreads(pass, 0), 1, 1],
        sharedBytes: programs.flashBackwardSharedBytes(pass, 0),
        args,
      });
    stages.push(['slc dq', () =>
      launch('dq', [tiles.queryCount, Hq, 1], [...operands, ptr(grads.dq), ptr(cu), ptr(cu), ptr(tiles.queries), ...tail, dqAccumulate, ...dqMaps])]);
    const dk = grads.dkSlc ?? grads.dk;
    const dv = grads.dvSlc ?? grads.dv;
    const dkdvAccumulate = accumulateInto([dk, dv]);
    const dkdvMaps = programs.flashBackwardTensorMaps('dkdv', 0, inputs.q.ptr, dOut.ptr, N);
    stages.push(['slc dkdv', () =>
      launch('dkdv', [tiles.keyCount, H, 1], [
        ...operands, ptr(dk), ptr(dv), ptr(cu), ptr(cu), ptr(tiles.keys), ...tail, dkdvAccumulate, NULL, NULL, { i64: N * H }, ...dkdvMaps,
      ])]);
  }

  /**
   * dKc, dVc back onto the shared k, v: through a learned phi's products, or phi = mean's spread over the blocks
   * unless the selected branch's reduce added it already (`meanDone`). Given compressed K/V keep their own gradients.
   */
  private pushCompress(
    stages: [BackwardStage, () => void][],
    inputs: DeviceNsaInputs,
    grads: DeviceNsaGradients,
    phi: ForwardRunner['phi'],
    meanDone: boolean,
  ): void {
    const { programs, forward } = this;
    const { plan } = forward;
    const config = programs.config;
    const H = config.kvHeads;
    const N = plan.totalTokens;
    const tables = forward.deviceTables;
    if (inputs.kCmp === undefined && plan.totalCompressed > 0 && phi !== undefined) {
      const { phiK, phiV } = inputs;
      const { dPhiK, dPhiV } = grads;
      if (phiK === undefined || phiV === undefined || dPhiK === undefined || dPhiV === undefined) {
        throw new TypeError(`phi = ${config.phi}: the backward needs phi's parameters and their gradient buffers`);
      }
      stages.push(['compress', () => {
        phi.backward('k', inputs.k, phiK, grads.dkc, grads.dk, dPhiK);
        phi.backward('v', inputs.v, phiV, grads.dvc, grads.dv, dPhiV);
      }]);
    } else if (inputs.kCmp === undefined && plan.totalCompressed > 0 && !meanDone) {
      stages.push(['compress', () =>
        programs.compressMeanBackward.launch({
          grid: [N, H, 1],
          block: [128, 1, 1],
          args: [ptr(grads.dkc), ptr(grads.dvc), ptr(grads.dk), ptr(grads.dv), ptr(tables.rowSeq), ptr(tables.cuSeqlens), ptr(tables.cuCmp), { i32: H }],
        })]);
    }
  }

  dispose(): void {
    for (const b of this.buffers) b.dispose();
    this.buffers.length = 0;
    if ('index' in this.slc) this.slc.index.dispose();
    this.forward.phi?.freeBackwardScratch();
  }

  private keep(b: DeviceBuffer): DeviceBuffer {
    this.buffers.push(b);
    return b;
  }
}

/** (sequence, start) pairs of tiles of `size` rows of each sequence under the offsets `cu`. */
function tileList(cu: readonly number[], size: number, order: 'latest first' | 'earliest first'): Int32Array {
  const list: [number, number][] = [];
  for (let s = 0; s + 1 < cu.length; s++) {
    for (let start = 0; start < cu[s + 1]! - cu[s]!; start += size) list.push([s, start]);
  }
  list.sort((a, b) => (order === 'latest first' ? b[1] - a[1] : a[1] - b[1]) || a[0] - b[0]);
  return Int32Array.from(list.flat());
}
