// The public operator (nsaForward and its backward) on the CPU backend against the float64 reference run on the
// same values, over random configs: G in 1..16, odd T, dk != dv, packed and batched layouts, all three phi kinds
// with random parameters, independent K/V per branch, and bf16/f16/f32 inputs. Plus the result's contract:
// output dtypes, backward more than once, release(), savedBytes.

import { describe, expect, it } from 'vitest';
import { CpuBackend } from '../../src/backends/cpu/cpu-backend.js';
import { NSAConfig, PHI_KINDS, type PhiKind } from '../../src/config/nsa-config.js';
import { DisposedError } from '../../src/errors.js';
import { nsaForward, type NsaForwardResult } from '../../src/nsa/operator.js';
import type { NsaGradients, NsaInputs, NsaOutputs } from '../../src/nsa/types.js';
import { phiParamArrays, type PhiParams } from '../../src/reference/compress.js';
import { nsaReferenceBackward, type NsaReferenceGradients } from '../../src/reference/nsa-backward.js';
import { nsaReferenceForward, type NsaReferenceInputs, type NsaReferenceOutputs } from '../../src/reference/nsa-forward.js';
import type { FloatDType } from '../../src/tensor/dtype.js';
import { Rng } from '../../src/tensor/random.js';
import { Tensor } from '../../src/tensor/tensor.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { randomProblem } from '../helpers/random-problem.js';

const backend = new CpuBackend({ threads: 1 });
const RTOL = { rtol: 1e-6 };
const INPUT_DTYPES: readonly FloatDType[] = ['f32', 'bf16', 'f16'];
const OUTPUT_NAMES = ['o', 'oCmp', 'oSlc', 'oWin', 'lseCmp', 'lseSlc', 'lseWin'] as const;

interface Case {
  readonly name: string;
  readonly config: NSAConfig;
  /** Packed (B = 1 with cuSeqlens), or B sequences of one length (no cuSeqlens). */
  readonly layout: { readonly packed: readonly number[] } | { readonly batch: number; readonly length: number };
  readonly independent: { cmp: boolean; slc: boolean; win: boolean };
  readonly dtype: FloatDType;
  readonly seed: number;
}

/** The operator's inputs (rounded to the case's dtype) and the reference's inputs holding the same values. */
interface Problem {
  readonly inputs: NsaInputs;
  readonly reference: NsaReferenceInputs;
  readonly B: number;
  readonly T: number;
}

function randomCase(rng: Rng, trial: number): Case {
  const d = rng.int(1, 4);
  const l = d * rng.int(1, 3);
  const selectBlock = l + d * rng.int(0, 3);
  const kvHeads = rng.int(1, 2);
  const G = trial < 16 ? trial + 1 : rng.int(1, 16);
  const headDim = rng.int(2, 12);
  const drawn = rng.int(2, 12);
  const valueDim = drawn === headDim ? headDim + 1 : drawn;
  const phi: PhiKind = PHI_KINDS[trial % 3]!;
  const config = new NSAConfig({
    compressBlock: l,
    compressStride: d,
    selectBlock,
    selectCount: rng.int(1, 6),
    window: rng.int(1, 40),
    phi,
    heads: kvHeads * G,
    kvHeads,
    headDim,
    valueDim,
  });
  let layout: Case['layout'];
  const kind = trial % 4;
  if (kind === 3) {
    layout = { batch: rng.int(2, 3), length: 2 * rng.int(5, 35) + 1 };
  } else {
    const lengths = Array.from({ length: kind === 0 ? 1 : rng.int(2, 4) }, () => rng.int(1, 70));
    if (lengths.reduce((a, b) => a + b, 0) % 2 === 0) lengths[lengths.length - 1]! += 1; // odd T
    layout = { packed: lengths };
  }
  const independent = { cmp: rng.next() < 0.25, slc: rng.next() < 0.35, win: rng.next() < 0.35 };
  const dtype = INPUT_DTYPES[trial % INPUT_DTYPES.length]!;
  const flags = Object.entries(independent).filter(([, on]) => on).map(([b]) => b);
  const seqs = 'packed' in layout ? `packed ${layout.packed.join('+')}` : `B=${layout.batch} T=${layout.length}`;
  const name =
    `#${trial} G=${G} H=${kvHeads} dk=${config.headDim} dv=${config.valueDim} l=${l} d=${d} l'=${selectBlock} ` +
    `n=${config.selectCount} w=${config.window} phi=${phi} ${seqs} ${dtype}${flags.length > 0 ? ` own K/V: ${flags.join(',')}` : ''}`;
  return { name, config, layout, independent, dtype, seed: 1000 + trial };
}

/** Rounds `values` to `dtype` and returns the tensor and its values as doubles (what both sides compute with). */
function rounded(values: ArrayLike<number>, shape: readonly number[], dtype: FloatDType): { tensor: Tensor; values: Float64Array } {
  const tensor = Tensor.fromValues(values, shape, dtype);
  return { tensor, values: tensor.toFloat64() };
}

function phiShapes(config: NSAConfig, dim: number, hidden: number): Record<string, readonly number[]> {
  const { kvHeads: H, compressBlock: l } = config;
  return {
    pe: [H, l, dim],
    w: [H, l * dim, dim],
    b: [H, dim],
    w1: [H, l * dim, hidden],
    b1: [H, hidden],
    w2: [H, hidden, dim],
    b2: [H, dim],
  };
}

function roundedPhi(
  phi: PhiParams | undefined,
  config: NSAConfig,
  dim: number,
  dtype: FloatDType,
): { tensors: Record<string, Tensor> | undefined; params: PhiParams | undefined } {
  if (phi === undefined) return { tensors: undefined, params: undefined };
  const hidden = phi.kind === 'mlp' ? phi.hidden : 0;
  const shapes = phiShapes(config, dim, hidden);
  const tensors: Record<string, Tensor> = {};
  const values: Record<string, Float64Array> = {};
  for (const [name, array] of Object.entries(phiParamArrays(phi))) {
    const r = rounded(array, shapes[name]!, dtype);
    tensors[name] = r.tensor;
    values[name] = r.values;
  }
  const params: PhiParams =
    phi.kind === 'linear'
      ? { kind: 'linear', pe: values['pe']!, w: values['w']!, b: values['b']! }
      : { kind: 'mlp', hidden, pe: values['pe']!, w1: values['w1']!, b1: values['b1']!, w2: values['w2']!, b2: values['b2']! };
  return { tensors, params };
}

function makeProblem(c: Case): Problem {
  const { layout } = c;
  const seqlens = 'packed' in layout ? layout.packed : Array.from({ length: layout.batch }, () => layout.length);
  const raw = randomProblem(c.config, seqlens, c.seed, { independent: c.independent, phiHidden: 1 + (c.seed % 7) });
  const packed = 'packed' in layout;
  const B = packed ? 1 : seqlens.length;
  const T = packed ? raw.cuSeqlens[raw.cuSeqlens.length - 1]! : seqlens[0]!;
  const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = c.config;
  const Tc = packed ? seqlens.reduce((s, n) => s + c.config.compressedLength(n), 0) : c.config.compressedLength(T);
  const tensor = (values: ArrayLike<number> | undefined, shape: readonly number[], dtype = c.dtype) =>
    values === undefined ? undefined : rounded(values, shape, dtype);
  const q = tensor(raw.q, [B, T, Hq, dk])!;
  const k = tensor(raw.k, [B, T, H, dk])!;
  const v = tensor(raw.v, [B, T, H, dv])!;
  const g = tensor(raw.g, [B, T, Hq, 3], 'f32')!;
  const kCmp = tensor(raw.kCmp, [B, Tc, H, dk]);
  const vCmp = tensor(raw.vCmp, [B, Tc, H, dv]);
  const kSlc = tensor(raw.kSlc, [B, T, H, dk]);
  const vSlc = tensor(raw.vSlc, [B, T, H, dv]);
  const kWin = tensor(raw.kWin, [B, T, H, dk]);
  const vWin = tensor(raw.vWin, [B, T, H, dv]);
  const phiK = roundedPhi(raw.phiK, c.config, dk, c.dtype);
  const phiV = roundedPhi(raw.phiV, c.config, dv, c.dtype);
  return {
    B,
    T,
    inputs: {
      q: q.tensor,
      k: k.tensor,
      v: v.tensor,
      g: g.tensor,
      cuSeqlens: packed ? raw.cuSeqlens : undefined,
      kCmp: kCmp?.tensor,
      vCmp: vCmp?.tensor,
      kSlc: kSlc?.tensor,
      vSlc: vSlc?.tensor,
      kWin: kWin?.tensor,
      vWin: vWin?.tensor,
      phiK: phiK.tensors,
      phiV: phiV.tensors,
    },
    reference: {
      q: q.values,
      k: k.values,
      v: v.values,
      g: g.values,
      cuSeqlens: raw.cuSeqlens,
      kCmp: kCmp?.values,
      vCmp: vCmp?.values,
      kSlc: kSlc?.values,
      vSlc: vSlc?.values,
      kWin: kWin?.values,
      vWin: vWin?.values,
      phiK: phiK.params,
      phiV: phiV.params,
    },
  };
}

function expectOutputs(actual: NsaOutputs, expected: NsaReferenceOutputs, what: string, tol = RTOL): void {
  for (const name of OUTPUT_NAMES) expectRelativeRms(actual[name].toFloat64(), expected[name], `${what}: ${name}`, tol);
  expect(Array.from(actual.blockIndices.data), `${what}: blockIndices`).toEqual(Array.from(expected.blockIndices));
}

function expectGradients(actual: NsaGradients, expected: NsaReferenceGradients, what: string, tol = RTOL): void {
  for (const name of ['dq', 'dk', 'dv', 'dg', 'dkCmp', 'dvCmp', 'dkSlc', 'dvSlc', 'dkWin', 'dvWin'] as const) {
    const e = expected[name];
    const a = actual[name];
    expect(a === undefined, `${what}: ${name} present on one side only`).toBe(e === undefined);
    if (a !== undefined && e !== undefined) expectRelativeRms(a.toFloat64(), e, `${what}: ${name}`, tol);
  }
  for (const side of ['dPhiK', 'dPhiV'] as const) {
    const e = expected[side];
    const a = actual[side];
    expect(a === undefined, `${what}: ${side} present on one side only`).toBe(e === undefined);
    if (a === undefined || e === undefined) continue;
    expect(Object.keys(a).sort(), `${what}: ${side} names`).toEqual(Object.keys(e).sort());
    for (const [name, values] of Object.entries(e)) expectRelativeRms(a[name]!.toFloat64(), values, `${what}: ${side}.${name}`, tol);
  }
}

interface Ran {
  readonly problem: Problem;
  readonly result: NsaForwardResult;
  readonly dO: Tensor;
  readonly refForward: NsaReferenceOutputs;
  readonly refGrads: NsaReferenceGradients;
}

async function runCase(c: Case, outputDType?: FloatDType): Promise<Ran> {
  const problem = makeProblem(c);
  const result = await nsaForward(problem.inputs, c.config, { backend, ...(outputDType === undefined ? {} : { outputDType }) });
  const dO = Tensor.randn(result.o.shape, 'f32', c.seed + 77);
  const refForward = nsaReferenceForward(c.config, problem.reference);
  const refGrads = nsaReferenceBackward(c.config, problem.reference, refForward, dO.toFloat64());
  return { problem, result, dO, refForward, refGrads };
}

const rng = new Rng(20250216);
const CASES = Array.from({ length: 21 }, (_, trial) => randomCase(rng, trial));

describe('nsaForward and backward on the cpu backend against the float64 reference', () => {
  it('the random cases cover what they should', () => {
    const groups = new Set(CASES.map((c) => c.config.groupSize));
    for (let G = 1; G <= 16; G++) expect(groups.has(G), `G = ${G}`).toBe(true);
    expect(new Set(CASES.map((c) => c.config.phi))).toEqual(new Set(PHI_KINDS));
    expect(new Set(CASES.map((c) => c.dtype))).toEqual(new Set(INPUT_DTYPES));
    expect(CASES.every((c) => c.config.headDim !== c.config.valueDim)).toBe(true);
    expect(CASES.some((c) => 'packed' in c.layout && c.layout.packed.length > 1)).toBe(true);
    expect(CASES.some((c) => 'batch' in c.layout)).toBe(true);
    for (const branch of ['cmp', 'slc', 'win'] as const) expect(CASES.some((c) => c.independent[branch]), branch).toBe(true);
    expect(CASES.some((c) => c.config.phi !== 'mean' && !c.independent.cmp), 'a learned phi with parameters').toBe(true);
  });

  for (const c of CASES) {
    it(c.name, async () => {
      const { problem, result, dO, refForward, refGrads } = await runCase(c);
      expect(result.o.shape).toEqual([problem.B, problem.T, c.config.heads, c.config.valueDim]);
      expect(result.o.dtype).toBe('f32');
      expectOutputs(result, refForward, c.name);
      const grads = await result.backward(dO);
      expect(grads.dq.dtype).toBe('f32');
      expect(grads.dq.shape).toEqual(problem.inputs.q.shape);
      expect(grads.dg.shape).toEqual(problem.inputs.g.shape);
      expectGradients(grads, refGrads, c.name);
      result.release();
    });
  }
});

describe('the forward result', () => {
  // A case with every branch's own K/V and a learned phi, packed.
  const base = CASES.find((c) => c.config.phi === 'linear' && !c.independent.cmp && 'packed' in c.layout)!;
  const c: Case = { ...base, independent: { cmp: false, slc: true, win: true } };

  it("outputDType 'bf16' returns bf16 outputs and gradients (block indices stay i32)", async () => {
    const { result, dO, refForward, refGrads } = await runCase(c, 'bf16');
    for (const name of OUTPUT_NAMES) expect(result[name].dtype, name).toBe('bf16');
    expect(result.blockIndices.dtype).toBe('i32');
    const bf16 = { rtol: 4e-3 };
    expectOutputs(result, refForward, 'bf16 outputs', bf16);
    const grads = await result.backward(dO);
    for (const [name, t] of Object.entries(grads)) {
      if (t instanceof Tensor) expect(t.dtype, name).toBe('bf16');
    }
    for (const t of Object.values(grads.dPhiK ?? {})) expect(t.dtype).toBe('bf16');
    expectGradients(grads, refGrads, 'bf16 gradients', bf16);
  });

  it("outputDType 'f64' returns the reference's doubles", async () => {
    const { result, dO, refForward, refGrads } = await runCase(c, 'f64');
    expect(result.o.dtype).toBe('f64');
    expectOutputs(result, refForward, 'f64 outputs', { rtol: 1e-14 });
    expectGradients(await result.backward(dO), refGrads, 'f64 gradients', { rtol: 1e-14 });
  });

  it('backward() can run more than once and gives the same gradients', async () => {
    const { result, dO } = await runCase(c);
    const first = await result.backward(dO);
    const second = await result.backward(dO);
    for (const name of ['dq', 'dk', 'dv', 'dg', 'dkSlc', 'dvWin'] as const) {
      expect(Array.from(second[name]!.data as Float32Array), name).toEqual(Array.from(first[name]!.data as Float32Array));
    }
  });

  it('savedBytes > 0, and backward() after release() throws DisposedError', async () => {
    const { result, dO } = await runCase(c);
    expect(result.savedBytes).toBeGreaterThan(0);
    expect(result.backend).toBe(backend);
    expect(result.request.config).toBe(c.config);
    result.release();
    await expect(result.backward(dO)).rejects.toBeInstanceOf(DisposedError);
    await expect(result.backward(dO)).rejects.toThrow('was used after dispose()');
    expect(() => result.release()).not.toThrow();
  });
});
