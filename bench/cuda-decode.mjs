// Decode-step benchmark of the cuda KV cache: per-step latency and effective bandwidth (bytes NSA must read /
// time) beside dense attention over the same cache, in one run; with --launches, each launch of the step timed
// alone as well. Run after `npm run build`:
//   node bench/cuda-decode.mjs [--batches 1,8,64] [--contexts 8192,65536,131072] [--presets paper,fla] [--launches] [--trace]
//                              [--branches]
// The NSA step writes the gated sum alone (as a server's does); --branches also times it writing each branch's
// output and lse (what decode() returns by default), in the same run.
// --trace (fused step): one traced run, summarised per kind of work item (when they started and ended, how long
// their attention took, how long slc items waited for their selection) and how many CTAs ran over time;
// --trace-json <dir> also writes each traced run's records (one per work item, in ticket order) to <dir>.
// The step (and each launch with --launches) is replayed as a CUDA graph; NSA_DECODE_GRAPH=0 times direct launches,
// NSA_DECODE_FUSED=0 takes the three-launch step instead of the fused one, NSA_DECODE_LAYOUT=token stores the cache
// [T, H, D] instead of [H, T, D], NSA_DECODE_BULK=0 gathers the selected rows with cp.async instead of bulk copies,
// NSA_DECODE_{CMP,SLC}_CHUNK=n force the keys per CTA of a branch.
import { NSAConfig, createKvCache } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';
import { decodeBytesPerHead } from '../dist/nsa/decode/types.js';
import { writeFileSync } from 'node:fs';
import { flag, hasFlag } from './args.mjs';

const batches = flag('batches', '1,8,64').split(',').map(Number);
const contexts = flag('contexts', '8192,65536,131072').split(',').map(Number);
const presets = flag('presets', 'paper,fla').split(',');
const launches = hasFlag('launches');
const branches = hasFlag('branches');
const traceDir = flag('trace-json', undefined);
const tracing = hasFlag('trace') || traceDir !== undefined;
const us = (ns) => (ns / 1000).toFixed(1);
const mean = (xs) => (xs.length === 0 ? 0 : xs.reduce((a, b) => a + b, 0) / xs.length);
const quantile = (xs, q) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? 0 : s[Math.min(s.length - 1, Math.floor(q * s.length))];
};

/** One line per kind of work item of a traced fused step, the selects and merges, and CTAs running over time. */
function printTrace(recs) {
  const span = Math.max(...recs.map((r) => r.end));
  for (const kind of ['cmp', 'win', 'slc']) {
    const rs = recs.filter((r) => r.kind === kind);
    if (rs.length === 0) continue;
    const starts = rs.map((r) => r.start);
    const ends = rs.map((r) => r.end);
    const attend = rs.map((r) => r.attended - (r.waited > 0 ? r.waited : r.start));
    const wait = rs.map((r) => (r.waited > 0 ? r.waited - r.start : 0));
    console.log(
      `      ${kind}: ${rs.length} items, start ${us(quantile(starts, 0))}/${us(quantile(starts, 0.5))}/${us(quantile(starts, 1))} us ` +
        `(min/median/max), end ${us(quantile(ends, 0.5))}/${us(quantile(ends, 1))}, attention ${us(mean(attend))} us mean ` +
        `(max ${us(Math.max(...attend))}), wait ${us(mean(wait))} mean (max ${us(Math.max(...wait))})`,
    );
  }
  const sel = recs.filter((r) => r.selected).map((r) => r.end - r.attended);
  const mer = recs.filter((r) => r.merged).map((r) => r.end - r.attended);
  const lastSel = Math.max(...recs.filter((r) => r.selected).map((r) => r.end));
  console.log(
    `      span ${us(span)} us; select ${sel.length}x ${us(mean(sel))} us mean (max ${us(Math.max(...sel))}, last ends ${us(lastSel)}); ` +
      `merge ${mer.length}x ${us(mean(mer))} us mean`,
  );
  const selects = recs.filter((r) => r.selected && r.select !== undefined);
  if (selects.length > 0) {
    const part = (f) => `${us(mean(selects.map(f)))} (max ${us(Math.max(...selects.map(f))).padStart(4)})`;
    const rounds = selects.map((r) => r.select.rounds);
    console.log(
      `      select phases, us mean: counter ${part((r) => r.select.entered - r.attended)}, lse ${part((r) => r.select.lse - r.select.entered)}, ` +
        `scores ${part((r) => r.select.scores - r.select.lse)}, top-n ${part((r) => r.select.topN - r.select.scores)}, ` +
        `fence+flag ${part((r) => r.end - r.select.topN)}; rounds of slices ${Math.min(...rounds)}-${Math.max(...rounds)}`,
    );
  }
  const merges = recs.filter((r) => r.merged && r.merge !== undefined);
  if (merges.length > 0) {
    const part = (f) => `${us(mean(merges.map(f)))} (max ${us(Math.max(...merges.map(f))).padStart(4)})`;
    console.log(
      `      merge phases, us mean: counter ${part((r) => r.merge.entered - r.attended)}, weights ${part((r) => r.merge.weights - r.merge.entered)}, ` +
        `outputs ${part((r) => r.merge.outputs - r.merge.weights)}, discards ${part((r) => r.end - r.merge.outputs)}`,
    );
  }
  const buckets = 20;
  const alive = [];
  const waiting = [];
  for (let b = 0; b < buckets; b++) {
    const t = ((b + 0.5) * span) / buckets;
    alive.push(recs.filter((r) => r.start <= t && t < r.end).length);
    waiting.push(recs.filter((r) => r.waited > 0 && r.start <= t && t < r.waited).length);
  }
  console.log(`      CTAs running per ${us(span / buckets)} us: ${alive.join(' ')}; slc waiting: ${waiting.join(' ')}`);
}
const timing = { warmup: 5, iterations: 20 };
const backend = await createCudaBackend();
console.log(backend.description);
for (const preset of presets) {
  const config = NSAConfig.preset(preset, { heads: 64, kvHeads: 4, headDim: 128, valueDim: 128 });
  for (const S of contexts) {
    for (const B of batches) {
      const cache = await createKvCache(config, { backend, maxTokens: S });
      for (let s = 0; s < B; s++) cache.appendRandom(cache.addSequence(), S, s);
      const nsa = (await cache.timeDecodeStep(timing)).medianMs;
      const withBranches = branches ? (await cache.timeDecodeStep({ ...timing, branches: true })).medianMs : undefined;
      const dense = (await cache.timeDecodeStep({ ...timing, dense: true })).medianMs;
      const bytes = decodeBytesPerHead(config, S, 2);
      const tb = (b, ms) => ((B * config.kvHeads * b) / (ms * 1e-3) / 1e12).toFixed(2);
      console.log(
        `${preset.padEnd(5)} B=${String(B).padStart(2)} S=${String(S).padStart(7)}: nsa ${nsa.toFixed(4)} ms (${tb(bytes.nsa, nsa)} TB/s) | ` +
          `dense ${dense.toFixed(4)} ms (${tb(bytes.dense, dense)} TB/s) | dense/nsa ${(dense / nsa).toFixed(2)}x (model ${(bytes.dense / bytes.nsa).toFixed(1)}x)` +
          (withBranches === undefined ? '' : ` | with branch outputs ${withBranches.toFixed(4)} ms`),
      );
      if (launches && typeof cache.timeDecodeLaunches === 'function') {
        const split = await cache.timeDecodeLaunches(timing);
        const sum = split.reduce((a, l) => a + l.medianMs, 0);
        console.log(`      launches alone: ${split.map((l) => `${l.name} ${l.medianMs.toFixed(4)}`).join(', ')} ms (sum ${sum.toFixed(4)})`);
      }
      if (tracing && typeof cache.traceDecodeStep === 'function') {
        const recs = cache.traceDecodeStep();
        if (recs !== undefined) printTrace(recs);
        if (recs !== undefined && traceDir !== undefined)
          writeFileSync(`${traceDir}/trace-${preset}-b${B}-s${S}.json`, JSON.stringify({ preset, B, S, records: recs }));
      }
      cache.dispose();
    }
  }
}
backend.dispose();
