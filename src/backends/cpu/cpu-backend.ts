// The CPU backend: the float64-accumulating reference over f32 storage, split over rows across worker threads.
// Compression runs once on the calling thread; each worker then computes its share of the rows in place on
// shared memory. Small problems stay on the calling thread, where starting workers would cost more than it saves.

import { availableParallelism } from 'node:os';
import { ShapeError } from '../../errors.js';
import type { PhiParams } from '../../reference/compress.js';
import { finishBackward, type BackwardAccumulators } from '../../reference/nsa-backward.js';
import { allocateOutputs, prepareNsaProblem, type NsaProblem, type NsaReferenceOutputs } from '../../reference/nsa-forward.js';
import type { FloatArray } from '../../reference/layout.js';
import type { FloatDType } from '../../tensor/dtype.js';
import { formatShape, Tensor } from '../../tensor/tensor.js';
import type { NsaGradients, NsaOutputs } from '../../nsa/types.js';
import type { NsaRequest } from '../../nsa/validate.js';
import type {
  Backend,
  BackendForwardResult,
  BenchmarkProblem,
  SavedForBackward,
  TimingOptions,
  TimingResult,
} from '../backend.js';
import { randomInputs } from '../../nsa/random-inputs.js';
import { validateNsaInputs } from '../../nsa/validate.js';
import { median } from '../timing.js';
import {
  runBackwardTask,
  runForwardTask,
  splitRows,
  type BackwardTask,
  type ForwardTask,
  type PrivateKvGradients,
  type ProblemArrays,
} from './row-tasks.js';
import { WorkerPool } from './worker-pool.js';
import { phiParamsOf } from '../../nsa/phi-params.js';
import { CpuKvCache } from './cpu-kv-cache.js';
import type { NSAConfig } from '../../config/nsa-config.js';
import type { KvCache, KvCacheOptions } from '../../nsa/decode/types.js';

export interface CpuBackendOptions {
  /** Worker threads; 0 or 1 runs on the calling thread. Default: the cores present, at most 8. */
  readonly threads?: number;
  /** Problems below this many multiply-adds stay on the calling thread. */
  readonly minParallelWork?: number;
}

const ROW_CHUNK = 16;

export class CpuBackend implements Backend {
  readonly name = 'cpu' as const;
  readonly description: string;
  private readonly pool: WorkerPool | undefined;
  private readonly minParallelWork: number;

  constructor(options: CpuBackendOptions = {}) {
    const threads = options.threads ?? Math.min(8, availableParallelism());
    this.pool = threads > 1 && WorkerPool.supported() ? new WorkerPool(threads) : undefined;
    this.minParallelWork = options.minParallelWork ?? 5e6;
    this.description = `cpu (float64 accumulation, ${this.pool ? `${this.pool.size} worker threads` : 'calling thread'})`;
  }

  async forward(request: NsaRequest, outputDType: FloatDType): Promise<BackendForwardResult> {
    const pool = this.poolFor(request);
    const problem = prepareNsaProblem(request.config, referenceInputs(request, pool !== undefined));
    const out = allocateOutputs(problem.layout, request.config.selectCount, pool !== undefined);
    const base = taskBase(problem, pool !== undefined);
    const tasks = splitRows(problem.layout.totalTokens, pool?.size ?? 1, ROW_CHUNK).map(
      (rows): ForwardTask => ({ kind: 'forward', ...base, out, rows }),
    );
    if (pool === undefined) tasks.forEach(runForwardTask);
    else await pool.run(tasks);
    const saved = new CpuSaved(problem, out);
    return { outputs: outputTensors(request, out, outputDType), saved };
  }

  async backward(request: NsaRequest, saved: SavedForBackward, dOut: Tensor, outputDType: FloatDType): Promise<NsaGradients> {
    if (!(saved instanceof CpuSaved)) throw new TypeError('saved: expected what the cpu backend forward returned');
    const { batch: B, tokens: T, config } = request;
    const expected = [B, T, config.heads, config.valueDim];
    if (dOut.shape.join() !== expected.join()) {
      throw new ShapeError(`dOut: expected shape ${formatShape(expected)} (the shape of o), got ${formatShape(dOut.shape)}`);
    }
    const pool = this.poolFor(request);
    const { problem, out } = saved;
    const shared = pool !== undefined;
    const { totalTokens: N, heads: Hq, dk } = problem.layout;
    const dq = allocF64(N * Hq * dk, shared);
    const dg = allocF64(N * Hq * 3, shared);
    const dO = shared ? toShared(dOut.toFloat32()) : dOut.toFloat32();
    const forwardShared = shared ? sharedOutputs(out) : out;
    const base = taskBase(problem, shared);
    const tasks = splitRows(N, pool?.size ?? 1, ROW_CHUNK).map(
      (rows): BackwardTask => ({ kind: 'backward', ...base, forward: forwardShared, dOut: dO, dq, dg, rows }),
    );
    const privates = pool === undefined ? tasks.map(runBackwardTask) : (await pool.run(tasks)).map((r) => r.kv!);
    const acc: BackwardAccumulators = { ...sumPrivate(privates), dq, dg };
    return gradientTensors(request, finishBackward(problem, acc), outputDType);
  }

  async time(problem: BenchmarkProblem, options: TimingOptions): Promise<TimingResult> {
    const request = validateNsaInputs(randomInputs({ ...problem, pattern: problem.inputs }), problem.config, { checkFinite: false });
    const samples: number[] = [];
    const total = options.warmup + options.iterations;
    for (let i = 0; i < total; i++) {
      const start = performance.now();
      const { outputs, saved } = await this.forward(request, 'f32');
      if (options.backward) await this.backward(request, saved, outputs.o, 'f32');
      if (i >= options.warmup) samples.push(performance.now() - start);
      options.onIteration?.(i + 1, total);
    }
    return { medianMs: median(samples), samplesMs: samples, clock: 'wall clock' };
  }

  createKvCache(config: NSAConfig, options: KvCacheOptions): KvCache {
    return new CpuKvCache(config, options);
  }

  dispose(): void {
    this.pool?.dispose();
  }

  private poolFor(request: NsaRequest): WorkerPool | undefined {
    if (this.pool === undefined) return undefined;
    const { config } = request;
    const rows = request.batch * request.tokens * config.heads;
    const keysPerRow = config.selectCount * config.selectBlock + config.window + request.tokens / config.compressStride / 2;
    return rows * keysPerRow * (config.headDim + config.valueDim) >= this.minParallelWork ? this.pool : undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

class CpuSaved implements SavedForBackward {
  readonly backend = 'cpu' as const;
  readonly bytes: number;
  constructor(
    readonly problem: NsaProblem,
    readonly out: NsaReferenceOutputs,
  ) {
    this.bytes = Object.values(out).reduce((s: number, a: ArrayLike<number> & { byteLength: number }) => s + a.byteLength, 0);
  }
  release(): void {}
}

function allocF64(n: number, shared: boolean): Float64Array {
  return shared ? new Float64Array(new SharedArrayBuffer(n * 8)) : new Float64Array(n);
}

function toShared<T extends Float32Array | Float64Array | Int32Array>(a: T): T {
  if (a.buffer instanceof SharedArrayBuffer) return a;
  const ctor = a.constructor as new (b: SharedArrayBuffer) => T;
  const copy = new ctor(new SharedArrayBuffer(a.byteLength));
  copy.set(a as never);
  return copy;
}

function sharedOutputs(out: NsaReferenceOutputs): NsaReferenceOutputs {
  return Object.fromEntries(Object.entries(out).map(([k, a]) => [k, toShared(a as Float64Array)])) as unknown as NsaReferenceOutputs;
}

function optionalF32(t: Tensor | undefined, shared: boolean): Float32Array | undefined {
  if (t === undefined) return undefined;
  return shared ? toShared(t.toFloat32()) : t.toFloat32();
}

function referenceInputs(request: NsaRequest, shared: boolean): Parameters<typeof prepareNsaProblem>[1] {
  const { inputs, config } = request;
  const f32 = (t: Tensor): Float32Array => (shared ? toShared(t.toFloat32()) : t.toFloat32());
  const phi = (params: Readonly<Record<string, Tensor>> | undefined): PhiParams | undefined =>
    phiParamsOf(config, params, request.phiHidden);
  return {
    q: f32(inputs.q),
    k: f32(inputs.k),
    v: f32(inputs.v),
    g: f32(inputs.g),
    cuSeqlens: request.cuSeqlens,
    kCmp: optionalF32(inputs.kCmp, shared),
    vCmp: optionalF32(inputs.vCmp, shared),
    kSlc: optionalF32(inputs.kSlc, shared),
    vSlc: optionalF32(inputs.vSlc, shared),
    kWin: optionalF32(inputs.kWin, shared),
    vWin: optionalF32(inputs.vWin, shared),
    phiK: phi(inputs.phiK),
    phiV: phi(inputs.phiV),
  };
}

function taskBase(problem: NsaProblem, shared: boolean): Pick<ForwardTask, 'config' | 'cuSeqlens' | 'arrays'> {
  const { inputs } = problem;
  const arrays: ProblemArrays = {
    q: inputs.q,
    k: inputs.k,
    v: inputs.v,
    g: inputs.g,
    kc: shared ? toShared(problem.kc) : problem.kc,
    vc: shared ? toShared(problem.vc) : problem.vc,
    kSlc: inputs.kSlc,
    vSlc: inputs.vSlc,
    kWin: inputs.kWin,
    vWin: inputs.vWin,
  };
  return { config: problem.config.toOptions(), cuSeqlens: inputs.cuSeqlens, arrays };
}

function sumPrivate(parts: PrivateKvGradients[]): PrivateKvGradients {
  const [first, ...rest] = parts;
  for (const part of rest) {
    for (const key of Object.keys(first!) as (keyof PrivateKvGradients)[]) {
      const target = first![key];
      const source = part[key];
      for (let i = 0; i < target.length; i++) target[i]! += source[i]!;
    }
  }
  return first!;
}

function tensorOf(values: FloatArray, shape: readonly number[], dtype: FloatDType): Tensor {
  return Tensor.fromValues(values, shape, dtype);
}

function outputTensors(request: NsaRequest, out: NsaReferenceOutputs, dtype: FloatDType): NsaOutputs {
  const { batch: B, tokens: T, config } = request;
  const o = [B, T, config.heads, config.valueDim];
  const lse = [B, T, config.heads];
  return {
    o: tensorOf(out.o, o, dtype),
    oCmp: tensorOf(out.oCmp, o, dtype),
    oSlc: tensorOf(out.oSlc, o, dtype),
    oWin: tensorOf(out.oWin, o, dtype),
    lseCmp: tensorOf(out.lseCmp, lse, dtype),
    lseSlc: tensorOf(out.lseSlc, lse, dtype),
    lseWin: tensorOf(out.lseWin, lse, dtype),
    blockIndices: new Tensor('i32', [B, T, config.kvHeads, config.selectCount], Int32Array.from(out.blockIndices)),
  };
}

function gradientTensors(request: NsaRequest, g: ReturnType<typeof finishBackward>, dtype: FloatDType): NsaGradients {
  const { inputs } = request;
  const like = (values: FloatArray, t: Tensor): Tensor => tensorOf(values, t.shape, dtype);
  const grads: { -readonly [K in keyof NsaGradients]: NsaGradients[K] } = {
    dq: like(g.dq, inputs.q),
    dk: like(g.dk, inputs.k),
    dv: like(g.dv, inputs.v),
    dg: like(g.dg, inputs.g),
  };
  const optional = [
    ['dkCmp', g.dkCmp, inputs.kCmp],
    ['dvCmp', g.dvCmp, inputs.vCmp],
    ['dkSlc', g.dkSlc, inputs.kSlc],
    ['dvSlc', g.dvSlc, inputs.vSlc],
    ['dkWin', g.dkWin, inputs.kWin],
    ['dvWin', g.dvWin, inputs.vWin],
  ] as const;
  for (const [name, values, input] of optional) if (values !== undefined && input !== undefined) grads[name] = like(values, input);
  for (const [name, values, params] of [
    ['dPhiK', g.dPhiK, inputs.phiK],
    ['dPhiV', g.dPhiV, inputs.phiV],
  ] as const) {
    if (values === undefined || params === undefined) continue;
    grads[name] = Object.fromEntries(Object.entries(values).map(([p, v]) => [p, like(v, params[p]!)]));
  }
  return grads;
}
