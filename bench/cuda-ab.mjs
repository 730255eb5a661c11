// A/B timing of environment variants on the shapes, interleaved: each round times every variant once (a
// fresh backend per variant, so the kernels are built with its settings), and the medians over rounds are printed
// per variant, so slow drift (clocks, temperature) falls on all variants alike. Run after `npm run build`:
//   node bench/cuda-ab.mjs --variants ,NSA_FA_BWD_TMA=1 [--lengths 16384,65536] [--groups 4,16] [--presets fla,paper]
//     [--rounds 3] [--backward]
import { NSAConfig } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';
import { applyVariant, parseVariants, variantLabel } from './env-variants.mjs';
import { flag, hasFlag } from './args.mjs';

const lengths = flag('lengths', '16384,65536').split(',').map(Number);
const groups = flag('groups', '4,16').split(',').map(Number);
const presets = flag('presets', 'fla,paper').split(',');
const rounds = Number(flag('rounds', '3'));
const backward = hasFlag('backward');
const variants = parseVariants(flag('variants', ''));
const timing = { warmup: 1, iterations: 3, backward };
const times = new Map(); // "variant|shape" -> ms per round
for (let round = 0; round < rounds; round++) {
  for (const variant of variants) {
    applyVariant(variant);
    const backend = await createCudaBackend();
    for (const G of groups) {
      for (const preset of presets) {
        for (const T of lengths) {
          const hq = G === 16 ? 64 : 32;
          const config = NSAConfig.preset(preset, { heads: hq, kvHeads: hq / G, headDim: 128, valueDim: 128 });
          const ms = (await backend.time({ config, cuSeqlens: [0, T], dtype: 'bf16', seed: 1 }, timing)).medianMs;
          const key = `${variantLabel(variant)}|G=${G} ${preset.padEnd(5)} T=${T}`;
          times.set(key, [...(times.get(key) ?? []), ms]);
        }
      }
    }
    backend.dispose();
  }
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`${backward ? 'fwd+bwd' : 'forward'} ms, median of ${rounds} interleaved rounds (each the median of ${timing.iterations})`);
for (const [key, ms] of times) {
  const [label, shape] = key.split('|');
  console.log(`${shape} ${label.padEnd(24)} ${median(ms).toFixed(2)}  (${ms.map((x) => x.toFixed(2)).join(' ')})`);
}
