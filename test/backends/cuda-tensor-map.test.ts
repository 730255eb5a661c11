// The tensor-map spec's checks (tensor-map.ts), which mirror cuTensorMapEncodeTiled's rules so that a bad map is
// refused with the field named before the driver answers CUDA_ERROR_INVALID_VALUE. (fake-runtime.test.ts encodes
// one through a fake driver; test/gpu/cuda-runtime.test.ts copies a box with it on an sm_90 GPU.)
import { describe, expect, it } from 'vitest';
import { InputValueError } from '../../src/errors.js';
import { checkTiledTensorMap, type TiledTensorMapSpec } from '../../src/backends/cuda/tensor-map.js';

const good: TiledTensorMapSpec = { ptr: 0x10000n, dtype: 'bf16', dims: [128, 4096], strides: [256], box: [64, 64], swizzle: '128B' };

describe('checkTiledTensorMap', () => {
  it('accepts a bf16 matrix in boxes of 64 x 64 with the 128-byte swizzle (the wgmma tile layout)', () => {
    expect(() => checkTiledTensorMap(good, 'k')).not.toThrow();
    expect(() => checkTiledTensorMap({ ...good, dtype: 'f32', box: [32, 64] }, 'k')).not.toThrow();
    expect(() => checkTiledTensorMap({ ...good, dims: [128], strides: [], box: [64] }, 'k')).not.toThrow();
  });

  it('refuses, naming the field, what the driver would', () => {
    const cases: [Partial<TiledTensorMapSpec>, RegExp][] = [
      [{ ptr: 0x10008n }, /ptr must be 16-byte aligned/],
      [{ dims: [] , strides: [], box: [] }, /dims must have 1 to 5 entries/],
      [{ dims: [128, 0] }, /dims must be whole numbers/],
      [{ strides: [] }, /strides must have 1 entries/],
      [{ strides: [200] }, /strides must be multiples of 16/],
      [{ box: [64] }, /box must have 2 entries/],
      [{ box: [64, 257] }, /box must be whole numbers in \[1, 256\]/],
      [{ box: [4, 64] }, /innermost row a multiple of 16 bytes/],
      [{ box: [128, 64] }, /within the 128B swizzle span/],
      [{ swizzle: '64B' }, /within the 64B swizzle span/],
      [{ dtype: 'f64' as unknown as 'f32' }, /dtype must be/],
    ];
    for (const [change, message] of cases) {
      expect(() => checkTiledTensorMap({ ...good, ...change }, 'k')).toThrow(InputValueError);
      expect(() => checkTiledTensorMap({ ...good, ...change }, 'k')).toThrow(message);
    }
  });
});
