// Kernel sources reach NVRTC with their local headers inlined (NVRTC gets one string; the cubin cache hashes it).
// Headers include one another, so each must be inlined once, where it is first included. NVRTC also ships no C++
// standard library, which nvcc's compile check (npm run check:kernels) cannot notice: a kernel using std:: compiles
// there and fails at run time on the GPU.

import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { kernelDirectory, kernelSource } from '../../src/backends/cuda/nsa/kernel-source.js';

const count = (text: string, needle: string): number => text.split(needle).length - 1;

describe('kernelSource', () => {
  it('inlines every header once, even when a header includes another (flash attention: nsa_wgmma.cuh -> nsa_common.cuh)', () => {
    const source = kernelSource('flash_attention.cu');
    expect(source).not.toMatch(/^#include "/m);
    expect(count(source, '// ---- nsa_common.cuh ----')).toBe(1);
    expect(count(source, '// ---- nsa_wgmma.cuh ----')).toBe(1);
    expect(count(source, 'struct SoftmaxRows {')).toBe(1);
    expect(source.indexOf('// ---- nsa_common.cuh ----')).toBeLessThan(source.indexOf('// ---- nsa_wgmma.cuh ----'));
  });

  it('inlines nothing twice in any kernel source', () => {
    for (const file of ['decode.cu', 'select_blocks.cu', 'selected_attention.cu', 'flash_attention_bwd.cu']) {
      const source = kernelSource(file);
      expect(source, file).not.toMatch(/^#include "/m);
      expect(count(source, 'struct SoftmaxRows {'), file).toBe(1);
    }
  });

  it('uses no C++ standard library and no system header but the CUDA half types (NVRTC ships neither)', () => {
    const files = readdirSync(kernelDirectory()).filter((f) => f.endsWith('.cu'));
    expect(files.length).toBeGreaterThan(5);
    for (const file of files) {
      const source = kernelSource(file);
      expect(source, file).not.toMatch(/\bstd::/);
      const system = [...source.matchAll(/^#include <([^>]+)>/gm)].map((m) => m[1]);
      expect(system.filter((h) => h !== 'cuda_bf16.h' && h !== 'cuda_fp16.h'), file).toEqual([]);
    }
  });
});
