// How many keys a query attends in each branch, averaged over every query (and KV head for the selection),
// against full causal attention, which attends t + 1 keys at position t.

import type { NSAConfig } from '../config/nsa-config.js';
import { visibleCompressed } from '../reference/layout.js';

export interface KeysSummary {
  readonly queries: number;
  /** Mean visible compressed tokens. */
  readonly cmp: number;
  /** Mean keys of the selected blocks after the causal clip. */
  readonly slc: number;
  /** Mean window keys. */
  readonly win: number;
  readonly total: number;
  /** Mean keys of full causal attention ((T + 1) / 2 for one sequence). */
  readonly full: number;
}

/** `blockIndices` is [N, H, n] (packed rows), as the operator returns it. */
export function keysPerBranch(config: NSAConfig, cuSeqlens: readonly number[], blockIndices: Int32Array): KeysSummary {
  const { kvHeads: H, selectCount: n, selectBlock: ls, window: w } = config;
  let cmp = 0;
  let slc = 0;
  let win = 0;
  let full = 0;
  let queries = 0;
  for (let s = 0; s + 1 < cuSeqlens.length; s++) {
    const start = cuSeqlens[s]!;
    const length = cuSeqlens[s + 1]! - start;
    const cLength = config.compressedLength(length);
    for (let t = 0; t < length; t++) {
      cmp += visibleCompressed(config, t, cLength);
      win += Math.min(w, t + 1);
      full += t + 1;
      const base = (start + t) * H * n;
      let selected = 0;
      for (let i = 0; i < H * n; i++) {
        const j = blockIndices[base + i]!;
        if (j >= 0) selected += Math.max(0, Math.min((j + 1) * ls, t + 1) - j * ls);
      }
      slc += selected / H;
      queries++;
    }
  }
  const mean = (x: number): number => (queries === 0 ? 0 : x / queries);
  return { queries, cmp: mean(cmp), slc: mean(slc), win: mean(win), total: mean(cmp + slc + win), full: mean(full) };
}
