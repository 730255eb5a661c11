// Tensor: a shape, a dtype and host storage (row-major, contiguous). Device backends keep their own handles and
// exchange data with the host through these.

import { DTypeError, ShapeError } from '../errors.js';
import {
  allocateStorage,
  float64ToStorage,
  isFloatDType,
  storageToFloat32,
  storageToFloat64,
  type DType,
  type DTypeMap,
} from './dtype.js';
import { Rng } from './random.js';

export type Shape = readonly number[];

export class Tensor<D extends DType = DType> {
  readonly shape: Shape;
  readonly dtype: D;
  readonly data: DTypeMap[D];

  constructor(dtype: D, shape: Shape, data?: DTypeMap[D]) {
    for (const [axis, n] of shape.entries()) {
      if (!Number.isInteger(n) || n < 0) {
        throw new ShapeError(`shape[${axis}] must be a non-negative integer, got ${n} (shape [${shape.join(', ')}])`);
      }
    }
    const size = shapeSize(shape);
    if (data !== undefined && data.length !== size) {
      throw new ShapeError(`data has ${data.length} elements but shape [${shape.join(', ')}] needs ${size}`);
    }
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.data = data ?? allocateStorage(dtype, size);
  }

  get size(): number {
    return this.data.length;
  }

  get rank(): number {
    return this.shape.length;
  }

  static zeros<D extends DType>(shape: Shape, dtype: D): Tensor<D> {
    return new Tensor(dtype, shape);
  }

  /** A tensor of `dtype` holding `values` (doubles), rounded as the dtype requires. */
  static fromValues<D extends DType>(values: ArrayLike<number>, shape: Shape, dtype: D): Tensor<D> {
    if (values.length !== shapeSize(shape)) {
      throw new ShapeError(`${values.length} values do not fill shape [${shape.join(', ')}] (${shapeSize(shape)})`);
    }
    return new Tensor(dtype, shape, float64ToStorage(dtype, values));
  }

  static f32(values: ArrayLike<number>, shape: Shape): Tensor<'f32'> {
    return Tensor.fromValues(values, shape, 'f32');
  }

  /** Standard normal entries from a seeded generator, times `std`. */
  static randn<D extends DType>(shape: Shape, dtype: D, seed: number, std = 1): Tensor<D> {
    const rng = new Rng(seed);
    const values = new Float64Array(shapeSize(shape));
    for (let i = 0; i < values.length; i++) values[i] = rng.normal() * std;
    return Tensor.fromValues(values, shape, dtype);
  }

  /** Uniform entries in [lo, hi) from a seeded generator. */
  static uniform<D extends DType>(shape: Shape, dtype: D, seed: number, lo = 0, hi = 1): Tensor<D> {
    const rng = new Rng(seed);
    const values = new Float64Array(shapeSize(shape));
    for (let i = 0; i < values.length; i++) values[i] = lo + (hi - lo) * rng.next();
    return Tensor.fromValues(values, shape, dtype);
  }

  /** The values as doubles (a new array). */
  toFloat64(): Float64Array {
    return storageToFloat64(this.dtype, this.data);
  }

  /** The values as f32 (the same array when already f32). */
  toFloat32(): Float32Array {
    if (this.dtype === 'f32') return this.data as Float32Array;
    return storageToFloat32(this.dtype, this.data);
  }

  cast<E extends DType>(dtype: E): Tensor<E> {
    if ((dtype as DType) === this.dtype) return this as unknown as Tensor<E>;
    if (!isFloatDType(this.dtype) && isFloatDType(dtype)) {
      return Tensor.fromValues(this.toFloat64(), this.shape, dtype);
    }
    if (isFloatDType(this.dtype) && !isFloatDType(dtype)) {
      throw new DTypeError(`cannot cast ${this.dtype} to ${dtype}: use an explicit rounding first`);
    }
    // f32 values are exact as doubles: convert from the storage itself, without a copy twice its size.
    return Tensor.fromValues(this.dtype === 'f32' ? (this.data as Float32Array) : this.toFloat64(), this.shape, dtype);
  }

  /** The same storage viewed with another shape of the same size. */
  reshape(shape: Shape): Tensor<D> {
    return new Tensor(this.dtype, shape, this.data);
  }

  toString(): string {
    return `Tensor(${this.dtype}, [${this.shape.join(', ')}])`;
  }
}

export function shapeSize(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function formatShape(shape: Shape): string {
  return `[${shape.join(', ')}]`;
}
