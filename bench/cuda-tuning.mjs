// Tries the kernels' launch-shape variants (NSA_FA_WARPS, NSA_SLC_PIPELINE) on the issue's shapes and prints
// per-stage medians (CUDA events), to choose the defaults. Run from the repo root after `npm run build`:
//   node bench/cuda-tuning.mjs [--lengths 65536] [--variants 8:2x1x8,NSA_FA_WGMMA=0] [--shapes group,fsa] [--presets fla,paper]
//     [--groups 16,4] [--inputs random|smooth] [--out tuning.json]
import { writeFileSync } from 'node:fs';
import { NSAConfig } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';
import { applyVariant, parseVariants, variantLabel } from './env-variants.mjs';
import { flag } from './args.mjs';

const lengths = flag('lengths', '65536').split(',').map(Number);
const timing = { warmup: 2, iterations: 5 };
// --inputs smooth: q and k with a slowly varying positional component, neighbouring queries choosing alike (src/nsa/random-inputs.ts).
const inputs = flag('inputs', 'random');
// A variant is `faWarps:slcPipeline` (e.g. 8:2x1x8) or environment settings joined by `+` (e.g. NSA_FA_WGMMA=0+NSA_FA_WARPS=4).
const variants = (flag('variants', '8:4x2x3,8:4x1x4,8:4x1x6,8:2x2x6,8:2x1x8')).split(',').flatMap((v) => {
  if (v.includes('=')) return parseVariants(v);
  const [fa, slc] = v.split(':');
  return [{ NSA_FA_WARPS: fa, NSA_SLC_PIPELINE: slc }];
});
// --shapes picks the selected kernels, --presets the presets (default fla), --groups G (default 16).
const shapes = flag('presets', 'fla').split(',').flatMap((preset) =>
  flag('groups', '16').split(',').map(Number).flatMap((G) =>
    flag('shapes', 'group,fsa').split(',').map((kernel) => ({ G, preset, kernel }))));
const rows = [];
for (const variant of variants) {
  applyVariant(variant); // only this variant's settings over the starting environment
  for (const shape of shapes) {
    const backend = await createCudaBackend({ selectedKernel: shape.kernel });
    for (const T of lengths) {
      const hq = shape.G === 16 ? 64 : shape.G === 8 ? 64 : 32;
      const config = NSAConfig.preset(shape.preset, { heads: hq, kvHeads: hq / shape.G, headDim: 128, valueDim: 128 });
      const problem = { config, cuSeqlens: [0, T], dtype: 'bf16', seed: 1, inputs };
      const total = (await backend.time(problem, timing)).medianMs;
      const stages = await backend.profileStages(problem, timing);
      const dense = shape.G === 16 && shape.preset === 'fla' ? (await backend.timeDense(problem, timing)).medianMs : undefined;
      const row = { ...variant, ...shape, T, total, dense, stages: Object.fromEntries(Object.entries(stages).map(([k, v]) => [k, v.medianMs])) };
      rows.push(row);
      console.log(
        `${variantLabel(variant)}${inputs === 'random' ? '' : ` ${inputs}`} G=${shape.G} ${shape.preset.padEnd(5)} ${shape.kernel.padEnd(5)} T=${T}: total ${total.toFixed(2)} ms` +
          (dense === undefined ? '' : ` dense ${dense.toFixed(2)}`) +
          ' | ' + Object.entries(row.stages).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(' '),
      );
    }
    backend.dispose();
  }
}
const out = flag('out', undefined);
if (out) writeFileSync(out, JSON.stringify(rows, null, 2));
