#!/usr/bin/env node
// Compile check of the kernels as the cuda backend builds them for a matrix of configs, with nvcc and no GPU:
// each config's NsaPrograms (dist/, so `npm run build` first) is asked for every kernel through a stand-in context
// that records the NVRTC options instead of compiling, and each distinct (kernel file, arch, options) is compiled
// with nvcc. compile-kernels.mjs (CI) compiles each source's fixed `nvcc-check` variants; this covers the options
// the host derives from a config (head dims, G, block sizes, dtype, the tuning for sm_90 and for sm_80), which is
// where a kernel change can break a shape no GPU test runs. The whole matrix is ~2500 compiles, ~25 minutes on two
// cores; narrow it with the options. A kernel getter added to NsaPrograms must be added to KERNELS below.
//
//   node scripts/compile-configs.mjs [--arch sm_90,sm_80] [--groups 1,2,3,4,8,16,24,64] [--shapes fla,paper,small,wide]
//                                    [--dtypes bf16,f16] [--parallel 2]
import { mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { NSAConfig } from '../dist/index.js';
import { kernelTuning, NsaPrograms } from '../dist/backends/cuda/nsa/programs.js';
import { findNvcc, firstLines, indent, runCommand } from './nvcc.mjs';

const { values: opts } = parseArgs({
  options: {
    arch: { type: 'string', default: 'sm_90,sm_80' },
    groups: { type: 'string', default: '1,2,3,4,8,16,24,64' },
    shapes: { type: 'string', default: 'fla,paper,small,wide' },
    dtypes: { type: 'string', default: 'bf16,f16' },
    parallel: { type: 'string', default: String(Math.min(2, availableParallelism())) },
  },
});

/** Block sizes: the two presets, small blocks (l' = 32 under 64-key tiles) and wide ones (l' = 128). */
const SHAPES = {
  fla: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 16, window: 512 },
  paper: { compressBlock: 32, compressStride: 16, selectBlock: 64, selectCount: 16, window: 512 },
  small: { compressBlock: 16, compressStride: 8, selectBlock: 32, selectCount: 8, window: 40 },
  wide: { compressBlock: 64, compressStride: 32, selectBlock: 128, selectCount: 4, window: 200 },
};
const HEAD_DIMS = [[64, 64], [128, 128], [192, 128], [128, 64], [64, 128]];
const ARCHS = { sm_90: [9, 0], sm_80: [8, 0] };

/** Every kernel an NsaPrograms builds (the forward's, the backward's, decode's), each requested once. */
const KERNELS = [
  (p) => p.compressMean,
  (p) => p.compressMeanBackward,
  ...['gemm', 'column_sums', 'scatter_rows'].map((fn) => (p) => p.phi(fn)),
  ...[0, 1, 2, 3, 4].map((mode) => (p) => p.flash(mode)),
  (p) => p.selectBlocks,
  (p) => p.allVisibleBlocks,
  (p) => p.selectedAttention,
  (p) => p.selectedUnion,
  ...['attend', 'attend_persistent', 'reduce'].map((fn) => (p) => p.fsa(fn)),
  ...['fused', 'cmp_win', 'select', 'slc', 'dense', 'combine_dense', 'compress_mean'].map((fn) => (p) => p.decode(fn)),
  ...[0, 1, 2, 3].flatMap((mode) => ['preprocess', 'dq', 'dkdv', 'reduce_splits', 'dq_cmp_win'].map((fn) => (p) => p.flashBackward(mode, fn))),
  ...['dq', 'dkdv', 'reduce', 'dq_reduce'].flatMap((fn) =>
    [[false, false], [true, false], [true, true]].map(([fusedDq, withMean]) => (p) => p.selectedBackward(fn, fusedDq, withMean))),
];

/** A context that records each module request (keyed by file, arch and options) instead of compiling it. */
function recordingContext(cc, jobs, label) {
  const hopper = cc[0] >= 9;
  return {
    device: { computeCapability: cc, sharedBytesPerSm: (hopper ? 228 : 164) * 1024, reservedSharedBytesPerBlock: 1024 },
    maxSharedBytesOptin: (hopper ? 227 : 163) * 1024,
    module(name, _source, { options = [], archSpecific = false } = {}) {
      const arch = `sm_${cc[0]}${cc[1]}${archSpecific ? 'a' : ''}`;
      const key = `${name} ${arch} ${options.join(' ')}`;
      if (!jobs.has(key)) jobs.set(key, { file: `${name}.cu`, arch, options, config: label });
      return { name };
    },
    kernel: (_module, fn) => ({ fn }),
  };
}

function collectJobs() {
  const jobs = new Map();
  const refused = new Set();
  const list = (s) => s.split(',').filter((x) => x !== '');
  for (const archName of list(opts.arch)) {
    const cc = ARCHS[archName];
    if (cc === undefined) throw new Error(`--arch: expected sm_90 or sm_80, got '${archName}'`);
    for (const shapeName of list(opts.shapes)) {
      const shape = SHAPES[shapeName];
      if (shape === undefined) throw new Error(`--shapes: expected some of ${Object.keys(SHAPES).join(', ')}, got '${shapeName}'`);
      for (const G of list(opts.groups).map(Number)) {
        for (const [dk, dv] of HEAD_DIMS) {
          for (const dtype of list(opts.dtypes)) {
            const kvHeads = G > 32 ? 1 : 2; // two KV heads where Hq stays within 64
            const config = new NSAConfig({ ...shape, heads: G * kvHeads, kvHeads, headDim: dk, valueDim: dv });
            const label = `${archName} ${shapeName} G=${G} dk=${dk} dv=${dv} ${dtype}`;
            const programs = new NsaPrograms(recordingContext(cc, jobs, label), config, dtype, kernelTuning(config, {}, cc));
            for (const request of KERNELS) {
              try {
                request(programs);
              } catch (e) {
                refused.add(`${label}: ${String(e.message).split('\n')[0]}`); // a config the backend refuses, by name
              }
            }
          }
        }
      }
    }
  }
  return { jobs: [...jobs.values()], refused: [...refused] };
}

async function main() {
  const nvcc = findNvcc();
  if (nvcc === undefined) {
    console.log('compile-configs: skipped: nvcc not found (looked in PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)');
    return 0;
  }
  let collected;
  try {
    collected = collectJobs();
  } catch (e) {
    console.error(`compile-configs: ${e.message}`);
    return 2;
  }
  const { jobs, refused } = collected;
  for (const line of refused) console.log(`refused by the backend (not compiled): ${line}`);
  console.log(`compile-configs: ${jobs.length} distinct compiles`);
  const kernelsDir = fileURLToPath(new URL('../src/backends/cuda/kernels/', import.meta.url));
  const scratch = mkdtempSync(join(tmpdir(), 'nsa-configs-'));
  const started = Date.now();
  let failed = 0;
  let next = 0;
  let done = 0;
  const worker = async (w) => {
    while (next < jobs.length) {
      const job = jobs[next++];
      const compute = job.arch.replace('sm_', 'compute_');
      const args = ['--cubin', `-gencode=arch=${compute},code=${job.arch}`, '-std=c++17', ...job.options, '-o', join(scratch, `${w}.cubin`), join(kernelsDir, job.file)];
      const { code, output } = await runCommand(nvcc, args);
      done++;
      if (code !== 0) {
        failed++;
        console.log(`FAIL  ${job.file} [${job.config}]: ${nvcc} ${args.join(' ')}\n${indent(firstLines(output, 20))}`);
      }
      if (done % 100 === 0) console.log(`${done} of ${jobs.length}, ${failed} failed, ${Math.round((Date.now() - started) / 1000)} s`);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Number(opts.parallel)) }, (_, w) => worker(w)));
  rmSync(scratch, { recursive: true, force: true });
  console.log(`compile-configs: ${jobs.length - failed} of ${jobs.length} compiles passed (${nvcc}, ${Math.round((Date.now() - started) / 1000)} s)`);
  return failed === 0 ? 0 : 1;
}

process.exitCode = await main();
