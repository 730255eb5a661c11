// The library's random-input recipe (what the benchmarks time): every phi kind gets inputs the operator accepts,
// dk != dv included (the mlp's hidden width must agree between the key and value sides), and the CPU backend's
// timer runs on them.

import { describe, expect, it } from 'vitest';
import { CpuBackend } from '../../src/backends/cpu/cpu-backend.js';
import { NSAConfig, PHI_KINDS } from '../../src/config/nsa-config.js';
import { randomInputs, SMOOTH_WAVE_AMPLITUDE } from '../../src/nsa/random-inputs.js';
import { blockScoresAt, prepareNsaProblem } from '../../src/reference/nsa-forward.js';
import { selectTopBlocks } from '../../src/reference/selection.js';
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

  it('smooth inputs add a wave of the position to q and k, each with its own phases, and leave v and the gates', () => {
    const config = new NSAConfig({ ...shape, phi: 'mean' });
    const spec = { config, cuSeqlens: [0, 300], dtype: 'f32' as const, seed: 4 };
    const plain = randomInputs(spec);
    const smooth = randomInputs({ ...spec, pattern: 'smooth' });
    expect(smooth.v.toFloat64()).toEqual(plain.v.toFloat64());
    expect(smooth.g.toFloat64()).toEqual(plain.g.toFloat64());
    for (const name of ['q', 'k'] as const) {
      const [, N, rows, D] = smooth[name].shape as [number, number, number, number];
      const a = plain[name].toFloat64();
      const b = smooth[name].toFloat64();
      const wave = (t: number, r: number, d: number): number => b[(t * rows + r) * D + d]! - a[(t * rows + r) * D + d]!;
      for (let d = 0; d < D; d++) {
        const period = 256 * 2 ** ((8 * d) / D);
        for (let t = 0; t < N; t++) {
          expect(Math.abs(wave(t, 0, d))).toBeLessThanOrEqual(SMOOTH_WAVE_AMPLITUDE + 1e-6);
          for (let r = 1; r < rows; r++) expect(wave(t, r, d)).toBeCloseTo(wave(t, 0, d), 6); // every head alike
          // A sinusoid of that period: w(t + 1) + w(t - 1) = 2 cos(2 pi / P) w(t).
          if (t > 0 && t + 1 < N) expect(wave(t + 1, 0, d) + wave(t - 1, 0, d)).toBeCloseTo(2 * Math.cos((2 * Math.PI) / period) * wave(t, 0, d), 5);
        }
      }
    }
    // q and k take different phases.
    const first = (x: typeof plain.q, y: typeof plain.q): number => x.toFloat64()[0]! - y.toFloat64()[0]!;
    expect(first(smooth.q, plain.q)).not.toBeCloseTo(first(smooth.k, plain.k), 3);
  });

  it('smooth inputs make neighbouring queries choose more blocks alike than random ones', () => {
    const config = NSAConfig.preset('fla', { heads: 16, kvHeads: 1, headDim: 128, valueDim: 128 }); // the benchmarks' group
    const T = 4096;
    const common = (pattern: 'random' | 'smooth'): number => {
      const inputs = randomInputs({ config, cuSeqlens: [0, T], dtype: 'f32', seed: 3, pattern });
      const problem = prepareNsaProblem(config, { q: inputs.q.toFloat64(), k: inputs.k.toFloat64(), v: inputs.v.toFloat64(), g: inputs.g.toFloat64(), cuSeqlens: [0, T] });
      let shared = 0;
      for (let t = T - 64; t < T; t += 4) {
        const chosen = [0, 1, 2, 3].map((i) => {
          const out = new Int32Array(config.selectCount);
          selectTopBlocks(config, t + i, blockScoresAt(problem, t + i, 0), out, 0);
          return new Set(out);
        });
        shared += [...chosen[0]!].filter((b) => chosen.every((s) => s.has(b))).length;
      }
      return shared / 16; // blocks four consecutive queries all chose, of 16 (3 forced)
    };
    const random = common('random');
    const smooth = common('smooth');
    expect(random).toBeLessThan(4);
    expect(smooth).toBeGreaterThan(random + 2);
  });

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
