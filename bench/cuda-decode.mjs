// Decode-step benchmark of the cuda KV cache: per-step latency and effective bandwidth (bytes NSA must read /
// time) beside dense attention over the same cache, in one run; with --launches, each launch of the step timed
// alone as well. Run after `npm run build`:
//   node bench/cuda-decode.mjs [--batches 1,8,64] [--contexts 8192,65536,131072] [--presets paper,fla] [--launches]
// The step (and each launch with --launches) is replayed as a CUDA graph; NSA_DECODE_GRAPH=0 times direct launches,
// NSA_DECODE_BULK=0 gathers the selected rows with cp.async instead of bulk copies, NSA_DECODE_{CMP,SLC}_CHUNK=n
// force the keys per CTA of a branch.
import { NSAConfig, createKvCache } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';
import { decodeBytesPerHead } from '../dist/nsa/decode/types.js';

const args = process.argv.slice(2);
const flag = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
};
const batches = flag('batches', '1,8,64').split(',').map(Number);
const contexts = flag('contexts', '8192,65536,131072').split(',').map(Number);
const presets = flag('presets', 'paper,fla').split(',');
const launches = args.includes('--launches');
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
      const dense = (await cache.timeDecodeStep({ ...timing, dense: true })).medianMs;
      const bytes = decodeBytesPerHead(config, S, 2);
      const tb = (b, ms) => ((B * config.kvHeads * b) / (ms * 1e-3) / 1e12).toFixed(2);
      console.log(
        `${preset.padEnd(5)} B=${String(B).padStart(2)} S=${String(S).padStart(7)}: nsa ${nsa.toFixed(4)} ms (${tb(bytes.nsa, nsa)} TB/s) | ` +
          `dense ${dense.toFixed(4)} ms (${tb(bytes.dense, dense)} TB/s) | dense/nsa ${(dense / nsa).toFixed(2)}x (model ${(bytes.dense / bytes.nsa).toFixed(1)}x)`,
      );
      if (launches && typeof cache.timeDecodeLaunches === 'function') {
        const split = await cache.timeDecodeLaunches(timing);
        const sum = split.reduce((a, l) => a + l.medianMs, 0);
        console.log(`      launches alone: ${split.map((l) => `${l.name} ${l.medianMs.toFixed(4)}`).join(', ')} ms (sum ${sum.toFixed(4)})`);
      }
      cache.dispose();
    }
  }
}
backend.dispose();
