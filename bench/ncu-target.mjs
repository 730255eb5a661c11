// One NSA forward (+ backward with --backward) on the cuda backend and nothing else, for a profiler to attach to:
//   ncu --kernel-name regex:"nsa_selected_attention|nsa_flash_attention_tma" --launch-count 2 --section SpeedOfLight \
//       node bench/ncu-target.mjs --length 65536 --group 16 --preset fla [--batch 64] [--backward]
// Shapes as the benchmarks': B = 1 (or --batch sequences of --length tokens), hq = 64 at G = 16 (else 32), d = 128, bf16, random inputs. No warm-up and a
// single run, so each kernel launches once (plus the one-time compiles, which launch nothing).
import { NSAConfig } from '../dist/index.js';
import { createCudaBackend } from '../dist/backends/cuda/cuda-backend.js';
import { flag, hasFlag } from './args.mjs';

const T = Number(flag('length', '16384'));
const G = Number(flag('group', '16'));
const preset = flag('preset', 'fla');
const batch = Number(flag('batch', '1'));
const backward = hasFlag('backward');
const hq = G === 16 ? 64 : 32;
const backend = await createCudaBackend({});
try {
  const config = NSAConfig.preset(preset, { heads: hq, kvHeads: hq / G, headDim: 128, valueDim: 128 });
  const result = await backend.time({ config, cuSeqlens: Array.from({ length: batch + 1 }, (_, i) => i * T), dtype: 'bf16', seed: 1 }, { warmup: 0, iterations: 1, backward });
  console.log(`${preset} G = ${G} B = ${batch} T = ${T} ${backward ? 'fwd+bwd' : 'forward'}: ${result.medianMs.toFixed(2)} ms`);
} finally {
  backend.dispose();
}
