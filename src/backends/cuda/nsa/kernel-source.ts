// Kernel sources shipped with the package (src/backends/cuda/kernels, copied to dist by the build). The shared
// header is inlined into each source so the cubin cache key, a hash of the source, changes with the header too.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BackendUnavailableError } from '../../../errors.js';

const KERNEL_DIR = new URL('../kernels/', import.meta.url);
const INCLUDE = /^#include "([A-Za-z0-9_.-]+\.cuh)"\s*$/m;
const cache = new Map<string, string>();

export function kernelDirectory(): string {
  return fileURLToPath(KERNEL_DIR);
}

/** The text of kernels/<file> with its local #include "x.cuh" lines replaced by the headers' text. */
export function kernelSource(file: string): string {
  const known = cache.get(file);
  if (known !== undefined) return known;
  let source = read(file);
  // Headers include one another; each is inlined once, where it is first included (#pragma once has no file to go by).
  const inlined = new Set<string>();
  for (let match = INCLUDE.exec(source); match !== null; match = INCLUDE.exec(source)) {
    const header = match[1]!;
    const text = inlined.has(header) ? `// ${header}: inlined above` : `// ---- ${header} ----\n${read(header)}\n// ---- end ${header} ----`;
    inlined.add(header);
    source = source.replace(match[0], () => text); // a function: `$` in the text is not a pattern
  }
  cache.set(file, source);
  return source;
}

function read(file: string): string {
  try {
    return readFileSync(new URL(file, KERNEL_DIR), 'utf8');
  } catch (e) {
    throw new BackendUnavailableError('cuda', `kernel source ${file} is missing from ${kernelDirectory()}: ${(e as Error).message}`);
  }
}
