// Small Koffi helpers shared by driver.ts and nvrtc.ts: process-wide named types and "open the first library
// that loads". Koffi 3 facts this backend relies on (checked against Koffi 3.3.4, see test/cuda-runtime/):
//   - pointers and opaque handles (`koffi.pointer('CUstream', koffi.opaque())`) are plain BigInt values;
//   - an out-parameter (`_Out_ T *p`) is passed as a one-element array and read back from `[0]`;
//   - 64-bit integers come back as a Number when they fit 2^53 and as a BigInt when not, so read them through
//     `BigInt(...)` or `Number(...)`;
//   - a Buffer or typed array passed for `void *` is handed to C as a pointer to its bytes (honouring byteOffset),
//     without a copy, for the duration of the call;
//   - a JS array of Buffers passed for `void **` becomes a C array of pointers to each Buffer's bytes.
import koffi from 'koffi';
import type { LibraryHandle, TypeObject } from 'koffi';

/**
 * The Koffi type called `name`, made by `make` the first time. Koffi's type names are process-wide and it refuses
 * a duplicate, while test runners may evaluate this module more than once per process.
 */
export function namedType(name: string, make: () => TypeObject): TypeObject {
  try {
    return koffi.type(name);
  } catch {
    return make();
  }
}

/** An opaque handle type, `typedef struct X_st *Name`, passed around as a BigInt. */
export function opaqueHandle(name: string): TypeObject {
  return namedType(name, () => koffi.pointer(name, koffi.opaque()));
}

export function alias(name: string, of: string): TypeObject {
  return namedType(name, () => koffi.alias(name, of));
}

export interface OpenedLibrary {
  readonly lib: LibraryHandle;
  /** The candidate that loaded: a path, or a bare file name resolved by the dynamic loader. */
  readonly path: string;
}

/** dlopen each candidate in turn; returns the first that loads and, for each one before it, why it did not. */
export function openFirst(candidates: readonly string[]): { opened: OpenedLibrary | undefined; failures: string[] } {
  const failures: string[] = [];
  for (const path of candidates) {
    try {
      return { opened: { lib: koffi.load(path), path }, failures };
    } catch (e) {
      failures.push(`${path}: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  return { opened: undefined, failures };
}

/** Reads a one-element out-parameter array that holds a 64-bit integer (Number or BigInt, see above). */
export function outBigInt(out: readonly unknown[]): bigint {
  const v = out[0];
  if (typeof v === 'bigint') return v;
  if (typeof v === 'number') return BigInt(v);
  return 0n;
}

export function outNumber(out: readonly unknown[]): number {
  const v = out[0];
  return typeof v === 'bigint' ? Number(v) : typeof v === 'number' ? v : 0;
}

/**
 * The most bytes one host copy passes: a Uint8Array spans at most 2^32 - 1 bytes in V8, and the outputs of a long
 * forward are larger (1M tokens x 16 heads x 128 fp32 values: 9 GB), so copies go in parts of 1 GiB.
 */
export const MAX_COPY_BYTES = 2 ** 30;

/**
 * Byte views of consecutive parts of any typed array or DataView (so Koffi passes raw bytes whatever the element
 * type), each at most maxBytes, with their byte offsets into it.
 */
export function byteParts(view: ArrayBufferView, maxBytes = MAX_COPY_BYTES): { offset: number; bytes: Uint8Array }[] {
  const parts: { offset: number; bytes: Uint8Array }[] = [];
  for (let offset = 0; offset < view.byteLength; offset += maxBytes) {
    parts.push({ offset, bytes: new Uint8Array(view.buffer, view.byteOffset + offset, Math.min(maxBytes, view.byteLength - offset)) });
  }
  return parts;
}
