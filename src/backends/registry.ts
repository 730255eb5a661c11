// Backends register async factories that probe their device; the registry creates each at most once and says
// why one is unavailable. tfjs' engine registry is the model: a name maps to one factory, duplicates throw.

import { BackendUnavailableError } from '../errors.js';
import type { Backend, BackendName } from './backend.js';

export type BackendFactory = () => Promise<Backend>;

interface Entry {
  readonly factory: BackendFactory;
  /** Higher is preferred when choosing the best backend present. */
  readonly priority: number;
  instance?: Promise<Backend>;
}

const entries = new Map<BackendName, Entry>();

export function registerBackend(name: BackendName, factory: BackendFactory, priority: number): void {
  if (entries.has(name)) throw new Error(`backend ${name} is already registered`);
  entries.set(name, { factory, priority });
}

export function registeredBackends(): BackendName[] {
  return [...entries.keys()];
}

/** The backend called `name`, created on first use; throws BackendUnavailableError saying why it cannot run. */
export async function getBackend(name: BackendName): Promise<Backend> {
  const entry = entries.get(name);
  if (entry === undefined) {
    throw new BackendUnavailableError(name, `no backend named ${name} (registered: ${registeredBackends().join(', ')})`);
  }
  entry.instance ??= entry.factory().catch((e: unknown) => {
    delete entry.instance; // let a later call try again (a driver may appear)
    throw e;
  });
  return entry.instance;
}

/** The preferred backend that can run here, with the reasons the better ones could not. */
export async function bestBackend(): Promise<{ backend: Backend; skipped: { name: BackendName; reason: string }[] }> {
  const skipped: { name: BackendName; reason: string }[] = [];
  const ordered = [...entries.entries()].sort((a, b) => b[1].priority - a[1].priority);
  for (const [name] of ordered) {
    try {
      return { backend: await getBackend(name), skipped };
    } catch (e) {
      if (!(e instanceof BackendUnavailableError)) throw e;
      skipped.push({ name, reason: e.message });
    }
  }
  throw new BackendUnavailableError('cpu', `no backend can run here: ${skipped.map((s) => `${s.name}: ${s.reason}`).join('; ')}`);
}

/** Disposes every backend created so far (they are created again on next use). */
export async function disposeBackends(): Promise<void> {
  for (const entry of entries.values()) {
    const instance = entry.instance;
    delete entry.instance;
    if (instance !== undefined) (await instance.catch(() => undefined))?.dispose();
  }
}
