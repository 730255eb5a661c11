// The built executable end to end: `npm run build`, then `node dist/cli/main.js ...` in a child process.
// Skipped, saying why, when dist/ cannot be built here.

import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it, type TestContext } from 'vitest';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const MAIN = fileURLToPath(new URL('../../dist/cli/main.js', import.meta.url));

interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

function run(file: string, args: readonly string[], timeout: number): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(file, args, { cwd: ROOT, timeout, encoding: 'utf8' }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === 'number' ? error.code : -1;
      resolve({ code, stdout, stderr });
    });
  });
}

let buildProblem: string | undefined;

beforeAll(async () => {
  const built = await run('npm', ['run', 'build'], 170_000);
  if (built.code !== 0) buildProblem = `npm run build failed (exit ${built.code}): ${(built.stdout + built.stderr).trim().split('\n').slice(-5).join(' | ')}`;
}, 180_000);

function requireBuild(ctx: TestContext): void {
  if (buildProblem !== undefined) {
    console.warn(`skipping the built-bin test: ${buildProblem}`);
    ctx.skip();
  }
}

describe('the built nsa executable', () => {
  it('starts with a node shebang', async (ctx) => {
    requireBuild(ctx);
    expect((await readFile(MAIN, 'utf8')).split('\n', 1)[0]).toBe('#!/usr/bin/env node');
  });

  it('is executable itself (npx nsa runs the file directly)', async (ctx) => {
    requireBuild(ctx);
    const r = await run(MAIN, ['--help'], 30_000);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('demo');
  });

  it('runs the demo end to end', async (ctx) => {
    requireBuild(ctx);
    const r = await run(process.execPath, [MAIN, 'demo', '--seqlen', '300', '--heads', '2', '--head-dim', '16', '--value-dim', '16'], 60_000);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('check against the float64 reference');
    expect(r.stdout).toMatch(/^ {2}t=299 \|/m);
  });

  it('sets the exit code of a usage error', async (ctx) => {
    requireBuild(ctx);
    const r = await run(process.execPath, [MAIN, 'demo', '--no-such-flag'], 30_000);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa demo: unknown option '--no-such-flag'/);
  });
});
