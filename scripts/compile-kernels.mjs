#!/usr/bin/env node
// Compile check of every CUDA kernel source (src/backends/cuda/kernels/*.cu, or the folder given as argument) with nvcc, for sm_80 and sm_90a,
// two compiles at a time: one line per file, variant and arch, nvcc's own errors on failure, and a non-zero exit
// when any fails. Without nvcc it says so and exits 0 (CI without CUDA).
//
// Kernels that need defines to compile on their own list them in their leading comment block, one line per
// variant, each compiled separately:
//   // nvcc-check: -DHEAD_DIM=64 -DBLOCK=32
//   // nvcc-check: -DHEAD_DIM=128 -DBLOCK=64
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findNvcc, firstLines, indent, runCommand } from './nvcc.mjs';

const ARCHS = [
  { name: 'sm_80', gencode: '-gencode=arch=compute_80,code=sm_80' },
  { name: 'sm_90a', gencode: '-gencode=arch=compute_90a,code=sm_90a' },
];
const PARALLEL = 2;
const MAX_ERROR_LINES = 40;
// An optional argument names another folder of .cu files (used to test this script).
const kernelsDir = process.argv[2] ?? fileURLToPath(new URL('../src/backends/cuda/kernels/', import.meta.url));

/** The flag sets of the `// nvcc-check:` lines in the file's leading comment block; one empty set when none. */
function checkVariants(source) {
  const variants = [];
  for (const line of source.split('\n')) {
    const trimmed = line.trim();
    if (trimmed === '') continue;
    if (!trimmed.startsWith('//')) break;
    const match = /^\/\/\s*nvcc-check:(.*)$/.exec(trimmed);
    if (match) variants.push(match[1].trim().split(/\s+/).filter((f) => f !== ''));
  }
  return variants.length > 0 ? variants : [[]];
}

async function main() {
  const nvcc = findNvcc();
  if (nvcc === undefined) {
    console.log('compile-kernels: skipped: nvcc not found (looked in PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)');
    return 0;
  }
  const files = existsSync(kernelsDir) ? readdirSync(kernelsDir).filter((f) => f.endsWith('.cu')).sort() : [];
  if (files.length === 0) {
    console.log(`compile-kernels: no .cu files in ${kernelsDir}`);
    return 0;
  }
  const scratch = mkdtempSync(join(tmpdir(), 'nsa-nvcc-'));
  const jobs = files.flatMap((file) =>
    checkVariants(readFileSync(join(kernelsDir, file), 'utf8')).flatMap((flags) => ARCHS.map((arch) => ({ file, flags, arch }))),
  );
  let failed = 0;
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const job = jobs[next++];
      const out = join(scratch, `${basename(job.file, '.cu')}-${next}.cubin`);
      const args = ['--cubin', job.arch.gencode, '-std=c++17', ...job.flags, '-o', out, join(kernelsDir, job.file)];
      const started = Date.now();
      const { code, output } = await runCommand(nvcc, args);
      const label = `${job.file} [${job.arch.name}]${job.flags.length > 0 ? ` ${job.flags.join(' ')}` : ''}`;
      const seconds = ((Date.now() - started) / 1000).toFixed(1);
      if (code === 0) {
        console.log(`ok    ${label} (${seconds}s)`);
        if (output.trim() !== '') console.log(indent(output));
      } else {
        failed++;
        console.log(`FAIL  ${label} (${seconds}s): ${nvcc} ${args.join(' ')}\n${indent(firstLines(output, MAX_ERROR_LINES))}`);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, jobs.length) }, worker));
  rmSync(scratch, { recursive: true, force: true });
  console.log(`compile-kernels: ${jobs.length - failed} of ${jobs.length} compiles passed (${nvcc})`);
  return failed === 0 ? 0 : 1;
}

process.exitCode = await main();
