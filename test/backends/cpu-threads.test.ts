// The CPU backend's worker-thread path against its calling-thread path. Workers need the compiled worker.js beside
// worker-pool.js, so this test compiles the package (tsc with tsconfig.build.json, as `npm run build` does) into a
// private folder and imports it from there: a build of its own cannot race the one test/cli/bin.test.ts makes in
// dist/. Skipped, saying why, when the package does not compile here.

import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import type * as Nsa from '../../src/index.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
// Inside node_modules so that the compiled files resolve the package's dependencies as dist/ would.
const CACHE = join(ROOT, 'node_modules', '.cache');

let outDir: string | undefined;
let nsa: typeof Nsa | undefined;
let buildProblem: string | undefined;

beforeAll(async () => {
  try {
    mkdirSync(CACHE, { recursive: true });
    outDir = mkdtempSync(join(CACHE, 'nsa-cpu-threads-'));
    const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
    execFileSync(process.execPath, [tsc, '-p', 'tsconfig.build.json', '--outDir', outDir], { cwd: ROOT, stdio: 'pipe', timeout: 170_000 });
    nsa = (await import(pathToFileURL(join(outDir, 'index.js')).href)) as typeof Nsa;
  } catch (e) {
    const err = e as { stdout?: Buffer; stderr?: Buffer; message?: string };
    const output = `${err.stdout?.toString() ?? ''}${err.stderr?.toString() ?? ''}`.trim() || (err.message ?? String(e));
    buildProblem = `the package did not compile (tsc -p tsconfig.build.json): ${output.split('\n').slice(-5).join(' | ')}`;
  }
}, 180_000);

afterAll(async () => {
  await nsa?.disposeBackends();
  if (outDir !== undefined) rmSync(outDir, { recursive: true, force: true });
});

function built(ctx: TestContext): typeof Nsa {
  if (nsa === undefined) {
    console.warn(`skipping the worker-thread test: ${buildProblem ?? 'the built package was not loaded'}`);
    ctx.skip();
  }
  return nsa!;
}

/** A packed problem with every branch in play: 3 sequences (one shorter than l), G = 4, dk != dv. */
function packedProblem(m: typeof Nsa): { inputs: Nsa.NsaInputs; config: Nsa.NSAConfig } {
  const config = new m.NSAConfig({ compressBlock: 8, compressStride: 4, selectBlock: 16, selectCount: 4, window: 24, heads: 8, kvHeads: 2, headDim: 16, valueDim: 12 });
  const cuSeqlens = [0, 5, 140, 301];
  const N = cuSeqlens[cuSeqlens.length - 1]!;
  const inputs = {
    q: m.Tensor.randn([1, N, 8, 16], 'f32', 1),
    k: m.Tensor.randn([1, N, 2, 16], 'f32', 2),
    v: m.Tensor.randn([1, N, 2, 12], 'f32', 3),
    g: m.Tensor.uniform([1, N, 8, 3], 'f32', 4),
    kWin: m.Tensor.randn([1, N, 2, 16], 'bf16', 5),
    vWin: m.Tensor.randn([1, N, 2, 12], 'bf16', 6),
    cuSeqlens,
  };
  return { inputs, config };
}

function bits(t: Nsa.Tensor): number[] {
  return Array.from(t.data as ArrayLike<number>);
}

describe('the cpu backend on worker threads (from the compiled package)', () => {
  it('says it uses worker threads', (ctx) => {
    const m = built(ctx);
    const threaded = new m.CpuBackend({ threads: 2, minParallelWork: 0 });
    const single = new m.CpuBackend({ threads: 1 });
    try {
      expect(threaded.description).toContain('2 worker threads');
      expect(single.description).toContain('calling thread');
    } finally {
      threaded.dispose();
      single.dispose();
    }
  });

  it('gives the same outputs and gradients as the calling thread', async (ctx) => {
    const m = built(ctx);
    const { inputs, config } = packedProblem(m);
    const threaded = new m.CpuBackend({ threads: 2, minParallelWork: 0 });
    const single = new m.CpuBackend({ threads: 1 });
    try {
      // f64 outputs show every bit of the double accumulation, not just what survives rounding to f32.
      const a = await m.nsaForward(inputs, config, { backend: threaded, outputDType: 'f64' });
      const b = await m.nsaForward(inputs, config, { backend: single, outputDType: 'f64' });
      // Forward rows are computed by one thread each: bit for bit the same.
      for (const name of ['o', 'oCmp', 'oSlc', 'oWin', 'lseCmp', 'lseSlc', 'lseWin', 'blockIndices'] as const) {
        expect(bits(a[name]), name).toEqual(bits(b[name]));
      }
      const dO = m.Tensor.randn(a.o.shape, 'f32', 9);
      const ga = await a.backward(dO);
      const gb = await b.backward(dO);
      // dq and dg are row-disjoint: the same bits.
      for (const name of ['dq', 'dg'] as const) expect(bits(ga[name]), name).toEqual(bits(gb[name]));
      // K/V gradients are sums over the query rows; each thread sums its rows, then the partial sums are added, so
      // the order of additions (not the result to double precision) differs from one thread's.
      for (const name of ['dk', 'dv', 'dkWin', 'dvWin'] as const) {
        const x = ga[name]!.toFloat64();
        const y = gb[name]!.toFloat64();
        let num = 0;
        let den = 0;
        for (let i = 0; i < y.length; i++) {
          num += (x[i]! - y[i]!) ** 2;
          den += y[i]! ** 2;
        }
        expect(den, `${name} is not all zero`).toBeGreaterThan(0);
        expect(Math.sqrt(num / den), `${name}: relative RMS difference`).toBeLessThan(1e-13);
      }
      // The f32 results people get by default agree bit for bit here.
      const fa = await m.nsaForward(inputs, config, { backend: threaded });
      const fb = await m.nsaForward(inputs, config, { backend: single });
      expect(bits(fa.o)).toEqual(bits(fb.o));
    } finally {
      threaded.dispose();
      single.dispose();
    }
  });

  it('is deterministic run to run', async (ctx) => {
    const m = built(ctx);
    const { inputs, config } = packedProblem(m);
    const threaded = new m.CpuBackend({ threads: 2, minParallelWork: 0 });
    try {
      const a = await m.nsaForward(inputs, config, { backend: threaded, outputDType: 'f64' });
      const dO = m.Tensor.randn(a.o.shape, 'f32', 9);
      const first = await a.backward(dO);
      const second = await (await m.nsaForward(inputs, config, { backend: threaded, outputDType: 'f64' })).backward(dO);
      for (const name of ['dq', 'dk', 'dv', 'dg', 'dkWin', 'dvWin'] as const) expect(bits(second[name]!), name).toEqual(bits(first[name]!));
    } finally {
      threaded.dispose();
    }
  });
});
