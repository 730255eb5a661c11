// `nsa check`: every tensor against the float64 reference.

import { afterAll, describe, expect, it } from 'vitest';
import { disposeBackends, getBackend } from '../../src/backends/index.js';
import { cli, TINY, TINY_CONFIG } from './helpers.js';

afterAll(disposeBackends);

const cudaPresent = await getBackend('cuda').then(
  () => true,
  () => false,
);

describe('nsa check', () => {
  it('passes on cpu and prints every output tensor', async () => {
    const r = await cli('check', '--backend', 'cpu', ...TINY, ...TINY_CONFIG);
    expect(r.code, r.stderr).toBe(0);
    for (const name of ['o', 'o_cmp', 'o_slc', 'o_win', 'lse_cmp', 'lse_slc', 'lse_win']) {
      expect(r.stdout).toMatch(new RegExp(`^${name} +\\[1, 100, 4(, 8)?\\] +[\\d.e+-]+ +[\\d.e+-]+ .* ok$`, 'm'));
    }
    expect(r.stdout).toMatch(/^lse_cmp .* \d+ \/ 0 +ok$/m); // early queries see no compressed block: -inf, matched
    expect(r.stdout).toContain('block_indices: 200 of 200 (query, KV head) rows identical: ok');
    expect(r.stdout).toContain('all 8 tensors match');
  });

  it('checks the gradients with --backward, on packed bf16 inputs', async () => {
    const r = await cli('check', '--backend', 'cpu', '--seqlens', '20,70', '--heads', '4', '--kv-heads', '1', '--head-dim', '8', '--value-dim', '8', '--dtype', 'bf16', '--backward', ...TINY_CONFIG);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    for (const name of ['dq', 'dk', 'dv', 'dg']) expect(r.stdout).toMatch(new RegExp(`^${name} .* ok$`, 'm'));
    expect(r.stdout).toContain('all 12 tensors match');
  });

  it('checks a learned phi and its parameter gradients', async () => {
    const r = await cli('check', '--backend', 'cpu', '--seqlen', '40', '--heads', '2', '--kv-heads', '1', '--head-dim', '4', '--value-dim', '4', '--phi', 'mlp', '--backward', ...TINY_CONFIG);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^dphi_k\.w1 .* ok$/m);
  });

  it.skipIf(cudaPresent)('exits non-zero saying why cuda is unavailable', async () => {
    const r = await cli('check', '--backend', 'cuda', ...TINY);
    expect([1, 2]).toContain(r.code);
    expect(r.stderr).toMatch(/^nsa check: cuda backend unavailable: \S/);
    expect(r.stdout).toBe('');
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });
});
