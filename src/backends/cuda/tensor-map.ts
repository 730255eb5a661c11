// TMA tensor maps (sm_90): the 128-byte descriptor a kernel's `cp.async.bulk.tensor` reads to copy a box of a
// strided global tensor into shared memory, optionally swizzled. With the 128-byte swizzle and boxes 64 elements
// wide (128 bytes of bf16), a box lands in shared memory exactly as the WgmmaTile layout of kernels/nsa_wgmma.cuh
// (8-row atoms, 16-byte chunks XOR-permuted by row % 8), so a producer warp can load wgmma operands with one
// instruction per box instead of every thread issuing 16-byte copies.
//
// The host encodes the map (cuTensorMapEncodeTiled) and passes its bytes by value as a `const __grid_constant__`
// kernel parameter ({ bytes } in kernel-args.ts). The flash kernels' `_tma` forms read their tiles this way
// (programs.ts builds and memoises their maps); the GPU runtime test round-trips a box through shared memory.
import { InputValueError } from '../../errors.js';
import type { CudaDriver, DevicePtr } from './driver.js';
import koffi from 'koffi';

export type TensorMapDType = 'bf16' | 'f16' | 'f32';
export type TensorMapSwizzle = 'none' | '32B' | '64B' | '128B';

/** A tiled view of a global tensor, innermost dimension first (as cuTensorMapEncodeTiled takes it). */
export interface TiledTensorMapSpec {
  /** The tensor's first element: 16-byte aligned. */
  readonly ptr: DevicePtr;
  readonly dtype: TensorMapDType;
  /** Elements along each dimension, innermost first (1 to 5 dimensions). */
  readonly dims: readonly number[];
  /** Byte strides of dimensions 1 .. rank-1 (the innermost is contiguous): multiples of 16. */
  readonly strides: readonly number[];
  /** The box one copy moves, in elements per dimension (1 .. 256 each). */
  readonly box: readonly number[];
  readonly swizzle: TensorMapSwizzle;
}

/** cuda.h's CUtensorMapDataType values. */
const DTYPE = { f16: 6, f32: 7, bf16: 9 } as const;
const ELEMENT_BYTES = { f16: 2, f32: 4, bf16: 2 } as const;
/** CUtensorMapSwizzle values and the span (bytes) a box row may not exceed under each. */
const SWIZZLE = { none: [0, Infinity], '32B': [1, 32], '64B': [2, 64], '128B': [3, 128] } as const;
const L2_PROMOTION_128B = 2;
export const TENSOR_MAP_BYTES = 128;

/** Throws InputValueError naming the field when the spec breaks one of cuTensorMapEncodeTiled's rules. */
export function checkTiledTensorMap(spec: TiledTensorMapSpec, what: string): void {
  const rank = spec.dims.length;
  const bad = (field: string, rule: string, got: unknown): never => {
    throw new InputValueError(`tensor map ${what}: ${field} ${rule}; got ${JSON.stringify(got)}`);
  };
  if (!(spec.dtype in DTYPE)) bad('dtype', "must be 'bf16', 'f16' or 'f32'", spec.dtype);
  if (!(spec.swizzle in SWIZZLE)) bad('swizzle', "must be 'none', '32B', '64B' or '128B'", spec.swizzle);
  if (rank < 1 || rank > 5) bad('dims', 'must have 1 to 5 entries', spec.dims);
  if (spec.ptr % 16n !== 0n) bad('ptr', 'must be 16-byte aligned', `0x${spec.ptr.toString(16)}`);
  if (spec.dims.some((d) => !Number.isInteger(d) || d < 1 || d > 2 ** 32)) bad('dims', 'must be whole numbers in [1, 2^32]', spec.dims);
  if (spec.strides.length !== rank - 1) bad('strides', `must have ${rank - 1} entries (one per dimension past the first)`, spec.strides);
  if (spec.strides.some((s) => !Number.isInteger(s) || s < 16 || s % 16 !== 0 || s >= 2 ** 40)) {
    bad('strides', 'must be multiples of 16 bytes below 2^40', spec.strides);
  }
  if (spec.box.length !== rank) bad('box', `must have ${rank} entries`, spec.box);
  if (spec.box.some((b) => !Number.isInteger(b) || b < 1 || b > 256)) bad('box', 'must be whole numbers in [1, 256]', spec.box);
  const rowBytes = (spec.box[0] ?? 0) * ELEMENT_BYTES[spec.dtype];
  if (rowBytes % 16 !== 0) bad('box', 'must make its innermost row a multiple of 16 bytes', spec.box);
  if (rowBytes > SWIZZLE[spec.swizzle][1]) bad('box', `must keep its innermost row within the ${spec.swizzle} swizzle span`, spec.box);
}

/**
 * Encodes the tensor map of `spec` (checked first): its 128 bytes, to pass as `{ bytes }`. Out-of-bounds elements
 * of a box read as zeros; L2 promotion 128 B.
 */
export function encodeTiledTensorMap(driver: CudaDriver, spec: TiledTensorMapSpec, what: string): Uint8Array {
  checkTiledTensorMap(spec, what);
  // The driver wants the map 64-byte aligned in host memory: find such a window in a larger buffer.
  const scratch = Buffer.alloc(TENSOR_MAP_BYTES + 64);
  const skew = Number((64n - (koffi.address(scratch) % 64n)) % 64n);
  const map = scratch.subarray(skew, skew + TENSOR_MAP_BYTES);
  driver.tensorMapEncodeTiled(
    map,
    DTYPE[spec.dtype],
    spec.ptr,
    BigUint64Array.from(spec.dims.map(BigInt)),
    BigUint64Array.from(spec.strides.map(BigInt)),
    Uint32Array.from(spec.box),
    Uint32Array.from(spec.box.map(() => 1)),
    SWIZZLE[spec.swizzle][0],
    L2_PROMOTION_128B,
    what,
  );
  return Uint8Array.from(map);
}
