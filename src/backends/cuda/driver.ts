// Koffi bindings to the CUDA driver API (libcuda): every prototype in one place as a C-like string, and one typed
// wrapper per call that checks its CUresult and throws CudaError(call, code, name, kernel?). Signatures follow
// cuda.h of CUDA 13.0; the `_v2` names are the ones cuda.h's macros select. How Koffi passes each kind of
// argument is summed up at the top of ffi.ts.
import type { LibraryHandle } from 'koffi';
import { BackendUnavailableError, CudaError, DeviceOutOfMemoryError } from '../../errors.js';
import { alias, byteParts, opaqueHandle, outBigInt, outNumber } from './ffi.js';

/** A device address (CUdeviceptr, 64-bit). */
export type DevicePtr = bigint;
declare const handleKind: unique symbol;
/** Opaque driver handles are BigInt pointers in Koffi 3; the brand keeps one kind from passing for another. */
export type Handle<K extends string> = bigint & { readonly [handleKind]: K };
export type CUcontext = Handle<'CUcontext'>;
export type CUmodule = Handle<'CUmodule'>;
export type CUfunction = Handle<'CUfunction'>;
export type CUstream = Handle<'CUstream'>;
export type CUevent = Handle<'CUevent'>;
export type CUgraph = Handle<'CUgraph'>;
export type CUgraphExec = Handle<'CUgraphExec'>;
export type Dim3 = readonly [number, number, number];

export const CUDA_ERROR_OUT_OF_MEMORY = 2;
export const CU_DEVICE_ATTRIBUTE = {
  MAX_THREADS_PER_BLOCK: 1,
  MULTIPROCESSOR_COUNT: 16,
  L2_CACHE_SIZE: 38,
  COMPUTE_CAPABILITY_MAJOR: 75,
  COMPUTE_CAPABILITY_MINOR: 76,
  MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: 81,
  MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: 97,
  RESERVED_SHARED_MEMORY_PER_BLOCK: 111,
} as const;
export const CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;
/** Stream flag 0: a blocking stream, ordered with the legacy default stream that the synchronous copies use. */
export const CU_STREAM_DEFAULT = 0;
export const CU_EVENT_DEFAULT = 0;
/** Stream capture mode: calls that are unsafe during a capture are not checked (the caller makes none). */
export const CU_STREAM_CAPTURE_MODE_RELAXED = 2;

type Out = unknown[];
type Dim6 = [gx: number, gy: number, gz: number, bx: number, by: number, bz: number];
type Fn<A extends unknown[]> = (...args: A) => number;

/** The C functions as Koffi binds them (Koffi's own typings return `any`; these signatures are the contract). */
interface RawDriver {
  cuGetErrorName: Fn<[result: number, str: Out]>;
  cuGetErrorString: Fn<[result: number, str: Out]>;
  cuInit: Fn<[flags: number]>;
  cuDriverGetVersion: Fn<[version: Out]>;
  cuDeviceGetCount: Fn<[count: Out]>;
  cuDeviceGet: Fn<[device: Out, ordinal: number]>;
  cuDeviceGetName: Fn<[name: Uint8Array, len: number, dev: number]>;
  cuDeviceGetAttribute: Fn<[value: Out, attrib: number, dev: number]>;
  cuDeviceTotalMem_v2: Fn<[bytes: Out, dev: number]>;
  cuDevicePrimaryCtxRetain: Fn<[ctx: Out, dev: number]>;
  cuDevicePrimaryCtxRelease_v2: Fn<[dev: number]>;
  cuCtxSetCurrent: Fn<[ctx: CUcontext]>;
  cuCtxSynchronize: Fn<[]>;
  cuMemAlloc_v2: Fn<[ptr: Out, bytes: number]>;
  cuMemFree_v2: Fn<[ptr: DevicePtr]>;
  cuMemGetInfo_v2: Fn<[free: Out, total: Out]>;
  cuMemcpyHtoD_v2: Fn<[dst: DevicePtr, src: Uint8Array, bytes: number]>;
  cuMemcpyDtoH_v2: Fn<[dst: Uint8Array, src: DevicePtr, bytes: number]>;
  cuMemcpyDtoD_v2: Fn<[dst: DevicePtr, src: DevicePtr, bytes: number]>;
  cuMemsetD8_v2: Fn<[dst: DevicePtr, value: number, count: number]>;
  cuMemsetD32_v2: Fn<[dst: DevicePtr, value: number, count: number]>;
  cuModuleLoadData: Fn<[module: Out, image: Uint8Array]>;
  cuModuleUnload: Fn<[module: CUmodule]>;
  cuModuleGetFunction: Fn<[fn: Out, module: CUmodule, name: string]>;
  cuFuncSetAttribute: Fn<[fn: CUfunction, attrib: number, value: number]>;
  cuOccupancyMaxActiveBlocksPerMultiprocessor: Fn<[blocks: Out, fn: CUfunction, blockSize: number, sharedBytes: number]>;
  cuLaunchKernel: Fn<[fn: CUfunction, ...dims: Dim6, shared: number, stream: CUstream, params: readonly Uint8Array[] | null, extra: null]>;
  cuStreamCreate: Fn<[stream: Out, flags: number]>;
  cuStreamDestroy_v2: Fn<[stream: CUstream]>;
  cuStreamSynchronize: Fn<[stream: CUstream]>;
  cuEventCreate: Fn<[event: Out, flags: number]>;
  cuEventRecord: Fn<[event: CUevent, stream: CUstream]>;
  cuEventSynchronize: Fn<[event: CUevent]>;
  cuEventElapsedTime: Fn<[ms: Out, start: CUevent, end: CUevent]>;
  cuEventDestroy_v2: Fn<[event: CUevent]>;
}

/** CUDA graphs (stream capture and replay): bound on first use, so a library without them still loads. */
interface RawGraphs {
  cuStreamBeginCapture_v2: Fn<[stream: CUstream, mode: number]>;
  cuStreamEndCapture: Fn<[stream: CUstream, graph: Out]>;
  cuGraphInstantiateWithFlags: Fn<[exec: Out, graph: CUgraph, flags: number]>;
  cuGraphLaunch: Fn<[exec: CUgraphExec, stream: CUstream]>;
  cuGraphExecDestroy: Fn<[exec: CUgraphExec]>;
  cuGraphDestroy: Fn<[graph: CUgraph]>;
}

interface RawTensorMaps {
  cuTensorMapEncodeTiled: Fn<
    [
      map: Uint8Array,
      dtype: number,
      rank: number,
      address: DevicePtr,
      dims: BigUint64Array,
      strides: BigUint64Array,
      box: Uint32Array,
      elementStrides: Uint32Array,
      interleave: number,
      swizzle: number,
      l2Promotion: number,
      oobFill: number,
    ]
  >;
}

function bindTensorMaps(lib: LibraryHandle): RawTensorMaps {
  return {
    cuTensorMapEncodeTiled: lib.func(
      'CUresult cuTensorMapEncodeTiled(void *tensorMap, int tensorDataType, uint32_t tensorRank, CUdeviceptr globalAddress, ' +
        'const uint64_t *globalDim, const uint64_t *globalStrides, const uint32_t *boxDim, const uint32_t *elementStrides, ' +
        'int interleave, int swizzle, int l2Promotion, int oobFill)',
    ),
  };
}

function bindGraphs(lib: LibraryHandle): RawGraphs {
  for (const handle of ['CUgraph', 'CUgraphExec']) opaqueHandle(handle);
  const f = (prototype: string) => lib.func(prototype);
  return {
    cuStreamBeginCapture_v2: f('CUresult cuStreamBeginCapture_v2(CUstream hStream, int mode)'),
    cuStreamEndCapture: f('CUresult cuStreamEndCapture(CUstream hStream, _Out_ CUgraph *phGraph)'),
    cuGraphInstantiateWithFlags: f('CUresult cuGraphInstantiateWithFlags(_Out_ CUgraphExec *phGraphExec, CUgraph hGraph, unsigned long long flags)'),
    cuGraphLaunch: f('CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)'),
    cuGraphExecDestroy: f('CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)'),
    cuGraphDestroy: f('CUresult cuGraphDestroy(CUgraph hGraph)'),
  };
}

function bind(lib: LibraryHandle): RawDriver {
  alias('CUresult', 'int');
  alias('CUdevice', 'int');
  alias('CUdeviceptr', 'unsigned long long');
  for (const handle of ['CUcontext', 'CUmodule', 'CUfunction', 'CUstream', 'CUevent']) opaqueHandle(handle);
  const f = (prototype: string) => lib.func(prototype);
  return {
    cuGetErrorName: f('CUresult cuGetErrorName(CUresult error, _Out_ const char **pStr)'),
    cuGetErrorString: f('CUresult cuGetErrorString(CUresult error, _Out_ const char **pStr)'),
    cuInit: f('CUresult cuInit(unsigned int Flags)'),
    cuDriverGetVersion: f('CUresult cuDriverGetVersion(_Out_ int *driverVersion)'),
    cuDeviceGetCount: f('CUresult cuDeviceGetCount(_Out_ int *count)'),
    cuDeviceGet: f('CUresult cuDeviceGet(_Out_ CUdevice *device, int ordinal)'),
    cuDeviceGetName: f('CUresult cuDeviceGetName(uint8_t *name, int len, CUdevice dev)'),
    cuDeviceGetAttribute: f('CUresult cuDeviceGetAttribute(_Out_ int *pi, int attrib, CUdevice dev)'),
    cuDeviceTotalMem_v2: f('CUresult cuDeviceTotalMem_v2(_Out_ size_t *bytes, CUdevice dev)'),
    cuDevicePrimaryCtxRetain: f('CUresult cuDevicePrimaryCtxRetain(_Out_ CUcontext *pctx, CUdevice dev)'),
    cuDevicePrimaryCtxRelease_v2: f('CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)'),
    cuCtxSetCurrent: f('CUresult cuCtxSetCurrent(CUcontext ctx)'),
    cuCtxSynchronize: f('CUresult cuCtxSynchronize(void)'),
    cuMemAlloc_v2: f('CUresult cuMemAlloc_v2(_Out_ CUdeviceptr *dptr, size_t bytesize)'),
    cuMemFree_v2: f('CUresult cuMemFree_v2(CUdeviceptr dptr)'),
    cuMemGetInfo_v2: f('CUresult cuMemGetInfo_v2(_Out_ size_t *free, _Out_ size_t *total)'),
    cuMemcpyHtoD_v2: f('CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount)'),
    cuMemcpyDtoH_v2: f('CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)'),
    cuMemcpyDtoD_v2: f('CUresult cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount)'),
    cuMemsetD8_v2: f('CUresult cuMemsetD8_v2(CUdeviceptr dstDevice, unsigned char uc, size_t N)'),
    cuMemsetD32_v2: f('CUresult cuMemsetD32_v2(CUdeviceptr dstDevice, unsigned int ui, size_t N)'),
    cuModuleLoadData: f('CUresult cuModuleLoadData(_Out_ CUmodule *module, const void *image)'),
    cuModuleUnload: f('CUresult cuModuleUnload(CUmodule hmod)'),
    cuModuleGetFunction: f('CUresult cuModuleGetFunction(_Out_ CUfunction *hfunc, CUmodule hmod, const char *name)'),
    cuFuncSetAttribute: f('CUresult cuFuncSetAttribute(CUfunction hfunc, int attrib, int value)'),
    cuOccupancyMaxActiveBlocksPerMultiprocessor: f(
      'CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(_Out_ int *numBlocks, CUfunction func, int blockSize, size_t dynamicSMemSize)',
    ),
    // kernelParams: Koffi turns a JS array of Buffers into a C array of pointers to each Buffer's bytes, which is
    // exactly `void **kernelParams` (one pointer per kernel argument); the driver copies the values during the call.
    cuLaunchKernel: f(
      'CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ, ' +
        'unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ, unsigned int sharedMemBytes, ' +
        'CUstream hStream, void **kernelParams, void **extra)',
    ),
    cuStreamCreate: f('CUresult cuStreamCreate(_Out_ CUstream *phStream, unsigned int Flags)'),
    cuStreamDestroy_v2: f('CUresult cuStreamDestroy_v2(CUstream hStream)'),
    cuStreamSynchronize: f('CUresult cuStreamSynchronize(CUstream hStream)'),
    cuEventCreate: f('CUresult cuEventCreate(_Out_ CUevent *phEvent, unsigned int Flags)'),
    cuEventRecord: f('CUresult cuEventRecord(CUevent hEvent, CUstream hStream)'),
    cuEventSynchronize: f('CUresult cuEventSynchronize(CUevent hEvent)'),
    // CUDA 12.8 added cuEventElapsedTime_v2 (cuda.h 13 maps the name to it); older drivers have only the first.
    cuEventElapsedTime: firstFunc(lib, [
      'CUresult cuEventElapsedTime_v2(_Out_ float *pMilliseconds, CUevent hStart, CUevent hEnd)',
      'CUresult cuEventElapsedTime(_Out_ float *pMilliseconds, CUevent hStart, CUevent hEnd)',
    ]),
    cuEventDestroy_v2: f('CUresult cuEventDestroy_v2(CUevent hEvent)'),
  };
}

function firstFunc(lib: LibraryHandle, prototypes: readonly string[]): ReturnType<LibraryHandle['func']> {
  for (const prototype of prototypes.slice(0, -1)) {
    try {
      return lib.func(prototype);
    } catch {
      // not exported by this driver: try the next name
    }
  }
  return lib.func(prototypes[prototypes.length - 1] ?? '');
}

/** The typed driver: one method per call, each throwing CudaError (or DeviceOutOfMemoryError) on failure. */
export class CudaDriver {
  private graphFns: RawGraphs | null | undefined;
  private tensorMapFns: RawTensorMaps | null | undefined;

  private constructor(
    private readonly c: RawDriver,
    /** The libcuda that was loaded: a path, or the bare name the dynamic loader resolved. */
    readonly path: string,
    private readonly lib: LibraryHandle,
  ) {}

  /** Binds every prototype (the graph calls on first use); throws (Koffi's error) when the library lacks one. */
  static bind(lib: LibraryHandle, path: string): CudaDriver {
    return new CudaDriver(bind(lib), path, lib);
  }

  /** Whether this libcuda exports the graph calls (stream capture, instantiate, launch). */
  get hasGraphs(): boolean {
    if (this.graphFns === undefined) {
      try {
        this.graphFns = bindGraphs(this.lib);
      } catch {
        this.graphFns = null;
      }
    }
    return this.graphFns !== null;
  }

  check(call: string, result: number, kernel?: string): void {
    if (result !== 0) throw new CudaError(call, result, this.errorName(result), kernel);
  }

  /** CUDA_ERROR_INVALID_VALUE and the like; `CUresult <n>` for a code this driver cannot name. */
  errorName(result: number): string {
    const out: Out = [null];
    return this.c.cuGetErrorName(result, out) === 0 && typeof out[0] === 'string' ? out[0] : `CUresult ${result}`;
  }

  errorString(result: number): string {
    const out: Out = [null];
    return this.c.cuGetErrorString(result, out) === 0 && typeof out[0] === 'string' ? out[0] : `CUresult ${result}`;
  }

  init(): void {
    this.check('cuInit', this.c.cuInit(0));
  }

  driverVersion(): number {
    return this.outInt('cuDriverGetVersion', (o) => this.c.cuDriverGetVersion(o));
  }

  deviceCount(): number {
    return this.outInt('cuDeviceGetCount', (o) => this.c.cuDeviceGetCount(o));
  }

  device(ordinal: number): number {
    return this.outInt('cuDeviceGet', (o) => this.c.cuDeviceGet(o, ordinal));
  }

  deviceName(dev: number): string {
    const buf = Buffer.alloc(256);
    this.check('cuDeviceGetName', this.c.cuDeviceGetName(buf, buf.length, dev));
    const end = buf.indexOf(0);
    return buf.toString('utf8', 0, end < 0 ? buf.length : end);
  }

  deviceAttribute(attrib: number, dev: number): number {
    return this.outInt('cuDeviceGetAttribute', (o) => this.c.cuDeviceGetAttribute(o, attrib, dev));
  }

  deviceTotalMem(dev: number): number {
    return this.outInt('cuDeviceTotalMem_v2', (o) => this.c.cuDeviceTotalMem_v2(o, dev));
  }

  primaryCtxRetain(dev: number): CUcontext {
    return this.outHandle<CUcontext>('cuDevicePrimaryCtxRetain', (o) => this.c.cuDevicePrimaryCtxRetain(o, dev));
  }

  primaryCtxRelease(dev: number): void {
    this.check('cuDevicePrimaryCtxRelease_v2', this.c.cuDevicePrimaryCtxRelease_v2(dev));
  }

  ctxSetCurrent(ctx: CUcontext): void {
    this.check('cuCtxSetCurrent', this.c.cuCtxSetCurrent(ctx));
  }

  ctxSynchronize(kernel?: string): void {
    this.check('cuCtxSynchronize', this.c.cuCtxSynchronize(), kernel);
  }

  /** CUDA_ERROR_OUT_OF_MEMORY becomes DeviceOutOfMemoryError with the free bytes; the context stays usable. */
  memAlloc(bytes: number, what: string): DevicePtr {
    const out: Out = [0];
    const result = this.c.cuMemAlloc_v2(out, bytes);
    if (result === CUDA_ERROR_OUT_OF_MEMORY) throw new DeviceOutOfMemoryError(bytes, this.freeBytesOrZero(), what);
    this.check('cuMemAlloc_v2', result);
    return outBigInt(out);
  }

  memFree(ptr: DevicePtr): void {
    this.check('cuMemFree_v2', this.c.cuMemFree_v2(ptr));
  }

  memGetInfo(): { free: number; total: number } {
    const free: Out = [0];
    const total: Out = [0];
    this.check('cuMemGetInfo_v2', this.c.cuMemGetInfo_v2(free, total));
    return { free: outNumber(free), total: outNumber(total) };
  }

  memcpyHtoD(dst: DevicePtr, src: ArrayBufferView): void {
    for (const { offset, bytes } of byteParts(src)) {
      this.check('cuMemcpyHtoD_v2', this.c.cuMemcpyHtoD_v2(dst + BigInt(offset), bytes, bytes.byteLength));
    }
  }

  memcpyDtoH(dst: ArrayBufferView, src: DevicePtr): void {
    for (const { offset, bytes } of byteParts(dst)) {
      this.check('cuMemcpyDtoH_v2', this.c.cuMemcpyDtoH_v2(bytes, src + BigInt(offset), bytes.byteLength));
    }
  }

  memcpyDtoD(dst: DevicePtr, src: DevicePtr, bytes: number): void {
    this.check('cuMemcpyDtoD_v2', this.c.cuMemcpyDtoD_v2(dst, src, bytes));
  }

  memsetD8(dst: DevicePtr, value: number, count: number): void {
    this.check('cuMemsetD8_v2', this.c.cuMemsetD8_v2(dst, value, count));
  }

  memsetD32(dst: DevicePtr, value: number, count: number): void {
    this.check('cuMemsetD32_v2', this.c.cuMemsetD32_v2(dst, value >>> 0, count));
  }

  moduleLoadData(image: Uint8Array, name: string): CUmodule {
    return this.outHandle<CUmodule>('cuModuleLoadData', (o) => this.c.cuModuleLoadData(o, image), name);
  }

  moduleUnload(module: CUmodule): void {
    this.check('cuModuleUnload', this.c.cuModuleUnload(module));
  }

  moduleGetFunction(module: CUmodule, name: string): CUfunction {
    return this.outHandle<CUfunction>('cuModuleGetFunction', (o) => this.c.cuModuleGetFunction(o, module, name), name);
  }

  funcSetAttribute(fn: CUfunction, attrib: number, value: number, kernel: string): void {
    this.check('cuFuncSetAttribute', this.c.cuFuncSetAttribute(fn, attrib, value), kernel);
  }

  /** How many CTAs of `fn` with this block size and dynamic shared memory one SM holds at once. */
  occupancyBlocksPerSM(fn: CUfunction, blockSize: number, sharedBytes: number, kernel: string): number {
    const call = 'cuOccupancyMaxActiveBlocksPerMultiprocessor';
    return this.outInt(call, (o) => this.c.cuOccupancyMaxActiveBlocksPerMultiprocessor(o, fn, blockSize, sharedBytes), kernel);
  }

  /**
   * cuTensorMapEncodeTiled (CUDA 12+, for sm_90's TMA): writes the 128-byte tensor map into `map`, which must be 64-byte
   * aligned in host memory (tensor-map.ts takes care of that). The enums are cuda.h's values.
   */
  tensorMapEncodeTiled(
    map: Uint8Array,
    dtype: number,
    address: DevicePtr,
    dims: BigUint64Array,
    strides: BigUint64Array,
    box: Uint32Array,
    elementStrides: Uint32Array,
    swizzle: number,
    l2Promotion: number,
    what: string,
  ): void {
    if (this.tensorMapFns === undefined) {
      try {
        this.tensorMapFns = bindTensorMaps(this.lib);
      } catch {
        this.tensorMapFns = null;
      }
    }
    if (this.tensorMapFns === null) {
      throw new BackendUnavailableError('cuda', `cuTensorMapEncodeTiled (${what}): ${this.path} does not export it (CUDA 12 or later does)`);
    }
    const result = this.tensorMapFns.cuTensorMapEncodeTiled(map, dtype, dims.length, address, dims, strides, box, elementStrides, 0, swizzle, l2Promotion, 0);
    this.check('cuTensorMapEncodeTiled', result, what);
  }

  /** `params` holds one Buffer per kernel argument (see kernel-args.ts); null for a kernel without arguments. */
  launchKernel(fn: CUfunction, grid: Dim3, block: Dim3, sharedBytes: number, stream: CUstream, params: readonly Uint8Array[] | null, kernel: string): void {
    const result = this.c.cuLaunchKernel(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], sharedBytes, stream, params, null);
    this.check('cuLaunchKernel', result, kernel);
  }

  streamCreate(flags: number): CUstream {
    return this.outHandle<CUstream>('cuStreamCreate', (o) => this.c.cuStreamCreate(o, flags));
  }

  streamDestroy(stream: CUstream): void {
    this.check('cuStreamDestroy_v2', this.c.cuStreamDestroy_v2(stream));
  }

  /** `kernel` names the kernel most likely at fault when an asynchronous error surfaces here. */
  streamSynchronize(stream: CUstream, kernel?: string): void {
    this.check('cuStreamSynchronize', this.c.cuStreamSynchronize(stream), kernel);
  }

  eventCreate(flags: number): CUevent {
    return this.outHandle<CUevent>('cuEventCreate', (o) => this.c.cuEventCreate(o, flags));
  }

  eventRecord(event: CUevent, stream: CUstream): void {
    this.check('cuEventRecord', this.c.cuEventRecord(event, stream));
  }

  eventSynchronize(event: CUevent, kernel?: string): void {
    this.check('cuEventSynchronize', this.c.cuEventSynchronize(event), kernel);
  }

  eventElapsedMs(start: CUevent, end: CUevent): number {
    const out: Out = [0];
    this.check('cuEventElapsedTime', this.c.cuEventElapsedTime(out, start, end));
    return outNumber(out);
  }

  eventDestroy(event: CUevent): void {
    this.check('cuEventDestroy_v2', this.c.cuEventDestroy_v2(event));
  }

  /** Starts capturing the work queued on `stream` into a graph instead of running it. */
  streamBeginCapture(stream: CUstream, mode: number): void {
    this.check('cuStreamBeginCapture_v2', this.graphs('cuStreamBeginCapture_v2').cuStreamBeginCapture_v2(stream, mode));
  }

  /** Ends the capture; returns the graph of the work queued since streamBeginCapture. */
  streamEndCapture(stream: CUstream): CUgraph {
    const g = this.graphs('cuStreamEndCapture');
    return this.outHandle<CUgraph>('cuStreamEndCapture', (o) => g.cuStreamEndCapture(stream, o));
  }

  graphInstantiate(graph: CUgraph): CUgraphExec {
    const g = this.graphs('cuGraphInstantiateWithFlags');
    return this.outHandle<CUgraphExec>('cuGraphInstantiateWithFlags', (o) => g.cuGraphInstantiateWithFlags(o, graph, 0));
  }

  /** `kernel` names the graph's work in an error. */
  graphLaunch(exec: CUgraphExec, stream: CUstream, kernel?: string): void {
    this.check('cuGraphLaunch', this.graphs('cuGraphLaunch').cuGraphLaunch(exec, stream), kernel);
  }

  graphExecDestroy(exec: CUgraphExec): void {
    this.check('cuGraphExecDestroy', this.graphs('cuGraphExecDestroy').cuGraphExecDestroy(exec));
  }

  graphDestroy(graph: CUgraph): void {
    this.check('cuGraphDestroy', this.graphs('cuGraphDestroy').cuGraphDestroy(graph));
  }

  private graphs(call: string): RawGraphs {
    if (!this.hasGraphs || this.graphFns === null || this.graphFns === undefined) {
      throw new BackendUnavailableError('cuda', `${call}: ${this.path} does not export the CUDA graph calls`);
    }
    return this.graphFns;
  }

  private outInt(call: string, run: (out: Out) => number, kernel?: string): number {
    const out: Out = [0];
    this.check(call, run(out), kernel);
    return outNumber(out);
  }

  private outHandle<H extends bigint>(call: string, run: (out: Out) => number, kernel?: string): H {
    const out: Out = [null];
    this.check(call, run(out), kernel);
    return outBigInt(out) as H;
  }

  private freeBytesOrZero(): number {
    try {
      return this.memGetInfo().free;
    } catch {
      return 0;
    }
  }
}
