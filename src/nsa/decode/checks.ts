// Validation shared by every backend's KV cache: appends and decode queries are checked whole before anything
// changes, so a refused call leaves the cache as it was.

import type { NSAConfig } from '../../config/nsa-config.js';
import { CacheFullError, InputValueError, ShapeError } from '../../errors.js';
import type { Tensor } from '../../tensor/tensor.js';
import { expectFinite, expectFloatTensor, expectShape } from '../validate.js';
import type { DecodeQuery } from './types.js';

export interface CacheView {
  readonly config: NSAConfig;
  readonly sequenceCount: number;
  readonly maxTokens: number;
  length(sequence: number): number;
}

export function checkSequence(cache: CacheView, sequence: unknown, what: string): asserts sequence is number {
  if (typeof sequence !== 'number' || !Number.isInteger(sequence) || sequence < 0 || sequence >= cache.sequenceCount) {
    throw new InputValueError(
      `${what}: no sequence ${String(sequence)} in this cache (it holds ${cache.sequenceCount}: 0 .. ${cache.sequenceCount - 1})`,
    );
  }
}

/** Checks an append; returns the number of tokens it adds. */
export function checkAppend(cache: CacheView, sequence: number, k: Tensor, v: Tensor): number {
  checkSequence(cache, sequence, 'append');
  const { kvHeads: H, headDim: dk, valueDim: dv } = cache.config;
  expectFloatTensor(k, 'k', 3);
  expectFloatTensor(v, 'v', 3);
  const T = k.shape[0]!;
  if (T < 1) throw new ShapeError(`k: an append needs at least one token (axis 0), got ${T}`);
  expectShape(k, 'k', [T, H, dk], 'T, H, Dk of the cache');
  expectShape(v, 'v', [T, H, dv], 'the tokens of k, H, Dv of the cache');
  expectFinite(k, 'k');
  expectFinite(v, 'v');
  const length = cache.length(sequence);
  if (length + T > cache.maxTokens) {
    throw new CacheFullError(
      `append: sequence ${sequence} holds ${length} tokens; ${T} more would pass its capacity of ${cache.maxTokens} ` +
        '(create the cache with a larger maxTokens)',
    );
  }
  return T;
}

/** Checks decode queries; returns each request's query count. */
export function checkDecode(cache: CacheView, queries: readonly DecodeQuery[]): number[] {
  if (!Array.isArray(queries) || queries.length === 0) throw new ShapeError('decode: expected a non-empty array of queries');
  const { heads: Hq, headDim: dk } = cache.config;
  return queries.map((query, i) => {
    const where = `queries[${i}]`;
    checkSequence(cache, query.sequence, where);
    expectFloatTensor(query.q, `${where}.q`, 3);
    expectFloatTensor(query.g, `${where}.g`, 3);
    const Tq = query.q.shape[0]!;
    expectShape(query.q, `${where}.q`, [Tq, Hq, dk], 'Tq, Hq, Dk of the cache');
    expectShape(query.g, `${where}.g`, [Tq, Hq, 3], 'the queries of q, Hq, 3 gates');
    const length = cache.length(query.sequence);
    if (Tq < 1 || Tq > length) {
      throw new ShapeError(
        `${where}.q: ${Tq} queries for the last positions of sequence ${query.sequence}, which holds ${length} tokens ` +
          '(append the queries\u2019 keys and values first)',
      );
    }
    expectFinite(query.q, `${where}.q`);
    expectFinite(query.g, `${where}.g`);
    return Tq;
  });
}
