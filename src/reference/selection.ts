// Selection: compressed-attention probabilities -> selection-block scores -> top-n blocks.
//   p_slc[j] = sum over compressed blocks i overlapping selection block j of p_cmp[i] * overlap(i, j) / d,
//   summed over the G query heads of a group (one selection per KV head). Forced blocks (0, the block holding t
//   and the one before it) rank above all others; ties go to the lower index; only blocks with j*l' <= t compete.

import type { NSAConfig } from '../config/nsa-config.js';

/**
 * Adds the selection-block scores implied by one head's compressed probabilities p[0 .. visible) into
 * scores[j]. The caller zeroes `scores` for the candidate blocks first and calls this once per head of a group.
 */
export function accumulateBlockScores(
  config: NSAConfig,
  p: Float64Array,
  visible: number,
  scores: Float64Array,
): void {
  const { compressBlock: l, compressStride: d, selectBlock: ls } = config;
  for (let i = 0; i < visible; i++) {
    const start = i * d;
    const end = start + l;
    const pi = p[i]!;
    for (let j = Math.floor(start / ls); j * ls < end; j++) {
      const overlap = Math.min(end, (j + 1) * ls) - Math.max(start, j * ls);
      scores[j]! += (pi * overlap) / d;
    }
  }
}

/** Selection blocks that may be chosen at local position t: j with j*l' <= t. */
export function candidateBlocks(config: NSAConfig, t: number): number {
  return Math.floor(t / config.selectBlock) + 1;
}

/**
 * Writes the n selected blocks of a query at local position t into out[oo .. oo + n), ascending and padded
 * with -1; returns how many were selected. `scores` holds one score per candidate block.
 */
export function selectTopBlocks(
  config: NSAConfig,
  t: number,
  scores: Float64Array,
  out: Int32Array,
  oo: number,
): number {
  const n = config.selectCount;
  const candidates = candidateBlocks(config, t);
  const current = candidates - 1;
  let count = 0;
  // Forced blocks first, lowest index first: 0, current - 1, current (distinct ones only).
  let previous = -1;
  for (const j of [0, current - 1, current]) {
    if (count === n) break;
    if (j <= previous) continue; // current - 1 < 0, or a block already forced
    out[oo + count++] = j;
    previous = j;
  }
  const forcedCount = count;
  // The rest (1 .. current - 2) by score, descending; scanning j upward keeps the lower index ahead on ties.
  for (let j = 1; j < current - 1; j++) count = insertByScore(scores, out, oo, forcedCount, count, n, j);
  sortAscending(out, oo, count);
  for (let i = count; i < n; i++) out[oo + i] = -1;
  return count;
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

/** Inserts candidate j into the list out[oo + from .. oo + count) kept in (score desc, index asc) order. */
function insertByScore(
  scores: Float64Array,
  out: Int32Array,
  oo: number,
  from: number,
  count: number,
  n: number,
  j: number,
): number {
  const s = scores[j]!;
  let pos = count;
  // Strictly greater moves ahead: an equal score keeps the earlier (lower) index in front.
  while (pos > from && scores[out[oo + pos - 1]!]! < s) pos--;
  if (pos >= n) return count;
  const last = Math.min(count, n - 1);
  for (let i = last; i > pos; i--) out[oo + i] = out[oo + i - 1]!;
  out[oo + pos] = j;
  return Math.min(count + 1, n);
}

function sortAscending(out: Int32Array, oo: number, count: number): void {
  for (let i = oo + 1; i < oo + count; i++) {
    const v = out[i]!;
    let k = i - 1;
    while (k >= oo && out[k]! > v) {
      out[k + 1] = out[k]!;
      k--;
    }
    out[k + 1] = v;
  }
}
