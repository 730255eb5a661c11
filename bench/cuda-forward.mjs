// Forward benchmark of the cuda backend on the shapes, with a per-stage breakdown, our dense kernel and
// torch SDPA (python3 bench/torch_sdpa.py) measured in the same run. Run from the repo root after `npm run build`:
//   node bench/cuda-forward.mjs [--lengths 8192,16384] [--batch 64] [--groups 16,4] [--no-torch] [--out results.json]
// Prints a table; medians of CUDA-event timings after warm-up. --batch B times B sequences of each length (SDPA too).
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { NSAConfig } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';
import { flag, hasFlag } from './args.mjs';

const lengths = flag('lengths', '8192,16384,32768,65536').split(',').map(Number);
const outFile = flag('out', undefined);
const groups = flag('groups', '16,4').split(',').map(Number);
const kernels = flag('kernels', 'auto').split(',');
const batch = Number(flag('batch', '1'));
const withTorch = !hasFlag('no-torch');
const timing = { warmup: Number(flag('warmup', '3')), iterations: Number(flag('iters', '10')) };

function sdpa(T, B, hq, h, d) {
  try {
    const out = execFileSync('python3', ['bench/torch_sdpa.py', '--seqlen', String(T), '--batch', String(B), '--heads', String(hq), '--kv-heads', String(h), '--head-dim', String(d), '--value-dim', String(d), '--dtype', 'bf16', '--warmup', String(timing.warmup), '--iters', String(timing.iterations)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    return JSON.parse(out.trim().split('\n').pop()).median_ms;
  } catch (e) {
    return `n/a (${String(e.message).split('\n')[0]})`;
  }
}

const rows = [];
const backends = new Map();
for (const kernel of kernels) backends.set(kernel, await createCudaBackend({ selectedKernel: kernel }));
const first = backends.values().next().value;
console.log(first.description);
for (const G of groups) {
  const hq = G === 16 ? 64 : 32;
  const h = hq / G;
  for (const preset of ['fla', 'paper']) {
    for (const T of lengths) {
      const config = NSAConfig.preset(preset, { heads: hq, kvHeads: h, headDim: 128, valueDim: 128, selectCount: 16, window: 512 });
      const problem = { config, cuSeqlens: Array.from({ length: batch + 1 }, (_, i) => i * T), dtype: 'bf16', seed: 1 };
      const dense = (await first.timeDense(problem, timing)).medianMs;
      const torch = withTorch ? sdpa(T, batch, hq, h, 128) : 'not timed';
      for (const [kernel, backend] of backends) {
        const nsa = (await backend.time(problem, timing)).medianMs;
        const stages = await backend.profileStages(problem, timing);
        const row = { G, preset, B: batch, T, kernel, nsa, dense, sdpa: torch, stages: Object.fromEntries(Object.entries(stages).map(([k, v]) => [k, v.medianMs])) };
        rows.push(row);
        const fmt = (x) => (typeof x === 'number' ? x.toFixed(2) : x);
        console.log(
          `G=${G} ${preset.padEnd(5)} B=${batch} T=${String(T).padStart(6)} ${kernel.padEnd(5)} nsa ${fmt(nsa).padStart(8)} ms | dense ${fmt(dense).padStart(8)} | sdpa ${fmt(torch)} | ` +
            `x dense ${(dense / nsa).toFixed(2)} | x sdpa ${typeof torch === 'number' ? (torch / nsa).toFixed(2) : '-'} | dense/sdpa thr ${typeof torch === 'number' ? (torch / dense).toFixed(2) : '-'} | ` +
            Object.entries(row.stages).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(' '),
        );
      }
    }
  }
}
if (outFile) writeFileSync(outFile, JSON.stringify({ device: first.description, rows }, null, 2));
for (const b of [...backends.values()].reverse()) b.dispose();
