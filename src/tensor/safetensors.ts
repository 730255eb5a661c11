// The safetensors file format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of UTF-8 JSON naming each tensor's dtype, shape and [begin, end) byte range in the data
// buffer that follows, and an optional "__metadata__" object of strings. Reading validates every rule and copies
// each tensor into its own aligned typed array; writing lays tensors out contiguously in insertion order and pads
// the header with spaces to a multiple of 8 bytes, as the reference implementation does.

import { readFile } from 'node:fs/promises';
import { DTypeError, SafetensorsError } from '../errors.js';
import { allocateStorage, BYTES_PER_ELEMENT, DTYPES, type DType, type DTypeMap } from './dtype.js';
import { formatShape, Tensor } from './tensor.js';
import { writeFileAtomic } from './atomic-write.js';

export interface SafetensorsFile {
  /** Tensors in the order of their data offsets in the file. */
  tensors: Map<string, Tensor>;
  metadata: Record<string, string>;
}

/** The reference implementation refuses headers above 100 MB; a larger length means a corrupt or hostile file. */
export const MAX_HEADER_BYTES = 100_000_000;

const METADATA_KEY = '__metadata__';

const TO_FILE_DTYPE: Readonly<Record<DType, string>> = {
  f64: 'F64',
  f32: 'F32',
  f16: 'F16',
  bf16: 'BF16',
  i32: 'I32',
  i64: 'I64',
};
const FROM_FILE_DTYPE: ReadonlyMap<string, DType> = new Map(DTYPES.map((d) => [TO_FILE_DTYPE[d], d]));

// Dtypes the format defines but this library has no storage for: reading one is a DTypeError, not a corrupt file.
const UNSUPPORTED_FILE_DTYPES: ReadonlySet<string> = new Set([
  'BOOL',
  'U8',
  'I8',
  'U16',
  'I16',
  'U32',
  'U64',
  'F8_E4M3',
  'F8_E5M2',
  'F8_E8M0',
  'F6_E2M3',
  'F6_E3M2',
  'F4',
  'C64',
]);

const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// ---------------------------------------------------------------------------------------------------------------
// Reading

interface Entry {
  name: string;
  dtype: DType;
  shape: number[];
  size: number;
  begin: number;
  end: number;
  headerIndex: number;
}

/** Parses a whole safetensors file held in memory. Tensor data is copied, so `bytes` may be reused afterwards. */
export function parseSafetensors(bytes: Uint8Array): SafetensorsFile {
  if (bytes.length < 8) {
    throw new SafetensorsError(
      `safetensors file is ${bytes.length} bytes long, shorter than the 8-byte header length it must start with`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength64 = view.getBigUint64(0, true);
  if (headerLength64 > BigInt(MAX_HEADER_BYTES)) {
    throw new SafetensorsError(
      `safetensors header length ${headerLength64} is larger than the ${MAX_HEADER_BYTES}-byte limit: the file is corrupt or not safetensors`,
    );
  }
  const headerLength = Number(headerLength64);
  if (headerLength > bytes.length - 8) {
    throw new SafetensorsError(
      `safetensors header length ${headerLength} is larger than the ${bytes.length - 8} bytes that follow it in the file`,
    );
  }
  const header = decodeHeader(bytes.subarray(8, 8 + headerLength));
  const data = bytes.subarray(8 + headerLength);

  let metadata: Record<string, string> = {};
  const entries: Entry[] = [];
  for (const [name, value] of Object.entries(header)) {
    if (name === METADATA_KEY) metadata = parseMetadata(value);
    else entries.push(parseEntry(name, value, entries.length, data.length));
  }
  checkNoOverlap(entries);

  const tensors = new Map<string, Tensor>();
  for (const e of entries) {
    const storage = decodeLittleEndian(e.dtype, data.subarray(e.begin, e.end), e.size);
    tensors.set(e.name, new Tensor(e.dtype, e.shape, storage));
  }
  return { tensors, metadata };
}

function decodeHeader(raw: Uint8Array): Record<string, unknown> {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(raw);
  } catch {
    throw new SafetensorsError(`safetensors header (${raw.length} bytes) is not valid UTF-8`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    throw new SafetensorsError(`safetensors header is not valid JSON (${reason}); it starts ${preview(text)}`);
  }
  if (!isPlainObject(parsed)) {
    throw new SafetensorsError(`safetensors header must be a JSON object, got ${describe(parsed)}`);
  }
  return parsed;
}

function parseMetadata(value: unknown): Record<string, string> {
  if (!isPlainObject(value)) {
    throw new SafetensorsError(`safetensors ${METADATA_KEY} must be an object of strings, got ${describe(value)}`);
  }
  for (const [key, v] of Object.entries(value)) {
    if (typeof v !== 'string') {
      throw new SafetensorsError(`safetensors ${METADATA_KEY}["${key}"] must be a string, got ${describe(v)}`);
    }
  }
  // fromEntries defines own properties, so a key such as "__proto__" stays a plain entry.
  return Object.fromEntries(Object.entries(value as Record<string, string>));
}

function parseEntry(name: string, value: unknown, headerIndex: number, dataLength: number): Entry {
  const where = `safetensors tensor '${name}'`;
  if (!isPlainObject(value)) {
    throw new SafetensorsError(`${where}: header entry must be an object with dtype, shape and data_offsets, got ${describe(value)}`);
  }
  for (const field of ['dtype', 'shape', 'data_offsets'] as const) {
    if (!(field in value)) throw new SafetensorsError(`${where}: header entry is missing "${field}"`);
  }
  const { dtype: fileDtype, shape, data_offsets: offsets } = value;

  if (typeof fileDtype !== 'string') {
    throw new SafetensorsError(`${where}: dtype must be a string such as "F32", got ${describe(fileDtype)}`);
  }
  if (!Array.isArray(shape)) throw new SafetensorsError(`${where}: shape must be an array, got ${describe(shape)}`);
  for (const [axis, n] of shape.entries()) {
    if (!isNonNegativeInteger(n)) {
      throw new SafetensorsError(`${where}: shape[${axis}] must be a non-negative integer, got ${describe(n)}`);
    }
  }
  const dims = shape as number[];
  const size = dims.reduce((a, b) => a * b, 1);
  if (!Number.isSafeInteger(size)) {
    throw new SafetensorsError(`${where}: shape ${formatShape(dims)} has more elements than can be addressed`);
  }

  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeInteger)) {
    throw new SafetensorsError(
      `${where}: data_offsets must be [begin, end] with non-negative integers, got ${describe(offsets)}`,
    );
  }
  const [begin, end] = offsets as [number, number];
  if (begin > end) {
    throw new SafetensorsError(`${where}: data_offsets [${begin}, ${end}] must have begin <= end`);
  }
  if (end > dataLength) {
    throw new SafetensorsError(
      `${where}: data_offsets end ${end} lies beyond the data buffer: expected at least ${end} data bytes but the file has ${dataLength} (truncated file?)`,
    );
  }

  const dtype = FROM_FILE_DTYPE.get(fileDtype);
  if (dtype === undefined) {
    if (UNSUPPORTED_FILE_DTYPES.has(fileDtype)) {
      throw new DTypeError(
        `${where} has dtype ${fileDtype}, which this library does not support (supported: ${[...FROM_FILE_DTYPE.keys()].join(', ')})`,
      );
    }
    throw new SafetensorsError(`${where}: dtype "${fileDtype}" is not a safetensors dtype`);
  }
  const expectedBytes = size * BYTES_PER_ELEMENT[dtype];
  if (end - begin !== expectedBytes) {
    throw new SafetensorsError(
      `${where}: data_offsets [${begin}, ${end}] span ${end - begin} bytes but ${fileDtype} shape ${formatShape(dims)} needs ${expectedBytes}`,
    );
  }
  return { name, dtype, shape: dims, size, begin, end, headerIndex };
}

/** Sorts entries into file order and refuses any two whose byte ranges share a byte. */
function checkNoOverlap(entries: Entry[]): void {
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end || a.headerIndex - b.headerIndex);
  let previous: Entry | undefined;
  for (const e of entries) {
    if (e.begin === e.end) continue; // an empty tensor owns no bytes
    if (previous !== undefined && e.begin < previous.end) {
      throw new SafetensorsError(
        `safetensors tensors '${previous.name}' [${previous.begin}, ${previous.end}] and '${e.name}' [${e.begin}, ${e.end}] overlap in the data buffer`,
      );
    }
    previous = e;
  }
}

/**
 * Copies `count` little-endian elements of `dtype` out of `src` (at any alignment) into a new typed array.
 * `hostIsLittleEndian` is a parameter only so tests can drive the byte-swapping path on a little-endian host.
 * @internal
 */
export function decodeLittleEndian<D extends DType>(
  dtype: D,
  src: Uint8Array,
  count: number,
  hostIsLittleEndian = HOST_IS_LITTLE_ENDIAN,
): DTypeMap[D] {
  const out = allocateStorage(dtype, count);
  if (hostIsLittleEndian) {
    new Uint8Array(out.buffer, out.byteOffset, out.byteLength).set(src.subarray(0, out.byteLength));
    return out;
  }
  // Swap by element width through unsigned views of the output, so float NaN payloads are kept bit for bit.
  const view = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const width = BYTES_PER_ELEMENT[dtype];
  if (width === 2) {
    const u = new Uint16Array(out.buffer, out.byteOffset, count);
    for (let i = 0; i < count; i++) u[i] = view.getUint16(i * 2, true);
  } else if (width === 4) {
    const u = new Uint32Array(out.buffer, out.byteOffset, count);
    for (let i = 0; i < count; i++) u[i] = view.getUint32(i * 4, true);
  } else {
    const u = new BigUint64Array(out.buffer, out.byteOffset, count);
    for (let i = 0; i < count; i++) u[i] = view.getBigUint64(i * 8, true);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

/** Serializes tensors (in insertion order, contiguous) and optional string metadata to safetensors bytes. */
export function serializeSafetensors(
  tensors: Record<string, Tensor> | Map<string, Tensor>,
  metadata?: Record<string, string>,
): Uint8Array {
  const list = tensors instanceof Map ? [...tensors] : Object.entries(tensors);
  const parts: string[] = [];
  if (metadata !== undefined) {
    if (!isPlainObject(metadata)) {
      throw new SafetensorsError(`metadata must be an object of strings, got ${describe(metadata)}`);
    }
    for (const [key, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new SafetensorsError(`metadata["${key}"] must be a string, got ${describe(v)}`);
    }
    parts.push(`${JSON.stringify(METADATA_KEY)}:${JSON.stringify(metadata)}`);
  }
  // Entries are joined by hand so the header keeps insertion order even for integer-like names like "0".
  let offset = 0;
  for (const [name, t] of list) {
    if (name === METADATA_KEY) {
      throw new SafetensorsError(`tensor name "${METADATA_KEY}" is reserved for metadata; rename the tensor`);
    }
    if (!(t instanceof Tensor)) throw new SafetensorsError(`tensors["${name}"] must be a Tensor, got ${describe(t)}`);
    const end = offset + t.data.byteLength;
    const info = { dtype: TO_FILE_DTYPE[t.dtype], shape: t.shape, data_offsets: [offset, end] };
    parts.push(`${JSON.stringify(name)}:${JSON.stringify(info)}`);
    offset = end;
  }
  const json = new TextEncoder().encode(`{${parts.join(',')}}`);
  const headerLength = Math.ceil(json.length / 8) * 8;
  if (headerLength > MAX_HEADER_BYTES) {
    throw new SafetensorsError(`safetensors header would be ${headerLength} bytes, over the ${MAX_HEADER_BYTES}-byte limit`);
  }

  const out = new Uint8Array(8 + headerLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLength), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + headerLength); // space padding
  let at = 8 + headerLength;
  for (const [, t] of list) {
    encodeLittleEndian(t.dtype, t.data, out.subarray(at, at + t.data.byteLength));
    at += t.data.byteLength;
  }
  return out;
}

/**
 * Writes the elements of `data` into `dst` as little-endian bytes.
 * `hostIsLittleEndian` is a parameter only so tests can drive the byte-swapping path on a little-endian host.
 * @internal
 */
export function encodeLittleEndian(
  dtype: DType,
  data: DTypeMap[DType],
  dst: Uint8Array,
  hostIsLittleEndian = HOST_IS_LITTLE_ENDIAN,
): void {
  if (hostIsLittleEndian) {
    dst.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    return;
  }
  // Swap by element width through unsigned views of the input, so float NaN payloads are kept bit for bit.
  const view = new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
  const width = BYTES_PER_ELEMENT[dtype];
  const n = data.length;
  if (width === 2) {
    const u = new Uint16Array(data.buffer, data.byteOffset, n);
    for (let i = 0; i < n; i++) view.setUint16(i * 2, u[i]!, true);
  } else if (width === 4) {
    const u = new Uint32Array(data.buffer, data.byteOffset, n);
    for (let i = 0; i < n; i++) view.setUint32(i * 4, u[i]!, true);
  } else {
    const u = new BigUint64Array(data.buffer, data.byteOffset, n);
    for (let i = 0; i < n; i++) view.setBigUint64(i * 8, u[i]!, true);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Files

/** Reads and parses a safetensors file; format errors name the file. */
export async function readSafetensorsFile(path: string): Promise<SafetensorsFile> {
  const bytes = await readFile(path);
  try {
    return parseSafetensors(bytes);
  } catch (err) {
    if (err instanceof SafetensorsError) throw new SafetensorsError(`${path}: ${err.message}`);
    if (err instanceof DTypeError) throw new DTypeError(`${path}: ${err.message}`);
    throw err;
  }
}

/** Writes a safetensors file atomically (writeFileAtomic): readers see the old file or the whole new one. */
export async function writeSafetensorsFile(
  path: string,
  tensors: Record<string, Tensor> | Map<string, Tensor>,
  metadata?: Record<string, string>,
): Promise<void> {
  const bytes = serializeSafetensors(tensors, metadata); // before touching the disk: a bad input writes nothing
  await writeFileAtomic(path, bytes);
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers

function isPlainObject(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

function isNonNegativeInteger(x: unknown): x is number {
  return typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
}

function describe(x: unknown): string {
  if (x === undefined) return 'undefined';
  if (x === null) return 'null';
  if (typeof x === 'string') return `string ${preview(JSON.stringify(x))}`;
  if (typeof x !== 'object') return `${typeof x} ${String(x)}`;
  let json: string;
  try {
    json = JSON.stringify(x);
  } catch {
    json = Object.prototype.toString.call(x); // BigInt or cyclic contents
  }
  return `${Array.isArray(x) ? 'array' : 'object'} ${preview(json)}`;
}

function preview(text: string): string {
  return text.length > 60 ? `${text.slice(0, 60)}…` : text;
}
