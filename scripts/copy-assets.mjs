// Finishes the build after tsc: copies the files tsc does not emit into dist/ (the CUDA kernel sources,
// src/backends/cuda/kernels/*.cu and *.cuh, that the cuda backend compiles at run time with NVRTC; none is fine),
// and makes the `nsa` bin executable, since tsc writes it without the execute bit and `npx nsa` runs it directly.

import { chmod, copyFile, mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const ASSETS = [{ from: 'src/backends/cuda/kernels', to: 'dist/backends/cuda/kernels', extensions: ['.cu', '.cuh'] }];

async function listFiles(dir, extensions) {
  try {
    const entries = await readdir(dir, { withFileTypes: true });
    return entries.filter((e) => e.isFile() && extensions.some((ext) => e.name.endsWith(ext))).map((e) => e.name);
  } catch (err) {
    if (err.code === 'ENOENT') return [];
    throw err;
  }
}

let copied = 0;
for (const { from, to, extensions } of ASSETS) {
  const names = await listFiles(join(root, from), extensions);
  if (names.length === 0) continue;
  await mkdir(join(root, to), { recursive: true });
  for (const name of names) {
    await copyFile(join(root, from, name), join(root, to, name));
    copied++;
  }
}
const bin = join(root, 'dist/cli/main.js');
await chmod(bin, 0o755).catch((err) => {
  if (err.code !== 'ENOENT') throw err;
});
console.log(`copy-assets: ${copied} file(s) copied into dist/, ${'dist/cli/main.js'} executable`);
