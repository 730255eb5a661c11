// Where each packed sequence lives: its raw tokens [start, start + length) and its compressed tokens
// [cStart, cStart + cLength) (complete compression blocks only, concatenated in sequence order).

import type { NSAConfig } from '../config/nsa-config.js';

/** Float storage the reference reads: f32 from the CPU backend, f64 from tests. */
export type FloatArray = Float32Array | Float64Array;

export interface SequenceSpan {
  readonly start: number;
  readonly length: number;
  readonly cStart: number;
  readonly cLength: number;
}

export interface PackedLayout {
  readonly sequences: readonly SequenceSpan[];
  /** N: all tokens. */
  readonly totalTokens: number;
  /** All compressed tokens of all sequences. */
  readonly totalCompressed: number;
  /** Hq, H, G, Dk, Dv of the head layout. */
  readonly heads: number;
  readonly kvHeads: number;
  readonly group: number;
  readonly dk: number;
  readonly dv: number;
}

/** The layout of packed sequences given by offsets `cuSeqlens` (already validated: 0, increasing, ends at N). */
export function packedLayout(config: NSAConfig, cuSeqlens: readonly number[]): PackedLayout {
  const sequences: SequenceSpan[] = [];
  let cStart = 0;
  for (let b = 0; b + 1 < cuSeqlens.length; b++) {
    const start = cuSeqlens[b]!;
    const length = cuSeqlens[b + 1]! - start;
    const cLength = config.compressedLength(length);
    sequences.push({ start, length, cStart, cLength });
    cStart += cLength;
  }
  return {
    sequences,
    totalTokens: cuSeqlens[cuSeqlens.length - 1] ?? 0,
    totalCompressed: cStart,
    heads: config.heads,
    kvHeads: config.kvHeads,
    group: config.groupSize,
    dk: config.headDim,
    dv: config.valueDim,
  };
}

/** Offsets [0, T, 2T, ..., B*T] of B sequences of equal length T. */
export function uniformCuSeqlens(batch: number, length: number): number[] {
  return Array.from({ length: batch + 1 }, (_, b) => b * length);
}

/** Compressed blocks visible at local position t: block i is visible iff i*d + l - 1 <= t. */
export function visibleCompressed(config: NSAConfig, t: number, cLength: number): number {
  const l = config.compressBlock;
  if (t < l - 1) return 0;
  return Math.min(cLength, Math.floor((t - l + 1) / config.compressStride) + 1);
}
