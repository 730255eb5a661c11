// A pooled device allocator. Sizes round up to a size class (256-byte steps up to 1 MiB, 2 MiB steps above), and
// a disposed buffer's block goes to its class's free list for the next allocation of that class, so a model that
// repeats the same shapes stops calling the driver after its first step. When the device is out of memory the
// pool frees its cached blocks, and those of the other live pools on the same device (each backend's context has
// its own), and tries once more before throwing DeviceOutOfMemoryError. Sizes are plain numbers (exact up to 2^53
// bytes); device addresses are BigInt.
import { DeviceOutOfMemoryError, DisposedError, InputValueError } from '../../errors.js';
import type { DevicePtr } from './driver.js';

/** What the pool needs from a device: the context gives it the driver's calls, tests give it a fake. */
export interface DeviceAllocator {
  /** Throws DeviceOutOfMemoryError when the device cannot hold `bytes` more. */
  alloc(bytes: number, what: string): DevicePtr;
  free(ptr: DevicePtr): void;
  freeBytes(): number;
  readonly totalBytes: number;
  /** The device's ordinal: pools of one device give their cached blocks back when another runs out (none without). */
  readonly ordinal?: number;
}

export interface DeviceBuffer {
  /** The device address; reading it after dispose() throws DisposedError. */
  readonly ptr: DevicePtr;
  /** Bytes asked for. */
  readonly bytes: number;
  /** Bytes of the block behind it: its size class. */
  readonly capacity: number;
  readonly what: string;
  readonly disposed: boolean;
  /** Returns the block to the pool; a second call does nothing. */
  dispose(): void;
}

export interface PoolStats {
  /** Capacity of the live buffers. */
  readonly bytesInUse: number;
  /** Free blocks kept for reuse. */
  readonly bytesCached: number;
  readonly buffersInUse: number;
  readonly blocksCached: number;
}

export const SMALL_STEP = 256;
export const SMALL_LIMIT = 1 << 20;
export const LARGE_STEP = 2 << 20;

export function sizeClass(bytes: number): number {
  if (bytes <= SMALL_LIMIT) return Math.max(SMALL_STEP, Math.ceil(bytes / SMALL_STEP) * SMALL_STEP);
  return Math.ceil(bytes / LARGE_STEP) * LARGE_STEP;
}

/** Every pool not yet disposed, so that one out of memory can trim the others of its device. */
const livePools = new Set<DeviceMemoryPool>();

export class DeviceMemoryPool {
  private readonly cached = new Map<number, DevicePtr[]>();
  private readonly live = new Map<PooledBuffer, DevicePtr>();
  private bytesCached = 0;
  private bytesInUse = 0;
  private disposed = false;

  constructor(private readonly device: DeviceAllocator) {
    livePools.add(this);
  }

  alloc(bytes: number, what: string): DeviceBuffer {
    if (this.disposed) throw new DisposedError('device memory pool');
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new InputValueError(`device allocation for ${what}: ${bytes} is not a whole number of bytes`);
    }
    const capacity = sizeClass(bytes);
    const ptr = this.takeCached(capacity) ?? this.allocFromDevice(capacity, bytes, what);
    const buffer = new PooledBuffer(ptr, bytes, capacity, what, (b) => this.release(b));
    this.live.set(buffer, ptr);
    this.bytesInUse += capacity;
    return buffer;
  }

  /** Gives every cached block back to the driver; returns the bytes freed. */
  trim(): number {
    const freed = this.bytesCached;
    for (const ptrs of this.cached.values()) for (const ptr of ptrs) this.device.free(ptr);
    this.cached.clear();
    this.bytesCached = 0;
    return freed;
  }

  /** Cached bytes this pool and the other live pools of its device would give back on out-of-memory. */
  reclaimableBytes(): number {
    let bytes = 0;
    for (const pool of this.siblingsAndSelf()) bytes += pool.bytesCached;
    return bytes;
  }

  stats(): PoolStats {
    let blocksCached = 0;
    for (const ptrs of this.cached.values()) blocksCached += ptrs.length;
    return { bytesInUse: this.bytesInUse, bytesCached: this.bytesCached, buffersInUse: this.live.size, blocksCached };
  }

  /** Frees every block, cached or live; live buffers become disposed. A second call does nothing. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    livePools.delete(this);
    const live = [...this.live];
    this.live.clear();
    this.bytesInUse = 0;
    for (const [buffer] of live) buffer.dispose();
    let first: unknown;
    for (const ptr of [...live.map(([, p]) => p), ...[...this.cached.values()].flat()]) {
      try {
        this.device.free(ptr);
      } catch (e) {
        first ??= e;
      }
    }
    this.cached.clear();
    this.bytesCached = 0;
    if (first !== undefined) throw first;
  }

  private release(buffer: PooledBuffer): void {
    const ptr = this.live.get(buffer);
    if (ptr === undefined) return; // the pool was disposed first and freed the block itself
    this.live.delete(buffer);
    this.bytesInUse -= buffer.capacity;
    const list = this.cached.get(buffer.capacity) ?? [];
    list.push(ptr);
    this.cached.set(buffer.capacity, list);
    this.bytesCached += buffer.capacity;
  }

  private siblingsAndSelf(): DeviceMemoryPool[] {
    const { ordinal } = this.device;
    return [...livePools].filter((pool) => pool === this || (ordinal !== undefined && pool.device.ordinal === ordinal));
  }

  private takeCached(capacity: number): DevicePtr | undefined {
    const ptr = this.cached.get(capacity)?.pop();
    if (ptr !== undefined) this.bytesCached -= capacity;
    return ptr;
  }

  private allocFromDevice(capacity: number, bytes: number, what: string): DevicePtr {
    if (capacity > this.device.totalBytes) throw new DeviceOutOfMemoryError(bytes, this.device.freeBytes(), what);
    try {
      return this.device.alloc(capacity, what);
    } catch (e) {
      if (!(e instanceof DeviceOutOfMemoryError)) throw e;
      if (this.reclaimableBytes() === 0) throw new DeviceOutOfMemoryError(bytes, e.freeBytes, what);
    }
    for (const pool of this.siblingsAndSelf()) pool.trim();
    try {
      return this.device.alloc(capacity, what);
    } catch (e) {
      if (e instanceof DeviceOutOfMemoryError) throw new DeviceOutOfMemoryError(bytes, e.freeBytes, what);
      throw e;
    }
  }
}

class PooledBuffer implements DeviceBuffer {
  #ptr: DevicePtr | undefined;

  constructor(
    ptr: DevicePtr,
    readonly bytes: number,
    readonly capacity: number,
    readonly what: string,
    private readonly onDispose: (buffer: PooledBuffer) => void,
  ) {
    this.#ptr = ptr;
  }

  get ptr(): DevicePtr {
    if (this.#ptr === undefined) throw new DisposedError(`device buffer for ${this.what}`);
    return this.#ptr;
  }

  get disposed(): boolean {
    return this.#ptr === undefined;
  }

  dispose(): void {
    if (this.#ptr === undefined) return;
    this.#ptr = undefined;
    this.onDispose(this);
  }
}
