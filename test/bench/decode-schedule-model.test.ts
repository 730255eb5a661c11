// bench/decode-schedule-model.mjs on a hand-made trace whose schedule can be worked out on paper: one (query, KV
// head) pair with two cmp items, one win item and one slc item, replayed through two CTA slots.

import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const SCRIPT = fileURLToPath(new URL('../../bench/decode-schedule-model.mjs', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'nsa-schedule-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const record = (kind: string, start: number, waited: number, attended: number, end: number, selected = false, merged = false) => ({
  kind,
  start: start * 1000,
  waited: waited * 1000,
  attended: attended * 1000,
  end: end * 1000,
  selected,
  merged,
  sm: 0,
});

/**
 * Two slots: cmp 0 attends 0-10 us (then a 1 us epilogue), cmp 1 0-20 us and selects for 6 us (to 26); the freed
 * slot takes the win item at 11 (5 us, epilogue to 17) and then the slc item, which waits for the select (26) and
 * attends 4 us; the row's last item merges for 3 us: 33 us.
 */
const trace = {
  preset: 'paper',
  B: 1,
  S: 4096,
  records: [
    record('cmp', 0, 0, 10, 11),
    record('cmp', 0, 0, 20, 26, true),
    record('win', 11, 0, 16, 17),
    record('slc', 17, 26, 30, 33, false, true),
  ],
};

function model(records: unknown): string {
  const file = join(dir, `trace-${Math.random().toString(36).slice(2)}.json`);
  writeFileSync(file, JSON.stringify(records));
  return execFileSync('node', [SCRIPT, file, '--slots', '2'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

describe('decode-schedule-model', () => {
  it('replays the hand-made trace to its worked-out span, and shortens it where the chain shortens', () => {
    const out = model(trace);
    expect(out).toContain('traced step 33.0 us, modelled 33.0 us');
    expect(out).toMatch(/selects x 0 +27\.0 us/); // slc 20 + 4, merge + 3
    expect(out).toMatch(/merges x 0 +30\.0 us/);
    expect(out).toMatch(/selects x 0\.5 +30\.0 us/);
  });

  it('refuses a trace that is not in the default ticket order', () => {
    const shuffled = { ...trace, records: [trace.records[2], trace.records[0], trace.records[1], trace.records[3]] };
    expect(() => model(shuffled)).toThrow(/default ticket order/);
  });
});
