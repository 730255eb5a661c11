// phi: a block of l keys (or values) -> one compressed token, forward and backward, per KV head.
//   mean:   the average of the block.
//   linear: flatten(block + pe) @ w + b                      pe [H, l, D], w [H, l*D, D], b [H, D]
//   mlp:    gelu(flatten(block + pe) @ w1 + b1) @ w2 + b2    w1 [H, l*D, M], b1 [H, M], w2 [H, M, D], b2 [H, D]
// Parameters are per KV head (docs/decisions.md). GELU is the tanh form.

import type { PhiKind } from '../config/nsa-config.js';
import type { NSAConfig } from '../config/nsa-config.js';
import type { FloatArray, PackedLayout } from './layout.js';

export interface LinearPhiParams {
  readonly kind: 'linear';
  readonly pe: FloatArray;
  readonly w: FloatArray;
  readonly b: FloatArray;
}

export interface MlpPhiParams {
  readonly kind: 'mlp';
  readonly pe: FloatArray;
  readonly w1: FloatArray;
  readonly b1: FloatArray;
  readonly w2: FloatArray;
  readonly b2: FloatArray;
  /** M: the hidden width. */
  readonly hidden: number;
}

export type PhiParams = LinearPhiParams | MlpPhiParams;

/** Gradients of phi's parameters, named as the parameters. */
export type PhiParamGrads = { readonly [name: string]: Float64Array };

/** The parameter names of each learned phi, in the order of its formula. */
export const PHI_PARAM_NAMES: Readonly<Record<Exclude<PhiKind, 'mean'>, readonly string[]>> = {
  linear: ['pe', 'w', 'b'],
  mlp: ['pe', 'w1', 'b1', 'w2', 'b2'],
};

/** Compressed tokens [Nc, H, D] of x [N, H, D]. */
export function compressForward(
  config: NSAConfig,
  layout: PackedLayout,
  x: FloatArray,
  dim: number,
  phi: PhiParams | undefined,
): Float64Array {
  const H = layout.kvHeads;
  const out = new Float64Array(layout.totalCompressed * H * dim);
  const compressor = new BlockCompressor(config, dim, phi);
  forEachBlock(config, layout, (row, cRow) => {
    for (let h = 0; h < H; h++) compressor.compress(x, row, h, H, out, (cRow * H + h) * dim);
  });
  return out;
}

/** phi of one block at a time (the decode cache compresses incrementally with it). */
export class BlockCompressor {
  private readonly block: Float64Array;
  constructor(
    private readonly config: NSAConfig,
    private readonly dim: number,
    private readonly phi: PhiParams | undefined,
  ) {
    this.block = new Float64Array(config.compressBlock * dim);
  }

  /** out[oo .. oo + D) = phi(x[row .. row + l), head h of H). */
  compress(x: FloatArray, row: number, h: number, H: number, out: Float64Array | Float32Array, oo: number): void {
    const { config, dim, phi, block } = this;
    gatherBlock(config, x, row, h, H, dim, block, phi);
    const target = out instanceof Float64Array ? out : new Float64Array(dim);
    const to = out instanceof Float64Array ? oo : 0;
    if (phi === undefined) meanBlock(block, config.compressBlock, dim, target, to);
    else if (phi.kind === 'linear') linearBlock(phi, h, block, dim, target, to);
    else mlpBlock(phi, h, block, dim, target, to, undefined);
    if (target !== out) out.set(target, oo);
  }
}

/**
 * Backward of compressForward: adds d(loss)/dx into `dx` [N, H, D] and returns the parameter gradients
 * (empty for mean).
 */
export function compressBackward(
  config: NSAConfig,
  layout: PackedLayout,
  x: FloatArray,
  dim: number,
  phi: PhiParams | undefined,
  dOut: Float64Array,
  dx: Float64Array,
): PhiParamGrads {
  const H = layout.kvHeads;
  const l = config.compressBlock;
  const grads = phi === undefined ? {} : zerosLike(phi);
  const block = new Float64Array(l * dim);
  const dBlock = new Float64Array(l * dim);
  const hidden = phi?.kind === 'mlp' ? new Float64Array(phi.hidden * 2) : undefined;
  forEachBlock(config, layout, (row, cRow) => {
    for (let h = 0; h < H; h++) {
      const go = (cRow * H + h) * dim;
      if (phi === undefined) {
        for (let r = 0; r < l; r++) {
          const xo = ((row + r) * H + h) * dim;
          for (let c = 0; c < dim; c++) dx[xo + c]! += dOut[go + c]! / l;
        }
        continue;
      }
      gatherBlock(config, x, row, h, H, dim, block, phi);
      dBlock.fill(0);
      if (phi.kind === 'linear') linearBlockBackward(phi, grads, h, block, dim, dOut, go, dBlock);
      else mlpBlockBackward(phi, grads, h, block, dim, dOut, go, dBlock, hidden!);
      const pe = grads['pe']!;
      for (let r = 0; r < l; r++) {
        const xo = ((row + r) * H + h) * dim;
        for (let c = 0; c < dim; c++) {
          const g = dBlock[r * dim + c]!;
          dx[xo + c]! += g;
          pe[(h * l + r) * dim + c]! += g;
        }
      }
    }
  });
  return grads;
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

/** Calls fn(first raw row of the block, compressed row) for every compressed token of every sequence. */
function forEachBlock(config: NSAConfig, layout: PackedLayout, fn: (row: number, cRow: number) => void): void {
  for (const seq of layout.sequences) {
    for (let i = 0; i < seq.cLength; i++) fn(seq.start + i * config.compressStride, seq.cStart + i);
  }
}

/** block[r, c] = x[row + r, h, c] (+ pe[h, r, c] for a learned phi). */
function gatherBlock(
  config: NSAConfig,
  x: FloatArray,
  row: number,
  h: number,
  H: number,
  dim: number,
  block: Float64Array,
  phi: PhiParams | undefined,
): void {
  const l = config.compressBlock;
  for (let r = 0; r < l; r++) {
    const xo = ((row + r) * H + h) * dim;
    for (let c = 0; c < dim; c++) block[r * dim + c] = x[xo + c]!;
  }
  if (phi !== undefined) {
    const po = h * l * dim;
    for (let i = 0; i < l * dim; i++) block[i]! += phi.pe[po + i]!;
  }
}

function meanBlock(block: Float64Array, l: number, dim: number, out: Float64Array, o: number): void {
  for (let c = 0; c < dim; c++) {
    let s = 0;
    for (let r = 0; r < l; r++) s += block[r * dim + c]!;
    out[o + c] = s / l;
  }
}

/** out[o + c] = b[h, c] + sum_i u[i] * w[h, i, c] for u = the flattened block. */
function affine(
  u: Float64Array,
  w: FloatArray,
  b: FloatArray,
  h: number,
  inDim: number,
  outDim: number,
  out: Float64Array,
  o: number,
): void {
  const wo = h * inDim * outDim;
  for (let c = 0; c < outDim; c++) out[o + c] = b[h * outDim + c]!;
  for (let i = 0; i < inDim; i++) {
    const ui = u[i]!;
    const row = wo + i * outDim;
    for (let c = 0; c < outDim; c++) out[o + c]! += ui * w[row + c]!;
  }
}

/** Backward of affine: dW += u^T dOut, db += dOut, du += W dOut. */
function affineBackward(
  u: Float64Array,
  w: FloatArray,
  dW: Float64Array,
  dB: Float64Array,
  h: number,
  inDim: number,
  outDim: number,
  dOut: Float64Array,
  go: number,
  du: Float64Array,
): void {
  const wo = h * inDim * outDim;
  for (let c = 0; c < outDim; c++) dB[h * outDim + c]! += dOut[go + c]!;
  for (let i = 0; i < inDim; i++) {
    const ui = u[i]!;
    const row = wo + i * outDim;
    let acc = 0;
    for (let c = 0; c < outDim; c++) {
      const g = dOut[go + c]!;
      dW[row + c]! += ui * g;
      acc += w[row + c]! * g;
    }
    du[i]! += acc;
  }
}

function linearBlock(phi: LinearPhiParams, h: number, u: Float64Array, dim: number, out: Float64Array, o: number): void {
  affine(u, phi.w, phi.b, h, u.length, dim, out, o);
}

function linearBlockBackward(
  phi: LinearPhiParams,
  grads: PhiParamGrads,
  h: number,
  u: Float64Array,
  dim: number,
  dOut: Float64Array,
  go: number,
  du: Float64Array,
): void {
  affineBackward(u, phi.w, grads['w']!, grads['b']!, h, u.length, dim, dOut, go, du);
}

const GELU_C = Math.sqrt(2 / Math.PI);
const GELU_A = 0.044715;

export function gelu(a: number): number {
  return 0.5 * a * (1 + Math.tanh(GELU_C * (a + GELU_A * a * a * a)));
}

export function geluDerivative(a: number): number {
  const th = Math.tanh(GELU_C * (a + GELU_A * a * a * a));
  return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * GELU_C * (1 + 3 * GELU_A * a * a);
}

/** mlp forward for one block; `scratch` (2M), when given, keeps the pre-activation [0, M) and activation [M, 2M). */
function mlpBlock(
  phi: MlpPhiParams,
  h: number,
  u: Float64Array,
  dim: number,
  out: Float64Array,
  o: number,
  scratch: Float64Array | undefined,
): void {
  const M = phi.hidden;
  const buf = scratch ?? new Float64Array(2 * M);
  affine(u, phi.w1, phi.b1, h, u.length, M, buf, 0);
  for (let m = 0; m < M; m++) buf[M + m] = gelu(buf[m]!);
  affine(buf.subarray(M, 2 * M), phi.w2, phi.b2, h, M, dim, out, o);
}

function mlpBlockBackward(
  phi: MlpPhiParams,
  grads: PhiParamGrads,
  h: number,
  u: Float64Array,
  dim: number,
  dOut: Float64Array,
  go: number,
  du: Float64Array,
  scratch: Float64Array,
): void {
  const M = phi.hidden;
  const out = new Float64Array(dim);
  mlpBlock(phi, h, u, dim, out, 0, scratch);
  const z = scratch.subarray(M, 2 * M);
  const dz = new Float64Array(M);
  affineBackward(z, phi.w2, grads['w2']!, grads['b2']!, h, M, dim, dOut, go, dz);
  for (let m = 0; m < M; m++) dz[m]! *= geluDerivative(scratch[m]!);
  affineBackward(u, phi.w1, grads['w1']!, grads['b1']!, h, u.length, M, dz, 0, du);
}

/** The parameter arrays of a learned phi by name. */
export function phiParamArrays(phi: PhiParams): Readonly<Record<string, FloatArray>> {
  return phi.kind === 'linear'
    ? { pe: phi.pe, w: phi.w, b: phi.b }
    : { pe: phi.pe, w1: phi.w1, b1: phi.b1, w2: phi.w2, b2: phi.b2 };
}

function zerosLike(phi: PhiParams): { [name: string]: Float64Array } {
  const arrays = phiParamArrays(phi);
  return Object.fromEntries(PHI_PARAM_NAMES[phi.kind].map((name) => [name, new Float64Array(arrays[name]!.length)]));
}
