// Which selected-attention kernel 'auto' runs: the FSA order below G = 16 while its scratch fits the device memory.
import { describe, expect, it } from 'vitest';
import { NSAConfig } from '../../src/index.js';
import { autoSelectedKernel, fsaScratchBytes, GROUP_CENTRIC_MIN_G } from '../../src/backends/cuda/nsa/forward-runner.js';

const GB = 1e9;

describe('autoSelectedKernel', () => {
  it('counts the FSA scratch: a bf16 partial output and an fp32 lse per (token, head, slot), an 8-byte index entry per (token, KV head, slot)', () => {
    const config = new NSAConfig({ heads: 32, kvHeads: 8, headDim: 128, valueDim: 128, selectCount: 16 });
    expect(fsaScratchBytes(config, 1)).toBe(16 * (32 * (128 * 2 + 4) + 8 * 8));
    expect(fsaScratchBytes(config, 65536)).toBe(65536 * fsaScratchBytes(config, 1));
    const narrow = new NSAConfig({ heads: 4, kvHeads: 4, headDim: 192, valueDim: 64, selectCount: 3 });
    expect(fsaScratchBytes(narrow, 10)).toBe(10 * 3 * (4 * (64 * 2 + 4) + 4 * 8));
  });

  it('takes the FSA order below G = 16 while the scratch leaves a quarter of the available memory free', () => {
    expect(GROUP_CENTRIC_MIN_G).toBe(16);
    expect(autoSelectedKernel(4, 34 * GB, 78 * GB)).toBe('fsa');
    expect(autoSelectedKernel(1, 58.5 * GB, 78 * GB)).toBe('fsa');
    expect(autoSelectedKernel(4, 58.6 * GB, 78 * GB)).toBe('group');
    expect(autoSelectedKernel(4, 69 * GB, 78 * GB)).toBe('group');
    expect(autoSelectedKernel(16, 1, 78 * GB)).toBe('group');
    expect(autoSelectedKernel(15, 1, 78 * GB)).toBe('fsa');
  });
});
