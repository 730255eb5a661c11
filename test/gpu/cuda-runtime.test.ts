// The CUDA runtime layer on a real GPU: NVRTC compile of kernels/smoke.cu and the cubin cache, launches over 10M
// bf16 elements checked exactly, a TMA box copy (sm_90), out-of-memory recovery, a bad launch reported with the
// kernel's name, dynamic shared memory above 48 KiB, and CUDA-event timing. Skips, saying why, where no GPU, driver or NVRTC is present.
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CudaError, DeviceOutOfMemoryError, DisposedError, KernelCompileError } from '../../src/errors.js';
import { bf16ToF32, f32ToBf16 } from '../../src/tensor/dtype.js';
import { CudaContext, type CudaModule } from '../../src/backends/cuda/context.js';
import { cudaAvailability } from '../../src/backends/cuda/libraries.js';
import type { DeviceBuffer } from '../../src/backends/cuda/memory.js';
import { kernelSource } from '../../src/backends/cuda/nsa/kernel-source.js';
import { encodeTiledTensorMap } from '../../src/backends/cuda/tensor-map.js';

const availability = cudaAvailability();
if (!availability.available) {
  console.warn(`skipping the CUDA runtime GPU tests: ${availability.reason}`);
} else {
  const { device } = availability;
  console.log(
    `CUDA runtime tests on ${device.name} (cc ${device.computeCapability.join('.')}, ${device.smCount} SMs), driver ` +
      `${availability.driverVersion} (${availability.libcudaPath}), NVRTC ${availability.nvrtcVersion} ` +
      `(${availability.nvrtcPath}), headers ${availability.includeDir ?? 'none found'}`,
  );
}

const N = 10_000_000;
const smokeSource = readFileSync(new URL('../../src/backends/cuda/kernels/smoke.cu', import.meta.url), 'utf8');

describe.skipIf(!availability.available)('CUDA runtime on a GPU', () => {
  const savedCacheDir = process.env['NSA_CACHE_DIR'];
  let ctx: CudaContext;
  let module: CudaModule;
  let scratch: DeviceBuffer;

  const fillLaunch = (out: DeviceBuffer, value: number, n: number, block: readonly [number, number, number] = [256, 1, 1]) =>
    ctx.kernel(module, 'smoke_fill_bf16').launch({ grid: [ctx.device.smCount * 8, 1, 1], block, args: [{ ptr: out.ptr }, { f32: value }, { i32: n }] });

  beforeAll(() => {
    process.env['NSA_CACHE_DIR'] = mkdtempSync(join(tmpdir(), 'nsa-gpu-cubin-'));
    ctx = CudaContext.create();
  });

  afterAll(() => {
    ctx.dispose();
    if (savedCacheDir === undefined) delete process.env['NSA_CACHE_DIR'];
    else process.env['NSA_CACHE_DIR'] = savedCacheDir;
  });

  it('compiles smoke.cu with NVRTC, then serves the same cubin from the on-disk cache', () => {
    const t0 = performance.now();
    const first = ctx.compile('smoke', smokeSource);
    const t1 = performance.now();
    const second = ctx.compile('smoke', smokeSource);
    const t2 = performance.now();
    console.log(`NVRTC compile ${(t1 - t0).toFixed(1)} ms, cache hit ${(t2 - t1).toFixed(2)} ms, cubin ${first.cubin.length} bytes`);
    expect([first.cacheHit, second.cacheHit]).toEqual([false, true]);
    expect(second.cubin.equals(first.cubin)).toBe(true);
    expect([...first.cubin.subarray(0, 4)]).toEqual([0x7f, 0x45, 0x4c, 0x46]); // an ELF cubin
    expect(t2 - t1).toBeLessThan(t1 - t0);
    module = ctx.module('smoke', smokeSource);
    expect(module.cacheHit).toBe(true);
  });

  it('fills 10M bf16 elements and runs axpy over them, exactly', () => {
    const y = ctx.alloc(N * 2, 'y');
    fillLaunch(y, -2.5, N);
    const filled = new Uint16Array(N);
    ctx.download(y, filled);
    expect(filled.every((h) => h === f32ToBf16(-2.5))).toBe(true);

    const xs = new Uint16Array(N);
    const ys = new Uint16Array(N);
    for (let i = 0; i < N; i++) {
      xs[i] = f32ToBf16((i % 64) * 0.5);
      ys[i] = f32ToBf16((i % 7) - 3);
    }
    const x = ctx.upload(xs, 'x');
    ctx.driver.memcpyHtoD(y.ptr, ys);
    ctx.kernel(module, 'smoke_axpy_bf16').launch({
      grid: [ctx.device.smCount * 4, 1, 1],
      block: [256, 1, 1],
      args: [{ ptr: y.ptr }, { ptr: x.ptr }, { f32: 2 }, { i64: BigInt(N) }],
    });
    const out = new Uint16Array(N);
    ctx.download(y, out);
    let wrong = -1;
    for (let i = 0; i < N && wrong < 0; i++) if (bf16ToF32(out[i] ?? 0) !== (i % 64) + (i % 7) - 3) wrong = i;
    expect(wrong).toBe(-1);
    x.dispose();
    scratch = y;
  });

  it('compiles for the arch-specific target on Hopper and newer', () => {
    if (ctx.device.computeCapability[0] < 9) return;
    const archModule = ctx.module('smoke', smokeSource, { archSpecific: true });
    expect(archModule.arch).toMatch(/^sm_\d+a$/);
    ctx.kernel(archModule, 'smoke_fill_bf16').launch({ grid: [1, 1, 1], block: [32, 1, 1], args: [{ ptr: scratch.ptr }, { f32: 1 }, { i32: 32 }] });
    ctx.synchronize();
  });

  it('copies a 64 x 64 box through a TMA tensor map (128-byte swizzle: the wgmma tile layout), zeros past the end', () => {
    if (ctx.device.computeCapability[0] < 9) return; // TMA is sm_90's
    const rows = 100;
    const cols = 192;
    const value = (r: number, c: number): number => (r * 7 + c * 3) % 251; // exact in bf16
    const host = new Uint16Array(rows * cols);
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) host[r * cols + c] = f32ToBf16(value(r, c));
    const x = ctx.upload(host, 'tma source');
    const out = ctx.alloc(64 * 64 * 2, 'tma box');
    const map = encodeTiledTensorMap(ctx.driver, { ptr: x.ptr, dtype: 'bf16', dims: [cols, rows], strides: [cols * 2], box: [64, 64], swizzle: '128B' }, 'tma source');
    const tma = ctx.module('tma_smoke', kernelSource('tma_smoke.cu'));
    const [x0, y0] = [64, 40]; // rows 100 .. 103 of the box lie past the end
    ctx.kernel(tma, 'tma_smoke_box').launch({ grid: [1, 1, 1], block: [128, 1, 1], args: [{ bytes: map }, { ptr: out.ptr }, { i32: x0 }, { i32: y0 }] });
    const got = new Uint16Array(64 * 64);
    ctx.download(out, got);
    let wrong = 0;
    for (let r = 0; r < 64; r++) {
      for (let c = 0; c < 64; c++) {
        const want = y0 + r < rows ? value(y0 + r, x0 + c) : 0;
        if (bf16ToF32(got[r * 64 + c]!) !== want) wrong++;
      }
    }
    expect(wrong).toBe(0);
    x.dispose();
    out.dispose();
  });

  it('turns out-of-memory into DeviceOutOfMemoryError and allocates afterwards', () => {
    expect(() => ctx.alloc(2 ** 50, '1 PiB test buffer')).toThrow(DeviceOutOfMemoryError);
    let error: unknown; // the driver's own CUDA_ERROR_OUT_OF_MEMORY, past the pool's size check
    try {
      ctx.driver.memFree(ctx.driver.memAlloc(ctx.device.totalBytes, 'the whole device'));
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(DeviceOutOfMemoryError);
    expect((error as DeviceOutOfMemoryError).freeBytes).toBeGreaterThan(0);
    const after = ctx.alloc(256 << 20, 'after OOM');
    fillLaunch(after, 3, 1000);
    ctx.synchronize();
    after.dispose();
  });

  it('reports a bad launch configuration as CudaError naming the kernel, and stays usable', () => {
    let error: unknown;
    try {
      fillLaunch(scratch, 0, N, [4096, 1, 1]);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(CudaError);
    expect(error).toMatchObject({ call: 'cuLaunchKernel', kernel: 'smoke_fill_bf16', resultName: 'CUDA_ERROR_INVALID_VALUE' });
    fillLaunch(scratch, 1, N);
    ctx.synchronize();
  });

  it('opts in to more than 48 KiB of dynamic shared memory', () => {
    const sharedBytes = Math.min(100 * 1024, ctx.device.maxSharedBytesOptin);
    ctx.kernel(module, 'smoke_fill_bf16').launch({ grid: [1, 1, 1], block: [128, 1, 1], sharedBytes, args: [{ ptr: scratch.ptr }, { f32: 0 }, { i32: 128 }] });
    ctx.synchronize();
  });

  it('passes NVRTC errors on as KernelCompileError with the log', () => {
    const broken = 'extern "C" __global__ void broken(float* p) { p[0] = undefined_thing; }';
    expect(() => ctx.module('broken', broken)).toThrow(KernelCompileError);
    expect(() => ctx.module('broken', broken)).toThrow(/undefined_thing/);
  });

  it('times the axpy with CUDA events', () => {
    const x = ctx.alloc(N * 2, 'x');
    ctx.memset(x, 0);
    const axpy = ctx.kernel(module, 'smoke_axpy_bf16');
    const timing = ctx.time(
      () => axpy.launch({ grid: [ctx.device.smCount * 4, 1, 1], block: [256, 1, 1], args: [{ ptr: scratch.ptr }, { ptr: x.ptr }, { f32: 1 }, { i64: BigInt(N) }] }),
      { warmup: 3, iterations: 20 },
    );
    expect(timing.samplesMs).toHaveLength(20);
    expect(timing.medianMs).toBeGreaterThan(0);
    console.log(`smoke_axpy_bf16 over ${N} elements: median ${timing.medianMs.toFixed(4)} ms, ${((N * 6) / timing.medianMs / 1e6).toFixed(0)} GB/s`);
    x.dispose();
  });

  it('frees its memory on dispose and refuses work afterwards', () => {
    scratch.dispose();
    expect(ctx.memoryStats().bytesInUse).toBe(0);
    ctx.dispose();
    expect(() => ctx.alloc(1, 'late')).toThrow(DisposedError);
  });
});
