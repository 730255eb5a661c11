// Kernel arguments for cuLaunchKernel. The driver takes `void **kernelParams`: one pointer per kernel parameter,
// each pointing at that parameter's value in host memory, in the order the kernel's C signature declares them; it
// copies the values during the call. packKernelArgs writes every value into one Buffer, each at an offset aligned
// to its size; kernelParamPointers cuts that Buffer into one view per argument, and Koffi passes the JS array of
// views as the C array of pointers (driver.ts). Pure: testable without a GPU.
import { InputValueError } from '../../errors.js';
import type { DevicePtr } from './driver.js';

/** One kernel argument, tagged with its C type: `ptr` for any `T*`, then int, unsigned, long long, etc. */
export type KernelArg =
  | { readonly ptr: DevicePtr }
  | { readonly i32: number }
  | { readonly u32: number }
  | { readonly i64: number | bigint }
  | { readonly u64: number | bigint }
  | { readonly f32: number }
  | { readonly f64: number }
  /** A struct passed by value, as its bytes: e.g. a 128-byte CUtensorMap for a `const __grid_constant__` parameter. */
  | { readonly bytes: Uint8Array };

export interface PackedKernelArgs {
  /** All argument values, little-endian, each at an offset that is a multiple of its alignment (alignOf). */
  readonly bytes: Buffer;
  readonly offsets: readonly number[];
  readonly sizes: readonly number[];
}

export function packKernelArgs(args: readonly KernelArg[], kernel = 'kernel'): PackedKernelArgs {
  const sizes = args.map(sizeOf);
  const offsets: number[] = [];
  let end = 0;
  args.forEach((arg, i) => {
    const align = alignOf(arg);
    const offset = Math.ceil(end / align) * align;
    offsets.push(offset);
    end = offset + (sizes[i] ?? 0);
  });
  const bytes = Buffer.alloc(end);
  args.forEach((arg, i) => write(bytes, offsets[i] ?? 0, arg, `argument ${i} of kernel ${kernel}`));
  return { bytes, offsets, sizes };
}

/** The `void **kernelParams` array: one view per argument into the packed bytes (null for no arguments). */
export function kernelParamPointers(packed: PackedKernelArgs): Buffer[] | null {
  if (packed.offsets.length === 0) return null;
  return packed.offsets.map((offset, i) => packed.bytes.subarray(offset, offset + (packed.sizes[i] ?? 0)));
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

const TWO_64 = 1n << 64n;
const TWO_63 = 1n << 63n;

function sizeOf(arg: KernelArg): number {
  if ('bytes' in arg) return arg.bytes.length;
  return 'i32' in arg || 'u32' in arg || 'f32' in arg ? 4 : 8;
}

/** Scalars align to their size; a by-value struct to 64 bytes (a CUtensorMap's alignment) or, if shorter, 8. */
function alignOf(arg: KernelArg): number {
  if ('bytes' in arg) return arg.bytes.length >= 64 ? 64 : 8;
  return sizeOf(arg);
}

function write(bytes: Buffer, offset: number, arg: KernelArg, what: string): void {
  if ('bytes' in arg) {
    if (arg.bytes.length === 0) throw new InputValueError(`${what} (bytes): an empty struct`);
    bytes.set(arg.bytes, offset);
  } else if ('ptr' in arg) bytes.writeBigUInt64LE(bigIntIn(arg.ptr, 0n, TWO_64, `${what} (pointer)`), offset);
  else if ('i32' in arg) bytes.writeInt32LE(intIn(arg.i32, -(2 ** 31), 2 ** 31, `${what} (i32)`), offset);
  else if ('u32' in arg) bytes.writeUInt32LE(intIn(arg.u32, 0, 2 ** 32, `${what} (u32)`), offset);
  else if ('i64' in arg) bytes.writeBigInt64LE(bigIntIn(arg.i64, -TWO_63, TWO_63, `${what} (i64)`), offset);
  else if ('u64' in arg) bytes.writeBigUInt64LE(bigIntIn(arg.u64, 0n, TWO_64, `${what} (u64)`), offset);
  else if ('f32' in arg) bytes.writeFloatLE(arg.f32, offset);
  else bytes.writeDoubleLE(arg.f64, offset);
}

function intIn(value: number, min: number, maxExclusive: number, what: string): number {
  if (!Number.isInteger(value) || value < min || value >= maxExclusive) {
    throw new InputValueError(`${what}: ${value} is not an integer in [${min}, ${maxExclusive})`);
  }
  return value;
}

function bigIntIn(value: number | bigint, min: bigint, maxExclusive: bigint, what: string): bigint {
  if (typeof value === 'number' && !Number.isSafeInteger(value)) {
    throw new InputValueError(`${what}: ${value} is not a safe integer; pass a bigint`);
  }
  const v = BigInt(value);
  if (v < min || v >= maxExclusive) throw new InputValueError(`${what}: ${v} is outside [${min}, ${maxExclusive})`);
  return v;
}
