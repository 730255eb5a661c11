// nvcc for the kernel compile checks (compile-kernels.mjs, compile-configs.mjs): where to find it and how to run it.
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';

/** nvcc from PATH, $CUDA_HOME/bin or /usr/local/cuda/bin; undefined when none runs. */
export function findNvcc() {
  const candidates = ['nvcc'];
  if (process.env.CUDA_HOME) candidates.push(join(process.env.CUDA_HOME, 'bin', 'nvcc'));
  candidates.push('/usr/local/cuda/bin/nvcc');
  return candidates.find((c) => spawnSync(c, ['--version'], { stdio: 'ignore' }).status === 0);
}

/** Runs `command` with `args`; resolves to its exit code and its stdout and stderr together. */
export function runCommand(command, args) {
  return new Promise((resolve) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (d) => (output += d));
    child.stderr.on('data', (d) => (output += d));
    child.on('error', (e) => resolve({ code: -1, output: String(e) }));
    child.on('close', (code) => resolve({ code, output }));
  });
}

/** The first n lines of text, and how many more there were. */
export function firstLines(text, n) {
  const lines = text.trimEnd().split('\n');
  return lines.length <= n ? text : `${lines.slice(0, n).join('\n')}\n... (${lines.length - n} more lines)`;
}

export function indent(text) {
  return text.trimEnd().split('\n').map((l) => `      ${l}`).join('\n');
}
