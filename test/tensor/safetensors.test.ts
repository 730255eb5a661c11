// safetensors reading and writing. Reader tests use files assembled here byte for byte (a header string, its
// 8-byte little-endian length, and data bytes written out by hand), so they do not lean on the serializer.

import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DTypeError, NsaError, SafetensorsError } from '../../src/errors.js';
import type { DType } from '../../src/tensor/dtype.js';
import {
  decodeLittleEndian,
  encodeLittleEndian,
  parseSafetensors,
  readSafetensorsFile,
  serializeSafetensors,
  writeSafetensorsFile,
} from '../../src/tensor/safetensors.js';
import { Tensor } from '../../src/tensor/tensor.js';

// ---------------------------------------------------------------------------------------------------------------
// Hand assembly

/** UTF-8 bytes of a string, one code point at a time (ASCII plus the few multi-byte characters used here). */
function utf8(text: string): number[] {
  return [...Buffer.from(text, 'utf8')];
}

/** The 8-byte little-endian encoding of a small non-negative length. */
function u64le(n: number): number[] {
  const out: number[] = [];
  let rest = n;
  for (let i = 0; i < 8; i++) {
    out.push(rest % 256);
    rest = Math.floor(rest / 256);
  }
  return out;
}

/** A file: length prefix, header text (optionally space-padded to a multiple of 8), then the data bytes. */
function file(header: string, data: number[] = [], pad = false): Uint8Array {
  let headerBytes = utf8(header);
  if (pad) while (headerBytes.length % 8 !== 0) headerBytes = [...headerBytes, 0x20];
  return Uint8Array.from([...u64le(headerBytes.length), ...headerBytes, ...data]);
}

function bits16(t: Tensor): number[] {
  return Array.from(t.data as Uint16Array);
}

function expectThrows(fn: () => unknown, errorClass: new (...args: never[]) => Error, message: RegExp): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught, `expected ${errorClass.name} matching ${message}`).toBeInstanceOf(errorClass);
  expect((caught as Error).message).toMatch(message);
}

const F32_ONE = [0x00, 0x00, 0x80, 0x3f];
const F32_MINUS_TWO = [0x00, 0x00, 0x00, 0xc0];

// ---------------------------------------------------------------------------------------------------------------
// Reading hand-built files

describe('parseSafetensors on hand-built files', () => {
  it('reads an f32 tensor, byte for byte', () => {
    const header = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
    expect(header.length).toBe(54);
    const bytes = Uint8Array.from([54, 0, 0, 0, 0, 0, 0, 0, ...utf8(header), ...F32_ONE, ...F32_MINUS_TWO]);
    const { tensors, metadata } = parseSafetensors(bytes);
    expect([...tensors.keys()]).toEqual(['w']);
    const w = tensors.get('w')!;
    expect(w.dtype).toBe('f32');
    expect(w.shape).toEqual([2]);
    expect(w.data).toBeInstanceOf(Float32Array);
    expect(Array.from(w.data as Float32Array)).toEqual([1, -2]);
    expect(metadata).toEqual({});
  });

  it('reads a bf16 tensor', () => {
    const header = '{"b":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}';
    // 1.0 = 80 3f, -2.0 = 00 c0, +Inf = 80 7f, 0.5 = 00 3f
    const { tensors } = parseSafetensors(file(header, [0x80, 0x3f, 0x00, 0xc0, 0x80, 0x7f, 0x00, 0x3f]));
    const b = tensors.get('b')!;
    expect(b.dtype).toBe('bf16');
    expect(bits16(b)).toEqual([0x3f80, 0xc000, 0x7f80, 0x3f00]);
    expect(Array.from(b.toFloat64())).toEqual([1, -2, Infinity, 0.5]);
  });

  it('reads an f16 tensor with a 2-d shape', () => {
    const header = '{"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}';
    // 1.0 = 00 3c, -2.0 = 00 c0, 0.5 = 00 38, 65504 = ff 7b
    const { tensors } = parseSafetensors(file(header, [0x00, 0x3c, 0x00, 0xc0, 0x00, 0x38, 0xff, 0x7b]));
    const h = tensors.get('h')!;
    expect(h.dtype).toBe('f16');
    expect(h.shape).toEqual([2, 2]);
    expect(bits16(h)).toEqual([0x3c00, 0xc000, 0x3800, 0x7bff]);
    expect(Array.from(h.toFloat64())).toEqual([1, -2, 0.5, 65504]);
  });

  it('reads an i64 tensor, including values beyond 2^53 and negatives', () => {
    const header = '{"i":{"dtype":"I64","shape":[3],"data_offsets":[0,24]}}';
    const data = [
      ...[0x01, 0, 0, 0, 0, 0, 0, 0], // 1
      ...[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // -1
      ...[0x05, 0, 0, 0, 0, 0, 0x20, 0x00], // 2^53 + 5
    ];
    const i = parseSafetensors(file(header, data)).tensors.get('i')!;
    expect(i.dtype).toBe('i64');
    expect(i.data).toBeInstanceOf(BigInt64Array);
    expect(Array.from(i.data as BigInt64Array)).toEqual([1n, -1n, 2n ** 53n + 5n]);
  });

  it('reads f64 and i32 tensors', () => {
    const header =
      '{"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"n":{"dtype":"I32","shape":[2],"data_offsets":[8,16]}}';
    const data = [
      ...[0, 0, 0, 0, 0, 0, 0xf0, 0x3f], // 1.0
      ...[0xfe, 0xff, 0xff, 0xff], // -2
      ...[0x00, 0x01, 0x00, 0x00], // 256
    ];
    const { tensors } = parseSafetensors(file(header, data));
    expect(Array.from(tensors.get('d')!.data as Float64Array)).toEqual([1]);
    expect(Array.from(tensors.get('n')!.data as Int32Array)).toEqual([-2, 256]);
  });

  it('reads __metadata__ with non-ASCII strings', () => {
    const header =
      '{"__metadata__":{"format":"pt","note":"héllo ✓"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}';
    const { tensors, metadata } = parseSafetensors(file(header, F32_ONE));
    expect(metadata).toEqual({ format: 'pt', note: 'héllo ✓' });
    expect([...tensors.keys()]).toEqual(['w']);
  });

  it('keeps a metadata key named __proto__ as a plain entry', () => {
    const header = '{"__metadata__":{"__proto__":"x"}}';
    const { metadata } = parseSafetensors(file(header));
    expect(Object.keys(metadata)).toEqual(['__proto__']);
    expect(Object.getPrototypeOf(metadata)).toBe(Object.prototype);
  });

  it('reads a header padded with spaces to a multiple of 8', () => {
    const header = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'; // 54 bytes -> 56
    const bytes = file(header, F32_ONE, true);
    expect(bytes[0]).toBe(56);
    expect([bytes[8 + 54], bytes[8 + 55]]).toEqual([0x20, 0x20]);
    expect(Array.from(parseSafetensors(bytes).tensors.get('w')!.data as Float32Array)).toEqual([1]);
  });

  it('orders tensors by data offset, not by header order', () => {
    const header =
      '{"c":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},' +
      '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},' +
      '"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}';
    const { tensors } = parseSafetensors(file(header, [...F32_MINUS_TWO, ...F32_ONE, 0, 0, 0, 0]));
    expect([...tensors.keys()]).toEqual(['b', 'a', 'c']);
    expect(Array.from(tensors.get('b')!.data as Float32Array)).toEqual([-2]);
    expect(Array.from(tensors.get('a')!.data as Float32Array)).toEqual([1]);
    expect(Array.from(tensors.get('c')!.data as Float32Array)).toEqual([0]);
  });

  it('copies tensors at unaligned offsets into aligned arrays, not aliasing the input', () => {
    // An f16 of one element puts the f32 at data offset 2; after the 108-byte header its bytes start at file
    // offset 118, which is not a multiple of 4.
    const header =
      '{"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"w":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}}';
    const inner = file(header, [0x00, 0x3c, ...F32_ONE, ...F32_MINUS_TWO]);
    const outer = new Uint8Array(inner.length + 3);
    outer.set(inner, 3); // and the file itself starts at an odd byteOffset of its buffer
    const view = outer.subarray(3);
    const { tensors } = parseSafetensors(view);
    const w = tensors.get('w')!;
    expect(w.data.byteOffset % 4).toBe(0);
    expect(Array.from(w.data as Float32Array)).toEqual([1, -2]);
    view.fill(0);
    expect(Array.from(w.data as Float32Array)).toEqual([1, -2]);
    expect(bits16(tensors.get('h')!)).toEqual([0x3c00]);
  });

  it('reads empty tensors and 0-d scalars', () => {
    const header =
      '{"e":{"dtype":"F32","shape":[2,0],"data_offsets":[0,0]},"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}}';
    const { tensors } = parseSafetensors(file(header, [0x00, 0xc0]));
    expect(tensors.get('e')!.shape).toEqual([2, 0]);
    expect(tensors.get('e')!.size).toBe(0);
    expect(tensors.get('s')!.shape).toEqual([]);
    expect(bits16(tensors.get('s')!)).toEqual([0xc000]);
  });

  it('reads a header with no tensors', () => {
    const { tensors, metadata } = parseSafetensors(file('{}'));
    expect(tensors.size).toBe(0);
    expect(metadata).toEqual({});
  });
});

// ---------------------------------------------------------------------------------------------------------------
// Writing

describe('serializeSafetensors', () => {
  it('writes the same bytes as the hand-built file, header padded with spaces', () => {
    const bytes = serializeSafetensors({ w: Tensor.f32([1, -2], [2]) });
    const header = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
    expect(Array.from(bytes)).toEqual(Array.from(file(header, [...F32_ONE, ...F32_MINUS_TWO], true)));
  });

  it('puts __metadata__ first and lays tensors out contiguously in insertion order', () => {
    const tensors = new Map<string, Tensor>([
      ['10', Tensor.fromValues([1], [1], 'bf16')],
      ['2', Tensor.f32([1, 2, 3], [3])],
      ['a', Tensor.fromValues([5], [], 'i64')],
    ]);
    const bytes = serializeSafetensors(tensors, { format: 'pt' });
    const headerLength = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    expect(headerLength % 8).toBe(0);
    const header = Buffer.from(bytes.subarray(8, 8 + headerLength)).toString('utf8');
    expect(header.trimEnd()).toBe(
      '{"__metadata__":{"format":"pt"},' +
        '"10":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},' +
        '"2":{"dtype":"F32","shape":[3],"data_offsets":[2,14]},' +
        '"a":{"dtype":"I64","shape":[],"data_offsets":[14,22]}}',
    );
    expect(bytes.length).toBe(8 + headerLength + 22);
    expect([...parseSafetensors(bytes).tensors.keys()]).toEqual(['10', '2', 'a']);
  });

  it('refuses a tensor named __metadata__ and non-string metadata', () => {
    expectThrows(() => serializeSafetensors({ __metadata__: Tensor.f32([1], [1]) }), SafetensorsError, /reserved/);
    const bad = { n: 1 } as unknown as Record<string, string>;
    expectThrows(() => serializeSafetensors({}, bad), SafetensorsError, /metadata\["n"\] must be a string, got number 1/);
    const notTensor = { x: { dtype: 'f32' } } as unknown as Record<string, Tensor>;
    expectThrows(() => serializeSafetensors(notTensor), SafetensorsError, /tensors\["x"\] must be a Tensor/);
  });
});

describe('round trips', () => {
  function roundTrip(tensors: Record<string, Tensor>, metadata?: Record<string, string>): Map<string, Tensor> {
    const parsed = parseSafetensors(serializeSafetensors(tensors, metadata));
    expect(parsed.metadata).toEqual(metadata ?? {});
    expect([...parsed.tensors.keys()]).toEqual(Object.keys(tensors));
    for (const [name, t] of Object.entries(tensors)) {
      const back = parsed.tensors.get(name)!;
      expect(back.dtype, name).toBe(t.dtype);
      expect(back.shape, name).toEqual(t.shape);
      // Compare raw bytes so NaN payloads, -0 and half bit patterns must match exactly.
      expect(Buffer.from(back.data.buffer, back.data.byteOffset, back.data.byteLength).equals(
        Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength),
      ), name).toBe(true);
    }
    return parsed.tensors;
  }

  it('keeps every dtype, with NaN, Inf and -0 bit patterns in f16 and bf16', () => {
    const f16 = new Tensor('f16', [8], Uint16Array.from([0x7c00, 0xfc00, 0x7e00, 0xfe01, 0x7c01, 0x8000, 0x0001, 0x7bff]));
    const bf16 = new Tensor('bf16', [8], Uint16Array.from([0x7f80, 0xff80, 0x7fc0, 0xffc1, 0x7f81, 0x8000, 0x0001, 0x7f7f]));
    const f32 = new Tensor('f32', [2, 3], new Float32Array(Uint32Array.from([0x7fc00000, 0xffc00001, 0x7f800000, 0xff800000, 0x80000000, 0x00000001]).buffer));
    const f64 = Tensor.fromValues([NaN, -Infinity, -0, Number.MIN_VALUE, Math.PI, 1e300], [3, 2], 'f64');
    const i32 = new Tensor('i32', [3], Int32Array.from([-(2 ** 31), 2 ** 31 - 1, 0]));
    const i64 = new Tensor('i64', [2], BigInt64Array.from([-(2n ** 63n), 2n ** 63n - 1n]));
    const back = roundTrip({ f16, bf16, f32, f64, i32, i64 }, { format: 'pt', empty: '' });
    expect(Object.is(back.get('f64')!.toFloat64()[2], -0)).toBe(true);
    expect(bits16(back.get('bf16')!)[3]).toBe(0xffc1);
  });

  it('keeps empty tensors and 0-d scalars', () => {
    const back = roundTrip({
      empty: Tensor.zeros([3, 0, 2], 'f32'),
      scalar: Tensor.fromValues([-2], [], 'bf16'),
      emptyI64: Tensor.zeros([0], 'i64'),
      after: Tensor.f32([7], [1]),
    });
    expect(back.get('scalar')!.toFloat64()[0]).toBe(-2);
    expect(back.get('empty')!.size).toBe(0);
  });

  it('keeps random tensors of every dtype', () => {
    const tensors: Record<string, Tensor> = {};
    for (const dtype of ['f64', 'f32', 'f16', 'bf16'] as const) tensors[dtype] = Tensor.randn([5, 7], dtype, 3);
    tensors.i32 = Tensor.fromValues([1, -2, 3, -4], [2, 2], 'i32');
    tensors.i64 = Tensor.fromValues([1, -2, 3, -4], [4], 'i64');
    roundTrip(tensors);
  });
});

describe('byte order', () => {
  // On a little-endian host the fast path is a byte copy; forcing the other path checks the DataView code that
  // a big-endian host would run, which must give the same bytes and values.
  const cases: [DType, Tensor][] = [
    ['f64', Tensor.fromValues([1, -0, NaN, 2 ** -1074], [4], 'f64')],
    ['f32', new Tensor('f32', [3], new Float32Array(Uint32Array.from([0x3f800000, 0xffc00001, 0x80000000]).buffer))],
    ['f16', new Tensor('f16', [3], Uint16Array.from([0x3c00, 0xfe01, 0x8000]))],
    ['bf16', new Tensor('bf16', [3], Uint16Array.from([0x3f80, 0xffc1, 0x8000]))],
    ['i32', new Tensor('i32', [2], Int32Array.from([-2, 256]))],
    ['i64', new Tensor('i64', [2], BigInt64Array.from([-1n, 2n ** 53n + 5n]))],
  ];
  for (const [dtype, t] of cases) {
    it(`encodes and decodes ${dtype} through DataView the same as the fast path`, () => {
      const fast = new Uint8Array(t.data.byteLength);
      const slow = new Uint8Array(t.data.byteLength + 1).subarray(1); // unaligned destination
      encodeLittleEndian(dtype, t.data, fast, true);
      encodeLittleEndian(dtype, t.data, slow, false);
      expect(Array.from(slow)).toEqual(Array.from(fast));
      const decoded = decodeLittleEndian(dtype, slow, t.size, false);
      expect(Buffer.from(decoded.buffer).equals(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength))).toBe(true);
    });
  }

  it('writes little-endian bytes for known values', () => {
    const out = new Uint8Array(8);
    encodeLittleEndian('f32', Float32Array.from([1, -2]), out, false);
    expect(Array.from(out)).toEqual([...F32_ONE, ...F32_MINUS_TWO]);
  });
});

// ---------------------------------------------------------------------------------------------------------------
// Bad input

describe('parseSafetensors refuses malformed files', () => {
  const entry = (body: string): Uint8Array => file(`{"t":${body}}`, [0, 0, 0, 0, 0, 0, 0, 0]);

  it('refuses a file shorter than 8 bytes', () => {
    expectThrows(() => parseSafetensors(new Uint8Array(5)), SafetensorsError, /5 bytes long, shorter than the 8-byte/);
    expectThrows(() => parseSafetensors(new Uint8Array(0)), SafetensorsError, /0 bytes long/);
  });

  it('refuses a header length larger than the file', () => {
    const bytes = Uint8Array.from([...u64le(100), ...utf8('{"a":1}   ')]);
    expectThrows(() => parseSafetensors(bytes), SafetensorsError, /header length 100 is larger than the 10 bytes/);
  });

  it('refuses an absurd header length', () => {
    const huge = Uint8Array.from([0, 0, 0, 0, 0, 1, 0, 0, ...utf8('{}')]); // 2^40
    expectThrows(() => parseSafetensors(huge), SafetensorsError, /header length 1099511627776 is larger than the 100000000-byte limit/);
    const max = Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    expectThrows(() => parseSafetensors(max), SafetensorsError, /18446744073709551615/);
  });

  it('refuses a header that is not UTF-8', () => {
    const bytes = Uint8Array.from([...u64le(4), 0x7b, 0xff, 0xfe, 0x7d]);
    expectThrows(() => parseSafetensors(bytes), SafetensorsError, /not valid UTF-8/);
  });

  it('refuses a header that is not JSON', () => {
    expectThrows(() => parseSafetensors(file('{"a":')), SafetensorsError, /not valid JSON.*starts \{"a":/);
    expectThrows(() => parseSafetensors(file('')), SafetensorsError, /not valid JSON/);
  });

  it('refuses a header that is not an object', () => {
    expectThrows(() => parseSafetensors(file('[1,2]')), SafetensorsError, /must be a JSON object, got array \[1,2\]/);
    expectThrows(() => parseSafetensors(file('null')), SafetensorsError, /must be a JSON object, got null/);
    expectThrows(() => parseSafetensors(file('42')), SafetensorsError, /must be a JSON object, got number 42/);
  });

  it('refuses an entry that is not an object', () => {
    expectThrows(() => parseSafetensors(entry('5')), SafetensorsError, /tensor 't'.*must be an object.*got number 5/);
  });

  it('refuses entries missing dtype, shape or data_offsets', () => {
    expectThrows(() => parseSafetensors(entry('{"shape":[2],"data_offsets":[0,8]}')), SafetensorsError, /tensor 't'.*missing "dtype"/);
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","data_offsets":[0,8]}')), SafetensorsError, /tensor 't'.*missing "shape"/);
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","shape":[2]}')), SafetensorsError, /tensor 't'.*missing "data_offsets"/);
  });

  it('refuses fields of the wrong type', () => {
    expectThrows(() => parseSafetensors(entry('{"dtype":32,"shape":[2],"data_offsets":[0,8]}')), SafetensorsError, /dtype must be a string.*got number 32/);
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","shape":"2","data_offsets":[0,8]}')), SafetensorsError, /shape must be an array, got string "2"/);
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","shape":[2],"data_offsets":"0-8"}')), SafetensorsError, /data_offsets must be \[begin, end\]/);
  });

  it('refuses negative or non-integer shape entries', () => {
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}')), SafetensorsError, /shape\[0\] must be a non-negative integer, got number -2/);
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","shape":[2,1.5],"data_offsets":[0,8]}')), SafetensorsError, /shape\[1\] must be a non-negative integer, got number 1.5/);
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}')), SafetensorsError, /shape\[0\].*got string "2"/);
  });

  it('refuses data_offsets that are not two non-negative integers with begin <= end', () => {
    for (const offsets of ['[0]', '[0,4,8]', '["0",8]', '[-4,8]', '[0.5,8]', 'null']) {
      expectThrows(
        () => parseSafetensors(entry(`{"dtype":"F32","shape":[2],"data_offsets":${offsets}}`)),
        SafetensorsError,
        /tensor 't': data_offsets must be \[begin, end\] with non-negative integers/,
      );
    }
    expectThrows(() => parseSafetensors(entry('{"dtype":"F32","shape":[1],"data_offsets":[8,4]}')), SafetensorsError, /data_offsets \[8, 4\] must have begin <= end/);
  });

  it('refuses data_offsets past the end of the data (truncated file)', () => {
    const header = '{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}';
    expectThrows(
      () => parseSafetensors(file(header, [...F32_ONE, ...F32_ONE, 0x00, 0x00])),
      SafetensorsError,
      /tensor 'w'.*expected at least 16 data bytes but the file has 10 \(truncated file\?\)/,
    );
  });

  it('refuses a byte length that disagrees with shape and dtype', () => {
    expectThrows(
      () => parseSafetensors(entry('{"dtype":"F32","shape":[3],"data_offsets":[0,8]}')),
      SafetensorsError,
      /tensor 't': data_offsets \[0, 8\] span 8 bytes but F32 shape \[3\] needs 12/,
    );
    expectThrows(() => parseSafetensors(entry('{"dtype":"BF16","shape":[],"data_offsets":[0,4]}')), SafetensorsError, /span 4 bytes but BF16 shape \[\] needs 2/);
  });

  it('refuses overlapping tensors', () => {
    const header =
      '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}';
    expectThrows(() => parseSafetensors(file(header, new Array<number>(12).fill(0))), SafetensorsError, /'a' \[0, 8\] and 'b' \[4, 12\] overlap/);
    const same =
      '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}';
    expectThrows(() => parseSafetensors(file(same, [0, 0, 0, 0])), SafetensorsError, /overlap/);
  });

  it('refuses metadata that is not an object of strings', () => {
    expectThrows(() => parseSafetensors(file('{"__metadata__":{"k":1}}')), SafetensorsError, /__metadata__\["k"\] must be a string, got number 1/);
    expectThrows(() => parseSafetensors(file('{"__metadata__":{"k":null}}')), SafetensorsError, /__metadata__\["k"\] must be a string, got null/);
    expectThrows(() => parseSafetensors(file('{"__metadata__":"x"}')), SafetensorsError, /__metadata__ must be an object of strings, got string "x"/);
  });

  it('refuses dtypes this library does not store with a DTypeError naming the tensor', () => {
    for (const dtype of ['U8', 'BOOL', 'I8', 'I16', 'U16', 'F8_E4M3']) {
      const bytes = file(`{"m":{"dtype":"${dtype}","shape":[2],"data_offsets":[0,2]}}`, [1, 0]);
      expectThrows(() => parseSafetensors(bytes), DTypeError, new RegExp(`tensor 'm' has dtype ${dtype}, which this library does not support`));
    }
  });

  it('refuses a dtype string that is not a safetensors dtype', () => {
    expectThrows(() => parseSafetensors(entry('{"dtype":"F128","shape":[],"data_offsets":[0,8]}')), SafetensorsError, /dtype "F128" is not a safetensors dtype/);
  });

  it('tags format errors with the safetensors code and unsupported dtypes with the dtype code', () => {
    const codeOf = (bytes: Uint8Array): string | undefined => {
      try {
        parseSafetensors(bytes);
      } catch (err) {
        return err instanceof NsaError ? err.code : 'not an NsaError';
      }
      return undefined;
    };
    expect(codeOf(new Uint8Array(3))).toBe('safetensors');
    expect(codeOf(file('{"m":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', [7]))).toBe('dtype');
  });
});

// ---------------------------------------------------------------------------------------------------------------
// Files

describe('safetensors files', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nsa-safetensors-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const tensors = { w: Tensor.f32([1, -2], [2]), h: Tensor.fromValues([0.5], [1], 'f16') };

  it('writes a file that reads back, leaving nothing else in the directory', async () => {
    const path = join(dir, 'model.safetensors');
    await writeSafetensorsFile(path, tensors, { format: 'pt' });
    expect(await readdir(dir)).toEqual(['model.safetensors']);
    const back = await readSafetensorsFile(path);
    expect(back.metadata).toEqual({ format: 'pt' });
    expect(Array.from(back.tensors.get('w')!.data as Float32Array)).toEqual([1, -2]);
    expect(bits16(back.tensors.get('h')!)).toEqual([0x3800]);
  });

  it('replaces an existing file whole', async () => {
    const path = join(dir, 'model.safetensors');
    await writeSafetensorsFile(path, tensors);
    await writeSafetensorsFile(path, { x: Tensor.fromValues([3], [], 'i64') });
    expect(await readdir(dir)).toEqual(['model.safetensors']);
    expect([...(await readSafetensorsFile(path)).tensors.keys()]).toEqual(['x']);
  });

  it('leaves no file when the target directory does not exist', async () => {
    await expect(writeSafetensorsFile(join(dir, 'missing', 'model.safetensors'), tensors)).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await readdir(dir)).toEqual([]);
  });

  it('leaves no file, and the old one untouched, when serialization throws', async () => {
    const path = join(dir, 'model.safetensors');
    await writeFile(path, 'old contents');
    const bad = { __metadata__: Tensor.f32([1], [1]) };
    await expect(writeSafetensorsFile(path, bad)).rejects.toBeInstanceOf(SafetensorsError);
    expect(await readdir(dir)).toEqual(['model.safetensors']);
    expect(await readFile(path, 'utf8')).toBe('old contents');
  });

  it('removes its temporary file when the final rename fails', async () => {
    const path = join(dir, 'model.safetensors');
    await mkdir(path); // a directory in the way: the temp file is written, then rename fails
    await expect(writeSafetensorsFile(path, tensors)).rejects.toMatchObject({ code: expect.stringMatching(/EISDIR|ENOTEMPTY|EEXIST|EPERM/) as unknown });
    expect(await readdir(dir)).toEqual(['model.safetensors']);
    expect(await readdir(path)).toEqual([]);
  });

  it('names the file in format errors', async () => {
    const path = join(dir, 'broken.safetensors');
    const header = '{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}';
    await writeFile(path, file(header, F32_ONE));
    await expect(readSafetensorsFile(path)).rejects.toThrow(new RegExp(`${path}: .*expected at least 16 data bytes but the file has 4`));
    await expect(readSafetensorsFile(path)).rejects.toBeInstanceOf(SafetensorsError);
    const u8 = join(dir, 'u8.safetensors');
    await writeFile(u8, file('{"m":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', [7]));
    await expect(readSafetensorsFile(u8)).rejects.toBeInstanceOf(DTypeError);
  });
});
