// Tensor: shape checks, storage per dtype, rounding on the way in, seeded random fills, cast and reshape.

import { describe, expect, it } from 'vitest';
import { DTypeError, ShapeError } from '../../src/errors.js';
import { f32ToBf16, f32ToF16 } from '../../src/tensor/dtype.js';
import { formatShape, shapeSize, Tensor } from '../../src/tensor/tensor.js';

describe('Tensor', () => {
  it('allocates zeroed storage of the dtype and freezes its shape', () => {
    const t = Tensor.zeros([2, 3, 4], 'bf16');
    expect(t.data).toBeInstanceOf(Uint16Array);
    expect([t.size, t.rank]).toEqual([24, 3]);
    expect(Object.isFrozen(t.shape)).toBe(true);
    expect(Tensor.zeros([2], 'i64').data).toBeInstanceOf(BigInt64Array);
    expect(Tensor.zeros([], 'f32').size).toBe(1);
    expect(Tensor.zeros([3, 0], 'f32').size).toBe(0);
  });

  it('refuses negative, fractional and NaN dims, naming the axis', () => {
    expect(() => new Tensor('f32', [2, -1])).toThrow(ShapeError);
    expect(() => new Tensor('f32', [2, -1])).toThrow('shape[1] must be a non-negative integer, got -1');
    expect(() => new Tensor('f32', [1.5])).toThrow('shape[0] must be a non-negative integer, got 1.5');
    expect(() => new Tensor('f32', [NaN])).toThrow(ShapeError);
  });

  it('refuses data whose length does not fill the shape', () => {
    expect(() => new Tensor('f32', [2, 3], new Float32Array(5))).toThrow('data has 5 elements but shape [2, 3] needs 6');
    expect(() => Tensor.fromValues([1, 2, 3], [2, 2], 'f32')).toThrow(ShapeError);
  });

  it('rounds values to the dtype on the way in, to nearest even', () => {
    const x = [1 + 2 ** -9, 1 + 3 * 2 ** -9, 65520, -0, Infinity, NaN];
    expect(Array.from(Tensor.fromValues(x, [6], 'bf16').data)).toEqual(x.map(f32ToBf16));
    expect(Array.from(Tensor.fromValues(x, [6], 'f16').data)).toEqual(x.map(f32ToF16));
    // bf16 keeps 7 mantissa bits (ulp 2^-7 at 1): half an ulp ties to even, three halves go up to the even one.
    const bf = Tensor.fromValues([1 + 2 ** -9, 1 + 3 * 2 ** -9, 1 + 2 ** -8, 1 + 3 * 2 ** -8], [4], 'bf16').toFloat64();
    expect(Array.from(bf)).toEqual([1, 1 + 2 ** -7, 1, 1 + 2 ** -6]);
    expect(Tensor.fromValues([65520], [1], 'f16').toFloat64()[0]).toBe(Infinity);
    expect(Tensor.f32([0.1], [1]).toFloat64()[0]).toBe(Math.fround(0.1));
  });

  it('toFloat32 returns f32 storage itself and converts the rest', () => {
    const f = Tensor.f32([1, 2], [2]);
    expect(f.toFloat32()).toBe(f.data);
    expect(Array.from(Tensor.fromValues([1.5, -2], [2], 'bf16').toFloat32())).toEqual([1.5, -2]);
    expect(Array.from(new Tensor('i64', [2], BigInt64Array.from([3n, -4n])).toFloat64())).toEqual([3, -4]);
  });

  it('randn and uniform are seeded: same seed, same values; other seeds differ', () => {
    const a = Tensor.randn([64], 'f32', 7);
    expect(Array.from(Tensor.randn([64], 'f32', 7).data)).toEqual(Array.from(a.data));
    expect(Array.from(Tensor.randn([64], 'f32', 8).data)).not.toEqual(Array.from(a.data));
    const u = Tensor.uniform([1000], 'f32', 3, -2, 5).toFloat64();
    expect(u.every((x) => x >= -2 && x < 5)).toBe(true);
    const std = Tensor.randn([4096], 'f64', 1, 0.5).toFloat64();
    const rms = Math.sqrt(std.reduce((s, x) => s + x * x, 0) / std.length);
    expect(rms).toBeGreaterThan(0.45);
    expect(rms).toBeLessThan(0.55);
  });

  it('casts between floats and from ints, but never rounds floats to ints implicitly', () => {
    const t = Tensor.f32([1.25, -3], [2]);
    expect(t.cast('f32')).toBe(t);
    expect(Array.from(t.cast('f16').toFloat64())).toEqual([1.25, -3]);
    expect(Array.from(new Tensor('i32', [2], Int32Array.from([5, -6])).cast('bf16').toFloat64())).toEqual([5, -6]);
    expect(() => t.cast('i32')).toThrow(DTypeError);
    expect(() => t.cast('i32')).toThrow('cannot cast f32 to i32');
  });

  it('reshape shares storage and checks the size', () => {
    const t = Tensor.f32([1, 2, 3, 4, 5, 6], [2, 3]);
    const r = t.reshape([3, 2]);
    expect(r.data).toBe(t.data);
    expect(r.shape).toEqual([3, 2]);
    expect(() => t.reshape([4, 2])).toThrow(ShapeError);
    expect(t.toString()).toBe('Tensor(f32, [2, 3])');
  });

  it('shapeSize and formatShape', () => {
    expect(shapeSize([2, 3, 4])).toBe(24);
    expect(shapeSize([])).toBe(1);
    expect(formatShape([1, 40, 4, 3])).toBe('[1, 40, 4, 3]');
  });
});
