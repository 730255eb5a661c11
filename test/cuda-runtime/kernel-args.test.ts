// Packing of cuLaunchKernel's `void **kernelParams`: offsets, alignment, bytes, and refusals of values that do not
// fit their C type. (fake-runtime.test.ts passes the same arrays through Koffi to C.)
import { describe, expect, it } from 'vitest';
import { InputValueError } from '../../src/errors.js';
import { kernelParamPointers, packKernelArgs, type KernelArg } from '../../src/backends/cuda/kernel-args.js';

describe('packKernelArgs', () => {
  it('places each value at an offset aligned to its size, little-endian', () => {
    const args: KernelArg[] = [
      { ptr: 0x7f00_1234_5678n },
      { i32: -7 },
      { f32: 2.5 },
      { i64: -5_000_000_000n },
      { u32: 0xffff_ffff },
      { f64: 0.1 },
      { u64: 2n ** 63n },
    ];
    const packed = packKernelArgs(args);
    expect(packed.sizes).toEqual([8, 4, 4, 8, 4, 8, 8]);
    expect(packed.offsets).toEqual([0, 8, 12, 16, 24, 32, 40]);
    expect(packed.bytes.length).toBe(48);
    const b = packed.bytes;
    expect(b.readBigUInt64LE(0)).toBe(0x7f00_1234_5678n);
    expect(b.readInt32LE(8)).toBe(-7);
    expect(b.readFloatLE(12)).toBe(2.5);
    expect(b.readBigInt64LE(16)).toBe(-5_000_000_000n);
    expect(b.readUInt32LE(24)).toBe(0xffff_ffff);
    expect(b.readDoubleLE(32)).toBe(0.1);
    expect(b.readBigUInt64LE(40)).toBe(2n ** 63n);
  });

  it('pads a 4-byte value followed by an 8-byte one', () => {
    const packed = packKernelArgs([{ i32: 1 }, { ptr: 16n }, { f32: 1 }, { i64: 3 }]);
    expect(packed.offsets).toEqual([0, 8, 16, 24]);
    for (const [i, offset] of packed.offsets.entries()) expect(offset % (packed.sizes[i] ?? 1)).toBe(0);
  });

  it('places a by-value struct (a 128-byte tensor map) at a 64-byte boundary, its bytes as given', () => {
    const map = Uint8Array.from({ length: 128 }, (_, i) => i);
    const packed = packKernelArgs([{ i32: 3 }, { bytes: map }, { ptr: 16n }, { bytes: Uint8Array.of(9, 8, 7, 6) }]);
    expect(packed.sizes).toEqual([4, 128, 8, 4]);
    expect(packed.offsets).toEqual([0, 64, 192, 200]);
    expect([...packed.bytes.subarray(64, 192)]).toEqual([...map]);
    expect([...packed.bytes.subarray(200, 204)]).toEqual([9, 8, 7, 6]);
    expect(() => packKernelArgs([{ bytes: new Uint8Array(0) }], 'my_kernel')).toThrow(/argument 0 of kernel my_kernel \(bytes\)/);
  });

  it('accepts numbers for 64-bit integers', () => {
    expect(packKernelArgs([{ i64: -3 }, { u64: 2 ** 40 }]).bytes.readBigInt64LE(0)).toBe(-3n);
  });

  it('refuses values that do not fit, naming the kernel and the argument', () => {
    const bad: KernelArg[][] = [
      [{ i32: 1.5 }],
      [{ i32: 2 ** 31 }],
      [{ u32: -1 }],
      [{ ptr: -1n }],
      [{ ptr: 2n ** 64n }],
      [{ i64: 2 ** 60 }],
      [{ u64: -1n }],
    ];
    for (const args of bad) expect(() => packKernelArgs(args, 'my_kernel')).toThrow(InputValueError);
    expect(() => packKernelArgs([{ f32: 1 }, { i32: 0.5 }], 'my_kernel')).toThrow(/argument 1 of kernel my_kernel \(i32\)/);
  });
});

describe('kernelParamPointers', () => {
  it('gives one view per argument into the packed bytes, and null for no arguments', () => {
    const packed = packKernelArgs([{ i32: 5 }, { ptr: 0xabcn }]);
    const views = kernelParamPointers(packed);
    expect(views).not.toBeNull();
    expect(views?.map((v) => [v.byteOffset - packed.bytes.byteOffset, v.length])).toEqual([
      [0, 4],
      [8, 8],
    ]);
    expect(views?.every((v) => v.buffer === packed.bytes.buffer)).toBe(true);
    expect(views?.[1]?.readBigUInt64LE(0)).toBe(0xabcn);
    expect(kernelParamPointers(packKernelArgs([]))).toBeNull();
  });
});
