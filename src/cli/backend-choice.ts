// Which backend a command runs on: the one named by --backend (its unavailability is an error the user asked
// for), or else the best one present, saying in one line on stderr why better ones were passed over.

import { totalmem } from 'node:os';
import { bestBackend, getBackend, type Backend, type BackendName } from '../backends/index.js';
import type { CliIo } from './io.js';

export async function chooseBackend(name: BackendName | undefined, io: CliIo): Promise<Backend> {
  if (name !== undefined) return getBackend(name);
  const { backend, skipped } = await bestBackend();
  if (skipped.length > 0) {
    const reasons = skipped.map((s) => `${s.name} unavailable (${firstLine(s.reason)})`).join(', ');
    io.stderr(`nsa: ${reasons}; using ${backend.name}\n`);
  }
  return backend;
}

/** True for backends that run on a GPU (their defaults are the large shapes, bf16, and looser tolerances). */
export function isGpuBackend(backend: Backend): boolean {
  return backend.name !== 'cpu';
}

export function firstLine(text: string): string {
  return text.split('\n', 1)[0]!.trim();
}

/**
 * Memory the backend computes in, in bytes: the GPU's (read from the cuda backend's device info when it exposes
 * it), host memory for the cpu; undefined when unknown.
 */
export function backendMemoryBytes(backend: Backend): number | undefined {
  if (!isGpuBackend(backend)) return totalmem();
  const total = (backend as { ctx?: { device?: { totalBytes?: unknown } } }).ctx?.device?.totalBytes;
  return typeof total === 'number' && total > 0 ? total : undefined;
}
