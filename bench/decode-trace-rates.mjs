// Reads a traced fused decode step written by `node bench/cuda-decode.mjs --trace-json <dir>` and prints, per slice
// of the step's time, the DRAM rate its work items attained (each item's share of the bytes NSA must read, spread
// evenly over its attention) and what the CTA slots were doing (attending, waiting for a selection, selecting,
// merging or finishing). Runs anywhere (no GPU):
//   node bench/decode-trace-rates.mjs <trace.json> [--buckets 20]
import { readFileSync } from 'node:fs';
import { NSAConfig } from '../dist/index.js';
import { decodeBytesPerHead } from '../dist/nsa/decode/types.js';
import { fileArgument, flag } from './args.mjs';

const file = fileArgument('node bench/decode-trace-rates.mjs <trace.json> [--buckets 20]');
const buckets = Number(flag('buckets', '20'));
const { preset, B, S, records } = JSON.parse(readFileSync(file, 'utf8'));
const config = NSAConfig.preset(preset, { heads: 64, kvHeads: 4, headDim: 128, valueDim: 128 });
// Bytes of each branch over the batch, shared evenly by that branch's items (chunks are equal but the last).
const branchBytes = decodeBytesPerHead(config, S, 2).branches;
const perItem = {};
for (const kind of ['cmp', 'slc', 'win']) {
  const count = records.filter((r) => r.kind === kind).length;
  perItem[kind] = count === 0 ? 0 : (branchBytes[kind] * B * config.kvHeads) / count;
}
const span = Math.max(...records.map((r) => r.end));
const width = span / buckets;
console.log(`${preset} B=${B} S=${S}: ${records.length} items over ${(span / 1000).toFixed(1)} us`);
console.log('   from us |  TB/s | attending  waiting  selecting  merging/finishing');
for (let b = 0; b < buckets; b++) {
  const lo = b * width;
  const hi = lo + width;
  let bytes = 0;
  for (const r of records) {
    const from = r.waited > 0 ? r.waited : r.start;
    if (r.attended <= from) continue;
    const overlap = Math.max(0, Math.min(r.attended, hi) - Math.max(from, lo));
    bytes += (perItem[r.kind] * overlap) / (r.attended - from);
  }
  const mid = lo + width / 2;
  const state = { attending: 0, waiting: 0, selecting: 0, finishing: 0 };
  for (const r of records) {
    if (!(r.start <= mid && mid < r.end)) continue;
    if (r.waited > 0 && mid < r.waited) state.waiting++;
    else if (mid < r.attended) state.attending++;
    else if (r.selected) state.selecting++;
    else state.finishing++;
  }
  console.log(
    `${(lo / 1000).toFixed(1).padStart(10)} | ${(bytes / width / 1000).toFixed(2).padStart(5)} | ${String(state.attending).padStart(9)} ` +
      `${String(state.waiting).padStart(8)} ${String(state.selecting).padStart(10)} ${String(state.finishing).padStart(18)}`,
  );
}
