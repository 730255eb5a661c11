// The library's random-input recipe (what the benchmarks time): every phi kind gets inputs the operator accepts,
// dk != dv included (the mlp's hidden width must agree between the key and value sides), and the CPU backend's
// timer runs on them.

import { describe, expect, it } from 'vitest';
import { CpuBackend } from '../../src/backends/cpu/cpu-backend.js';
import { NSAConfig, PHI_KINDS } from '../../src/config/nsa-config.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import { validateNsaInputs } from '../../src/nsa/validate.js';
import { PHI_PARAM_NAMES } from '../../src/reference/compress.js';

const shape = { heads: 4, kvHeads: 2, headDim: 8, valueDim: 12, compressBlock: 8, compressStride: 4, selectBlock: 8, selectCount: 3, window: 6 };

describe('randomInputs', () => {
  for (const phi of PHI_KINDS) {
    it(`makes inputs the operator accepts for phi = ${phi}, dk != dv`, async () => {
      const config = new NSAConfig({ ...shape, phi });
      const cuSeqlens = [0, 37, 60];
      const inputs = randomInputs({ config, cuSeqlens, dtype: 'bf16', seed: 5 });
      const request = validateNsaInputs(inputs, config);
      if (phi === 'mean') {
        expect(inputs.phiK).toBeUndefined();
        expect(inputs.phiV).toBeUndefined();
      } else {
        expect(Object.keys(inputs.phiK!).sort()).toEqual([...PHI_PARAM_NAMES[phi]].sort());
        expect(inputs.phiV!['pe']!.shape).toEqual([2, 8, 12]);
        if (phi === 'mlp') expect(request.phiHidden).toBe(8);
      }
      const backend = new CpuBackend({ threads: 1 });
      const timing = await backend.time({ config, cuSeqlens, dtype: 'f32', seed: 1 }, { warmup: 0, iterations: 1, backward: true });
      expect(timing.samplesMs).toHaveLength(1);
      backend.dispose();
    });
  }

  it('is deterministic in its seed', () => {
    const config = new NSAConfig({ ...shape, phi: 'linear' });
    const a = randomInputs({ config, cuSeqlens: [0, 20], dtype: 'f32', seed: 9 });
    const b = randomInputs({ config, cuSeqlens: [0, 20], dtype: 'f32', seed: 9 });
    const c = randomInputs({ config, cuSeqlens: [0, 20], dtype: 'f32', seed: 10 });
    const w = (x: typeof a): number[] => Array.from(x.phiK!['w']!.toFloat64());
    expect(w(a)).toEqual(w(b));
    expect(w(a)).not.toEqual(w(c));
  });
});
