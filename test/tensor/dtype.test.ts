// Exact checks of the f32 <-> f16/bf16 conversions: ties to even, subnormals, overflow, NaN/Inf/-0, and an
// exhaustive round trip over every 16-bit pattern. Inputs are built from bit patterns or powers of two so each
// expected result is known exactly, not computed by another converter.

import { describe, expect, it } from 'vitest';
import { bf16ToF32, f16ToF32, f32Bits, f32FromBits, f32ToBf16, f32ToF16, float64ToStorage, storageToFloat32 } from '../../src/tensor/dtype.js';

const hex = (n: number): string => `0x${n.toString(16).padStart(4, '0')}`;
const isF16NaN = (h: number): boolean => (h & 0x7c00) === 0x7c00 && (h & 0x03ff) !== 0;
const isBf16NaN = (h: number): boolean => (h & 0x7f80) === 0x7f80 && (h & 0x007f) !== 0;

describe('f32ToF16', () => {
  it('converts exact values', () => {
    expect(hex(f32ToF16(1))).toBe('0x3c00');
    expect(hex(f32ToF16(-2))).toBe('0xc000');
    expect(hex(f32ToF16(0.5))).toBe('0x3800');
    expect(hex(f32ToF16(65504))).toBe('0x7bff'); // largest finite half
    expect(hex(f32ToF16(2 ** -14))).toBe('0x0400'); // smallest normal half
    expect(hex(f32ToF16(0))).toBe('0x0000');
  });

  it('rounds ties to even: down when the lower neighbour is even', () => {
    // 1 + 2^-11 lies exactly halfway between 1 (0x3c00, even) and 1 + 2^-10 (0x3c01, odd).
    expect(hex(f32ToF16(1 + 2 ** -11))).toBe('0x3c00');
    expect(hex(f32ToF16(-(1 + 2 ** -11)))).toBe('0xbc00');
    // Halfway between 0x3c02 (even) and 0x3c03.
    expect(hex(f32ToF16(1 + 5 * 2 ** -11))).toBe('0x3c02');
  });

  it('rounds ties to even: up when the upper neighbour is even', () => {
    // 1 + 3 * 2^-11 lies halfway between 0x3c01 (odd) and 0x3c02 (even).
    expect(hex(f32ToF16(1 + 3 * 2 ** -11))).toBe('0x3c02');
    // Halfway between 0x3bff (odd, 1 - 2^-11) and 0x3c00 (1.0): the round-up carries into the exponent.
    expect(hex(f32ToF16(1 - 2 ** -12))).toBe('0x3c00');
  });

  it('rounds off-tie values to the nearest', () => {
    expect(hex(f32ToF16(1 + 2 ** -11 + 2 ** -23))).toBe('0x3c01'); // one f32 ulp above the tie
    expect(hex(f32ToF16(1 + 3 * 2 ** -11 - 2 ** -23))).toBe('0x3c01'); // one f32 ulp below the tie
  });

  it('produces subnormal halves with ties to even', () => {
    expect(hex(f32ToF16(2 ** -24))).toBe('0x0001'); // smallest subnormal
    expect(hex(f32ToF16(-(2 ** -24)))).toBe('0x8001');
    expect(hex(f32ToF16(2 ** -25))).toBe('0x0000'); // exactly half the smallest: ties to 0 (even)
    expect(hex(f32ToF16(-(2 ** -25)))).toBe('0x8000'); // and keeps its sign
    expect(hex(f32ToF16(2 ** -25 + 2 ** -48))).toBe('0x0001'); // one f32 ulp above halfway
    expect(hex(f32ToF16(2 ** -26))).toBe('0x0000');
    expect(hex(f32ToF16(3 * 2 ** -25))).toBe('0x0002'); // 1.5 subnormal ulps: up to even 2
    expect(hex(f32ToF16(5 * 2 ** -25))).toBe('0x0002'); // 2.5 subnormal ulps: down to even 2
    expect(hex(f32ToF16(1023 * 2 ** -24))).toBe('0x03ff'); // largest subnormal
    expect(hex(f32ToF16(1023.5 * 2 ** -24))).toBe('0x0400'); // tie between 0x03ff and 0x0400 goes to the even normal
    expect(hex(f32ToF16(f32FromBits(0x00000001)))).toBe('0x0000'); // f32 subnormals underflow to zero
  });

  it('overflows to Inf only past the rounding boundary', () => {
    expect(hex(f32ToF16(65519))).toBe('0x7bff'); // rounds down to 65504
    expect(hex(f32ToF16(65520))).toBe('0x7c00'); // the tie above 65504 rounds to even, which is Inf
    expect(hex(f32ToF16(-65520))).toBe('0xfc00');
    expect(hex(f32ToF16(1e10))).toBe('0x7c00');
    expect(hex(f32ToF16(f32FromBits(0x7f7fffff)))).toBe('0x7c00'); // largest f32
  });

  it('keeps NaN, +-Inf and -0', () => {
    expect(isF16NaN(f32ToF16(NaN))).toBe(true);
    expect(isF16NaN(f32ToF16(f32FromBits(0x7f800001)))).toBe(true); // a NaN with a tiny payload must not become Inf
    expect(isF16NaN(f32ToF16(f32FromBits(0xff800001)))).toBe(true);
    expect(hex(f32ToF16(Infinity))).toBe('0x7c00');
    expect(hex(f32ToF16(-Infinity))).toBe('0xfc00');
    expect(hex(f32ToF16(-0))).toBe('0x8000');
  });
});

describe('f16ToF32', () => {
  it('decodes normals, subnormals and specials exactly', () => {
    expect(f16ToF32(0x3c00)).toBe(1);
    expect(f16ToF32(0xc000)).toBe(-2);
    expect(f16ToF32(0x7bff)).toBe(65504);
    expect(f16ToF32(0x3c01)).toBe(1 + 2 ** -10);
    expect(f16ToF32(0x0400)).toBe(2 ** -14);
    expect(f16ToF32(0x0001)).toBe(2 ** -24);
    expect(f16ToF32(0x03ff)).toBe(1023 * 2 ** -24);
    expect(f16ToF32(0x8001)).toBe(-(2 ** -24));
    expect(f16ToF32(0x7c00)).toBe(Infinity);
    expect(f16ToF32(0xfc00)).toBe(-Infinity);
    expect(Number.isNaN(f16ToF32(0x7e00))).toBe(true);
    expect(Number.isNaN(f16ToF32(0xfc01))).toBe(true);
    expect(Object.is(f16ToF32(0x8000), -0)).toBe(true);
    expect(Object.is(f16ToF32(0x0000), 0)).toBe(true);
  });

  it('round-trips every one of the 65536 bit patterns (NaNs to some NaN)', () => {
    const failures: string[] = [];
    for (let h = 0; h < 0x10000; h++) {
      const back = f32ToF16(f16ToF32(h));
      const ok = isF16NaN(h) ? isF16NaN(back) : back === h;
      if (!ok && failures.length < 10) failures.push(`${hex(h)} -> ${f16ToF32(h)} -> ${hex(back)}`);
    }
    expect(failures).toEqual([]);
  });

  it('decodes to values that f32 holds exactly', () => {
    const inexact: string[] = [];
    for (let h = 0; h < 0x10000; h++) {
      const v = f16ToF32(h);
      if (!Number.isNaN(v) && Math.fround(v) !== v) inexact.push(hex(h));
    }
    expect(inexact).toEqual([]);
  });
});

describe('f32ToBf16', () => {
  it('converts exact values', () => {
    expect(hex(f32ToBf16(1))).toBe('0x3f80');
    expect(hex(f32ToBf16(-2))).toBe('0xc000');
    expect(hex(f32ToBf16(0))).toBe('0x0000');
    expect(hex(f32ToBf16(f32FromBits(0x7f7f0000)))).toBe('0x7f7f'); // largest finite bf16
  });

  it('rounds ties to even in both directions', () => {
    // 1 + 2^-8 lies halfway between 1 (0x3f80, even) and 1 + 2^-7 (0x3f81, odd).
    expect(hex(f32ToBf16(1 + 2 ** -8))).toBe('0x3f80');
    // 1 + 3 * 2^-8 lies halfway between 0x3f81 (odd) and 0x3f82 (even).
    expect(hex(f32ToBf16(1 + 3 * 2 ** -8))).toBe('0x3f82');
    expect(hex(f32ToBf16(-(1 + 3 * 2 ** -8)))).toBe('0xbf82');
    expect(hex(f32ToBf16(1 + 2 ** -8 + 2 ** -23))).toBe('0x3f81'); // just above the tie
    expect(hex(f32ToBf16(1 + 3 * 2 ** -8 - 2 ** -23))).toBe('0x3f81'); // just below the tie
    expect(hex(f32ToBf16(f32FromBits(0x3f7f8000)))).toBe('0x3f80'); // tie that carries into the exponent
  });

  it('rounds f32 subnormals to bf16 subnormals with ties to even', () => {
    expect(hex(f32ToBf16(f32FromBits(0x00010000)))).toBe('0x0001'); // smallest bf16 subnormal, exact
    expect(hex(f32ToBf16(f32FromBits(0x00008000)))).toBe('0x0000'); // tie: down to even 0
    expect(hex(f32ToBf16(f32FromBits(0x00008001)))).toBe('0x0001');
    expect(hex(f32ToBf16(f32FromBits(0x00018000)))).toBe('0x0002'); // tie: up to even 2
    expect(hex(f32ToBf16(f32FromBits(0x80008000)))).toBe('0x8000'); // -0 keeps its sign
  });

  it('overflows to Inf only past the rounding boundary', () => {
    expect(hex(f32ToBf16(f32FromBits(0x7f7f7fff)))).toBe('0x7f7f');
    expect(hex(f32ToBf16(f32FromBits(0x7f7f8000)))).toBe('0x7f80'); // tie from odd 0x7f7f goes to Inf
    expect(hex(f32ToBf16(f32FromBits(0x7f7fffff)))).toBe('0x7f80');
    expect(hex(f32ToBf16(f32FromBits(0xff7fffff)))).toBe('0xff80');
  });

  it('keeps NaN (with its sign), +-Inf and -0', () => {
    expect(isBf16NaN(f32ToBf16(NaN))).toBe(true);
    const positive = f32ToBf16(f32FromBits(0x7fc00000));
    const negative = f32ToBf16(f32FromBits(0xffc00000));
    expect(isBf16NaN(positive) && (positive & 0x8000) === 0).toBe(true);
    expect(isBf16NaN(negative) && (negative & 0x8000) !== 0).toBe(true);
    // A NaN whose payload lies only in the low 16 bits must not truncate to Inf.
    const low = f32ToBf16(f32FromBits(0xff800001));
    expect(isBf16NaN(low) && (low & 0x8000) !== 0).toBe(true);
    expect(isBf16NaN(f32ToBf16(f32FromBits(0x7f800001)))).toBe(true);
    expect(hex(f32ToBf16(Infinity))).toBe('0x7f80');
    expect(hex(f32ToBf16(-Infinity))).toBe('0xff80');
    expect(hex(f32ToBf16(-0))).toBe('0x8000');
  });
});

describe('bf16ToF32', () => {
  it('is the top half of the f32 bits', () => {
    expect(bf16ToF32(0x3f80)).toBe(1);
    expect(bf16ToF32(0xc000)).toBe(-2);
    expect(bf16ToF32(0x7f80)).toBe(Infinity);
    expect(bf16ToF32(0xff80)).toBe(-Infinity);
    expect(bf16ToF32(0x0001)).toBe(2 ** -133);
    expect(Object.is(bf16ToF32(0x8000), -0)).toBe(true);
    expect(Number.isNaN(bf16ToF32(0x7fc0))).toBe(true);
    expect(f32Bits(bf16ToF32(0xffc1)) >>> 0).toBe(0xffc10000);
  });

  it('round-trips every one of the 65536 bit patterns (NaNs to a NaN of the same sign)', () => {
    const failures: string[] = [];
    for (let h = 0; h < 0x10000; h++) {
      const back = f32ToBf16(bf16ToF32(h));
      const ok = isBf16NaN(h) ? isBf16NaN(back) && (back & 0x8000) === (h & 0x8000) : back === h;
      if (!ok && failures.length < 10) failures.push(`${hex(h)} -> ${bf16ToF32(h)} -> ${hex(back)}`);
    }
    expect(failures).toEqual([]);
  });
});

describe('storageToFloat32', () => {
  it('gives halves exactly and rounds doubles and 64-bit ints once, for every dtype', () => {
    const halves = [1.5, -2, 65504, 2 ** -24];
    expect(Array.from(storageToFloat32('f16', Uint16Array.from(halves, f32ToF16)))).toEqual(halves);
    expect(Array.from(storageToFloat32('bf16', Uint16Array.from([1.5, -2, 3.140625], f32ToBf16)))).toEqual([1.5, -2, 3.140625]);
    expect(Array.from(storageToFloat32('f64', Float64Array.from([0.1, 1 / 3])))).toEqual([Math.fround(0.1), Math.fround(1 / 3)]);
    expect(Array.from(storageToFloat32('f32', Float32Array.from([0.25])))).toEqual([0.25]);
    expect(Array.from(storageToFloat32('i32', Int32Array.from([-7, 16777217])))).toEqual([-7, 16777216]);
    expect(Array.from(storageToFloat32('i64', BigInt64Array.from([-3n, 2n ** 40n + 1n])))).toEqual([-3, 2 ** 40]);
  });
});

describe('the array conversions agree with the per-number ones', () => {
  it('bf16 -> f32 over all 65536 bit patterns (NaNs stay NaN)', () => {
    const bits = Uint16Array.from({ length: 0x10000 }, (_, h) => h);
    const fast = storageToFloat32('bf16', bits);
    const bad: string[] = [];
    for (let h = 0; h < 0x10000; h++) {
      const want = bf16ToF32(h);
      const ok = Number.isNaN(want) ? Number.isNaN(fast[h]!) : Object.is(fast[h], Math.fround(want));
      if (!ok && bad.length < 5) bad.push(`${h.toString(16)}: ${fast[h]} vs ${want}`);
    }
    expect(bad).toEqual([]);
  });

  it('f32 storage -> bf16 as f32ToBf16 number by number: ties, overflow, subnormals, signed zeros, NaN', () => {
    const specials = [0, -0, 1, -1.5, 3.140625, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9, 3.4e38, -3.4e38, Infinity, -Infinity, NaN, 1e-40, -1e-45, 2 ** -126];
    const values = Float32Array.from([...specials, ...Array.from({ length: 4096 }, (_, i) => Math.sin(i * 12.9898) * 10 ** ((i % 80) - 40))]);
    const fast = float64ToStorage('bf16', values);
    const slow = Uint16Array.from(values, (x) => f32ToBf16(x));
    expect(Array.from(fast)).toEqual(Array.from(slow));
    const view = float64ToStorage('bf16', values.subarray(3, 9)); // a view at an offset into its buffer
    expect(Array.from(view)).toEqual(Array.from(slow.subarray(3, 9)));
  });
});
