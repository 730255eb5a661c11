// `nsa bench --decode` on the cpu with tiny caches: the table, the JSON report, the flags it refuses, and which
// (B, S) pairs it plans on a GPU with a given amount of memory.

import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { disposeBackends, type Backend } from '../../src/backends/index.js';
import { GPU_DECODE_DEFAULTS, planDecodeShapes } from '../../src/cli/commands/bench-decode.js';
import { NSAConfig } from '../../src/config/nsa-config.js';
import { decodeBytesPerHead } from '../../src/nsa/decode/types.js';
import { cli } from './helpers.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nsa-bench-decode-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
  await disposeBackends();
});

const TINY = ['--backend', 'cpu', '--heads', '2', '--kv-heads', '1', '--head-dim', '8', '--value-dim', '8', '--warmup', '0', '--iters', '1'];
const HEADER = /^preset +B +S +NSA ms +NSA BW +dense ms +dense BW +BW unit +dense\/NSA time +dense\/NSA bytes$/m;

describe('nsa bench --decode', () => {
  it('prints a row per preset, batch and context with the bandwidths and both ratios', async () => {
    const r = await cli('bench', '--decode', '--batches', '1,2', '--contexts', '100,300', ...TINY);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/^backend +cpu/m);
    expect(r.stdout).toMatch(/^shapes +Hq = 2, H = 1, Dk = 8, Dv = 8; cache f32;/m);
    expect(r.stdout).toMatch(HEADER);
    const num = '[\\d.]+';
    for (const preset of ['fla', 'paper']) {
      for (const B of ['1', '2']) {
        for (const S of ['100', '300']) {
          const row = `^${preset} +${B} +${S} +${num} +${num} +${num} +${num} +[GT]B/s +${num}x +${num}x$`;
          expect(r.stdout, `${preset} B=${B} S=${S}`).toMatch(new RegExp(row, 'm'));
        }
      }
    }
    // The model's ratio: dense bytes / NSA bytes, the same for every batch size.
    const model = (preset: 'fla' | 'paper', S: number): string => {
      const bytes = decodeBytesPerHead(NSAConfig.preset(preset, { heads: 2, kvHeads: 1, headDim: 8, valueDim: 8 }), S, 4);
      return `${(bytes.dense / bytes.nsa).toFixed(2)}x`;
    };
    expect(r.stdout).toMatch(new RegExp(`^paper +2 +300 .* ${model('paper', 300)}$`, 'm'));
    expect(r.stdout).toMatch(new RegExp(`^fla +1 +100 .* ${model('fla', 100)}$`, 'm'));
  });

  it('writes the rows, the device and the command line with --json', async () => {
    const file = join(dir, 'decode.json');
    const argv = ['bench', '--decode', '--batches', '3', '--contexts', '200', '--presets', 'paper', ...TINY, '--iters', '2', '--json', file];
    const r = await cli(...argv);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`wrote ${file}`);
    const report = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
    expect(report['command']).toBe(`nsa ${argv.join(' ')}`);
    expect(report['device']).toMatch(/^cpu/);
    expect(report['mode']).toBe('decode');
    const results = report['results'] as {
      preset: string;
      batch: number;
      context: number;
      cacheBytes: number;
      nsa: { medianMs: number; samplesMs: number[] };
      dense: { medianMs: number };
      nsaStepBytes: number;
      denseStepBytes: number;
      nsaBytesPerSecond: number;
      denseOverNsaBytes: number;
    }[];
    expect(results).toHaveLength(1);
    const row = results[0]!;
    expect([row.preset, row.batch, row.context]).toEqual(['paper', 3, 200]);
    expect(row.nsa.samplesMs).toHaveLength(2);
    expect(row.nsa.medianMs).toBeGreaterThan(0);
    expect(row.dense.medianMs).toBeGreaterThan(0);
    expect(row.cacheBytes).toBeGreaterThan(3 * 200 * 16 * 4 - 1);
    const perHead = decodeBytesPerHead(NSAConfig.paper({ heads: 2, kvHeads: 1, headDim: 8, valueDim: 8 }), 200, 4);
    expect(row.nsaStepBytes).toBe(3 * perHead.nsa);
    expect(row.denseStepBytes).toBe(3 * perHead.dense);
    expect(row.nsaBytesPerSecond).toBeCloseTo(row.nsaStepBytes / (row.nsa.medianMs * 1e-3), 3);
    expect(row.denseOverNsaBytes).toBeCloseTo(perHead.dense / perHead.nsa, 12);
  });

  it('times a learned phi too (random parameters)', async () => {
    const r = await cli('bench', '--decode', '--batches', '1', '--contexts', '130', '--presets', 'paper', '--phi', 'linear', ...TINY);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^paper +1 +130 /m);
  });

  for (const [flag, ...value] of [['--backward'], ['--lengths', '1k'], ['--batch', '2'], ['--dtype', 'bf16'], ['--inputs', 'smooth']] as const) {
    it(`refuses ${flag} with exit 2`, async () => {
      const r = await cli('bench', '--decode', flag, ...value, ...TINY);
      expect(r.code).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(new RegExp(`^nsa bench: --decode cannot be used with ${flag}: `));
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    });
  }

  it('refuses --batches and --contexts without --decode', async () => {
    for (const flag of ['--batches', '--contexts']) {
      const r = await cli('bench', flag, '4', ...TINY);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`^nsa bench: ${flag} applies to --decode only`));
    }
  });

  it('refuses a bad batch list', async () => {
    const r = await cli('bench', '--decode', '--batches', '1,0', ...TINY);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa bench: option '--batches <list>' argument '1,0' is invalid/);
  });

  it('fails with a message for a backend that cannot decode here', async () => {
    const r = await cli('bench', '--decode', '--backend', 'cuda', '--batches', '1', '--contexts', '100');
    expect([1, 2]).toContain(r.code);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^nsa bench: .*cuda/);
  });
});

describe('the decode plan', () => {
  const config = NSAConfig.paper({ heads: 64, kvHeads: 4, headDim: 128, valueDim: 128 });
  const gpu = (totalBytes: number): Backend => ({ name: 'cuda', ctx: { device: { totalBytes } } }) as unknown as Backend;
  const key = (s: { batch: number; context: number }): string => `${s.batch}x${s.context}`;

  it('times the default grid plus 1m at batch 1 on an 80 GiB GPU, skipping nothing', () => {
    const p = planDecodeShapes({}, GPU_DECODE_DEFAULTS, config, gpu(80 * 2 ** 30));
    expect(p.skipped).toEqual([]);
    expect(p.shapes.map(key)).toEqual(
      ['1x8192', '1x65536', '1x131072', '1x1048576', '8x8192', '8x65536', '8x131072', '64x8192', '64x65536', '64x131072'],
    );
  });

  it('skips the pairs whose cache would pass 60% of the device memory', () => {
    // 64 x 128k x 4 x 256 x 2 bytes x 1.2 = 19.2 GiB: over 60% of 24 GiB; 1 x 1m = 2.4 GiB fits.
    const p = planDecodeShapes({}, GPU_DECODE_DEFAULTS, config, gpu(24 * 2 ** 30));
    expect(p.skipped.map(key)).toEqual(['64x131072']);
    expect(p.shapes.map(key)).toContain('1x1048576');
  });

  it('takes the cross product of --batches and --contexts as given (no extra 1m)', () => {
    const p = planDecodeShapes({ batches: [1, 2], contexts: [8192] }, GPU_DECODE_DEFAULTS, config, gpu(80 * 2 ** 30));
    expect(p.shapes.map(key)).toEqual(['1x8192', '2x8192']);
  });
});
