// The ranked index walks' shared-memory span (InverseIndex): each chunk of tokens needs a counter for every block
// from block 0 of its first token's sequence to the last block any of its tokens may choose (its own), in global
// block numbers; rankedSpan must cover every chunk, or the kernels would index past their counters.
import { describe, expect, it } from 'vitest';
import { NSAConfig } from '../../src/index.js';
import { buildLayoutPlan } from '../../src/backends/cuda/nsa/layout-plan.js';
import { rankedSpan } from '../../src/backends/cuda/nsa/inverse-index.js';

/** The span by brute force: for each chunk, every token's own block against its chunk's first sequence's block 0. */
function bruteSpan(seqlens: readonly number[], selectBlock: number, chunk: number): number {
  const tokens: { seqFirstBlock: number; ownBlock: number }[] = [];
  let firstBlock = 0;
  for (const len of seqlens) {
    for (let t = 0; t < len; t++) tokens.push({ seqFirstBlock: firstBlock, ownBlock: firstBlock + Math.floor(t / selectBlock) });
    firstBlock += Math.ceil(len / selectBlock);
  }
  let span = 1;
  for (let t0 = 0; t0 < tokens.length; t0 += chunk) {
    const base = tokens[t0]!.seqFirstBlock;
    for (const tok of tokens.slice(t0, t0 + chunk)) span = Math.max(span, tok.ownBlock - base + 1);
  }
  return span;
}

describe('rankedSpan', () => {
  const cases: { seqlens: number[]; selectBlock: number; chunk: number }[] = [
    { seqlens: [65536], selectBlock: 64, chunk: 128 },
    { seqlens: [1000], selectBlock: 64, chunk: 128 },
    { seqlens: [1], selectBlock: 32, chunk: 128 },
    { seqlens: [100, 1, 300, 64, 5], selectBlock: 32, chunk: 128 },
    { seqlens: [129, 129, 129], selectBlock: 64, chunk: 128 },
    { seqlens: [5000, 70, 333], selectBlock: 128, chunk: 256 },
  ];
  for (const { seqlens, selectBlock, chunk } of cases) {
    it(`covers every chunk's blocks: l' = ${selectBlock}, chunks of ${chunk}, sequences [${seqlens.join(', ')}]`, () => {
      const config = new NSAConfig({ heads: 8, kvHeads: 2, headDim: 64, valueDim: 64, selectBlock, selectCount: 4 });
      const cuSeqlens = [0];
      for (const len of seqlens) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + len);
      const plan = buildLayoutPlan(config, cuSeqlens, 128, 32);
      expect(rankedSpan(plan, selectBlock, chunk)).toBe(bruteSpan(seqlens, selectBlock, chunk));
    });
  }

  it('is the whole sequence of blocks for a chunk ending a long sequence', () => {
    const config = new NSAConfig({ heads: 8, kvHeads: 2, headDim: 64, valueDim: 64 });
    const plan = buildLayoutPlan(config, [0, 65536], 128, 32);
    expect(rankedSpan(plan, 64, 128)).toBe(1024);
  });
});
