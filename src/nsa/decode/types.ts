// Decoding: a KV cache per batch of sequences (raw K/V for selection and window, compressed K/V for the cmp
// branch, compressed incrementally as tokens arrive) and a decode step for a batch of queries.

import type { NSAConfig } from '../../config/nsa-config.js';
import type { BackendName, TimingOptions, TimingResult } from '../../backends/backend.js';
import type { Tensor } from '../../tensor/tensor.js';

export interface KvCacheOptions {
  /** Tokens per sequence the cache may hold; an append past it is a CacheFullError (default 2^22). */
  readonly maxTokens?: number;
  /** Storage grows in pages of this many tokens (default 1024). */
  readonly pageTokens?: number;
  /** Parameters of a learned phi (config.phi linear or mlp), as for nsaForward: [H, l, D], ... */
  readonly phiK?: Readonly<Record<string, Tensor>> | undefined;
  readonly phiV?: Readonly<Record<string, Tensor>> | undefined;
}

/** Queries for the last `q.shape[0]` positions of one sequence (1 for plain decoding, more for speculative). */
export interface DecodeQuery {
  readonly sequence: number;
  /** [Tq, Hq, Dk] */
  readonly q: Tensor;
  /** [Tq, Hq, 3]: the gates of cmp, slc, win. */
  readonly g: Tensor;
}

/** What a decode step returns without its branches' outputs (`{ branches: false }`). Rows in query order. */
export interface DecodeOutput {
  /** [Q, Hq, Dv]: the gated sum. */
  readonly o: Tensor;
  /** [Q, H, n] */
  readonly blockIndices: Tensor<'i32'>;
}

/** Rows in query order (all queries of the first request, then the next). */
export interface DecodeOutputs extends DecodeOutput {
  readonly oCmp: Tensor;
  readonly oSlc: Tensor;
  readonly oWin: Tensor;
  /** [Q, Hq] */
  readonly lseCmp: Tensor;
  readonly lseSlc: Tensor;
  readonly lseWin: Tensor;
}

export interface DecodeOptions {
  /**
   * Also return each branch's output and lse (default true). false returns the gated sum and the selected blocks
   * alone, the step a server runs: on CUDA the merges that end the step then skip three quarters of their stores.
   */
  readonly branches?: boolean;
}

export interface KvCache {
  readonly backend: BackendName;
  readonly config: NSAConfig;
  readonly sequenceCount: number;
  /** Bytes of storage the cache holds (raw and compressed K/V of every sequence, allocated pages included). */
  readonly bytes: number;
  /** Adds an empty sequence; returns its index. */
  addSequence(): number;
  /** Tokens held by a sequence. */
  length(sequence: number): number;
  /** Compressed tokens held by a sequence: max(0, floor((length - l) / d) + 1). */
  compressedLength(sequence: number): number;
  /** Appends k [T, H, Dk] and v [T, H, Dv] to a sequence (any T >= 1); all or nothing. */
  append(sequence: number, k: Tensor, v: Tensor): void;
  /** One decode step for a batch of queries: the gated sum, the selected blocks, and the branches' outputs and lse
   * unless `branches: false`. */
  decode(queries: readonly DecodeQuery[], options: DecodeOptions & { readonly branches: false }): Promise<DecodeOutput>;
  decode(queries: readonly DecodeQuery[], options?: DecodeOptions & { readonly branches?: true }): Promise<DecodeOutputs>;
  decode(queries: readonly DecodeQuery[], options: DecodeOptions): Promise<DecodeOutput | DecodeOutputs>;
  /** Appends `tokens` seeded random tokens (N(0, 1) keys and values) to a sequence, made where the cache lives. */
  appendRandom(sequence: number, tokens: number, seed: number): void;
  /**
   * Times one decode step with one random query per sequence (all sequences), kept where the cache computes:
   * NSA, or dense attention over every cached token (the baseline) with `dense: true`. The NSA step writes the
   * gated sum alone unless `branches: true` (DecodeOptions).
   */
  timeDecodeStep(options: TimingOptions & DecodeOptions & { readonly dense?: boolean }): Promise<TimingResult>;
  dispose(): void;
}

/**
 * Bytes a decode step must read per sequence and KV head at a cache of `length` tokens: the visible compressed
 * tokens, n selected blocks and the window, each a key and a value (NSA-SPEC.md, Decoding), in all (`nsa`) and by
 * branch, against every token for dense attention. Element size in bytes (2 for bf16).
 */
export function decodeBytesPerHead(
  config: NSAConfig,
  length: number,
  elementBytes: number,
): { nsa: number; dense: number; branches: { cmp: number; slc: number; win: number } } {
  const row = (config.headDim + config.valueDim) * elementBytes;
  const branches = {
    cmp: config.compressedLength(length) * row,
    slc: Math.min(length, config.selectCount * config.selectBlock) * row,
    win: Math.min(length, config.window) * row,
  };
  return { nsa: branches.cmp + branches.slc + branches.win, dense: length * row, branches };
}
