// A kernel's top-n choice for one query row, checked against the reference's: near ties may flip in half
// precision, so a choice that differs must be valid and within 1% of the reference choice's score.
import { expect } from 'vitest';
import { blockScoresAt, type NsaProblem } from '../../src/reference/nsa-forward.js';

/**
 * Checks the blocks chosen for packed row `row` of `problem`: its choices sit at row qRow of `gpu` and of the
 * reference's `expected` ([rows, H, n], -1 padded) and its query heads at row qRow of problem.inputs.q. The choice
 * must be ascending, distinct, hold nothing past the row's own block and hold the forced blocks; where it differs
 * from the reference's, its blocks' reference scores must sum to within 1% of the reference choice's. Returns for
 * how many KV heads it differs.
 */
export function checkRowSelection(problem: NsaProblem, row: number, qRow: number, gpu: Int32Array, expected: Int32Array): number {
  const { config, layout } = problem;
  const { kvHeads: H, selectCount: n, selectBlock: ls } = config;
  const seq = layout.sequences.find((s) => row >= s.start && row < s.start + s.length)!;
  const t = row - seq.start;
  let differing = 0;
  for (let h = 0; h < H; h++) {
    const o = (qRow * H + h) * n;
    const got = Array.from(gpu.subarray(o, o + n)).filter((j) => j >= 0);
    const want = Array.from(expected.subarray(o, o + n)).filter((j) => j >= 0);
    const where = `row ${row} (t = ${t}), head ${h}: got [${got}], reference [${want}]`;
    expect(got.length, where).toBe(want.length);
    for (let i = 1; i < got.length; i++) expect(got[i]! > got[i - 1]!, `${where}: ascending and distinct`).toBe(true);
    const current = Math.floor(t / ls);
    for (const j of got) expect(j <= current, `${where}: no future block`).toBe(true);
    for (const forced of [0, current - 1, current].filter((j) => j >= 0).slice(0, n)) {
      expect(got.includes(forced), `${where}: forced block ${forced}`).toBe(true);
    }
    if (got.join() === want.join()) continue;
    differing++;
    const scores = blockScoresAt(problem, row, h, problem.inputs.q, qRow);
    const sum = (js: number[]): number => js.reduce((s, j) => s + scores[j]!, 0);
    const deficit = sum(want) - sum(got);
    expect(deficit, `${where}: score deficit ${deficit} of ${sum(want)}`).toBeLessThanOrEqual(1e-2 * Math.max(sum(want), 1e-6));
  }
  return differing;
}
