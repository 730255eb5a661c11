// Softmax attention of one query row over a set of key rows given as half-open ranges, forward (output and
// log-sum-exp) and backward. All three branches reduce to this with their own key sets:
//   cmp: compressed rows [0, visible)   slc: the selected blocks, clipped at t   win: (t - w, t]
// Rows index a [rows, H, D] array; `h` picks the KV head. Accumulation is in doubles.

import type { FloatArray } from './layout.js';

/** Key rows as half-open ranges [starts[i], ends[i]), i < count. */
export class KeyRanges {
  readonly starts: Int32Array;
  readonly ends: Int32Array;
  count = 0;
  constructor(capacity: number) {
    this.starts = new Int32Array(capacity);
    this.ends = new Int32Array(capacity);
  }
  clear(): this {
    this.count = 0;
    return this;
  }
  /** Adds [start, end) when non-empty, merging with the previous range when they touch. */
  push(start: number, end: number): this {
    if (end <= start) return this;
    if (this.count > 0 && this.ends[this.count - 1] === start) this.ends[this.count - 1] = end;
    else {
      this.starts[this.count] = start;
      this.ends[this.count] = end;
      this.count++;
    }
    return this;
  }
  get keyCount(): number {
    let n = 0;
    for (let i = 0; i < this.count; i++) n += this.ends[i]! - this.starts[i]!;
    return n;
  }
}

/** Where the operands of one attention live. */
export interface AttentionOperands {
  readonly keys: FloatArray;
  readonly values: FloatArray;
  /** H of the keys/values arrays. */
  readonly kvHeads: number;
  readonly dk: number;
  readonly dv: number;
  readonly scale: number;
}

/** A growable scratch for one row of scores. */
export class ScoreScratch {
  buffer = new Float64Array(256);
  ensure(n: number): Float64Array {
    if (this.buffer.length < n) this.buffer = new Float64Array(Math.max(n, this.buffer.length * 2));
    return this.buffer;
  }
}

/**
 * out[oo .. oo + Dv) = softmax(scale * q . K^T) V over the key rows of `ranges` for KV head h; returns the lse
 * (natural log of the sum of exp(scale * q . k)). An empty key set gives a zero output and -Infinity.
 */
export function attendForward(
  ops: AttentionOperands,
  q: FloatArray,
  qo: number,
  h: number,
  ranges: KeyRanges,
  out: Float64Array,
  oo: number,
  scratch: ScoreScratch,
): number {
  const { keys, values, kvHeads: H, dk, dv, scale } = ops;
  const scores = scratch.ensure(ranges.keyCount);
  let n = 0;
  let max = -Infinity;
  for (let r = 0; r < ranges.count; r++) {
    for (let j = ranges.starts[r]!; j < ranges.ends[r]!; j++) {
      const ko = (j * H + h) * dk;
      let s = 0;
      for (let c = 0; c < dk; c++) s += q[qo + c]! * keys[ko + c]!;
      s *= scale;
      scores[n++] = s;
      if (s > max) max = s;
    }
  }
  for (let c = 0; c < dv; c++) out[oo + c] = 0;
  if (n === 0) return -Infinity;
  let sum = 0;
  n = 0;
  for (let r = 0; r < ranges.count; r++) {
    for (let j = ranges.starts[r]!; j < ranges.ends[r]!; j++) {
      const p = Math.exp(scores[n++]! - max);
      sum += p;
      const vo = (j * H + h) * dv;
      for (let c = 0; c < dv; c++) out[oo + c]! += p * values[vo + c]!;
    }
  }
  const inv = 1 / sum;
  for (let c = 0; c < dv; c++) out[oo + c]! *= inv;
  return max + Math.log(sum);
}

/** Where the gradients of one attention go (all accumulated with +=). */
export interface AttentionGradients {
  readonly dq: Float64Array;
  readonly dKeys: Float64Array;
  readonly dValues: Float64Array;
}

/**
 * Backward of attendForward for one query row, given its lse, the upstream gradient dOut of its output and
 * delta = dOut . out. Adds into grads.dq[dqo ..], grads.dKeys and grads.dValues.
 */
export function attendBackward(
  ops: AttentionOperands,
  q: FloatArray,
  qo: number,
  h: number,
  ranges: KeyRanges,
  lse: number,
  dOut: Float64Array,
  doo: number,
  delta: number,
  grads: AttentionGradients,
  dqo: number,
): void {
  if (lse === -Infinity) return;
  const { keys, values, kvHeads: H, dk, dv, scale } = ops;
  const { dq, dKeys, dValues } = grads;
  for (let r = 0; r < ranges.count; r++) {
    for (let j = ranges.starts[r]!; j < ranges.ends[r]!; j++) {
      const ko = (j * H + h) * dk;
      const vo = (j * H + h) * dv;
      let s = 0;
      for (let c = 0; c < dk; c++) s += q[qo + c]! * keys[ko + c]!;
      const p = Math.exp(s * scale - lse);
      let dp = 0;
      for (let c = 0; c < dv; c++) {
        const g = dOut[doo + c]!;
        dp += g * values[vo + c]!;
        dValues[vo + c]! += p * g;
      }
      const ds = p * (dp - delta) * scale;
      for (let c = 0; c < dk; c++) {
        dq[dqo + c]! += ds * keys[ko + c]!;
        dKeys[ko + c]! += ds * q[qo + c]!;
      }
    }
  }
}
