// A model of the fused decode step's schedule, driven by a traced step (`node bench/cuda-decode.mjs --trace-json
// <dir>`): each work item keeps the attention time the trace measured, selects, merges and item epilogues take the
// trace's mean (median for epilogues), and the resident CTA slots take tickets in order as they free, as the kernel
// does; slc items wait for their pair's select, the last win/slc item of a row merges it. It prints the modelled
// step beside the traced one (the calibration), then the step with a phase made shorter, to say what shortening
// it would be worth before writing the kernel code. Runs anywhere (no GPU):
//   node bench/decode-schedule-model.mjs <trace.json> [--slots 396]
// Holds for the default ticket order (every cmp item, then every win item, then every slc item; NSA_DECODE_LAG
// unset). The durations come from one traced run, so a change that alters how fast the items stream (they share
// the DRAM) is beyond it, and so is one that alters how long every dependent round trip takes: it modelled the
// seventeenth session's 11.3 us faster select at 11 us off the step, and the step moved 0.4% (docs/performance.md).
import { readFileSync } from 'node:fs';
import { fileArgument, flag } from './args.mjs';

const file = fileArgument('node bench/decode-schedule-model.mjs <trace.json> [--slots 396]');
const slots = Number(flag('slots', '396'));
const { preset, B, S, records } = JSON.parse(readFileSync(file, 'utf8'));
const count = (kind) => records.filter((r) => r.kind === kind).length;
const rows = records.filter((r) => r.merged).length; // every (query, 16-head row group) merges once
const pairs = records.filter((r) => r.selected).length; // every (query, KV head) selects once
const cmpN = count('cmp') / rows;
const winN = count('win') / rows;
const slcN = count('slc') / rows;
const expected = [...Array(count('cmp')).fill('cmp'), ...Array(count('win')).fill('win'), ...Array(count('slc')).fill('slc')];
if (!Number.isInteger(cmpN * winN * slcN) || records.some((r, i) => r.kind !== expected[i])) {
  console.error('decode-schedule-model: the trace is not in the default ticket order (cmp, win, slc items) or its rows are uneven');
  process.exit(1);
}
const rowsPerPair = rows / pairs;
const mean = (v) => v.reduce((s, x) => s + x, 0) / v.length;
const median = (v) => [...v].sort((a, b) => a - b)[v.length >> 1];
const us = (ns) => ns / 1000;
// Each item's measured attention (from the end of its wait for slc items), in ticket order.
const attention = records.map((r) => us(r.attended - (r.waited > 0 ? r.waited : r.start)));
const measured = {
  select: mean(records.filter((r) => r.selected).map((r) => us(r.end - r.attended))),
  merge: mean(records.filter((r) => r.merged).map((r) => us(r.end - r.attended))),
  epilogue: median(records.filter((r) => !r.merged && !r.selected).map((r) => us(r.end - r.attended))),
};

/** The modelled step in us: `scale` multiplies the select, merge, or one kind's attention. */
function model(scale = {}) {
  const select = measured.select * (scale.select ?? 1);
  const merge = measured.merge * (scale.merge ?? 1);
  const events = []; // a binary heap of [time, order, action]
  let order = 0;
  const push = (time, action) => {
    events.push([time, order++, action]);
    for (let i = events.length - 1; i > 0; ) {
      const p = (i - 1) >> 1;
      if (events[p][0] < events[i][0] || (events[p][0] === events[i][0] && events[p][1] < events[i][1])) break;
      [events[p], events[i]] = [events[i], events[p]];
      i = p;
    }
  };
  const pop = () => {
    const top = events[0];
    const last = events.pop();
    if (events.length > 0) {
      events[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        for (const c of [l, r])
          if (c < events.length && (events[c][0] < events[m][0] || (events[c][0] === events[m][0] && events[c][1] < events[m][1]))) m = c;
        if (m === i) break;
        [events[m], events[i]] = [events[i], events[m]];
        i = m;
      }
    }
    return top;
  };
  const cmpLeft = new Array(pairs).fill(cmpN * rowsPerPair);
  const rowLeft = new Array(rows).fill(winN + slcN);
  const selected = new Array(pairs).fill(undefined);
  const waiters = Array.from({ length: pairs }, () => []);
  const cmpItems = rows * cmpN;
  const winItems = rows * winN;
  const kindOf = (item) => (item < cmpItems ? 'cmp' : item < cmpItems + winItems ? 'win' : 'slc');
  const rowOf = (item) =>
    item < cmpItems ? Math.floor(item / cmpN) : item < cmpItems + winItems ? Math.floor((item - cmpItems) / winN) : Math.floor((item - cmpItems - winItems) / slcN);
  const duration = (item) => attention[item] * (scale[kindOf(item)] ?? 1);
  let next = 0;
  let end = 0;
  for (let s = 0; s < slots; s++) push(0, { free: true });
  while (events.length > 0) {
    const [time, , a] = pop();
    end = Math.max(end, time);
    if (a.free) {
      if (next >= records.length) continue;
      const item = next++;
      const row = rowOf(item);
      const pair = Math.floor(row / rowsPerPair);
      if (kindOf(item) === 'cmp') push(time + duration(item), { cmpDone: pair });
      else if (kindOf(item) === 'win') push(time + duration(item), { rowDone: row });
      else if (selected[pair] !== undefined) push(Math.max(time, selected[pair]) + duration(item), { rowDone: row });
      else waiters[pair].push(item);
    } else if (a.cmpDone !== undefined) {
      // The pair's last cmp item selects, then frees its slot.
      if (--cmpLeft[a.cmpDone] === 0) push(time + select, { selectDone: a.cmpDone });
      else push(time + measured.epilogue, { free: true });
    } else if (a.selectDone !== undefined) {
      selected[a.selectDone] = time;
      for (const item of waiters[a.selectDone]) push(time + duration(item), { rowDone: rowOf(item) });
      waiters[a.selectDone] = [];
      push(time, { free: true });
    } else {
      push(time + (--rowLeft[a.rowDone] === 0 ? merge : measured.epilogue), { free: true });
    }
  }
  return end;
}

const traced = us(Math.max(...records.map((r) => r.end)));
console.log(
  `${preset} B=${B} S=${S}: ${records.length} items, ${slots} CTA slots; select ${measured.select.toFixed(1)} us, ` +
    `merge ${measured.merge.toFixed(1)} us, epilogue ${measured.epilogue.toFixed(2)} us`,
);
console.log(`traced step ${traced.toFixed(1)} us, modelled ${model().toFixed(1)} us`);
const cases = [
  ['selects x 0.5', { select: 0.5 }],
  ['selects x 0', { select: 0 }],
  ['merges x 0.5', { merge: 0.5 }],
  ['merges x 0', { merge: 0 }],
  ['cmp attention x 0.9', { cmp: 0.9 }],
  ['slc attention x 0.8', { slc: 0.8 }],
  ['win attention x 0.8', { win: 0.8 }],
];
for (const [name, scale] of cases) console.log(`  ${name.padEnd(22)} ${model(scale).toFixed(1)} us`);
