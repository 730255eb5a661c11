// The whole NSA forward in plain TypeScript with double accumulation: compress -> cmp attention (+lse) ->
// block scores -> top-n -> selected attention -> window attention -> gated sum. It is the oracle every backend is
// checked against, and the CPU backend runs it (split over rows across worker threads).
//
// Layout (packed): q [N, Hq, Dk], k [N, H, Dk], v [N, H, Dv], g [N, Hq, 3] (cmp, slc, win), compressed
// [Nc, H, D]. Query head hq uses KV head floor(hq / G).

import type { NSAConfig } from '../config/nsa-config.js';
import { attendForward, KeyRanges, ScoreScratch, type AttentionOperands } from './attention.js';
import { compressForward, type PhiParams } from './compress.js';
import { packedLayout, visibleCompressed, type FloatArray, type PackedLayout, type SequenceSpan } from './layout.js';
import { accumulateBlockScores, candidateBlocks, selectTopBlocks } from './selection.js';

export interface NsaReferenceInputs {
  readonly q: FloatArray;
  readonly k: FloatArray;
  readonly v: FloatArray;
  readonly g: FloatArray;
  /** Sequence offsets [0, ..., N]. */
  readonly cuSeqlens: readonly number[];
  /** Compressed keys/values given directly [Nc, H, D] (replacing phi). */
  readonly kCmp?: FloatArray | undefined;
  readonly vCmp?: FloatArray | undefined;
  /** Independent raw keys/values for the selected and window branches [N, H, D]. */
  readonly kSlc?: FloatArray | undefined;
  readonly vSlc?: FloatArray | undefined;
  readonly kWin?: FloatArray | undefined;
  readonly vWin?: FloatArray | undefined;
  /** Parameters of a learned phi (config.phi linear or mlp), for keys and for values. */
  readonly phiK?: PhiParams | undefined;
  readonly phiV?: PhiParams | undefined;
}

export interface NsaReferenceOutputs {
  /** [N, Hq, Dv]: the gated sum, and each branch's ungated output. */
  readonly o: Float64Array;
  readonly oCmp: Float64Array;
  readonly oSlc: Float64Array;
  readonly oWin: Float64Array;
  /** [N, Hq]: natural-log sum of exp(scores) per branch; -Infinity where a branch sees no key. */
  readonly lseCmp: Float64Array;
  readonly lseSlc: Float64Array;
  readonly lseWin: Float64Array;
  /** [N, H, n]: selected blocks, ascending, -1 padded. */
  readonly blockIndices: Int32Array;
}

/** Everything the rows of a forward or backward share: the config, the layout and the compressed K/V. */
export interface NsaProblem {
  readonly config: NSAConfig;
  readonly layout: PackedLayout;
  readonly inputs: NsaReferenceInputs;
  /** [Nc, H, Dk] and [Nc, H, Dv]: the compressed keys/values the cmp branch attends. */
  readonly kc: FloatArray;
  readonly vc: FloatArray;
  /**
   * [N, H, n]: a selection to use instead of top-n (to check a kernel's attention given the blocks it chose,
   * independently of near-tie flips in its choice).
   */
  readonly fixedBlockIndices?: Int32Array | undefined;
}

export function prepareNsaProblem(
  config: NSAConfig,
  inputs: NsaReferenceInputs,
  fixedBlockIndices?: Int32Array,
): NsaProblem {
  const layout = packedLayout(config, inputs.cuSeqlens);
  const kc = inputs.kCmp ?? compressForward(config, layout, inputs.k, config.headDim, inputs.phiK);
  const vc = inputs.vCmp ?? compressForward(config, layout, inputs.v, config.valueDim, inputs.phiV);
  return { config, layout, inputs, kc, vc, fixedBlockIndices };
}

/** Zeroed outputs; on SharedArrayBuffers when worker threads will write them. */
export function allocateOutputs(
  layout: Pick<PackedLayout, 'totalTokens' | 'heads' | 'kvHeads' | 'dv'>,
  selectCount: number,
  shared = false,
): NsaReferenceOutputs {
  const { totalTokens: N, heads: Hq, kvHeads: H, dv } = layout;
  const buffer = (bytes: number): ArrayBuffer | SharedArrayBuffer => (shared ? new SharedArrayBuffer(bytes) : new ArrayBuffer(bytes));
  const f64 = (n: number): Float64Array => new Float64Array(buffer(n * 8));
  return {
    o: f64(N * Hq * dv),
    oCmp: f64(N * Hq * dv),
    oSlc: f64(N * Hq * dv),
    oWin: f64(N * Hq * dv),
    lseCmp: f64(N * Hq),
    lseSlc: f64(N * Hq),
    lseWin: f64(N * Hq),
    blockIndices: new Int32Array(buffer(N * H * selectCount * 4)),
  };
}

/** The reference forward over all rows (with a given selection instead of top-n, when passed). */
export function nsaReferenceForward(
  config: NSAConfig,
  inputs: NsaReferenceInputs,
  fixedBlockIndices?: Int32Array,
): NsaReferenceOutputs {
  const problem = prepareNsaProblem(config, inputs, fixedBlockIndices);
  const out = allocateOutputs(problem.layout, config.selectCount);
  forwardRows(problem, 0, problem.layout.totalTokens, out);
  return out;
}

/** Computes the outputs of packed rows [rowStart, rowEnd) into `out` (other rows untouched). */
export function forwardRows(problem: NsaProblem, rowStart: number, rowEnd: number, out: NsaReferenceOutputs): void {
  const { config, layout, inputs } = problem;
  const query = new QueryEvaluator(config, branchOperands(problem), layout.totalCompressed, maxLength(layout));
  forEachRow(layout, rowStart, rowEnd, (seq, row, t) => {
    query.evaluate(seq, t, inputs.q, inputs.g, row, out, row, problem.fixedBlockIndices);
  });
}

/**
 * The whole operator for one query position: cmp attention (+ its probabilities summed into block scores), top-n,
 * selected and window attention, the gated sum. Shared by the forward (query row = output row = token) and the
 * decode step (queries against a cache). Scratch buffers live here, so evaluating a row allocates nothing.
 */
export class QueryEvaluator {
  private readonly keys: BranchKeys;
  private readonly scratch = new ScoreScratch();
  private readonly probs: Float64Array;
  private readonly scores: Float64Array;

  constructor(
    private readonly config: NSAConfig,
    private readonly ops: { cmp: AttentionOperands; slc: AttentionOperands; win: AttentionOperands },
    maxCompressed: number,
    maxLength: number,
  ) {
    this.keys = new BranchKeys(config);
    this.probs = new Float64Array(Math.max(1, maxCompressed));
    this.scores = new Float64Array(config.selectBlockCount(Math.max(1, maxLength)) + 1);
  }

  /**
   * Outputs of the query at local position t of `seq` (rows of q and g: qRow) into out's row outRow; uses
   * fixedBlocks' row (outRow) instead of top-n when given.
   */
  evaluate(
    seq: SequenceSpan,
    t: number,
    q: FloatArray,
    g: FloatArray,
    qRow: number,
    out: NsaReferenceOutputs,
    outRow: number,
    fixedBlocks?: Int32Array,
  ): void {
    const { config, keys, ops, scratch, probs, scores } = this;
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n } = config;
    const G = config.groupSize;
    for (let h = 0; h < H; h++) {
      // cmp attention for the G heads of the group; keep their probabilities for the block scores.
      const visible = keys.fillCompressed(seq, t);
      scores.fill(0, 0, candidateBlocks(config, t));
      for (let gi = 0; gi < G; gi++) {
        const hq = h * G + gi;
        const oo = (outRow * Hq + hq) * dv;
        const lse = attendForward(ops.cmp, q, (qRow * Hq + hq) * dk, h, keys.cmp, out.oCmp, oo, scratch);
        out.lseCmp[outRow * Hq + hq] = lse;
        for (let i = 0; i < visible; i++) probs[i] = Math.exp(scratch.buffer[i]! - lse);
        accumulateBlockScores(config, probs, visible, scores);
      }
      const bo = (outRow * H + h) * n;
      if (fixedBlocks === undefined) selectTopBlocks(config, t, scores, out.blockIndices, bo);
      else out.blockIndices.set(fixedBlocks.subarray(bo, bo + n), bo);
      keys.fillSelected(seq, t, out.blockIndices, bo);
      for (let gi = 0; gi < G; gi++) {
        const hq = h * G + gi;
        const oo = (outRow * Hq + hq) * dv;
        out.lseSlc[outRow * Hq + hq] = attendForward(ops.slc, q, (qRow * Hq + hq) * dk, h, keys.slc, out.oSlc, oo, scratch);
      }
      keys.fillWindow(seq, t);
      for (let gi = 0; gi < G; gi++) {
        const hq = h * G + gi;
        const oo = (outRow * Hq + hq) * dv;
        out.lseWin[outRow * Hq + hq] = attendForward(ops.win, q, (qRow * Hq + hq) * dk, h, keys.win, out.oWin, oo, scratch);
        const go = (qRow * Hq + hq) * 3;
        const gc = g[go]!;
        const gs = g[go + 1]!;
        const gw = g[go + 2]!;
        for (let c = 0; c < dv; c++) {
          out.o[oo + c] = gc * out.oCmp[oo + c]! + gs * out.oSlc[oo + c]! + gw * out.oWin[oo + c]!;
        }
      }
    }
  }
}

/**
 * The selection-block scores of the query at packed row `row` for KV head h (the GQA-summed, overlap-mapped cmp
 * probabilities top-n ranks), one per candidate block. For checking a kernel's choice by scores. The query's heads
 * come from q at row qRow (by default the problem's own q at `row`; a test past host-sized inputs passes its rows).
 */
export function blockScoresAt(problem: NsaProblem, row: number, h: number, q: FloatArray = problem.inputs.q, qRow = row): Float64Array {
  const { config, layout } = problem;
  const seq = layout.sequences.find((s) => row >= s.start && row < s.start + s.length)!;
  const t = row - seq.start;
  const keys = new BranchKeys(config);
  const visible = keys.fillCompressed(seq, t);
  const scores = new Float64Array(candidateBlocks(config, t));
  const probs = new Float64Array(Math.max(1, visible));
  const scratch = new ScoreScratch();
  const ops = branchOperands(problem).cmp;
  const o = new Float64Array(config.valueDim);
  for (let gi = 0; gi < layout.group; gi++) {
    const qo = (qRow * layout.heads + h * layout.group + gi) * layout.dk;
    const lse = attendForward(ops, q, qo, h, keys.cmp, o, 0, scratch);
    for (let i = 0; i < visible; i++) probs[i] = Math.exp(scratch.buffer[i]! - lse);
    accumulateBlockScores(config, probs, visible, scores);
  }
  return scores;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared with the backward

/** The operands of the three branches: compressed K/V for cmp, each branch's raw K/V for slc and win. */
export function branchOperands(problem: NsaProblem): {
  cmp: AttentionOperands;
  slc: AttentionOperands;
  win: AttentionOperands;
} {
  const { config, inputs, kc, vc } = problem;
  const base = { kvHeads: config.kvHeads, dk: config.headDim, dv: config.valueDim, scale: config.scale };
  return {
    cmp: { ...base, keys: kc, values: vc },
    slc: { ...base, keys: inputs.kSlc ?? inputs.k, values: inputs.vSlc ?? inputs.v },
    win: { ...base, keys: inputs.kWin ?? inputs.k, values: inputs.vWin ?? inputs.v },
  };
}

/** Fills the key ranges (absolute rows) of each branch for a query at local position t of a sequence. */
export class BranchKeys {
  readonly cmp = new KeyRanges(1);
  readonly slc: KeyRanges;
  readonly win = new KeyRanges(1);
  private readonly config: NSAConfig;

  constructor(config: NSAConfig) {
    this.config = config;
    this.slc = new KeyRanges(config.selectCount);
  }

  /** cmp: the visible compressed rows [cStart, cStart + visible); returns how many. */
  fillCompressed(seq: SequenceSpan, t: number): number {
    const visible = visibleCompressed(this.config, t, seq.cLength);
    this.cmp.clear().push(seq.cStart, seq.cStart + visible);
    return visible;
  }

  /** slc: the rows of the selected blocks in blocks[bo .. bo + n), the block holding t cut at t. */
  fillSelected(seq: SequenceSpan, t: number, blocks: Int32Array, bo: number): void {
    const ls = this.config.selectBlock;
    this.slc.clear();
    for (let i = 0; i < this.config.selectCount; i++) {
      const j = blocks[bo + i]!;
      if (j < 0) break;
      this.slc.push(seq.start + j * ls, seq.start + Math.min((j + 1) * ls, t + 1));
    }
  }

  /** win: rows (t - w, t]. */
  fillWindow(seq: SequenceSpan, t: number): void {
    this.win.clear().push(seq.start + Math.max(0, t - this.config.window + 1), seq.start + t + 1);
  }
}

/** Calls fn(sequence, packed row, local position) for every row in [rowStart, rowEnd). */
export function forEachRow(
  layout: PackedLayout,
  rowStart: number,
  rowEnd: number,
  fn: (seq: SequenceSpan, row: number, t: number) => void,
): void {
  for (const seq of layout.sequences) {
    const a = Math.max(rowStart, seq.start);
    const b = Math.min(rowEnd, seq.start + seq.length);
    for (let row = a; row < b; row++) fn(seq, row, row - seq.start);
  }
}

function maxLength(layout: PackedLayout): number {
  let m = 0;
  for (const s of layout.sequences) m = Math.max(m, s.length);
  return m;
}
