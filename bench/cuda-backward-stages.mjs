// Per-stage medians of the cuda backward (CUDA events), forward stages for comparison. Run after `npm run build`:
//   node bench/cuda-backward-stages.mjs [--lengths 65536] [--groups 16,4] [--presets fla,paper]
//     [--variants ,NSA_FSA_PERSISTENT=0,NSA_FA_BWD_WGS=2x2]   (environment variants, bench/env-variants.mjs)
import { NSAConfig } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';
import { applyVariant, parseVariants, variantLabel } from './env-variants.mjs';
import { flag } from './args.mjs';

const lengths = flag('lengths', '65536').split(',').map(Number);
const groups = flag('groups', '16,4').split(',').map(Number);
const presets = flag('presets', 'fla,paper').split(',');
const timing = { warmup: 1, iterations: 3 };
const variants = parseVariants(flag('variants', ''));
for (const variant of variants) {
  applyVariant(variant);
  const backend = await createCudaBackend();
  const label = variants.length > 1 ? `${variantLabel(variant)} ` : '';
  if (variant === variants[0]) console.log(backend.description);
  for (const G of groups) {
    for (const preset of presets) {
      for (const T of lengths) {
        const hq = G === 16 ? 64 : 32;
        const config = NSAConfig.preset(preset, { heads: hq, kvHeads: hq / G, headDim: 128, valueDim: 128 });
        const problem = { config, cuSeqlens: [0, T], dtype: 'bf16', seed: 1 };
        const total = (await backend.time(problem, { ...timing, backward: true })).medianMs;
        const stages = await backend.profileBackwardStages(problem, timing);
        console.log(`${label}G=${G} ${preset.padEnd(5)} T=${T}: fwd+bwd ${total.toFixed(2)} ms | ` + Object.entries(stages).map(([k, v]) => `${k} ${v.medianMs.toFixed(2)}`).join(' | '));
      }
    }
  }
  backend.dispose();
}
