// The block-selection GPU tests' comparisons (test/gpu/nsa-select*.test.ts): the blocks a forward chooses under each
// form's tuning, bit for bit against a baseline form's, the baseline's checked by the float64 reference's scores.

import { expect } from 'vitest';
import { NSAConfig } from '../../src/config/nsa-config.js';
import { nsaReferenceForward } from '../../src/reference/nsa-forward.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { randomInputs } from '../../src/nsa/random-inputs.js';
import { referenceInputs } from './gpu-inputs.js';
import { type BackendPool, type Case, checkSelection, nextTurn, packedOffsets } from './gpu-forward.js';

/**
 * The group-centric forward's block indices on `pool`'s backend for `env`, then a turn of the event loop: each
 * variant compiles its kernels synchronously, and vitest's RPC calls time out if several run back to back without one.
 */
export async function selectedBlocks(pool: BackendPool, inputs: ReturnType<typeof randomInputs>, config: NSAConfig, env: Record<string, string>): Promise<number[]> {
  const blocks = Array.from((await pool.withEnv('group', env, (backend) => nsaForward(inputs, config, { backend }))).blockIndices.data);
  await nextTurn();
  return blocks;
}

/**
 * For each case (inputs seeded seed + its index): the blocks chosen under every variant's settings must be those
 * chosen under `baseline`, bit for bit; the baseline's are checked by the reference's scores (rows whose choice
 * differs only among near-ties are counted and logged).
 */
export async function expectSameBlocks(pool: BackendPool, cases: Case[], seed: number, baseline: Record<string, string>, variants: [string, Record<string, string>][]): Promise<void> {
  for (const [i, c] of cases.entries()) {
    const config = new NSAConfig(c.options);
    const cuSeqlens = packedOffsets(c.seqlens);
    const inputs = randomInputs({ config, cuSeqlens, dtype: c.dtype, seed: seed + i });
    const expected = await selectedBlocks(pool, inputs, config, baseline);
    for (const [what, env] of variants) expect(await selectedBlocks(pool, inputs, config, env), `${c.name}: ${what}`).toEqual(expected);
    const ref = referenceInputs(inputs, cuSeqlens, config);
    const stats = checkSelection(config, ref, Int32Array.from(expected), nsaReferenceForward(config, ref).blockIndices);
    console.log(`${c.name}: selection differs from the reference in ${stats.differing} of ${stats.rows} rows`);
    await nextTurn();
  }
}
