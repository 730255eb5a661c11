// The dense oracle: NSA written a second way, as full masked attention matrices, sharing no code with the
// sparse reference. Compression is a matrix product (mean through a pooling matrix), block scores go through a
// token-count overlap matrix, top-n through a plain sort, and each branch is a [T, keys] masked softmax.
// Quadratic in T: for tests on small shapes only.

import type { NSAConfig } from '../config/nsa-config.js';
import { gelu, type PhiParams } from './compress.js';
import type { NsaReferenceInputs, NsaReferenceOutputs } from './nsa-forward.js';

export function denseOracleForward(config: NSAConfig, inputs: NsaReferenceInputs): NsaReferenceOutputs {
  const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv, selectCount: n } = config;
  const G = Hq / H;
  const N = inputs.cuSeqlens[inputs.cuSeqlens.length - 1]!;
  const out = {
    o: new Float64Array(N * Hq * dv),
    oCmp: new Float64Array(N * Hq * dv),
    oSlc: new Float64Array(N * Hq * dv),
    oWin: new Float64Array(N * Hq * dv),
    lseCmp: new Float64Array(N * Hq),
    lseSlc: new Float64Array(N * Hq),
    lseWin: new Float64Array(N * Hq),
    blockIndices: new Int32Array(N * H * n),
  };
  let cOffset = 0;
  for (let b = 0; b + 1 < inputs.cuSeqlens.length; b++) {
    const s0 = inputs.cuSeqlens[b]!;
    const T = inputs.cuSeqlens[b + 1]! - s0;
    const Tc = T >= config.compressBlock ? Math.floor((T - config.compressBlock) / config.compressStride) + 1 : 0;
    for (let h = 0; h < H; h++) {
      const k = slice(inputs.k, s0, T, H, h, dk);
      const v = slice(inputs.v, s0, T, H, h, dv);
      const kc = inputs.kCmp ? slice(inputs.kCmp, cOffset, Tc, H, h, dk) : compressDense(config, k, T, Tc, dk, h, inputs.phiK);
      const vc = inputs.vCmp ? slice(inputs.vCmp, cOffset, Tc, H, h, dv) : compressDense(config, v, T, Tc, dv, h, inputs.phiV);
      const kSlc = inputs.kSlc ? slice(inputs.kSlc, s0, T, H, h, dk) : k;
      const vSlc = inputs.vSlc ? slice(inputs.vSlc, s0, T, H, h, dv) : v;
      const kWin = inputs.kWin ? slice(inputs.kWin, s0, T, H, h, dk) : k;
      const vWin = inputs.vWin ? slice(inputs.vWin, s0, T, H, h, dv) : v;
      const cmpMask = (t: number, i: number): boolean => i * config.compressStride + config.compressBlock - 1 <= t;
      const winMask = (t: number, s: number): boolean => s <= t && s > t - config.window;
      const overlap = overlapMatrix(config, Tc, T);
      const Ns = Math.ceil(T / config.selectBlock);
      const groupScores = new Float64Array(T * Ns);
      const cmpResults = [];
      for (let gi = 0; gi < G; gi++) {
        const q = slice(inputs.q, s0, T, Hq, h * G + gi, dk);
        const cmp = maskedAttention(q, kc, vc, T, Tc, dk, dv, config.scale, cmpMask);
        cmpResults.push({ q, cmp });
        const pSlc = matmul(cmp.p, overlap, T, Tc, Ns);
        for (let i = 0; i < T * Ns; i++) groupScores[i]! += pSlc[i]!;
      }
      const selected = topBlocksBySort(config, groupScores, T, Ns);
      for (let t = 0; t < T; t++) {
        const bo = ((s0 + t) * H + h) * n;
        const chosen = selected[t]!;
        for (let i = 0; i < n; i++) out.blockIndices[bo + i] = i < chosen.length ? chosen[i]! : -1;
      }
      const slcMask = (t: number, s: number): boolean =>
        s <= t && selected[t]!.includes(Math.floor(s / config.selectBlock));
      for (let gi = 0; gi < G; gi++) {
        const hq = h * G + gi;
        const { q, cmp } = cmpResults[gi]!;
        const slc = maskedAttention(q, kSlc, vSlc, T, T, dk, dv, config.scale, slcMask);
        const win = maskedAttention(q, kWin, vWin, T, T, dk, dv, config.scale, winMask);
        for (let t = 0; t < T; t++) {
          const row = (s0 + t) * Hq + hq;
          const gate = [0, 1, 2].map((x) => inputs.g[row * 3 + x]!);
          out.lseCmp[row] = cmp.lse[t]!;
          out.lseSlc[row] = slc.lse[t]!;
          out.lseWin[row] = win.lse[t]!;
          for (let c = 0; c < dv; c++) {
            const oc = cmp.o[t * dv + c]!;
            const os = slc.o[t * dv + c]!;
            const ow = win.o[t * dv + c]!;
            out.oCmp[row * dv + c] = oc;
            out.oSlc[row * dv + c] = os;
            out.oWin[row * dv + c] = ow;
            out.o[row * dv + c] = gate[0]! * oc + gate[1]! * os + gate[2]! * ow;
          }
        }
      }
    }
    cOffset += Tc;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

type Floats = ArrayLike<number>;

/** Rows [s0, s0 + T) of head h of a [rows, heads, dim] array, as a dense [T, dim] matrix. */
function slice(x: Floats, s0: number, T: number, heads: number, h: number, dim: number): Float64Array {
  const m = new Float64Array(T * dim);
  for (let t = 0; t < T; t++) for (let c = 0; c < dim; c++) m[t * dim + c] = x[((s0 + t) * heads + h) * dim + c]!;
  return m;
}

function matmul(a: Floats, b: Floats, rows: number, inner: number, cols: number): Float64Array {
  const c = new Float64Array(rows * cols);
  for (let i = 0; i < rows; i++)
    for (let k = 0; k < inner; k++) {
      const aik = a[i * inner + k]!;
      if (aik === 0) continue;
      for (let j = 0; j < cols; j++) c[i * cols + j]! += aik * b[k * cols + j]!;
    }
  return c;
}

/** Compressed [Tc, dim] from x [T, dim]: blocks unfolded into [Tc, l*dim] rows, then phi as matrix products. */
function compressDense(
  config: NSAConfig,
  x: Float64Array,
  T: number,
  Tc: number,
  dim: number,
  h: number,
  phi: PhiParams | undefined,
): Float64Array {
  const l = config.compressBlock;
  if (phi === undefined) {
    // Pooling matrix P [Tc, T]: 1/l on the tokens of each block.
    const pool = new Float64Array(Tc * T);
    for (let i = 0; i < Tc; i++) for (let r = 0; r < l; r++) pool[i * T + i * config.compressStride + r] = 1 / l;
    return matmul(pool, x, Tc, T, dim);
  }
  const width = l * dim;
  const unfolded = new Float64Array(Tc * width);
  for (let i = 0; i < Tc; i++)
    for (let e = 0; e < width; e++) unfolded[i * width + e] = x[i * config.compressStride * dim + e]! + phi.pe[h * width + e]!;
  const affine = (u: Float64Array, w: Floats, b: Floats, inDim: number, outDim: number): Float64Array => {
    const wh = Float64Array.from({ length: inDim * outDim }, (_, e) => w[h * inDim * outDim + e]!);
    const y = matmul(u, wh, Tc, inDim, outDim);
    for (let i = 0; i < Tc; i++) for (let c = 0; c < outDim; c++) y[i * outDim + c]! += b[h * outDim + c]!;
    return y;
  };
  if (phi.kind === 'linear') return affine(unfolded, phi.w, phi.b, width, dim);
  const hidden = affine(unfolded, phi.w1, phi.b1, width, phi.hidden).map(gelu);
  return affine(hidden, phi.w2, phi.b2, phi.hidden, dim);
}

/** W [Tc, Ns]: how many tokens of compressed block i fall in selection block j, divided by d. */
function overlapMatrix(config: NSAConfig, Tc: number, T: number): Float64Array {
  const Ns = Math.ceil(T / config.selectBlock);
  const w = new Float64Array(Tc * Ns);
  for (let i = 0; i < Tc; i++)
    for (let r = 0; r < config.compressBlock; r++) {
      const token = i * config.compressStride + r;
      w[i * Ns + Math.floor(token / config.selectBlock)]! += 1 / config.compressStride;
    }
  return w;
}

/** Per query: candidates j*l' <= t ranked by (forced first, score desc, index asc), first n, ascending. */
function topBlocksBySort(config: NSAConfig, scores: Float64Array, T: number, Ns: number): number[][] {
  const result: number[][] = [];
  for (let t = 0; t < T; t++) {
    const current = Math.floor(t / config.selectBlock);
    const forced = new Set([0, current, current - 1]);
    const ranked = Array.from({ length: current + 1 }, (_, j) => j).sort((a, b) => {
      const fa = forced.has(a) ? 1 : 0;
      const fb = forced.has(b) ? 1 : 0;
      if (fa !== fb) return fb - fa;
      if (fa === 0 && scores[t * Ns + a] !== scores[t * Ns + b]) return scores[t * Ns + b]! - scores[t * Ns + a]!;
      return a - b;
    });
    result.push(ranked.slice(0, config.selectCount).sort((a, b) => a - b));
  }
  return result;
}

/** Row-wise masked softmax attention: probabilities [T, S], output [T, dv], lse [T] (-Infinity when masked out). */
function maskedAttention(
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  T: number,
  S: number,
  dk: number,
  dv: number,
  scale: number,
  mask: (t: number, s: number) => boolean,
): { p: Float64Array; o: Float64Array; lse: Float64Array } {
  const p = new Float64Array(T * S);
  const lse = new Float64Array(T).fill(-Infinity);
  for (let t = 0; t < T; t++) {
    let max = -Infinity;
    for (let s = 0; s < S; s++) {
      if (!mask(t, s)) continue;
      let dot = 0;
      for (let c = 0; c < dk; c++) dot += q[t * dk + c]! * k[s * dk + c]!;
      p[t * S + s] = dot * scale;
      max = Math.max(max, dot * scale);
    }
    if (max === -Infinity) continue;
    let sum = 0;
    for (let s = 0; s < S; s++) if (mask(t, s)) sum += Math.exp(p[t * S + s]! - max);
    lse[t] = max + Math.log(sum);
    for (let s = 0; s < S; s++) p[t * S + s] = mask(t, s) ? Math.exp(p[t * S + s]! - lse[t]!) : 0;
  }
  return { p, o: matmul(p, v, T, S, dv), lse };
}

/**
 * Plain causal attention per sequence and query head (GQA: head hq reads KV head floor(hq / G)), in doubles:
 * the reference of the backends' dense kernels. q [N, Hq, Dk], k [N, H, Dk], v [N, H, Dv] -> o [N, Hq, Dv],
 * lse [N, Hq].
 */
export function denseCausalAttention(
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  cuSeqlens: readonly number[],
  heads: number,
  kvHeads: number,
  dk: number,
  dv: number,
  scale: number,
): { o: Float64Array; lse: Float64Array } {
  const N = cuSeqlens[cuSeqlens.length - 1]!;
  const o = new Float64Array(N * heads * dv);
  const lse = new Float64Array(N * heads);
  const G = heads / kvHeads;
  for (let b = 0; b + 1 < cuSeqlens.length; b++) {
    const s0 = cuSeqlens[b]!;
    const T = cuSeqlens[b + 1]! - s0;
    for (let hq = 0; hq < heads; hq++) {
      const h = Math.floor(hq / G);
      const r = maskedAttention(
        slice(q, s0, T, heads, hq, dk),
        slice(k, s0, T, kvHeads, h, dk),
        slice(v, s0, T, kvHeads, h, dv),
        T,
        T,
        dk,
        dv,
        scale,
        (t, s) => s <= t,
      );
      for (let t = 0; t < T; t++) {
        lse[(s0 + t) * heads + hq] = r.lse[t]!;
        for (let c = 0; c < dv; c++) o[((s0 + t) * heads + hq) * dv + c] = r.o[t * dv + c]!;
      }
    }
  }
  return { o, lse };
}
