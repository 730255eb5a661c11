// The work a CPU thread does: the reference's forward or backward over a set of row ranges of one problem.
// The main thread and the workers run the same functions; arrays in a task live on SharedArrayBuffers when the
// task crosses threads, so every thread reads the same inputs and writes its own rows of the outputs.

import { NSAConfig, type NSAConfigOptions } from '../../config/nsa-config.js';
import { allocateAccumulators, backwardRows, type BackwardAccumulators } from '../../reference/nsa-backward.js';
import { forwardRows, type NsaProblem, type NsaReferenceOutputs } from '../../reference/nsa-forward.js';
import { packedLayout, type FloatArray } from '../../reference/layout.js';

/** The arrays a row pass reads: raw inputs, each branch's K/V and the compressed K/V. */
export interface ProblemArrays {
  readonly q: FloatArray;
  readonly k: FloatArray;
  readonly v: FloatArray;
  readonly g: FloatArray;
  readonly kc: FloatArray;
  readonly vc: FloatArray;
  readonly kSlc?: FloatArray | undefined;
  readonly vSlc?: FloatArray | undefined;
  readonly kWin?: FloatArray | undefined;
  readonly vWin?: FloatArray | undefined;
}

export interface ForwardTask {
  readonly kind: 'forward';
  readonly config: NSAConfigOptions;
  readonly cuSeqlens: readonly number[];
  readonly arrays: ProblemArrays;
  readonly out: NsaReferenceOutputs;
  readonly rows: readonly (readonly [number, number])[];
}

export interface BackwardTask {
  readonly kind: 'backward';
  readonly config: NSAConfigOptions;
  readonly cuSeqlens: readonly number[];
  readonly arrays: ProblemArrays;
  readonly forward: NsaReferenceOutputs;
  readonly dOut: FloatArray;
  /** Row-disjoint gradients every thread writes in place. */
  readonly dq: Float64Array;
  readonly dg: Float64Array;
  readonly rows: readonly (readonly [number, number])[];
}

/** K/V gradients a backward task accumulates privately (other threads touch the same rows). */
export type PrivateKvGradients = Omit<BackwardAccumulators, 'dq' | 'dg'>;

export type RowTask = ForwardTask | BackwardTask;

export function problemFromTask(task: RowTask): NsaProblem {
  const config = new NSAConfig(task.config);
  const { arrays } = task;
  return {
    config,
    layout: packedLayout(config, task.cuSeqlens),
    inputs: {
      q: arrays.q,
      k: arrays.k,
      v: arrays.v,
      g: arrays.g,
      cuSeqlens: task.cuSeqlens,
      kSlc: arrays.kSlc,
      vSlc: arrays.vSlc,
      kWin: arrays.kWin,
      vWin: arrays.vWin,
    },
    kc: arrays.kc,
    vc: arrays.vc,
  };
}

export function runForwardTask(task: ForwardTask): void {
  const problem = problemFromTask(task);
  for (const [a, b] of task.rows) forwardRows(problem, a, b, task.out);
}

export function runBackwardTask(task: BackwardTask): PrivateKvGradients {
  const problem = problemFromTask(task);
  const { dq: _dq, dg: _dg, ...kv } = allocateAccumulators(problem);
  const acc: BackwardAccumulators = { ...kv, dq: task.dq, dg: task.dg };
  for (const [a, b] of task.rows) backwardRows(problem, task.forward, task.dOut, a, b, acc);
  return kv;
}

/** Splits rows [0, total) into `parts` interleaved lists of chunks, so early (cheap) and late rows mix. */
export function splitRows(total: number, parts: number, chunk: number): [number, number][][] {
  const lists: [number, number][][] = Array.from({ length: parts }, () => []);
  for (let start = 0, i = 0; start < total; start += chunk, i++) {
    lists[i % parts]!.push([start, Math.min(total, start + chunk)]);
  }
  return lists;
}
