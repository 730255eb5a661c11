// Element types and their host storage, and exact conversions between f32 and the two half formats
// (round to nearest, ties to even; NaN stays NaN, +-Inf stays +-Inf, subnormals kept).

export interface DTypeMap {
  f64: Float64Array;
  f32: Float32Array;
  f16: Uint16Array; // IEEE binary16 bit patterns
  bf16: Uint16Array; // bfloat16 bit patterns (the top half of an f32)
  i32: Int32Array;
  i64: BigInt64Array;
}
export type DType = keyof DTypeMap;
export type FloatDType = 'f64' | 'f32' | 'f16' | 'bf16';
export type IntDType = 'i32' | 'i64';

export const DTYPES: readonly DType[] = ['f64', 'f32', 'f16', 'bf16', 'i32', 'i64'];
export const FLOAT_DTYPES: readonly FloatDType[] = ['f64', 'f32', 'f16', 'bf16'];

export const BYTES_PER_ELEMENT: Readonly<Record<DType, number>> = { f64: 8, f32: 4, f16: 2, bf16: 2, i32: 4, i64: 8 };

export function isDType(x: unknown): x is DType {
  return typeof x === 'string' && (DTYPES as readonly string[]).includes(x);
}

export function isFloatDType(x: DType): x is FloatDType {
  return (FLOAT_DTYPES as readonly string[]).includes(x);
}

/** A zero-filled array of `size` elements of `dtype`. */
export function allocateStorage<D extends DType>(dtype: D, size: number): DTypeMap[D] {
  const ctors: { [K in DType]: new (n: number) => DTypeMap[K] } = {
    f64: Float64Array,
    f32: Float32Array,
    f16: Uint16Array,
    bf16: Uint16Array,
    i32: Int32Array,
    i64: BigInt64Array,
  };
  return new ctors[dtype](size) as DTypeMap[D];
}

// ---------------------------------------------------------------------------------------------------------------
// Half-precision conversions. One shared scratch word reinterprets f32 <-> u32 without allocation.

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

export function f32Bits(x: number): number {
  scratchF32[0] = x;
  return scratchU32[0]!;
}

export function f32FromBits(bits: number): number {
  scratchU32[0] = bits >>> 0;
  return scratchF32[0]!;
}

/** bf16 bits of the f32 nearest to x, rounded to nearest even. NaN keeps its sign and becomes a quiet NaN. */
export function f32ToBf16(x: number): number {
  const bits = f32Bits(x);
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x0040) & 0xffff; // NaN: keep quiet
  const roundingBias = 0x7fff + ((bits >>> 16) & 1);
  return ((bits + roundingBias) >>> 16) & 0xffff;
}

export function bf16ToF32(h: number): number {
  return f32FromBits((h & 0xffff) << 16);
}

/** IEEE binary16 bits of the f32 nearest to x, rounded to nearest even; overflow goes to Inf. */
export function f32ToF16(x: number): number {
  const bits = f32Bits(x);
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x0200 | (mant >>> 13) : 0); // Inf or NaN (quiet)
  const e = exp - 127 + 15; // rebiased exponent
  if (e >= 0x1f) return sign | 0x7c00; // overflow
  if (e <= 0) {
    // Subnormal half (or zero): shift the full 24-bit significand right, rounding to nearest even.
    if (e < -10) return sign; // below half the smallest subnormal: rounds to zero
    mant |= 0x800000;
    const shift = 14 - e; // 13 bits of mantissa difference plus (1 - e)
    const halfway = 1 << (shift - 1);
    const rem = mant & ((1 << shift) - 1);
    let result = mant >>> shift;
    if (rem > halfway || (rem === halfway && (result & 1) === 1)) result++;
    return sign | result;
  }
  let result = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (result & 1) === 1)) result++; // may carry into the exponent: correct
  return sign | result;
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Element values of a float or int storage as doubles (i64 through Number, exact below 2^53). */
export function storageToFloat64(dtype: DType, data: DTypeMap[DType]): Float64Array {
  return widenStorage(dtype, data, new Float64Array(data.length));
}

/**
 * Element values of a float or int storage as f32 (a new array; halves exactly, doubles and ints rounded once).
 * Written as a loop: TypedArray.from(source, map) first lists every value in a JS array, which for the 10^8-10^9
 * elements of a long sequence exhausts the JS heap.
 */
export function storageToFloat32(dtype: DType, data: DTypeMap[DType]): Float32Array {
  return widenStorage(dtype, data, new Float32Array(data.length));
}

/** Fills `out` (as long as data) with data's element values; bf16 into f32 by the bits. */
function widenStorage<A extends Float32Array | Float64Array>(dtype: DType, data: DTypeMap[DType], out: A): A {
  if (dtype === 'bf16' && out instanceof Float32Array) bf16ToF32Bits(data as Uint16Array, new Uint32Array(out.buffer));
  else if (dtype === 'f16' || dtype === 'bf16') {
    const widen = dtype === 'f16' ? f16ToF32 : bf16ToF32;
    for (let i = 0; i < out.length; i++) out[i] = widen((data as Uint16Array)[i]!);
  } else if (dtype === 'i64') for (let i = 0; i < out.length; i++) out[i] = Number((data as BigInt64Array)[i]!);
  else out.set(data as Float64Array | Float32Array | Int32Array);
  return out;
}

/** bf16 bits to f32 bits, element by element: bf16 is f32's upper half, so a shift (bf16ToF32 over arrays). */
function bf16ToF32Bits(bits: Uint16Array, out: Uint32Array): void {
  for (let i = 0; i < bits.length; i++) out[i] = bits[i]! << 16;
}

/** f32 bits to bf16 bits, element by element, as f32ToBf16 (nearest even; NaN stays a quiet NaN of its sign). */
function f32BitsToBf16(bits: Uint32Array, out: Uint16Array): void {
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i]!;
    out[i] = (b & 0x7fffffff) > 0x7f800000 ? (b >>> 16) | 0x0040 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
}

/** Converts doubles to `dtype` storage: f32 rounds once, halves round f64 -> f32 -> half, ints must be integral. */
export function float64ToStorage<D extends DType>(dtype: D, values: ArrayLike<number>): DTypeMap[D] {
  const out = allocateStorage(dtype, values.length);
  const n = values.length;
  switch (dtype) {
    case 'f16':
      for (let i = 0; i < n; i++) (out as Uint16Array)[i] = f32ToF16(values[i]!);
      break;
    case 'bf16':
      // From f32 storage (the caches' and uploads' case) by its bits, without a JS number per element.
      if (values instanceof Float32Array) f32BitsToBf16(new Uint32Array(values.buffer, values.byteOffset, n), out as Uint16Array);
      else for (let i = 0; i < n; i++) (out as Uint16Array)[i] = f32ToBf16(values[i]!);
      break;
    case 'i64':
      for (let i = 0; i < n; i++) (out as BigInt64Array)[i] = BigInt(values[i]!);
      break;
    default:
      (out as Float64Array | Float32Array | Int32Array).set(values);
  }
  return out;
}
