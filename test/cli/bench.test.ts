// `nsa bench` on the cpu with tiny lengths: the table, the JSON report, and why torch is skipped.

import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { disposeBackends } from '../../src/backends/index.js';
import { denseFlops, shellQuote } from '../../src/cli/bench-report.js';
import { NSAConfig } from '../../src/config/nsa-config.js';
import { cli } from './helpers.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nsa-bench-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
  await disposeBackends();
});

describe('nsa bench', () => {
  it('prints a table per preset and length', async () => {
    const r = await cli('bench', '--backend', 'cpu', '--lengths', '64,128', '--iters', '1', '--warmup', '0', '--heads', '2', '--head-dim', '16', '--value-dim', '16');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^preset +T +NSA ms +dense ms +NSA vs dense +SDPA ms +NSA vs SDPA +dense\/SDPA throughput$/m);
    for (const preset of ['fla', 'paper']) {
      for (const T of ['64', '128']) expect(r.stdout).toMatch(new RegExp(`^${preset} +${T} +[\\d.]+ `, 'm'));
    }
    expect(r.stderr).toMatch(/^nsa bench: torch SDPA skipped: the backend is cpu/m);
  });

  it('writes every number and the command line with --json', async () => {
    const file = join(dir, 'bench.json');
    const argv = ['bench', '--backend', 'cpu', '--lengths', '96', '--presets', 'paper', '--iters', '2', '--warmup', '0', '--heads', '2', '--head-dim', '8', '--value-dim', '8', '--no-torch', '--json', file];
    const r = await cli(...argv);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe(''); // --no-torch: no line about torch
    const report = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
    expect(report['command']).toBe(`nsa ${argv.join(' ')}`);
    expect(report['device']).toMatch(/^cpu/);
    const results = report['results'] as { preset: string; seqlen: number; nsa: { medianMs: number; samplesMs: number[] } }[];
    expect(results).toHaveLength(1);
    expect(results[0]!.preset).toBe('paper');
    expect(results[0]!.seqlen).toBe(96);
    expect(results[0]!.nsa.samplesMs).toHaveLength(2);
    expect(results[0]!.nsa.medianMs).toBeGreaterThan(0);
    expect((report['settings'] as { inputs: string }).inputs).toBe('random');
  });

  it('times smooth inputs with --inputs smooth and says so, and refuses a pattern it does not know', async () => {
    const args = ['bench', '--backend', 'cpu', '--lengths', '64', '--presets', 'fla', '--iters', '1', '--warmup', '0', '--heads', '2', '--head-dim', '8', '--value-dim', '8', '--no-torch'];
    const r = await cli(...args, '--inputs', 'smooth');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^shapes .*; smooth inputs; /m);
    expect(r.stdout).toMatch(/^fla +64 +[\d.]+ /m);
    const bad = await cli(...args, '--inputs', 'sorted');
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--inputs.*sorted.*random, smooth/);
  });

  it('quotes the command line as a shell would need it', () => {
    expect(shellQuote('--lengths')).toBe('--lengths');
    expect(shellQuote('8k,16k')).toBe('8k,16k');
    expect(shellQuote("it's here")).toBe(`'it'\\''s here'`);
  });

  it('counts dense causal FLOPs over the causal half', () => {
    const config = new NSAConfig({ heads: 64, kvHeads: 4, headDim: 128, valueDim: 128 });
    expect(denseFlops(config, 1, 8192, false)).toBe(2 * 64 * ((8192 * 8193) / 2) * 256);
    expect(denseFlops(config, 1, 8192, true)).toBe(3.5 * denseFlops(config, 1, 8192, false));
  });
});
