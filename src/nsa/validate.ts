// Validation at the public boundary: every tensor's rank, shape, dtype and values, and the sequence offsets,
// each rule with its own message naming the input. What passes becomes an NsaRequest the backends trust.

import { NSAConfig, type NSAConfigOptions } from '../config/nsa-config.js';
import { DTypeError, InputValueError, ShapeError } from '../errors.js';
import { PHI_PARAM_NAMES } from '../reference/compress.js';
import { uniformCuSeqlens } from '../reference/layout.js';
import { isFloatDType } from '../tensor/dtype.js';
import { formatShape, Tensor } from '../tensor/tensor.js';
import type { NsaInputs } from './types.js';

/** Validated inputs: the config resolved against the tensors, and the packed layout. */
export interface NsaRequest {
  readonly config: NSAConfig;
  readonly inputs: NsaInputs;
  /** Offsets of the sequences in the flattened [B * T] token axis. */
  readonly cuSeqlens: readonly number[];
  /** B and T of the [B, T, ...] tensors. */
  readonly batch: number;
  readonly tokens: number;
  /** M of an mlp phi (its hidden width), 0 otherwise. */
  readonly phiHidden: number;
}

/**
 * Checks the inputs against the config and each other. A plain options object takes its head counts and dims
 * from the tensors; an NSAConfig must agree with them.
 */
export function validateNsaInputs(
  inputs: NsaInputs,
  configOrOptions: NSAConfig | NSAConfigOptions,
  { checkFinite = true }: { checkFinite?: boolean } = {},
): NsaRequest {
  for (const name of ['q', 'k', 'v', 'g'] as const) expectFloatTensor(inputs[name], name, 4);
  const [B, T, Hq, Dk] = inputs.q.shape as [number, number, number, number];
  const H = inputs.k.shape[2]!;
  const Dv = inputs.v.shape[3]!;
  const config =
    configOrOptions instanceof NSAConfig
      ? configOrOptions
      : new NSAConfig({ heads: Hq, kvHeads: H, headDim: Dk, valueDim: Dv, ...configOrOptions });
  if (B < 1) throw new ShapeError(`q: batch size B (axis 0) must be >= 1, got ${B}`);
  if (T < 1) throw new ShapeError(`q: sequence length T (axis 1) must be >= 1, got ${T} (an empty sequence has no attention to compute)`);
  if (Hq !== config.heads) throw new ShapeError(`q: ${Hq} query heads (axis 2) but config.heads is ${config.heads}`);
  if (Dk !== config.headDim) throw new ShapeError(`q: head dim ${Dk} (axis 3) but config.headDim is ${config.headDim}`);
  expectShape(inputs.k, 'k', [B, T, config.kvHeads, config.headDim], 'config.kvHeads, config.headDim');
  expectShape(inputs.v, 'v', [B, T, config.kvHeads, config.valueDim], 'config.kvHeads, config.valueDim');
  expectShape(inputs.g, 'g', [B, T, Hq, 3], 'one gate per query head and branch (cmp, slc, win)');

  const cuSeqlens = inputs.cuSeqlens === undefined ? uniformCuSeqlens(B, T) : validateCuSeqlens(inputs.cuSeqlens, B, T);
  const compressedTokens = cuSeqlens.slice(1).reduce((s, end, i) => s + config.compressedLength(end - cuSeqlens[i]!), 0);
  const tcPerBatch = inputs.cuSeqlens === undefined ? config.compressedLength(T) : compressedTokens;

  expectPair(inputs, 'kCmp', 'vCmp');
  expectPair(inputs, 'kSlc', 'vSlc');
  expectPair(inputs, 'kWin', 'vWin');
  if (inputs.kCmp !== undefined) {
    expectFloatTensor(inputs.kCmp, 'kCmp', 4);
    expectFloatTensor(inputs.vCmp!, 'vCmp', 4);
    const why = `Tc = ${tcPerBatch} complete compression blocks (l = ${config.compressBlock}, d = ${config.compressStride})`;
    expectShape(inputs.kCmp, 'kCmp', [B, tcPerBatch, config.kvHeads, config.headDim], why);
    expectShape(inputs.vCmp!, 'vCmp', [B, tcPerBatch, config.kvHeads, config.valueDim], why);
  }
  for (const [name, like] of [
    ['kSlc', 'k'],
    ['vSlc', 'v'],
    ['kWin', 'k'],
    ['vWin', 'v'],
  ] as const) {
    const t = inputs[name];
    if (t === undefined) continue;
    expectFloatTensor(t, name, 4);
    expectShape(t, name, inputs[like].shape, `the shape of ${like}`);
  }
  const phiHidden = validatePhiParams(inputs, config);
  if (checkFinite) expectAllFinite(inputs);
  return { config, inputs, cuSeqlens, batch: B, tokens: T, phiHidden };
}

/** Checks the upstream gradient of o: a finite float tensor of o's shape [B, T, Hq, Dv]. */
export function validateDOut(request: NsaRequest, dOut: unknown, { checkFinite = true }: { checkFinite?: boolean } = {}): Tensor {
  expectFloatTensor(dOut, 'dOut', 4);
  const { batch: B, tokens: T, config } = request;
  expectShape(dOut, 'dOut', [B, T, config.heads, config.valueDim], 'the shape of o');
  if (checkFinite) {
    const index = firstNonFinite(dOut);
    if (index >= 0) {
      throw new InputValueError(`dOut: element ${index} ${formatIndex(dOut.shape, index)} is ${dOut.toFloat64()[index]}; inputs must be finite`);
    }
  }
  return dOut;
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

export function expectFloatTensor(t: unknown, name: string, rank: number): asserts t is Tensor {
  if (!(t instanceof Tensor)) throw new ShapeError(`${name}: expected a Tensor, got ${describe(t)}`);
  if (!isFloatDType(t.dtype)) throw new DTypeError(`${name}: expected a float dtype (f32, f16, bf16 or f64), got ${t.dtype}`);
  if (t.rank !== rank) throw new ShapeError(`${name}: expected rank ${rank}, got rank ${t.rank} with shape ${formatShape(t.shape)}`);
}

export function expectShape(t: Tensor, name: string, expected: readonly number[], why: string): void {
  if (t.shape.length !== expected.length || t.shape.some((n, i) => n !== expected[i])) {
    throw new ShapeError(`${name}: expected shape ${formatShape(expected)} (${why}), got ${formatShape(t.shape)}`);
  }
}

function expectPair(inputs: NsaInputs, a: keyof NsaInputs, b: keyof NsaInputs): void {
  if ((inputs[a] === undefined) !== (inputs[b] === undefined)) {
    const [given, missing] = inputs[a] === undefined ? [b, a] : [a, b];
    throw new ShapeError(`${given} was given without ${missing}: give both or neither`);
  }
}

function validateCuSeqlens(raw: Tensor | readonly number[], B: number, T: number): number[] {
  let values: number[];
  if (raw instanceof Tensor) {
    if (raw.dtype !== 'i32' && raw.dtype !== 'i64') throw new DTypeError(`cuSeqlens: expected an i32 or i64 tensor, got ${raw.dtype}`);
    if (raw.rank !== 1) throw new ShapeError(`cuSeqlens: expected rank 1, got shape ${formatShape(raw.shape)}`);
    values = Array.from(raw.toFloat64());
  } else if (Array.isArray(raw)) {
    values = [...raw];
  } else {
    throw new ShapeError(`cuSeqlens: expected a Tensor or an array of numbers, got ${describe(raw)}`);
  }
  if (B !== 1) throw new ShapeError(`cuSeqlens: packed sequences need B = 1 (all tokens in axis 1), got B = ${B}`);
  if (values.length < 2) throw new ShapeError(`cuSeqlens: expected at least 2 offsets (one sequence), got ${values.length}`);
  for (const [i, x] of values.entries()) {
    if (!Number.isInteger(x)) throw new InputValueError(`cuSeqlens[${i}]: expected an integer offset, got ${x}`);
  }
  if (values[0] !== 0) throw new InputValueError(`cuSeqlens[0]: must be 0, got ${values[0]}`);
  for (let i = 1; i < values.length; i++) {
    if (values[i]! <= values[i - 1]!) {
      throw new InputValueError(
        `cuSeqlens: offsets must increase strictly (every sequence holds at least one token), ` +
          `but cuSeqlens[${i}] = ${values[i]} <= cuSeqlens[${i - 1}] = ${values[i - 1]}`,
      );
    }
  }
  const last = values[values.length - 1]!;
  if (last !== T) throw new InputValueError(`cuSeqlens: the last offset must equal T = ${T} (tokens in axis 1), got ${last}`);
  return values;
}

/** Checks a learned phi's parameters by name and shape; returns M for mlp (0 otherwise). */
export function validatePhiParams(inputs: Pick<NsaInputs, 'phiK' | 'phiV' | 'kCmp'>, config: NSAConfig): number {
  const learned = config.phi !== 'mean' && inputs.kCmp === undefined;
  let hidden = 0;
  for (const [side, dim] of [
    ['phiK', config.headDim],
    ['phiV', config.valueDim],
  ] as const) {
    const params = inputs[side];
    if (!learned) {
      if (params !== undefined) {
        const why = config.phi === 'mean' ? `config.phi is mean (no parameters)` : `kCmp/vCmp replace phi`;
        throw new ShapeError(`${side}: phi parameters were given but ${why}`);
      }
      continue;
    }
    if (params === undefined) {
      throw new ShapeError(`${side}: config.phi is ${config.phi}, which needs parameters ${PHI_PARAM_NAMES[config.phi].join(', ')}`);
    }
    const expectedNames = PHI_PARAM_NAMES[config.phi];
    for (const name of Object.keys(params)) {
      if (!expectedNames.includes(name)) {
        throw new ShapeError(`${side}.${name}: not a parameter of phi = ${config.phi} (expected ${expectedNames.join(', ')})`);
      }
    }
    const H = config.kvHeads;
    const width = config.compressBlock * dim;
    const get = (name: string, rank: number): Tensor => {
      const t = params[name];
      if (t === undefined) throw new ShapeError(`${side}.${name}: missing (phi = ${config.phi} needs ${expectedNames.join(', ')})`);
      expectFloatTensor(t, `${side}.${name}`, rank);
      return t;
    };
    expectShape(get('pe', 3), `${side}.pe`, [H, config.compressBlock, dim], 'H, l, D');
    if (config.phi === 'linear') {
      expectShape(get('w', 3), `${side}.w`, [H, width, dim], 'H, l*D, D');
      expectShape(get('b', 2), `${side}.b`, [H, dim], 'H, D');
    } else {
      const w1 = get('w1', 3);
      const M = w1.shape[2]!;
      if (hidden !== 0 && hidden !== M) throw new ShapeError(`${side}.w1: hidden width ${M} differs from phiK's ${hidden}`);
      hidden = M;
      expectShape(w1, `${side}.w1`, [H, width, M], 'H, l*D, M');
      expectShape(get('b1', 2), `${side}.b1`, [H, M], 'H, M');
      expectShape(get('w2', 3), `${side}.w2`, [H, M, dim], 'H, M, D');
      expectShape(get('b2', 2), `${side}.b2`, [H, dim], 'H, D');
    }
  }
  return hidden;
}

function expectAllFinite(inputs: NsaInputs): void {
  const named: [string, Tensor | undefined][] = [
    ['q', inputs.q],
    ['k', inputs.k],
    ['v', inputs.v],
    ['g', inputs.g],
    ['kCmp', inputs.kCmp],
    ['vCmp', inputs.vCmp],
    ['kSlc', inputs.kSlc],
    ['vSlc', inputs.vSlc],
    ['kWin', inputs.kWin],
    ['vWin', inputs.vWin],
  ];
  for (const side of ['phiK', 'phiV'] as const) {
    for (const [name, t] of Object.entries(inputs[side] ?? {})) named.push([`${side}.${name}`, t]);
  }
  for (const [name, t] of named) {
    if (t === undefined) continue;
    const index = firstNonFinite(t);
    if (index >= 0) {
      const value = t.toFloat64()[index];
      throw new InputValueError(`${name}: element ${index} ${formatIndex(t.shape, index)} is ${value}; inputs must be finite`);
    }
  }
}

/** Throws InputValueError naming the tensor and the first NaN/Inf element, if any. */
export function expectFinite(t: Tensor, name: string): void {
  const index = firstNonFinite(t);
  if (index >= 0) {
    throw new InputValueError(`${name}: element ${index} ${formatIndex(t.shape, index)} is ${t.toFloat64()[index]}; inputs must be finite`);
  }
}

function firstNonFinite(t: Tensor): number {
  if (t.dtype === 'f16' || t.dtype === 'bf16') {
    // Exponent all ones means Inf or NaN in both half formats.
    const mask = t.dtype === 'f16' ? 0x7c00 : 0x7f80;
    const bits = t.data as Uint16Array;
    for (let i = 0; i < bits.length; i++) if ((bits[i]! & mask) === mask) return i;
    return -1;
  }
  const data = t.data as Float32Array | Float64Array;
  for (let i = 0; i < data.length; i++) if (!Number.isFinite(data[i]!)) return i;
  return -1;
}

function formatIndex(shape: readonly number[], flat: number): string {
  const idx: number[] = [];
  for (let a = shape.length - 1; a >= 0; a--) {
    idx.unshift(flat % shape[a]!);
    flat = Math.floor(flat / shape[a]!);
  }
  return `at [${idx.join(', ')}]`;
}

function describe(x: unknown): string {
  if (x === null) return 'null';
  if (Array.isArray(x)) return `an array of ${x.length}`;
  return typeof x === 'object' ? (x.constructor?.name ?? 'an object') : typeof x;
}
