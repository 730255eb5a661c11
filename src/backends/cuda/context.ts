// CudaContext: one GPU's primary context and one stream, with compiled modules, kernels, pooled device memory,
// copies and event timing. The libraries load lazily, once per process (libraries.ts).
//
// Ordering: the stream is a blocking stream (flag 0), so the synchronous copies and memsets, which run on the
// legacy default stream, are ordered with the kernels launched on it: an upload lands before a later launch reads
// it, and a download waits for the kernels launched before it.
import { homedir } from 'node:os';
import { BackendUnavailableError, DisposedError, InputValueError } from '../../errors.js';
import { CubinCache, cubinCacheDir } from './cubin-cache.js';
import {
  CU_STREAM_CAPTURE_MODE_RELAXED,
  CU_STREAM_DEFAULT,
  type CUcontext,
  type CudaDriver,
  type CUgraph,
  type CUgraphExec,
  type CUmodule,
  type CUstream,
} from './driver.js';
import { Kernel, timeOnStream, type LaunchTarget, type TimingOptions, type TimingResult } from './launch.js';
import {
  deviceArch,
  formatCudaVersion,
  loadCudaLibraries,
  missingHeaderHint,
  readDeviceInfo,
  type CudaDeviceInfo,
  type CudaLibraries,
} from './libraries.js';
import { DeviceMemoryPool, type DeviceBuffer, type PoolStats } from './memory.js';
import { compileCuda, compileKey, type CompiledCubin, type CompileRequest } from './nvrtc.js';

export interface ModuleOptions {
  /** Extra NVRTC options, e.g. `-DHEAD_DIM=128`. */
  readonly options?: readonly string[];
  /** Compile for the arch-specific target (`sm_90a` on H100) to use wgmma and the like; default false. */
  readonly archSpecific?: boolean;
}

export interface CudaModule {
  readonly name: string;
  readonly arch: string;
  readonly key: string;
  /** Whether the cubin came from the on-disk cache. */
  readonly cacheHit: boolean;
  readonly handle: CUmodule;
}

export class CudaContext implements LaunchTarget {
  private static current: CudaContext | undefined;
  private readonly modules = new Map<string, CudaModule>();
  private readonly kernels = new Map<string, Kernel>();
  private readonly pool: DeviceMemoryPool;
  private lastKernel: string | undefined;
  private disposed = false;

  private constructor(
    private readonly libs: CudaLibraries,
    private readonly dev: number,
    private readonly ctx: CUcontext,
    readonly stream: CUstream,
    readonly device: CudaDeviceInfo,
  ) {
    const driver = libs.driver;
    this.pool = new DeviceMemoryPool({
      alloc: (bytes, what) => driver.memAlloc(bytes, what),
      free: (ptr) => driver.memFree(ptr),
      freeBytes: () => driver.memGetInfo().free,
      totalBytes: device.totalBytes,
      ordinal: device.index,
    });
  }

  /** Loads the libraries (first time only), retains the device's primary context and creates a stream. */
  static create(deviceIndex = 0): CudaContext {
    const libs = loadCudaLibraries();
    const { driver } = libs;
    const count = driver.deviceCount();
    if (!Number.isInteger(deviceIndex) || deviceIndex < 0 || deviceIndex >= count) {
      throw new BackendUnavailableError('cuda', `no CUDA device ${deviceIndex}: the driver reports ${count} device(s)`);
    }
    const info = readDeviceInfo(driver, deviceIndex);
    const dev = driver.device(deviceIndex);
    const ctx = driver.primaryCtxRetain(dev);
    try {
      driver.ctxSetCurrent(ctx);
      const context = new CudaContext(libs, dev, ctx, driver.streamCreate(CU_STREAM_DEFAULT), info);
      CudaContext.current = context;
      return context;
    } catch (e) {
      driver.primaryCtxRelease(dev);
      throw e;
    }
  }

  get driver(): CudaDriver {
    return this.libs.driver;
  }

  get maxSharedBytesOptin(): number {
    return this.device.maxSharedBytesOptin;
  }

  get driverVersion(): string {
    return formatCudaVersion(this.libs.driverVersion);
  }

  get nvrtcVersion(): string {
    return `${this.libs.nvrtc.major}.${this.libs.nvrtc.minor}`;
  }

  arch(archSpecific = false): string {
    return deviceArch(this.device.computeCapability, archSpecific);
  }

  /** NVRTC output for this GPU through the on-disk cache (see cubin-cache.ts), without loading it. */
  compile(name: string, source: string, opts: ModuleOptions = {}): CompiledCubin {
    this.assertLive();
    return compileCuda(this.libs.nvrtc, this.request(name, source, opts), new CubinCache(cubinCacheDir(process.env, homedir())));
  }

  /** The compiled and loaded module, memoised per (name, cache key). */
  module(name: string, source: string, opts: ModuleOptions = {}): CudaModule {
    this.assertLive();
    const req = this.request(name, source, opts);
    const id = `${name}:${compileKey(this.libs.nvrtc, req)}`;
    const known = this.modules.get(id);
    if (known !== undefined) return known;
    const compiled = this.compile(name, source, opts);
    this.activate();
    const module = { name, arch: req.arch, key: compiled.key, cacheHit: compiled.cacheHit, handle: this.driver.moduleLoadData(compiled.cubin, name) };
    this.modules.set(id, module);
    return module;
  }

  /** The `extern "C"` function `fnName` of a module, memoised. */
  kernel(module: CudaModule, fnName: string): Kernel {
    this.assertLive();
    const id = `${module.name}:${module.key}:${fnName}`;
    let kernel = this.kernels.get(id);
    if (kernel === undefined) {
      this.activate();
      kernel = new Kernel(this, fnName, this.driver.moduleGetFunction(module.handle, fnName));
      this.kernels.set(id, kernel);
    }
    return kernel;
  }

  /** Pooled device memory; throws DeviceOutOfMemoryError when it does not fit, leaving the context usable. */
  alloc(bytes: number, what: string): DeviceBuffer {
    this.assertLive();
    this.activate();
    return this.pool.alloc(bytes, what);
  }

  upload(data: ArrayBufferView, what = 'upload'): DeviceBuffer {
    const buffer = this.alloc(data.byteLength, what);
    try {
      if (data.byteLength > 0) this.driver.memcpyHtoD(buffer.ptr, data);
    } catch (e) {
      buffer.dispose();
      throw e;
    }
    return buffer;
  }

  /** Copies `data` into `buffer` at `byteOffset` (ordered after the work launched before). */
  uploadAt(buffer: DeviceBuffer, byteOffset: number, data: ArrayBufferView): void {
    this.assertLive();
    this.activate();
    if (byteOffset < 0 || byteOffset + data.byteLength > buffer.bytes) {
      throw new InputValueError(`upload into ${buffer.what}: bytes [${byteOffset}, ${byteOffset + data.byteLength}) outside its ${buffer.bytes}`);
    }
    if (data.byteLength > 0) this.driver.memcpyHtoD(buffer.ptr + BigInt(byteOffset), data);
  }

  /** Copies the first `into.byteLength` bytes of `buffer` into `into`, after the work launched before. */
  download(buffer: DeviceBuffer, into: ArrayBufferView): void {
    this.assertLive();
    this.activate();
    if (into.byteLength > buffer.bytes) {
      throw new InputValueError(`download from ${buffer.what}: ${into.byteLength} bytes asked, the buffer holds ${buffer.bytes}`);
    }
    if (into.byteLength > 0) this.driver.memcpyDtoH(into, buffer.ptr);
  }

  /** Sets `bytes` bytes (default all) of `buffer` to `byte`. */
  memset(buffer: DeviceBuffer, byte: number, bytes = buffer.bytes): void {
    this.assertLive();
    this.activate();
    this.driver.memsetD8(buffer.ptr, byte & 0xff, bytes);
  }

  /** Sets `count` 32-bit words (default all whole words) of `buffer` to the bits `word`. */
  memset32(buffer: DeviceBuffer, word: number, count = Math.floor(buffer.bytes / 4)): void {
    this.assertLive();
    this.activate();
    this.driver.memsetD32(buffer.ptr, word, count);
  }

  copy(dst: DeviceBuffer, src: DeviceBuffer, bytes = Math.min(dst.bytes, src.bytes)): void {
    this.assertLive();
    this.activate();
    this.driver.memcpyDtoD(dst.ptr, src.ptr, bytes);
  }

  /** Waits for all work; an asynchronous kernel fault surfaces here, naming the last kernel launched. */
  synchronize(): void {
    this.assertLive();
    this.activate();
    this.driver.ctxSynchronize(this.lastKernel === undefined ? undefined : `${this.lastKernel} (last launched)`);
  }

  /** Median of CUDA-event timings of `run`, which launches on this context's stream, after warm-up runs. */
  time(run: () => void, options: TimingOptions = {}): TimingResult {
    this.assertLive();
    this.activate();
    return timeOnStream(this.driver, this.stream, run, options);
  }

  /** Whether launches can be captured into a graph (captureGraph): the driver exports the graph calls. */
  get canCaptureGraphs(): boolean {
    return this.driver.hasGraphs;
  }

  /**
   * Captures the launches `run` queues on this context's stream (it must queue nothing else: no copies, no
   * synchronisation) into a graph that replays them with one driver call. Nothing runs until the graph is launched.
   */
  captureGraph(run: () => void, name: string): CudaGraph {
    this.assertLive();
    this.activate();
    const driver = this.driver;
    driver.streamBeginCapture(this.stream, CU_STREAM_CAPTURE_MODE_RELAXED);
    try {
      run();
    } catch (e) {
      try {
        driver.graphDestroy(driver.streamEndCapture(this.stream));
      } catch {
        // the capture was already invalidated: the first error is the one to report
      }
      throw e;
    }
    const graph = driver.streamEndCapture(this.stream);
    try {
      return new CudaGraph(this, graph, driver.graphInstantiate(graph), name);
    } catch (e) {
      driver.graphDestroy(graph);
      throw e;
    }
  }

  memoryStats(): PoolStats {
    return this.pool.stats();
  }

  /**
   * Device bytes an allocation can take: the driver's free memory and the blocks kept for reuse by this context's
   * pool and the other live pools of the device (an allocation that runs out frees them).
   */
  availableBytes(): number {
    this.assertLive();
    this.activate();
    return this.driver.memGetInfo().free + this.pool.reclaimableBytes();
  }

  /** Frees the pool's cached blocks; returns the bytes freed. */
  trim(): number {
    this.assertLive();
    this.activate();
    return this.pool.trim();
  }

  /** @internal For Kernel.launch. */
  beforeLaunch(kernel: string): void {
    this.assertLive();
    this.activate();
    this.lastKernel = kernel;
  }

  /** Frees all device memory, unloads modules, destroys the stream, releases the context. Runs every step even if one fails, then throws the first failure. */
  dispose(): void {
    if (this.disposed) return;
    const steps = [
      () => this.activate(),
      () => this.driver.ctxSynchronize(),
      () => this.pool.dispose(),
      ...[...this.modules.values()].map((m) => () => this.driver.moduleUnload(m.handle)),
      () => this.driver.streamDestroy(this.stream),
      () => this.driver.primaryCtxRelease(this.dev),
    ];
    this.disposed = true;
    this.modules.clear();
    this.kernels.clear();
    let first: unknown;
    for (const step of steps) {
      try {
        step();
      } catch (e) {
        first ??= e;
      }
    }
    if (CudaContext.current === this) CudaContext.current = undefined;
    if (first !== undefined) throw first;
  }

  private request(name: string, source: string, opts: ModuleOptions): CompileRequest {
    return {
      name,
      source,
      arch: this.arch(opts.archSpecific),
      options: opts.options ?? [],
      includeDirs: this.libs.includeDir === undefined ? [] : [this.libs.includeDir],
      missingHeaderHint: missingHeaderHint(this.libs),
    };
  }

  /** The driver's current context is per thread; switch only when another CudaContext was used last. */
  private activate(): void {
    if (CudaContext.current === this) return;
    this.driver.ctxSetCurrent(this.ctx);
    CudaContext.current = this;
  }

  private assertLive(): void {
    if (this.disposed) throw new DisposedError(`CUDA context on device ${this.device.index}`);
  }
}

/** Launches captured by CudaContext.captureGraph, replayed on the context's stream with one driver call. */
export class CudaGraph {
  private disposed = false;

  constructor(
    private readonly ctx: CudaContext,
    private readonly graph: CUgraph,
    private readonly exec: CUgraphExec,
    readonly name: string,
  ) {}

  launch(): void {
    if (this.disposed) throw new DisposedError(`CUDA graph ${this.name}`);
    this.ctx.beforeLaunch(this.name);
    this.ctx.driver.graphLaunch(this.exec, this.ctx.stream, this.name);
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.ctx.driver.graphExecDestroy(this.exec);
    this.ctx.driver.graphDestroy(this.graph);
  }
}
