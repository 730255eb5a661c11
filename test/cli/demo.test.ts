// `nsa demo` with tiny sizes: the check against the reference, the keys summary, the text picture and the PNG.

import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PNG } from 'pngjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { disposeBackends } from '../../src/backends/index.js';
import { cli, TINY, TINY_CONFIG } from './helpers.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nsa-demo-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
  await disposeBackends();
});

describe('nsa demo', () => {
  it('runs, checks rows against the reference, summarises keys and draws the selection', async () => {
    const r = await cli('demo', '--backend', 'cpu', ...TINY, ...TINY_CONFIG);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^backend {3}cpu/m);
    expect(r.stdout).toContain('NSAConfig(l=8, d=4');
    expect(r.stdout).toMatch(/^forward {3}[\d.]+ ms/m);
    expect(r.stdout).toMatch(/o: relative RMS error [\d.e+-]+, max abs .*: ok/);
    expect(r.stdout).toMatch(/block indices: 32 of 32 rows identical/);
    for (const branch of ['cmp', 'slc', 'win', 'total', 'full']) expect(r.stdout).toMatch(new RegExp(`^  ${branch} +[\\d,.]+ `, 'm'));
    expect(r.stdout).toContain('legend:');
    const rows = r.stdout.split('\n').filter((l) => /^ {2}t= *\d+ \|/.test(l));
    expect(rows).toHaveLength(8);
    expect(rows[0]).toMatch(/^ {2}t= +0 \|# {6}\|$/); // 7 blocks of 16 keys over T = 100; only block 0 at t = 0
    expect(rows[7]).toMatch(/^ {2}t=99 \|[#.]{7}\|$/);
  });

  it('takes the best backend when none is named, saying why cuda was passed over', async () => {
    const r = await cli('demo', ...TINY, ...TINY_CONFIG, '--preset', 'fla');
    expect(r.code, r.stderr).toBe(0);
    const warnings = r.stderr.split('\n').filter((l) => l !== '');
    expect(warnings.length).toBeLessThanOrEqual(1);
    if (warnings.length === 1) expect(warnings[0]).toMatch(/^nsa: cuda unavailable \(.+\); using cpu$/);
  });

  it('handles packed sequences and batches', async () => {
    const packed = await cli('demo', '--backend', 'cpu', '--seqlens', '30,120,7', '--heads', '2', '--head-dim', '8', '--value-dim', '8', ...TINY_CONFIG);
    expect(packed.code, packed.stderr).toBe(0);
    expect(packed.stdout).toContain('sequence 1 of 3 (T = 120');
    const batched = await cli('demo', '--backend', 'cpu', '--seqlen', '50', '--batch', '2', '--heads', '2', '--head-dim', '8', '--value-dim', '8', ...TINY_CONFIG);
    expect(batched.code, batched.stderr).toBe(0);
    expect(batched.stdout).toContain('q [1, 100, 2, 8]');
    expect(batched.stdout).toContain('2 packed sequences of 50 tokens each (N = 100)');
  });

  it('writes a valid PNG atomically with --png', async () => {
    const file = join(dir, 'selection.png');
    const r = await cli('demo', '--backend', 'cpu', ...TINY, ...TINY_CONFIG, '--png', file);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`wrote ${file}`);
    const bytes = await readFile(file);
    expect(Array.from(bytes.subarray(0, 8))).toEqual([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    const png = PNG.sync.read(bytes);
    expect(png.width).toBeGreaterThanOrEqual(7);
    expect(png.height).toBeGreaterThanOrEqual(100);
    expect(await readdir(dir)).toEqual(['selection.png']); // no temporary file left behind
  });

  it('exits 2 when the PNG cannot be written', async () => {
    const r = await cli('demo', '--backend', 'cpu', ...TINY, ...TINY_CONFIG, '--png', join(dir, 'missing', 'x.png'));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa demo: cannot write .*x\.png: no such file or directory$/m);
  });
});
