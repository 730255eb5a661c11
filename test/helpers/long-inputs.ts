// Inputs and guards for the GPU tests at a million tokens: bf16 normals made fast enough for billions of
// elements, the memory a test needs before it runs, and yields that keep vitest's worker responsive.
import { totalmem } from 'node:os';
import { Tensor } from '../../src/tensor/tensor.js';

/**
 * `count` (even) N(0, 1) values in bf16: a table of 4096 normals picked two at a time by a xorshift32 stream
 * (period 2^32 - 1), so that every row differs and 2.25e9 values take seconds (Tensor.randn's Box-Muller per
 * element would take minutes).
 */
export function normalBf16(count: number, seed: number): Uint16Array {
  const table = Tensor.randn([4096], 'bf16', seed).data;
  const out = new Uint16Array(count);
  const pairs = new Uint32Array(out.buffer, 0, count / 2);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < pairs.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    pairs[i] = table[x & 4095]! | (table[(x >>> 12) & 4095]! << 16);
  }
  return out;
}

/** Host memory the tests hold at most (inputs, fp32 outputs, gradients): ~59 GB measured on the forward + backward. */
export const HOST_BYTES = 80e9;

/** '' where the device and the host hold a case, else the skip's reason. */
export function memoryMissing(deviceTotal: number, deviceBytes: number): string {
  if (deviceTotal < deviceBytes) return ` (skipped: needs ${(deviceBytes / 1e9).toFixed(0)} GB of device memory, this GPU has ${(deviceTotal / 1e9).toFixed(0)})`;
  if (totalmem() < HOST_BYTES) return ` (skipped: needs ${(HOST_BYTES / 1e9).toFixed(0)} GB of host memory, this machine has ${(totalmem() / 1e9).toFixed(0)})`;
  return '';
}

/** Lets vitest's worker answer its runner between long synchronous steps (else its RPC times out). */
export function yieldToRunner(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
