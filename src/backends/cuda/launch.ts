// Typed kernel launches on a context's stream, and CUDA-event timing. A Kernel knows its name, so every failure
// of its launch is a CudaError that names it.
import { InputValueError, UnsupportedConfigError } from '../../errors.js';
import {
  CU_EVENT_DEFAULT,
  CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
  type CudaDriver,
  type CUfunction,
  type CUstream,
  type Dim3,
} from './driver.js';
import { kernelParamPointers, packKernelArgs, type KernelArg } from './kernel-args.js';

export interface LaunchConfig {
  readonly grid: Dim3;
  readonly block: Dim3;
  /** Dynamic shared memory in bytes, default 0; above 48 KiB the kernel's limit is raised first. */
  readonly sharedBytes?: number;
  /** In the order of the kernel's C parameters. */
  readonly args: readonly KernelArg[];
}

/** What a kernel needs from its context when it launches. */
export interface LaunchTarget {
  readonly driver: CudaDriver;
  readonly stream: CUstream;
  readonly maxSharedBytesOptin: number;
  /** Throws DisposedError after the context's dispose(), makes the context current, notes the kernel. */
  beforeLaunch(kernel: string): void;
}

export interface TimingOptions {
  /** Untimed runs first (default 3). */
  readonly warmup?: number;
  /** Timed runs (default 10). */
  readonly iterations?: number;
}

export interface TimingResult {
  readonly medianMs: number;
  readonly samplesMs: readonly number[];
}

/**
 * Dynamic shared memory above this is opted in first: without opting in a block gets 48 KiB of shared memory,
 * static and dynamic together, so a kernel with a few KiB of __shared__ arrays fails to launch just under 48 KiB
 * of dynamic memory.
 */
export const OPT_IN_ABOVE = 32 * 1024;

export class Kernel {
  private sharedLimit = OPT_IN_ABOVE;
  private readonly residentBlocks = new Map<string, number>();

  constructor(
    private readonly target: LaunchTarget,
    readonly name: string,
    readonly fn: CUfunction,
  ) {}

  launch(config: LaunchConfig): void {
    this.target.beforeLaunch(this.name);
    checkDim3(config.grid, 'grid', this.name);
    checkDim3(config.block, 'block', this.name);
    const shared = config.sharedBytes ?? 0;
    if (!Number.isInteger(shared) || shared < 0) {
      throw new InputValueError(`kernel ${this.name}: sharedBytes ${shared} is not a whole number of bytes`);
    }
    if (shared > this.sharedLimit) this.raiseSharedLimit(shared);
    const params = kernelParamPointers(packKernelArgs(config.args, this.name));
    this.target.driver.launchKernel(this.fn, config.grid, config.block, shared, this.target.stream, params, this.name);
  }

  /**
   * How many CTAs of this kernel one SM holds at once with `blockSize` threads and `sharedBytes` of dynamic shared
   * memory (the driver's occupancy calculator: registers, shared memory, __launch_bounds__): the grid of a
   * persistent kernel.
   */
  residentBlocksPerSM(blockSize: number, sharedBytes: number): number {
    const key = `${blockSize}:${sharedBytes}`;
    let blocks = this.residentBlocks.get(key);
    if (blocks === undefined) {
      this.target.beforeLaunch(this.name);
      if (sharedBytes > this.sharedLimit) this.raiseSharedLimit(sharedBytes);
      blocks = this.target.driver.occupancyBlocksPerSM(this.fn, blockSize, sharedBytes, this.name);
      this.residentBlocks.set(key, blocks);
    }
    return blocks;
  }

  private raiseSharedLimit(bytes: number): void {
    const max = this.target.maxSharedBytesOptin;
    if (bytes > max) {
      throw new UnsupportedConfigError(
        `kernel ${this.name} asks for ${bytes} bytes of dynamic shared memory; this GPU allows at most ${max} per block`,
      );
    }
    this.target.driver.funcSetAttribute(this.fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes, this.name);
    this.sharedLimit = bytes;
  }
}

/**
 * Times `run` (which launches work on `stream`) with a pair of CUDA events around each iteration, after `warmup`
 * untimed runs; returns the median and every sample in milliseconds.
 */
export function timeOnStream(driver: CudaDriver, stream: CUstream, run: () => void, options: TimingOptions = {}): TimingResult {
  const warmup = options.warmup ?? 3;
  const iterations = options.iterations ?? 10;
  if (!Number.isInteger(warmup) || warmup < 0) throw new InputValueError(`timing: warmup ${warmup} is not a count`);
  if (!Number.isInteger(iterations) || iterations < 1) throw new InputValueError(`timing: iterations ${iterations} is not a positive count`);
  for (let i = 0; i < warmup; i++) run();
  driver.streamSynchronize(stream);
  const start = driver.eventCreate(CU_EVENT_DEFAULT);
  const samplesMs: number[] = [];
  try {
    const end = driver.eventCreate(CU_EVENT_DEFAULT);
    try {
      for (let i = 0; i < iterations; i++) {
        driver.eventRecord(start, stream);
        run();
        driver.eventRecord(end, stream);
        driver.eventSynchronize(end);
        samplesMs.push(driver.eventElapsedMs(start, end));
      }
    } finally {
      driver.eventDestroy(end);
    }
  } finally {
    driver.eventDestroy(start);
  }
  return { medianMs: median(samplesMs), samplesMs };
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN;
  const sorted = [...xs].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? (sorted[mid] ?? Number.NaN) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

/** Koffi would silently wrap a fraction or a negative into `unsigned int`; zero and too-large dims are the driver's to refuse. */
function checkDim3(dims: Dim3, what: string, kernel: string): void {
  for (const d of dims) {
    if (!Number.isInteger(d) || d < 0 || d >= 2 ** 32) {
      throw new InputValueError(`kernel ${kernel}: ${what} [${dims.join(', ')}] holds ${d}, not an unsigned 32-bit integer`);
    }
  }
}
