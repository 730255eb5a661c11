// Help, usage errors and config errors: exit codes and one-line messages, never a stack trace.

import { afterAll, describe, expect, it } from 'vitest';
import { disposeBackends } from '../../src/backends/index.js';
import { cli } from './helpers.js';

afterAll(disposeBackends);

const COMMAND_FLAGS: Record<string, string[]> = {
  demo: ['--backend', '--preset', '--compress-block', '--select-count', '--window', '--phi', '--seqlen', '--seqlens', '--dtype', '--seed', '--png'],
  check: ['--backend', '--preset', '--compress-stride', '--select-block', '--heads', '--kv-heads', '--head-dim', '--value-dim', '--backward'],
  bench: ['--backend', '--lengths', '--presets', '--heads', '--kv-heads', '--backward', '--warmup', '--iters', '--json', '--no-torch', '--decode', '--batches', '--contexts'],
  run: ['--in', '--out', '--backend', '--preset', '--window', '--out-dtype'],
};

describe('nsa --help', () => {
  it('lists the commands', async () => {
    const r = await cli('--help');
    expect(r.code).toBe(0);
    for (const name of Object.keys(COMMAND_FLAGS)) expect(r.stdout).toContain(name);
  });

  for (const [name, flags] of Object.entries(COMMAND_FLAGS)) {
    it(`${name} --help exits 0 and names its flags`, async () => {
      const r = await cli(name, '--help');
      expect(r.code).toBe(0);
      expect(r.stderr).toBe('');
      expect(r.stdout).toContain(`Usage: nsa ${name}`);
      for (const flag of flags) expect(r.stdout, flag).toContain(flag);
    });
  }

  it('--version prints the package version', async () => {
    const r = await cli('--version');
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toMatch(/^\d+\.\d+\.\d+/);
  });
});

describe('usage errors exit 2 with one line', () => {
  it('an unknown flag', async () => {
    const r = await cli('demo', '--frobnicate');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa demo: unknown option '--frobnicate'/);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('an unknown command', async () => {
    const r = await cli('demoo');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa: unknown command 'demoo'/);
  });

  it('a bad value', async () => {
    const r = await cli('demo', '--seqlen', 'lots');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa demo: option '--seqlen <T>' argument 'lots' is invalid/);
  });

  it('a value outside the choices', async () => {
    const r = await cli('check', '--backend', 'tpu');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('cpu');
  });

  it('a missing required option', async () => {
    const r = await cli('check');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa check: required option '--backend <name>'/);
  });

  it('--seqlen with --seqlens', async () => {
    const r = await cli('demo', '--seqlen', '64', '--seqlens', '10,20');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa demo: .*cannot be used with/);
  });

  it('--seqlens with --batch 2', async () => {
    const r = await cli('demo', '--seqlens', '10,20', '--batch', '2');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa demo: --seqlens packs .* --batch must be 1/m);
  });
});

describe('invalid configs exit 2 and name the field', () => {
  it('-d 3 -l 8', async () => {
    const r = await cli('demo', '-d', '3', '-l', '8', '--seqlen', '64');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa demo: invalid NSA config:/m);
    expect(r.stderr).toContain('compressStride (-d, --compress-stride): must divide compressBlock (l = 8) (got 3)');
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
  });

  it('heads not divisible by kv heads', async () => {
    const r = await cli('check', '--backend', 'cpu', '--heads', '6', '--kv-heads', '4');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('heads (--heads): must be divisible by kvHeads');
  });

  it('in bench, before anything is timed', async () => {
    const r = await cli('bench', '--backend', 'cpu', '--lengths', '64', '-l', '24', '--select-block', '16');
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('compressBlock (-l, --compress-block)');
    expect(r.stdout).toBe('');
  });
});
