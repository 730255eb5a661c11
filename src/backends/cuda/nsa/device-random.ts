// Seeded random tensors filled on the GPU (kernels/random_fill.cu), so benchmarks at long lengths never build or
// upload gigabytes from the host.

import type { CudaContext } from '../context.js';
import type { Kernel } from '../launch.js';
import type { DeviceBuffer } from '../memory.js';
import { SMOOTH_WAVE_AMPLITUDE } from '../../../nsa/random-inputs.js';
import { kernelSource } from './kernel-source.js';
import type { HalfDType } from './programs.js';

export class DeviceRandom {
  private readonly normalKernel: Kernel;
  private readonly uniformKernel: Kernel;
  private readonly waveKernel: Kernel;

  constructor(
    private readonly ctx: CudaContext,
    dtype: HalfDType,
  ) {
    const options = ['-DDK=64', '-DDV=64', ...(dtype === 'f16' ? ['-DNSA_FP16'] : [])];
    const module = ctx.module('random_fill', kernelSource('random_fill.cu'), { options });
    this.normalKernel = ctx.kernel(module, 'nsa_fill_normal');
    this.uniformKernel = ctx.kernel(module, 'nsa_fill_uniform');
    this.waveKernel = ctx.kernel(module, 'nsa_add_wave');
  }

  /** Adds the smooth inputs' positional wave (random-inputs.ts, addSmoothWave) to a [tokens, rows, D] half tensor. */
  addSmoothWave(buffer: DeviceBuffer, tokens: number, rows: number, D: number, seed: number): void {
    const elements = tokens * rows * D;
    if (elements * 2 > buffer.bytes) throw new RangeError(`wave past the end of ${buffer.what}`);
    this.waveKernel.launch({
      grid: [gridFor(elements), 1, 1],
      block: [256, 1, 1],
      args: [{ ptr: buffer.ptr }, { i64: elements }, { i32: rows * D }, { i32: D }, { u64: BigInt(seed >>> 0) }, { f32: SMOOTH_WAVE_AMPLITUDE }],
    });
  }

  /** `elements` N(0, std^2) values of the half dtype, from element `offset` of the buffer on. */
  normal(buffer: DeviceBuffer, elements: number, seed: number, std = 1, offset = 0): void {
    if ((offset + elements) * 2 > buffer.bytes) throw new RangeError(`random fill past the end of ${buffer.what}`);
    this.normalKernel.launch({
      grid: [gridFor(elements), 1, 1],
      block: [256, 1, 1],
      args: [{ ptr: buffer.ptr + BigInt(offset * 2) }, { i64: elements }, { u64: BigInt(seed >>> 0) }, { f32: std }],
    });
  }

  /** `elements` U(0, 1] fp32 values. */
  uniform(buffer: DeviceBuffer, elements: number, seed: number): void {
    this.uniformKernel.launch({
      grid: [gridFor(elements), 1, 1],
      block: [256, 1, 1],
      args: [{ ptr: buffer.ptr }, { i64: elements }, { u64: BigInt(seed >>> 0) }],
    });
  }
}

function gridFor(elements: number): number {
  return Math.max(1, Math.min(65535, Math.ceil(elements / 256)));
}
