// Per-stage medians of the cuda backward (CUDA events), forward stages for comparison. Run after `npm run build`:
//   node bench/cuda-backward-stages.mjs [--lengths 65536] [--groups 16,4] [--presets fla,paper]
import { NSAConfig } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';

const args = process.argv.slice(2);
const flag = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
};
const lengths = flag('lengths', '65536').split(',').map(Number);
const groups = flag('groups', '16,4').split(',').map(Number);
const presets = flag('presets', 'fla,paper').split(',');
const timing = { warmup: 1, iterations: 3 };
const backend = await createCudaBackend();
console.log(backend.description);
for (const G of groups) {
  for (const preset of presets) {
    for (const T of lengths) {
      const hq = G === 16 ? 64 : 32;
      const config = NSAConfig.preset(preset, { heads: hq, kvHeads: hq / G, headDim: 128, valueDim: 128 });
      const problem = { config, cuSeqlens: [0, T], dtype: 'bf16', seed: 1 };
      const total = (await backend.time(problem, { ...timing, backward: true })).medianMs;
      const stages = await backend.profileBackwardStages(problem, timing);
      console.log(`G=${G} ${preset.padEnd(5)} T=${T}: fwd+bwd ${total.toFixed(2)} ms | ` + Object.entries(stages).map(([k, v]) => `${k} ${v.medianMs.toFixed(2)}`).join(' | '));
    }
  }
}
backend.dispose();
