// Where a kernel's warps stall, instruction by instruction, from an Nsight Compute source export. On the GPU machine:
//   ncu --kernel-name <kernel> --launch-count 1 --section SourceCounters --section WarpStateStats --import-source no \
//       -o /tmp/rep node <script that runs the kernel>
//   ncu -i /tmp/rep.ncu-rep --page source --csv --print-source sass > hot.csv
// then anywhere: node bench/ncu-hotspots.mjs hot.csv [--top 25] [--window 250]
// Prints the stall reasons' shares over the whole kernel, the instructions with the most stall samples (with their
// reasons), and the stretches of SASS (--window instructions each) that hold more than 2% of the samples, tagged with
// the kinds of instruction in them, which is usually enough to tell which loop of the source they are.
import { readFileSync } from 'node:fs';
import { flag } from './args.mjs';

const file = process.argv[2];
if (file === undefined || file.startsWith('--')) {
  console.error('usage: node bench/ncu-hotspots.mjs <ncu source page .csv> [--top 25] [--window 250]');
  process.exit(2);
}
const top = Number(flag('top', '25'));
const window = Number(flag('window', '250'));

/** The fields of one CSV line (quoted fields may hold commas; "" is a quote). */
function csvFields(line) {
  const fields = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const ch = line[i];
    if (quoted) {
      if (ch === '"' && line[i + 1] === '"') {
        field += '"';
        i++;
      } else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ',') {
      fields.push(field);
      field = '';
    } else field += ch;
  }
  fields.push(field);
  return fields;
}

const lines = readFileSync(file, 'utf8').split('\n').filter((l) => l.length > 0);
const headerAt = lines.findIndex((l) => l.startsWith('"Address"'));
if (headerAt < 0) {
  console.error(`${file}: no "Address" header line; expected ncu's --page source --csv --print-source sass output`);
  process.exit(1);
}
const header = csvFields(lines[headerAt]);
const rows = lines.slice(headerAt + 1).map(csvFields);
const column = (name) => {
  const i = header.indexOf(name);
  if (i < 0) throw new Error(`${file}: no column "${name}"`);
  return i;
};
const source = column('Source');
const samples = column('Warp Stall Sampling (All Samples)');
const reasons = header.map((h, i) => [h, i]).filter(([h]) => h.startsWith('stall_') && !h.includes('(Not Issued)'));
const count = (row, i) => Number(row[i]) || 0;

const total = rows.reduce((sum, r) => sum + count(r, samples), 0);
const pct = (n) => `${((100 * n) / Math.max(1, total)).toFixed(1)}%`;
console.log(`${rows.length} SASS instructions, ${total} stall samples`);
const byReason = reasons.map(([h, i]) => [h.slice(6), rows.reduce((sum, r) => sum + count(r, i), 0)]).filter(([, n]) => n > 0);
console.log('by reason: ' + byReason.sort((a, b) => b[1] - a[1]).map(([h, n]) => `${h} ${pct(n)}`).join(', '));

console.log(`\ntop ${top} instructions (index, samples, share, reasons | SASS):`);
const ranked = rows.map((r, n) => [count(r, samples), n]).sort((a, b) => b[0] - a[0]).slice(0, top);
for (const [s, n] of ranked) {
  const r = rows[n];
  const why = reasons.filter(([, i]) => count(r, i) > 0).map(([h, i]) => `${h.slice(6)}=${count(r, i)}`).join(' ');
  console.log(`${String(n).padStart(6)} ${String(s).padStart(7)} ${pct(s).padStart(6)} ${why} | ${r[source].trim()}`);
}

const KINDS = ['HGMMA', 'HMMA', 'LDGSTS', 'UBLKCP', 'UTMALDG', 'SYNCS', 'LDG', 'STG', 'LDS', 'STS', 'SHFL', 'REDUX', 'MUFU', 'BAR', 'ATOM', 'RED', 'CALL'];
console.log(`\nstretches of ${window} instructions holding more than 2% of the samples:`);
for (let a = 0; a < rows.length; a += window) {
  const part = rows.slice(a, a + window);
  const s = part.reduce((sum, r) => sum + count(r, samples), 0);
  if (s <= 0.02 * total) continue;
  const kinds = KINDS.filter((k) => part.some((r) => r[source].trim().replace(/^@!?U?P\w+\s+/, '').startsWith(k)));
  console.log(`${String(a).padStart(6)}..${String(a + part.length - 1).padEnd(6)} ${pct(s).padStart(6)}  ${kinds.join(' ')}`);
}
