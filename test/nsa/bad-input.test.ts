// Bad input through the public nsaForward on the CPU backend: every mistake a caller can make gets a typed error
// whose message says what was wrong, and the edge cases that are valid (T = 1, ragged packed lengths) give the
// right answer.

import { describe, expect, it } from 'vitest';
import { CpuBackend } from '../../src/backends/cpu/cpu-backend.js';
import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { DTypeError, InputValueError, NsaConfigError, ShapeError, type NsaError } from '../../src/errors.js';
import { nsaForward } from '../../src/nsa/operator.js';
import type { NsaInputs } from '../../src/nsa/types.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { f32ToBf16 } from '../../src/tensor/dtype.js';
import { Tensor } from '../../src/tensor/tensor.js';
import { expectRelativeRms } from '../helpers/compare.js';

const backend = new CpuBackend({ threads: 1 });

/** Small blocks so every branch matters at T = 40: l = 8, d = 4, l' = 16, n = 4, w = 16. */
const BLOCKS = { compressBlock: 8, compressStride: 4, selectBlock: 16, selectCount: 4, window: 16 } as const;
const HQ = 4;
const H = 2;
const DK = 16;
const DV = 8;
const T = 40;
const CONFIG = new NSAConfig({ ...BLOCKS, heads: HQ, kvHeads: H, headDim: DK, valueDim: DV });

interface Dims {
  readonly B?: number;
  readonly T?: number;
  readonly hq?: number;
  readonly h?: number;
  readonly dk?: number;
  readonly dv?: number;
}

function inputs({ B = 1, T: t = T, hq = HQ, h = H, dk = DK, dv = DV }: Dims = {}, seed = 1): NsaInputs {
  return {
    q: Tensor.randn([B, t, hq, dk], 'f32', seed),
    k: Tensor.randn([B, t, h, dk], 'f32', seed + 1),
    v: Tensor.randn([B, t, h, dv], 'f32', seed + 2),
    g: Tensor.uniform([B, t, hq, 3], 'f32', seed + 3),
  };
}

/** Runs the forward expecting a rejection; returns the error after checking its class and message fragments. */
async function rejects<E extends NsaError>(
  run: Promise<unknown>,
  errorClass: new (...args: never[]) => E,
  ...fragments: string[]
): Promise<E> {
  let error: unknown;
  try {
    await run;
  } catch (e) {
    error = e;
  }
  expect(error, 'expected the call to throw').toBeDefined();
  expect(error).toBeInstanceOf(errorClass);
  for (const fragment of fragments) expect((error as Error).message).toContain(fragment);
  return error as E;
}

function forward(x: NsaInputs, config: NSAConfig | NSAConfigOptions = BLOCKS): ReturnType<typeof nsaForward> {
  return nsaForward(x, config, { backend });
}

/** A tensor of the given values in place of one element of `t`. */
function withValue(t: Tensor, index: number, value: number): Tensor {
  const values = t.toFloat64();
  values[index] = value;
  return Tensor.fromValues(values, t.shape, t.dtype);
}

/** Rows [a, b) of a [1, N, ...] tensor, as a [1, b - a, ...] tensor. */
function rows(t: Tensor, a: number, b: number): Tensor {
  const per = t.shape.slice(2).reduce((x, y) => x * y, 1);
  return Tensor.fromValues(t.toFloat64().subarray(a * per, b * per), [1, b - a, ...t.shape.slice(2)], t.dtype);
}

describe('wrong ranks and shapes', () => {
  for (const name of ['q', 'k', 'v', 'g'] as const) {
    it(`${name} of rank 3 is a ShapeError naming ${name}`, async () => {
      const x = inputs();
      const t = x[name];
      const flat = t.reshape([t.shape[0]!, t.shape[1]!, t.shape[2]! * t.shape[3]!]);
      await rejects(forward({ ...x, [name]: flat }), ShapeError, `${name}: expected rank 4, got rank 3`);
    });
    it(`${name} of rank 5 is a ShapeError naming ${name}`, async () => {
      const x = inputs();
      const t = x[name];
      await rejects(forward({ ...x, [name]: t.reshape([1, ...t.shape]) }), ShapeError, `${name}: expected rank 4, got rank 5`);
    });
  }

  it('a missing tensor or a plain array is a ShapeError', async () => {
    const x = inputs();
    await rejects(forward({ ...x, g: undefined } as unknown as NsaInputs), ShapeError, 'g: expected a Tensor, got undefined');
    await rejects(forward({ ...x, q: x.q.data } as unknown as NsaInputs), ShapeError, 'q: expected a Tensor, got Float32Array');
    await rejects(forward({ ...x, k: null } as unknown as NsaInputs), ShapeError, 'k: expected a Tensor, got null');
  });

  it('batch of k differs from q', async () => {
    const x = inputs({ B: 2 });
    await rejects(forward({ ...x, k: inputs({ B: 1 }).k }), ShapeError, 'k: expected shape [2, 40, 2, 16]', 'got [1, 40, 2, 16]');
  });

  it('T of v differs from q', async () => {
    await rejects(forward({ ...inputs(), v: inputs({ T: 39 }).v }), ShapeError, 'v: expected shape [1, 40, 2, 8]', 'got [1, 39, 2, 8]');
  });

  it('T of g differs from q', async () => {
    await rejects(forward({ ...inputs(), g: inputs({ T: 41 }).g }), ShapeError, 'g: expected shape [1, 40, 4, 3]', 'got [1, 41, 4, 3]');
  });

  it('batch of g differs from q', async () => {
    await rejects(forward({ ...inputs(), g: inputs({ B: 3 }).g }), ShapeError, 'g: expected shape [1, 40, 4, 3]', 'got [3, 40, 4, 3]');
  });

  it('q heads differ from an NSAConfig instance', async () => {
    await rejects(forward(inputs({ hq: 6 }), CONFIG), ShapeError, 'q: 6 query heads (axis 2) but config.heads is 4');
  });

  it('k heads differ from an NSAConfig instance', async () => {
    await rejects(forward(inputs({ h: 1 }), CONFIG), ShapeError, 'k: expected shape [1, 40, 2, 16]', 'config.kvHeads');
  });

  it('q head dim differs from an NSAConfig instance', async () => {
    await rejects(forward(inputs({ dk: 32 }), CONFIG), ShapeError, 'q: head dim 32 (axis 3) but config.headDim is 16');
  });

  it('k heads that do not divide q heads (plain options) are a config error naming both counts', async () => {
    const e = await rejects(forward(inputs({ h: 3 })), NsaConfigError, 'heads: must be divisible by kvHeads (H = 3) (got 4)');
    expect(e.issues.map((i) => i.path)).toEqual(['heads']);
  });

  it('dk of k differs from q', async () => {
    const x = inputs();
    await rejects(forward({ ...x, k: inputs({ dk: 12 }).k }), ShapeError, 'k: expected shape [1, 40, 2, 16]', 'got [1, 40, 2, 12]');
  });

  it('dv of v differs from an NSAConfig instance', async () => {
    await rejects(forward(inputs({ dv: 16 }), CONFIG), ShapeError, 'v: expected shape [1, 40, 2, 8]', 'config.valueDim', 'got [1, 40, 2, 16]');
  });

  it('dv of an independent window value differs from v', async () => {
    const x = inputs();
    const other = inputs({ dv: 6 }, 9);
    await rejects(forward({ ...x, kWin: other.k, vWin: other.v }), ShapeError, 'vWin: expected shape [1, 40, 2, 8] (the shape of v)');
  });

  it('independent k of the wrong shape', async () => {
    const x = inputs();
    await rejects(forward({ ...x, kSlc: inputs({ T: 20 }).k, vSlc: x.v }), ShapeError, 'kSlc: expected shape [1, 40, 2, 16] (the shape of k)');
  });

  it('g with a last dim other than 3', async () => {
    const x = inputs();
    for (const gates of [2, 4]) {
      await rejects(
        forward({ ...x, g: Tensor.uniform([1, T, HQ, gates], 'f32', 5) }),
        ShapeError,
        'g: expected shape [1, 40, 4, 3] (one gate per query head and branch (cmp, slc, win))',
        `got [1, 40, 4, ${gates}]`,
      );
    }
  });

  it('T = 0 is a ShapeError, not an empty result', async () => {
    await rejects(forward(inputs({ T: 0 })), ShapeError, 'q: sequence length T (axis 1) must be >= 1, got 0');
    await rejects(forward(inputs({ T: 0 }), CONFIG), ShapeError, 'T (axis 1) must be >= 1');
  });

  it('B = 0 is a ShapeError', async () => {
    await rejects(forward(inputs({ B: 0 })), ShapeError, 'q: batch size B (axis 0) must be >= 1, got 0');
  });
});

describe('valid edge cases give the right answer', () => {
  it('T = 1: o_cmp = 0, lse_cmp = -inf, block 0 only, o = (g_slc + g_win) * v0', async () => {
    const x = inputs({ B: 2, T: 1 });
    const result = await forward(x);
    const ref = nsaReferenceForward(result.request.config, {
      q: x.q.toFloat64(),
      k: x.k.toFloat64(),
      v: x.v.toFloat64(),
      g: x.g.toFloat64(),
      cuSeqlens: [0, 1, 2],
    });
    const oCmp = result.oCmp.toFloat64();
    expect(oCmp.every((value) => value === 0)).toBe(true);
    expect(Array.from(result.lseCmp.toFloat64())).toEqual(new Array(2 * HQ).fill(-Infinity));
    expect(result.blockIndices.shape).toEqual([2, 1, H, 4]);
    expect(Array.from(result.blockIndices.data)).toEqual(Array.from({ length: 2 * H }, () => [0, -1, -1, -1]).flat());
    const v = x.v.toFloat64();
    const g = x.g.toFloat64();
    const q = x.q.toFloat64();
    const k = x.k.toFloat64();
    const o = result.o.toFloat64();
    const expected = new Float64Array(o.length);
    const expectedLse = new Float64Array(2 * HQ);
    for (let b = 0; b < 2; b++) {
      for (let hq = 0; hq < HQ; hq++) {
        const kv = Math.floor(hq / (HQ / H));
        const row = b * HQ + hq;
        for (let c = 0; c < DV; c++) expected[row * DV + c] = (g[row * 3 + 1]! + g[row * 3 + 2]!) * v[(b * H + kv) * DV + c]!;
        let dot = 0;
        for (let c = 0; c < DK; c++) dot += q[row * DK + c]! * k[(b * H + kv) * DK + c]!;
        expectedLse[row] = dot / Math.sqrt(DK);
      }
    }
    expectRelativeRms(o, expected, 'o', { rtol: 1e-6 });
    expectRelativeRms(result.oSlc.toFloat64(), result.oWin.toFloat64(), 'oSlc = oWin = v0', { rtol: 0 });
    expectRelativeRms(result.lseSlc.toFloat64(), expectedLse, 'lseSlc', { rtol: 1e-6 });
    expectRelativeRms(result.lseWin.toFloat64(), expectedLse, 'lseWin', { rtol: 1e-6 });
    expectRelativeRms(o, ref.o, 'o against the reference', { rtol: 1e-6 });
    expectRelativeRms(result.lseCmp.toFloat64(), ref.lseCmp, 'lseCmp against the reference', { rtol: 0 });
    // And its backward runs: no gradient reaches the (absent) compressed tokens.
    const grads = await result.backward(Tensor.randn(result.o.shape, 'f32', 3));
    expect(grads.dg.toFloat64().filter((_, i) => i % 3 === 0).every((value) => value === 0)).toBe(true);
    expect(grads.dk.toFloat64().every(Number.isFinite)).toBe(true);
  });

  it('ragged packed lengths: each sequence as if it ran alone', async () => {
    const lengths = [1, 16, 23, 7, 33];
    const cuSeqlens = [0];
    for (const n of lengths) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + n);
    const N = cuSeqlens[cuSeqlens.length - 1]!;
    const x = inputs({ T: N }, 11);
    const packed = await forward({ ...x, cuSeqlens });
    const dO = Tensor.randn(packed.o.shape, 'f32', 12);
    const packedGrads = await packed.backward(dO);
    for (let s = 0; s < lengths.length; s++) {
      const [a, b] = [cuSeqlens[s]!, cuSeqlens[s + 1]!];
      const alone = await forward({ q: rows(x.q, a, b), k: rows(x.k, a, b), v: rows(x.v, a, b), g: rows(x.g, a, b) });
      const what = `sequence ${s} (${b - a} tokens)`;
      for (const name of ['o', 'oCmp', 'oSlc', 'oWin', 'lseCmp', 'lseSlc', 'lseWin'] as const) {
        expectRelativeRms(rows(packed[name], a, b).toFloat64(), alone[name].toFloat64(), `${what}: ${name}`, { rtol: 0 });
      }
      expect(Array.from(rows(packed.blockIndices, a, b).data as Int32Array), `${what}: blockIndices`).toEqual(Array.from(alone.blockIndices.data));
      const grads = await alone.backward(rows(dO, a, b));
      for (const name of ['dq', 'dk', 'dv', 'dg'] as const) {
        expectRelativeRms(rows(packedGrads[name], a, b).toFloat64(), grads[name].toFloat64(), `${what}: ${name}`, { rtol: 1e-12 });
      }
    }
  });

  it('cuSeqlens as an i32 or i64 tensor gives the same result as an array', async () => {
    const x = inputs({ T: 40 }, 21);
    const offsets = [0, 13, 40];
    const fromArray = await forward({ ...x, cuSeqlens: offsets });
    for (const t of [new Tensor('i32', [3], Int32Array.from(offsets)), new Tensor('i64', [3], BigInt64Array.from(offsets.map(BigInt)))]) {
      const result = await forward({ ...x, cuSeqlens: t });
      expect(Array.from(result.o.data as Float32Array), t.dtype).toEqual(Array.from(fromArray.o.data as Float32Array));
    }
  });
});

describe('bad cuSeqlens', () => {
  const x = inputs();
  it('non-increasing (an empty sequence)', async () => {
    await rejects(forward({ ...x, cuSeqlens: [0, 20, 20, 40] }), InputValueError, 'offsets must increase strictly', 'cuSeqlens[2] = 20 <= cuSeqlens[1] = 20');
  });
  it('decreasing', async () => {
    await rejects(forward({ ...x, cuSeqlens: [0, 30, 10, 40] }), InputValueError, 'cuSeqlens[2] = 10 <= cuSeqlens[1] = 30');
  });
  it('not starting at 0', async () => {
    await rejects(forward({ ...x, cuSeqlens: [5, 20, 40] }), InputValueError, 'cuSeqlens[0]: must be 0, got 5');
  });
  it('not ending at T', async () => {
    await rejects(forward({ ...x, cuSeqlens: [0, 20, 39] }), InputValueError, 'the last offset must equal T = 40', 'got 39');
    await rejects(forward({ ...x, cuSeqlens: [0, 20, 41] }), InputValueError, 'the last offset must equal T = 40', 'got 41');
  });
  it('with B > 1', async () => {
    await rejects(forward({ ...inputs({ B: 2 }), cuSeqlens: [0, 40] }), ShapeError, 'packed sequences need B = 1', 'got B = 2');
  });
  it('non-integer offsets', async () => {
    await rejects(forward({ ...x, cuSeqlens: [0, 20.5, 40] }), InputValueError, 'cuSeqlens[1]: expected an integer offset, got 20.5');
    await rejects(forward({ ...x, cuSeqlens: [0, NaN, 40] }), InputValueError, 'cuSeqlens[1]: expected an integer offset, got NaN');
  });
  it('a float tensor', async () => {
    await rejects(forward({ ...x, cuSeqlens: Tensor.f32([0, 20, 40], [3]) }), DTypeError, 'cuSeqlens: expected an i32 or i64 tensor, got f32');
  });
  it('a tensor of rank 2', async () => {
    await rejects(forward({ ...x, cuSeqlens: new Tensor('i32', [1, 3], Int32Array.from([0, 20, 40])) }), ShapeError, 'cuSeqlens: expected rank 1, got shape [1, 3]');
  });
  it('too short', async () => {
    await rejects(forward({ ...x, cuSeqlens: [0] }), ShapeError, 'cuSeqlens: expected at least 2 offsets (one sequence), got 1');
    await rejects(forward({ ...x, cuSeqlens: [] }), ShapeError, 'got 0');
  });
  it('neither a tensor nor an array', async () => {
    await rejects(forward({ ...x, cuSeqlens: '0,40' } as unknown as NsaInputs), ShapeError, 'cuSeqlens: expected a Tensor or an array of numbers, got string');
  });
});

describe('wrong dtypes', () => {
  const x = inputs();
  it('an i32 q is a DTypeError', async () => {
    await rejects(forward({ ...x, q: new Tensor('i32', x.q.shape) }), DTypeError, 'q: expected a float dtype (f32, f16, bf16 or f64), got i32');
  });
  it('an i64 g is a DTypeError', async () => {
    await rejects(forward({ ...x, g: new Tensor('i64', x.g.shape) }), DTypeError, 'g: expected a float dtype', 'got i64');
  });
  it('an i32 compressed value is a DTypeError', async () => {
    const Tc = CONFIG.compressedLength(T);
    await rejects(
      forward({ ...x, kCmp: Tensor.randn([1, Tc, H, DK], 'f32', 3), vCmp: new Tensor('i32', [1, Tc, H, DV]) }),
      DTypeError,
      'vCmp: expected a float dtype',
    );
  });
  it('mixed float dtypes are accepted', async () => {
    const result = await forward({ ...x, q: x.q.cast('bf16'), k: x.k.cast('f16'), v: x.v.cast('f64') });
    expect(result.o.dtype).toBe('f32');
  });
});

describe('NaN and Inf inputs', () => {
  const x = inputs();
  it('NaN in q names q and the index', async () => {
    const index = ((0 * T + 7) * HQ + 2) * DK + 5;
    await rejects(forward({ ...x, q: withValue(x.q, index, NaN) }), InputValueError, `q: element ${index} at [0, 7, 2, 5] is NaN`, 'inputs must be finite');
  });
  it('Inf in q', async () => {
    await rejects(forward({ ...x, q: withValue(x.q, 0, -Infinity) }), InputValueError, 'q: element 0 at [0, 0, 0, 0] is -Infinity');
  });
  it('NaN and Inf in g', async () => {
    const last = x.g.size - 1;
    await rejects(forward({ ...x, g: withValue(x.g, last, NaN) }), InputValueError, `g: element ${last} at [0, 39, 3, 2] is NaN`);
    await rejects(forward({ ...x, g: withValue(x.g, 4, Infinity) }), InputValueError, 'g: element 4 at [0, 0, 1, 1] is Infinity');
  });
  it('NaN and Inf in a bf16 k', async () => {
    const k = x.k.cast('bf16');
    const index = ((0 * T + 3) * H + 1) * DK + 2;
    await rejects(forward({ ...x, k: withValue(k, index, Infinity) }), InputValueError, `k: element ${index} at [0, 3, 1, 2] is Infinity`);
    const bits = new Uint16Array(k.data as Uint16Array);
    bits[index] = f32ToBf16(NaN);
    await rejects(forward({ ...x, k: new Tensor('bf16', k.shape, bits) }), InputValueError, `k: element ${index} at [0, 3, 1, 2] is NaN`);
  });
  it('Inf in an f16 v', async () => {
    await rejects(forward({ ...x, v: withValue(x.v.cast('f16'), 9, -Infinity) }), InputValueError, 'v: element 9 at [0, 0, 1, 1] is -Infinity');
  });
  it('a finite value that overflows f16 is caught as Inf after the cast', async () => {
    await rejects(forward({ ...x, v: withValue(x.v, 3, 1e6).cast('f16') }), InputValueError, 'v: element 3', 'is Infinity');
  });
  it('NaN in a phi parameter names it', async () => {
    const cfg = { ...BLOCKS, phi: 'linear' as const };
    const phiK = linearPhi(DK);
    await rejects(
      forward({ ...x, phiK: { ...phiK, b: withValue(phiK.b, 1, NaN) }, phiV: linearPhi(DV) }, cfg),
      InputValueError,
      'phiK.b: element 1 at [0, 1] is NaN',
    );
  });
  it('checkFinite: false skips the check', async () => {
    const result = await nsaForward({ ...x, g: withValue(x.g, 0, NaN) }, BLOCKS, { backend, checkFinite: false });
    expect(Number.isNaN(result.o.toFloat64()[0])).toBe(true);
  });
});

function linearPhi(dim: number, seed = 30): Record<'pe' | 'w' | 'b', Tensor> {
  const l = BLOCKS.compressBlock;
  return {
    pe: Tensor.randn([H, l, dim], 'f32', seed, 0.1),
    w: Tensor.randn([H, l * dim, dim], 'f32', seed + 1, 1 / Math.sqrt(l * dim)),
    b: Tensor.randn([H, dim], 'f32', seed + 2, 0.1),
  };
}

describe('optional inputs', () => {
  const x = inputs();
  const Tc = CONFIG.compressedLength(T);
  it('kCmp without vCmp', async () => {
    await rejects(forward({ ...x, kCmp: Tensor.randn([1, Tc, H, DK], 'f32', 4) }), ShapeError, 'kCmp was given without vCmp: give both or neither');
  });
  it('vSlc without kSlc', async () => {
    await rejects(forward({ ...x, vSlc: x.v }), ShapeError, 'vSlc was given without kSlc');
  });
  it('kCmp with the wrong number of compressed tokens', async () => {
    expect(Tc).toBe(9);
    await rejects(
      forward({ ...x, kCmp: Tensor.randn([1, Tc - 1, H, DK], 'f32', 4), vCmp: Tensor.randn([1, Tc - 1, H, DV], 'f32', 5) }),
      ShapeError,
      'kCmp: expected shape [1, 9, 2, 16] (Tc = 9 complete compression blocks (l = 8, d = 4)), got [1, 8, 2, 16]',
    );
  });
  it('kCmp of a packed batch holds the compressed tokens of every sequence', async () => {
    // Sequences of 5, 20 and 15 tokens own 0, 4 and 2 compressed tokens.
    const cuSeqlens = [0, 5, 25, 40];
    await rejects(
      forward({ ...x, cuSeqlens, kCmp: Tensor.randn([1, Tc, H, DK], 'f32', 4), vCmp: Tensor.randn([1, Tc, H, DV], 'f32', 5) }),
      ShapeError,
      'kCmp: expected shape [1, 6, 2, 16] (Tc = 6',
    );
    const ok = await forward({ ...x, cuSeqlens, kCmp: Tensor.randn([1, 6, H, DK], 'f32', 4), vCmp: Tensor.randn([1, 6, H, DV], 'f32', 5) });
    expect(ok.o.shape).toEqual([1, T, HQ, DV]);
  });
  it('vCmp with the wrong dv', async () => {
    await rejects(
      forward({ ...x, kCmp: Tensor.randn([1, Tc, H, DK], 'f32', 4), vCmp: Tensor.randn([1, Tc, H, DK], 'f32', 5) }),
      ShapeError,
      'vCmp: expected shape [1, 9, 2, 8]',
    );
  });
  it('phi parameters with phi = mean', async () => {
    await rejects(forward({ ...x, phiK: linearPhi(DK) }), ShapeError, 'phiK: phi parameters were given but config.phi is mean (no parameters)');
  });
  it('phi parameters with kCmp/vCmp given', async () => {
    await rejects(
      forward(
        { ...x, kCmp: Tensor.randn([1, Tc, H, DK], 'f32', 4), vCmp: Tensor.randn([1, Tc, H, DV], 'f32', 5), phiK: linearPhi(DK), phiV: linearPhi(DV) },
        { ...BLOCKS, phi: 'linear' },
      ),
      ShapeError,
      'phiK: phi parameters were given but kCmp/vCmp replace phi',
    );
  });
  it('missing phi parameters for linear', async () => {
    await rejects(forward(x, { ...BLOCKS, phi: 'linear' }), ShapeError, 'phiK: config.phi is linear, which needs parameters pe, w, b');
    await rejects(forward({ ...x, phiK: linearPhi(DK) }, { ...BLOCKS, phi: 'linear' }), ShapeError, 'phiV: config.phi is linear');
  });
  it('one missing phi parameter', async () => {
    const { b: _b, ...noBias } = linearPhi(DV);
    await rejects(forward({ ...x, phiK: linearPhi(DK), phiV: noBias }, { ...BLOCKS, phi: 'linear' }), ShapeError, 'phiV.b: missing (phi = linear needs pe, w, b)');
  });
  it('a phi parameter of the wrong shape', async () => {
    const phiK = { ...linearPhi(DK), w: Tensor.randn([H, BLOCKS.compressBlock * DK, DK + 1], 'f32', 7) };
    await rejects(forward({ ...x, phiK, phiV: linearPhi(DV) }, { ...BLOCKS, phi: 'linear' }), ShapeError, 'phiK.w: expected shape [2, 128, 16] (H, l*D, D), got [2, 128, 17]');
    const phiV = { ...linearPhi(DV), pe: Tensor.randn([H, BLOCKS.compressBlock * DV], 'f32', 7) };
    await rejects(forward({ ...x, phiK: linearPhi(DK), phiV }, { ...BLOCKS, phi: 'linear' }), ShapeError, 'phiV.pe: expected rank 3, got rank 2');
  });
  it('an unknown phi parameter name', async () => {
    const phiK = { ...linearPhi(DK), bias: Tensor.randn([H, DK], 'f32', 8) };
    await rejects(forward({ ...x, phiK, phiV: linearPhi(DV) }, { ...BLOCKS, phi: 'linear' }), ShapeError, 'phiK.bias: not a parameter of phi = linear (expected pe, w, b)');
    await rejects(forward({ ...x, phiK: linearPhi(DK), phiV: linearPhi(DV) }, { ...BLOCKS, phi: 'mlp' }), ShapeError, 'phiK.w: not a parameter of phi = mlp');
  });
  it('mlp phi with different hidden widths for keys and values', async () => {
    const l = BLOCKS.compressBlock;
    const mlp = (dim: number, M: number): Record<string, Tensor> => ({
      pe: Tensor.randn([H, l, dim], 'f32', 1),
      w1: Tensor.randn([H, l * dim, M], 'f32', 2),
      b1: Tensor.randn([H, M], 'f32', 3),
      w2: Tensor.randn([H, M, dim], 'f32', 4),
      b2: Tensor.randn([H, dim], 'f32', 5),
    });
    await rejects(forward({ ...x, phiK: mlp(DK, 8), phiV: mlp(DV, 6) }, { ...BLOCKS, phi: 'mlp' }), ShapeError, "phiV.w1: hidden width 6 differs from phiK's 8");
  });
});

describe('backward input', () => {
  it('dOut of the wrong shape', async () => {
    const result = await forward(inputs());
    await rejects(result.backward(Tensor.randn([1, T, HQ, DK], 'f32', 1)), ShapeError, 'dOut: expected shape [1, 40, 4, 8] (the shape of o), got [1, 40, 4, 16]');
    await rejects(result.backward(Tensor.randn([T, HQ, DV], 'f32', 1)), ShapeError, 'dOut: expected rank 4');
  });
  it('dOut with NaN or Inf', async () => {
    const result = await forward(inputs());
    const dO = Tensor.randn(result.o.shape, 'f32', 1);
    await rejects(result.backward(withValue(dO, 17, NaN)), InputValueError, 'dOut: element 17 at [0, 0, 2, 1] is NaN');
    await rejects(result.backward(withValue(dO.cast('bf16'), 3, Infinity)), InputValueError, 'dOut: element 3 at [0, 0, 0, 3] is Infinity');
    // The forward result stays usable after a rejected dOut.
    const grads = await result.backward(dO);
    expect(grads.dq.shape).toEqual([1, T, HQ, DK]);
  });
});

describe('backward input that is not a float tensor', () => {
  it('an i32 dOut is a DTypeError', async () => {
    const result = await forward(inputs());
    await rejects(result.backward(new Tensor('i32', result.o.shape)), DTypeError, 'dOut');
  });
  it('a missing dOut is a ShapeError, not a TypeError', async () => {
    const result = await forward(inputs());
    await rejects(result.backward(undefined as unknown as Tensor), ShapeError, 'dOut');
  });
});
