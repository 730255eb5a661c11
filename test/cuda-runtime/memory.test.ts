// The pooled device allocator over a fake device: size classes, reuse, retry after trimming on out-of-memory,
// and dispose semantics.
import { describe, expect, it } from 'vitest';
import { DeviceOutOfMemoryError, DisposedError, InputValueError } from '../../src/errors.js';
import { DeviceMemoryPool, sizeClass, type DeviceAllocator } from '../../src/backends/cuda/memory.js';

const MiB = 1 << 20;

/** A device of `totalBytes` that hands out increasing fake addresses and records every call. */
function fakeDevice(totalBytes: number): DeviceAllocator & { used: number; allocs: number[]; frees: bigint[] } {
  const sizes = new Map<bigint, number>();
  let next = 0x7f00_0000_0000n;
  const device = {
    totalBytes,
    used: 0,
    allocs: [] as number[],
    frees: [] as bigint[],
    alloc(bytes: number, what: string): bigint {
      device.allocs.push(bytes);
      if (device.used + bytes > totalBytes) throw new DeviceOutOfMemoryError(bytes, totalBytes - device.used, what);
      const ptr = next;
      next += BigInt(bytes);
      sizes.set(ptr, bytes);
      device.used += bytes;
      return ptr;
    },
    free(ptr: bigint): void {
      device.frees.push(ptr);
      device.used -= sizes.get(ptr) ?? Number.NaN;
      sizes.delete(ptr);
    },
    freeBytes: () => totalBytes - device.used,
  };
  return device;
}

describe('sizeClass', () => {
  it('rounds to 256 bytes up to 1 MiB and to 2 MiB above', () => {
    expect([0, 1, 256, 257, 1000, MiB].map(sizeClass)).toEqual([256, 256, 256, 512, 1024, MiB]);
    expect([MiB + 1, 2 * MiB, 2 * MiB + 1, 100 * MiB].map(sizeClass)).toEqual([2 * MiB, 2 * MiB, 4 * MiB, 100 * MiB]);
    expect(sizeClass(2 ** 50)).toBe(2 ** 50);
  });
});

describe('DeviceMemoryPool', () => {
  it('reuses a disposed block for the next allocation of its class', () => {
    const device = fakeDevice(64 * MiB);
    const pool = new DeviceMemoryPool(device);
    const a = pool.alloc(1000, 'a');
    const ptr = a.ptr;
    expect([a.bytes, a.capacity]).toEqual([1000, 1024]);
    a.dispose();
    expect(pool.stats()).toEqual({ bytesInUse: 0, bytesCached: 1024, buffersInUse: 0, blocksCached: 1 });
    const b = pool.alloc(900, 'b');
    expect(b.ptr).toBe(ptr);
    expect(device.allocs).toEqual([1024]);
    expect(pool.stats()).toEqual({ bytesInUse: 1024, bytesCached: 0, buffersInUse: 1, blocksCached: 0 });
  });

  it('makes dispose idempotent and a disposed buffer unusable', () => {
    const pool = new DeviceMemoryPool(fakeDevice(MiB));
    const a = pool.alloc(10, 'scratch');
    a.dispose();
    a.dispose();
    expect(a.disposed).toBe(true);
    expect(() => a.ptr).toThrow(DisposedError);
    expect(() => a.ptr).toThrow(/scratch/);
    expect(pool.stats().blocksCached).toBe(1);
  });

  it('frees its cache and retries when the device is out of memory', () => {
    const device = fakeDevice(10 * MiB);
    const pool = new DeviceMemoryPool(device);
    pool.alloc(6 * MiB, 'first').dispose();
    const big = pool.alloc(8 * MiB, 'second');
    expect(big.capacity).toBe(8 * MiB);
    expect(device.allocs).toEqual([6 * MiB, 8 * MiB, 8 * MiB]);
    expect(device.frees).toHaveLength(1);
    expect(pool.stats().bytesCached).toBe(0);
  });

  it("frees the caches of the device's other pools when its own cannot make room, and no other device's", () => {
    const shared = Object.assign(fakeDevice(64 * MiB), { ordinal: 0 });
    const other = new DeviceMemoryPool(shared); // another backend's context on the same GPU
    const elsewhere = new DeviceMemoryPool(Object.assign(fakeDevice(64 * MiB), { ordinal: 1 }));
    const pool = new DeviceMemoryPool(shared);
    other.alloc(40 * MiB, 'cached by the other pool').dispose();
    elsewhere.alloc(40 * MiB, 'cached on another device').dispose();
    expect(pool.reclaimableBytes()).toBe(40 * MiB);
    const big = pool.alloc(48 * MiB, 'needs the other pool\'s cache');
    expect(big.capacity).toBe(48 * MiB);
    expect(other.stats().bytesCached).toBe(0);
    expect(elsewhere.stats().bytesCached).toBe(40 * MiB);
    big.dispose();
    other.dispose();
    elsewhere.dispose();
    pool.dispose();
  });

  it('throws DeviceOutOfMemoryError with the requested bytes, and keeps working afterwards', () => {
    const device = fakeDevice(10 * MiB);
    const pool = new DeviceMemoryPool(device);
    const held = pool.alloc(4 * MiB, 'held');
    let error: unknown;
    try {
      pool.alloc(7 * MiB - 5, 'too big');
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(DeviceOutOfMemoryError);
    expect(error).toMatchObject({ requestedBytes: 7 * MiB - 5, freeBytes: 6 * MiB });
    expect((error as Error).message).toContain('too big');
    expect(pool.alloc(MiB, 'after').capacity).toBe(MiB);
    expect(held.disposed).toBe(false);
  });

  it('refuses more than the device holds without asking the device', () => {
    const device = fakeDevice(10 * MiB);
    const pool = new DeviceMemoryPool(device);
    expect(() => pool.alloc(2 ** 50, '1 PiB')).toThrow(DeviceOutOfMemoryError);
    expect(device.allocs).toEqual([]);
  });

  it('refuses sizes that are not whole byte counts', () => {
    const pool = new DeviceMemoryPool(fakeDevice(MiB));
    for (const bytes of [-1, 1.5, Number.NaN, 2 ** 54]) expect(() => pool.alloc(bytes, 'x')).toThrow(InputValueError);
  });

  it('frees live and cached blocks on dispose; the pool then refuses work', () => {
    const device = fakeDevice(64 * MiB);
    const pool = new DeviceMemoryPool(device);
    const live = pool.alloc(3 * MiB, 'live');
    pool.alloc(100, 'cached').dispose();
    pool.dispose();
    pool.dispose();
    expect(device.used).toBe(0);
    expect(device.frees).toHaveLength(2);
    expect(live.disposed).toBe(true);
    live.dispose();
    expect(device.frees).toHaveLength(2);
    expect(pool.stats()).toEqual({ bytesInUse: 0, bytesCached: 0, buffersInUse: 0, blocksCached: 0 });
    expect(() => pool.alloc(1, 'late')).toThrow(DisposedError);
  });
});
