// The whole runtime layer (Koffi bindings, NVRTC compile + cache, pool, launches, timing, dispose) over a fake
// libcuda + libnvrtc built from fixtures/fake-cuda.c. It checks what cannot be checked by reading the code: that
// every out-parameter, handle, typed array and `void **kernelParams` crosses Koffi as the C side expects. The same
// flow on a real GPU is test/gpu/cuda-runtime.test.ts.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { CudaError, DeviceOutOfMemoryError, DisposedError, InputValueError, KernelCompileError, UnsupportedConfigError } from '../../src/errors.js';
import { bf16ToF32, f32Bits, f32ToBf16 } from '../../src/tensor/dtype.js';
import { CudaContext } from '../../src/backends/cuda/context.js';
import { cudaAvailability } from '../../src/backends/cuda/libraries.js';
import type { Kernel } from '../../src/backends/cuda/launch.js';
import { encodeTiledTensorMap } from '../../src/backends/cuda/tensor-map.js';
import { buildFakeCuda } from './fake-cuda.js';

const fake = buildFakeCuda();
if (fake === undefined) console.warn('skipping the fake-driver tests: no C compiler (cc, gcc, clang) to build fixtures/fake-cuda.c');

const MiB = 1 << 20;
const smokeSource = readFileSync(new URL('../../src/backends/cuda/kernels/smoke.cu', import.meta.url), 'utf8');
const ENV = ['NSA_LIBCUDA_PATH', 'NSA_NVRTC_PATH', 'NSA_CACHE_DIR', 'NSA_CUDA_INCLUDE', 'FAKE_CUDA_DRIVER_VERSION'] as const;

describe.skipIf(fake === undefined)('CUDA runtime over a fake libcuda + libnvrtc', () => {
  const saved = ENV.map((name) => [name, process.env[name]] as const);
  const root = mkdtempSync(join(tmpdir(), 'nsa-fake-runtime-'));
  const cacheDir = join(root, 'cache');
  const includeDir = join(root, 'include');
  let ctx: CudaContext;
  let fill: Kernel;

  beforeAll(() => {
    mkdirSync(includeDir);
    writeFileSync(join(includeDir, 'cuda_bf16.h'), '');
    process.env['NSA_LIBCUDA_PATH'] = fake?.path;
    process.env['NSA_NVRTC_PATH'] = fake?.path;
    process.env['NSA_CACHE_DIR'] = cacheDir;
    process.env['NSA_CUDA_INCLUDE'] = includeDir;
    ctx = CudaContext.create();
  });

  afterAll(() => {
    ctx.dispose();
    for (const [name, value] of saved) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  });

  it('reads the device and versions through the out-parameters', () => {
    const availability = cudaAvailability();
    expect(availability).toMatchObject({ available: true, driverVersion: '13.0', nvrtcVersion: '13.0', includeDir });
    expect(ctx.device).toEqual({
      index: 0,
      name: 'Fake GPU (test/cuda-runtime)',
      computeCapability: [9, 0],
      smCount: 132,
      maxSharedBytesOptin: 232448,
      sharedBytesPerSm: 233472,
      reservedSharedBytesPerBlock: 1024,
      l2Bytes: 50 * MiB,
      totalBytes: 64 * MiB,
    });
    expect([ctx.arch(), ctx.arch(true)]).toEqual(['sm_90', 'sm_90a']);
  });

  it('compiles smoke.cu, launches fill and axpy, and reads back exact bf16 results', () => {
    const module = ctx.module('smoke', smokeSource);
    expect(module).toMatchObject({ name: 'smoke', arch: 'sm_90', cacheHit: false });
    expect(ctx.module('smoke', smokeSource)).toBe(module);
    fill = ctx.kernel(module, 'smoke_fill_bf16');
    expect(ctx.kernel(module, 'smoke_fill_bf16')).toBe(fill);
    const n = 10_000;
    const y = ctx.alloc(n * 2, 'y');
    fill.launch({ grid: [40, 1, 1], block: [256, 1, 1], args: [{ ptr: y.ptr }, { f32: 1.5 }, { i32: n }] });
    expect(fake?.lastLaunch()).toEqual([40, 1, 1, 256, 1, 1, 0]);
    const filled = new Uint16Array(n);
    ctx.download(y, filled);
    expect(filled.every((h) => h === f32ToBf16(1.5))).toBe(true);

    const x = ctx.upload(Uint16Array.from({ length: n }, (_, i) => f32ToBf16((i % 64) * 0.5)), 'x');
    const y2 = ctx.upload(Uint16Array.from({ length: n }, (_, i) => f32ToBf16((i % 7) - 3)), 'y2');
    const axpy = ctx.kernel(module, 'smoke_axpy_bf16');
    axpy.launch({ grid: [8, 2, 1], block: [128, 1, 1], args: [{ ptr: y2.ptr }, { ptr: x.ptr }, { f32: 2 }, { i64: BigInt(n) }] });
    const out = new Uint16Array(n);
    ctx.download(y2, out);
    const wrong = [...out].findIndex((h, i) => bf16ToF32(h) !== (i % 64) + (i % 7) - 3);
    expect(wrong).toBe(-1);
    for (const b of [x, y, y2]) b.dispose();
  });

  it('serves a second compile from the on-disk cache, and recompiles a corrupted entry', () => {
    const first = ctx.compile('smoke', smokeSource);
    expect(first.cacheHit).toBe(true);
    expect(first.cubin.toString('utf8')).toContain(`// options: --gpu-architecture=sm_90 -std=c++17 -default-device -I${includeDir}\n`);
    const [entry, ...others] = readdirSync(cacheDir);
    expect(others).toEqual([]);
    writeFileSync(join(cacheDir, entry ?? ''), 'garbage');
    const again = ctx.compile('smoke', smokeSource);
    expect(again.cacheHit).toBe(false);
    expect(again.cubin).toEqual(first.cubin);
    expect(ctx.compile('smoke', smokeSource, { archSpecific: true, options: ['-DX=1'] }).options).toEqual([
      '--gpu-architecture=sm_90a', '-std=c++17', '-default-device', `-I${includeDir}`, '-DX=1',
    ]);
  });

  it('passes the NVRTC log on as KernelCompileError and destroys every program', () => {
    expect(() => ctx.module('broken', '#error nope')).toThrow(KernelCompileError);
    expect(() => ctx.module('broken', '#error nope')).toThrow(/NVRTC_ERROR_COMPILATION\n.*#error directive/);
    expect(() => ctx.module('headers', '#include <missing_header.h>')).toThrow(/cannot open source file[\s\S]*NSA_CUDA_INCLUDE/);
    expect(fake?.livePrograms()).toBe(0);
  });

  it('names the kernel in the CudaError of a bad launch, and stays usable', () => {
    const y = ctx.alloc(256, 'y');
    const args = [{ ptr: y.ptr }, { f32: 0 }, { i32: 128 }];
    let error: unknown;
    try {
      fill.launch({ grid: [1, 1, 1], block: [4096, 1, 1], args });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(CudaError);
    expect(error).toMatchObject({ call: 'cuLaunchKernel', result: 1, resultName: 'CUDA_ERROR_INVALID_VALUE', kernel: 'smoke_fill_bf16' });
    expect(() => fill.launch({ grid: [1.5, 1, 1], block: [128, 1, 1], args })).toThrow(InputValueError);
    expect(() => fill.launch({ grid: [1, 1, 1], block: [128, 1, 1], args: [{ ptr: y.ptr }, { f32: 0 }, { i32: 0.5 }] })).toThrow(InputValueError);
    fill.launch({ grid: [1, 1, 1], block: [128, 1, 1], args });
    ctx.synchronize();
    y.dispose();
  });

  it('raises the dynamic shared memory limit above 48 KiB, and refuses more than the GPU allows', () => {
    const y = ctx.alloc(256, 'y');
    const launch = (sharedBytes: number) => fill.launch({ grid: [1, 1, 1], block: [32, 1, 1], sharedBytes, args: [{ ptr: y.ptr }, { f32: 0 }, { i32: 1 }] });
    launch(64 * 1024);
    expect(fake?.maxDynamicShared('smoke_fill_bf16')).toBe(64 * 1024);
    expect(fake?.lastLaunch()[6]).toBe(64 * 1024);
    expect(() => launch(300 * 1024)).toThrow(UnsupportedConfigError);
    y.dispose();
  });

  it('asks the driver how many CTAs an SM holds, opting in to the shared memory first', () => {
    expect(fill.residentBlocksPerSM(128, 0)).toBe(16);
    // 100 KiB is above the default limit: without the opt-in the driver would count 0 CTAs.
    expect(fill.residentBlocksPerSM(128, 100 * 1024)).toBe(2);
    expect(fake?.maxDynamicShared('smoke_fill_bf16')).toBeGreaterThanOrEqual(100 * 1024);
    expect(() => fill.residentBlocksPerSM(2048, 0)).toThrow(CudaError);
  });

  it('encodes a tiled tensor map through a 64-byte aligned host buffer, every argument crossing Koffi as C sees it', () => {
    const x = ctx.alloc(1024 * 1024, 'tensor');
    const map = encodeTiledTensorMap(ctx.driver, { ptr: x.ptr, dtype: 'bf16', dims: [192, 100, 3], strides: [384, 38400], box: [64, 64, 1], swizzle: '128B' }, 'q');
    expect(map.length).toBe(128);
    const words = new BigUint64Array(map.buffer, map.byteOffset, 16);
    expect(words[0]).toBe(x.ptr);
    // bf16 = 9, rank 3, swizzle 128B = 3, L2 promotion 128 B = 2, no interleave, zero fill
    expect(words[1]).toBe(9n | (3n << 8n) | (3n << 16n) | (2n << 24n));
    const dimBox = (dim: number, box: number): bigint => BigInt(dim) | (BigInt(box) << 40n) | (1n << 56n);
    expect([words[2], words[3], words[4]]).toEqual([dimBox(192, 64), dimBox(100, 64), dimBox(3, 1)]);
    expect([words[7], words[8]]).toEqual([384n, 38400n]);
    x.dispose();
  });

  it('turns out-of-memory into DeviceOutOfMemoryError, trims the pool to fit, and keeps working', () => {
    expect(() => ctx.alloc(2 ** 50, '1 PiB')).toThrow(DeviceOutOfMemoryError);
    ctx.alloc(MiB, 'after 1 PiB').dispose();
    ctx.alloc(40 * MiB, 'big').dispose();
    const bigger = ctx.alloc(48 * MiB, 'bigger'); // fits only once the cached 40 MiB block is freed
    expect(ctx.memoryStats()).toMatchObject({ bytesCached: 0, bytesInUse: 48 * MiB });
    let error: unknown;
    try {
      ctx.alloc(20 * MiB, 'one too many'); // refused by the (fake) driver itself: CUDA_ERROR_OUT_OF_MEMORY
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(DeviceOutOfMemoryError);
    expect(error).toMatchObject({ requestedBytes: 20 * MiB, freeBytes: 64 * MiB - (fake?.bytesInUse() ?? 0) });
    bigger.dispose();
    ctx.alloc(20 * MiB, 'fits again').dispose();
  });

  it('copies typed arrays of any element type and offset, sets memory, and refuses oversized downloads', () => {
    const floats = new Float32Array([9, 1, 2, 3, 9]);
    const a = ctx.upload(floats.subarray(1, 4), 'a');
    const back = new Float32Array(3);
    ctx.download(a, back);
    expect([...back]).toEqual([1, 2, 3]);
    const b = ctx.alloc(12, 'b');
    ctx.memset32(b, f32Bits(0.5));
    ctx.download(b, back);
    expect([...back]).toEqual([0.5, 0.5, 0.5]);
    ctx.copy(b, a);
    ctx.memset(a, 0);
    ctx.download(b, back);
    expect([...back]).toEqual([1, 2, 3]);
    expect(() => ctx.download(a, new Float32Array(4))).toThrow(InputValueError);
    a.dispose();
    b.dispose();
  });

  it('times launches with a pair of CUDA events per iteration', () => {
    const y = ctx.alloc(256, 'y');
    const timing = ctx.time(() => fill.launch({ grid: [1, 1, 1], block: [32, 1, 1], args: [{ ptr: y.ptr }, { f32: 0 }, { i32: 1 }] }), {
      warmup: 2,
      iterations: 5,
    });
    expect(timing).toEqual({ medianMs: 0.25, samplesMs: [0.25, 0.25, 0.25, 0.25, 0.25] });
    y.dispose();
  });

  it('reports a libcuda without the graph calls, and refuses a capture naming the call', () => {
    expect(ctx.canCaptureGraphs).toBe(false);
    const run = vi.fn();
    expect(() => ctx.captureGraph(run, 'step')).toThrow(/cuStreamBeginCapture_v2: .* does not export the CUDA graph calls/);
    expect(run).not.toHaveBeenCalled();
  });

  it('frees everything on dispose, then refuses work', () => {
    const other = CudaContext.create();
    expect(fake?.ctxRefs()).toBe(2);
    const held = other.alloc(3 * MiB, 'held');
    other.dispose();
    other.dispose();
    expect(fake?.ctxRefs()).toBe(1);
    expect(() => held.ptr).toThrow(DisposedError);
    expect(() => other.alloc(1, 'late')).toThrow(DisposedError);
    ctx.dispose();
    expect([fake?.bytesInUse(), fake?.ctxRefs()]).toEqual([0, 0]);
    expect(() => fill.launch({ grid: [1, 1, 1], block: [1, 1, 1], args: [] })).toThrow(DisposedError);
  });

  it('skips an NVRTC newer than the driver, saying so', async () => {
    vi.resetModules();
    process.env['FAKE_CUDA_DRIVER_VERSION'] = '12040';
    const fresh = await import('../../src/backends/cuda/libraries.js');
    const availability = fresh.cudaAvailability();
    expect(availability.available).toBe(false);
    if (!availability.available) expect(availability.reason).toContain('NVRTC 13.0 is newer than the CUDA 12 driver can run');
  });
});
