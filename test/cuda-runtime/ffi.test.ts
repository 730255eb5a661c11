import { describe, expect, it } from 'vitest';
import { byteParts, MAX_COPY_BYTES } from '../../src/backends/cuda/ffi.js';

describe('byteParts (host copies in parts a Uint8Array can span)', () => {
  it('covers a view exactly, in order, in parts of at most maxBytes', () => {
    const floats = Float32Array.from({ length: 11 }, (_, i) => i + 1);
    const view = floats.subarray(2, 9); // 28 bytes from byte offset 8
    const parts = byteParts(view, 12);
    expect(parts.map((p) => [p.offset, p.bytes.byteLength])).toEqual([
      [0, 12],
      [12, 12],
      [24, 4],
    ]);
    const joined = new Uint8Array(view.byteLength);
    for (const { offset, bytes } of parts) joined.set(bytes, offset);
    expect([...new Float32Array(joined.buffer)]).toEqual([3, 4, 5, 6, 7, 8, 9]);
    expect(parts.every((p) => p.bytes.buffer === floats.buffer)).toBe(true); // views, not copies
  });

  it('gives one part for a view within the limit and none for an empty one', () => {
    expect(byteParts(new Uint16Array(5))).toHaveLength(1);
    expect(byteParts(new Uint16Array(0))).toEqual([]);
    expect(MAX_COPY_BYTES).toBeLessThan(2 ** 32); // the most bytes a Uint8Array spans in V8
  });
});
