// The cases and checks the cuda forward's GPU test files share (test/gpu/nsa-forward*.test.ts, nsa-select*.test.ts):
// seeded inputs, the float64 reference's comparisons at the spec's tolerances, bit-for-bit comparisons, and a pool of
// backends each created under its own tuning environment.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { createCudaBackend, type CudaBackend } from '../../src/backends/cuda/cuda-backend.js';
import { cudaAvailability } from '../../src/backends/cuda/libraries.js';
import type { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { prepareNsaProblem, type NsaReferenceInputs } from '../../src/reference/nsa-forward.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import type { NsaOutputs } from '../../src/nsa/types.js';
import { expectRelativeRms } from './compare.js';
import { withEnvironment } from './env.js';
import { withIndependentKv } from './gpu-inputs.js';
import { checkRowSelection } from './selection-check.js';

export const TOL = { rtol: 5e-3 };

export interface Case {
  readonly name: string;
  readonly options: NSAConfigOptions;
  readonly seqlens: readonly number[];
  readonly dtype: 'bf16' | 'f16';
  readonly kernels: readonly ('group' | 'fsa')[];
  readonly independent?: boolean;
}

export const base = { compressBlock: 32, compressStride: 16, selectBlock: 64, selectCount: 6, window: 96 };
export const CASES: Case[] = [
  { name: 'fla preset form, G = 16, T = 1000', options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 4, window: 128, heads: 16, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [1000], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'paper preset form, G = 4, D = 128, T = 777', options: { ...base, heads: 8, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [777], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'G = 1 (MHA), T = 513', options: { ...base, heads: 2, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [513], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'G = 2, f16, packed [100, 1, 300, 64, 5]', options: { ...base, selectBlock: 32, selectCount: 5, heads: 4, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [100, 1, 300, 64, 5], dtype: 'f16', kernels: ['group', 'fsa'] },
  { name: 'dk = 64 < dv = 128, G = 16, T = 345', options: { ...base, heads: 16, kvHeads: 1, headDim: 64, valueDim: 128 }, seqlens: [345], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'dk = 192, dv = 128, G = 16, T = 400', options: { ...base, heads: 16, kvHeads: 1, headDim: 192, valueDim: 128 }, seqlens: [400], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: "l' = 32 < 64-key tiles, n = 8, G = 8", options: { compressBlock: 16, compressStride: 8, selectBlock: 32, selectCount: 8, window: 40, heads: 8, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [611], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: "l' = 128 > 64-key tiles, G = 4", options: { compressBlock: 64, compressStride: 32, selectBlock: 128, selectCount: 4, window: 200, heads: 4, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [900], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'independent K/V per branch, compressed K/V given', options: { ...base, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [300, 211], dtype: 'bf16', kernels: ['group', 'fsa'], independent: true },
  { name: 'learned phi = linear, G = 4, packed [333, 70]', options: { ...base, phi: 'linear', heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 }, seqlens: [333, 70], dtype: 'bf16', kernels: ['fsa'] },
  { name: 'learned phi = mlp, dk = 128 != dv = 64, G = 16', options: { ...base, phi: 'mlp', heads: 16, kvHeads: 1, headDim: 128, valueDim: 64 }, seqlens: [301], dtype: 'bf16', kernels: ['group'] },
  // No sequence longer than n l': the selected branch is dense attention (as in the four cases above with T <= 384).
  { name: "every visible block selected (T <= n l' = 512), G = 16, D = 128, packed [512, 1, 333, 129]", options: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 8, window: 256, heads: 16, kvHeads: 1, headDim: 128, valueDim: 128 }, seqlens: [512, 1, 333, 129], dtype: 'bf16', kernels: ['group'] },
  { name: "every visible block selected (T <= n l' = 384), G = 4, f16, dk = 192, dv = 128, packed [384, 5, 383]", options: { ...base, heads: 8, kvHeads: 2, headDim: 192, valueDim: 128 }, seqlens: [384, 5, 383], dtype: 'f16', kernels: ['group', 'fsa'] },
  // G above 16: the selected attention takes a position's heads 16 at a time (grid z), the scoring sums them all.
  { name: 'G = 64 (MQA: 64 query heads, one KV head), T = 600', options: { ...base, heads: 64, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [600], dtype: 'bf16', kernels: ['group', 'fsa'] },
  { name: 'G = 32, D = 128, packed [450, 3]', options: { ...base, heads: 64, kvHeads: 2, headDim: 128, valueDim: 128 }, seqlens: [450, 3], dtype: 'bf16', kernels: ['group'] },
  { name: 'G = 24 (a second chunk of 16 heads, part-filled), T = 520', options: { ...base, heads: 24, kvHeads: 1, headDim: 64, valueDim: 64 }, seqlens: [520], dtype: 'bf16', kernels: ['group', 'fsa'] },
];

/** Case i's config, packed offsets and seeded inputs (its own K/V per branch where the case says so). */
export function caseInputs(i: number): { config: NSAConfig; cuSeqlens: number[]; inputs: ReturnType<typeof randomInputs> } {
  const c = CASES[i]!;
  const config = new NSAConfig(c.options);
  const cuSeqlens = packedOffsets(c.seqlens);
  const inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: 1000 + 17 * i });
  return { config, cuSeqlens, inputs: c.independent ? withIndependentKv(inputs, config, cuSeqlens, 1000 + 17 * i) : inputs };
}

/** Every row's selection is valid, and where it differs from the reference its score is within tolerance. */
export function checkSelection(config: NSAConfig, ref: NsaReferenceInputs, gpu: Int32Array, expected: Int32Array): { differing: number; rows: number } {
  const problem = prepareNsaProblem(config, ref);
  const H = config.kvHeads;
  let differing = 0;
  for (let row = 0; row < problem.layout.totalTokens; row++) differing += checkRowSelection(problem, row, row, gpu, expected);
  const rows = problem.layout.totalTokens * H;
  expect(differing, `rows whose selection differs from the reference: ${differing} of ${rows}`).toBeLessThanOrEqual(Math.max(2, rows * 0.02));
  return { differing, rows };
}

export function compareOutputs(out: NsaOutputs, ref: ReturnType<typeof nsaReferenceForward>): void {
  expectRelativeRms(out.o.toFloat64(), ref.o, 'o', TOL);
  expectRelativeRms(out.oCmp.toFloat64(), ref.oCmp, 'o_cmp', TOL);
  expectRelativeRms(out.oSlc.toFloat64(), ref.oSlc, 'o_slc', TOL);
  expectRelativeRms(out.oWin.toFloat64(), ref.oWin, 'o_win', TOL);
  expectRelativeRms(out.lseCmp.toFloat64(), ref.lseCmp, 'lse_cmp', TOL);
  expectRelativeRms(out.lseSlc.toFloat64(), ref.lseSlc, 'lse_slc', TOL);
  expectRelativeRms(out.lseWin.toFloat64(), ref.lseWin, 'lse_win', TOL);
}

/** A tensor's bytes, to compare two results bit for bit. */
export const bits = (t: { data: ArrayBufferView }): Buffer => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);

/** Two forwards chose the same blocks and gave the same selected branch and output, bit for bit. */
export function expectSameSelectedBits(a: NsaOutputs, b: NsaOutputs, what: string): void {
  for (const key of ['blockIndices', 'oSlc', 'lseSlc', 'o'] as const) {
    expect(bits(a[key]).equals(bits(b[key])), `${what}: ${key} bits`).toBe(true);
  }
}

/**
 * Backends for one test file: the two selected kernels' defaults, and one per (kernel, tuning environment) made on
 * first use (the tuning is read when a backend first builds a config's kernels). One CUDA context per process, so
 * they are disposed together, the first made last.
 */
export class BackendPool {
  private readonly backends = new Map<string, CudaBackend>();

  async open(): Promise<void> {
    for (const kernel of ['group', 'fsa'] as const) {
      this.backends.set(kernel, (await createCudaBackend({ selectedKernel: kernel })) as CudaBackend);
    }
  }

  /** The default backend of a selected kernel. */
  get(kernel: 'group' | 'fsa'): CudaBackend {
    return this.backends.get(kernel)!;
  }

  /** `run` on a backend created under `env`, kept for the file. */
  withEnv<T>(kernel: 'group' | 'fsa', env: Record<string, string>, run: (backend: CudaBackend) => Promise<T>): Promise<T> {
    const key = `${kernel} ${JSON.stringify(env)}`;
    return withEnvironment(env, async () => {
      if (!this.backends.has(key)) this.backends.set(key, (await createCudaBackend({ selectedKernel: kernel })) as CudaBackend);
      return run(this.backends.get(key)!);
    });
  }

  /** A backend created now (under the caller's environment), disposed with the others. */
  async fresh(kernel: 'group' | 'fsa', key: string): Promise<CudaBackend> {
    const backend = (await createCudaBackend({ selectedKernel: kernel })) as CudaBackend;
    this.backends.set(key, backend);
    return backend;
  }

  dispose(): void {
    for (const b of [...this.backends.values()].reverse()) b.dispose();
    this.backends.clear();
  }
}

/**
 * `describe(title on <the GPU>)` with a BackendPool opened before its tests and disposed after them; where no CUDA
 * GPU is usable, one skipped test that says why.
 */
export function describeWithBackends(title: string, body: (pool: BackendPool) => void): void {
  const availability = cudaAvailability();
  if (!availability.available) {
    describe(title, () => {
      it.skip(`skipped: no usable CUDA GPU here (${availability.reason.split('\n')[0]})`, () => {});
    });
    return;
  }
  describe(`${title} on ${availability.device.name}`, () => {
    const pool = new BackendPool();
    beforeAll(() => pool.open());
    afterAll(() => pool.dispose());
    body(pool);
  });
}

/** One turn of the event loop: lets vitest's RPC replies in between long runs of synchronous compiles. */
export const nextTurn = (): Promise<void> => new Promise<void>((resolve) => setImmediate(resolve));

/** Packed offsets [0, s0, s0 + s1, ...] of a case's sequence lengths. */
export function packedOffsets(seqlens: readonly number[]): number[] {
  const cuSeqlens = [0];
  for (const len of seqlens) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + len);
  return cuSeqlens;
}
