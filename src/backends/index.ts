// Registers the built-in backends: cuda (preferred where a GPU and NVRTC are present), then cpu.
// The cuda module is imported lazily so that loading this package never loads libcuda.

import { BackendUnavailableError } from '../errors.js';
import { CpuBackend } from './cpu/cpu-backend.js';
import { registerBackend, registeredBackends } from './registry.js';

if (!registeredBackends().includes('cpu')) {
  registerBackend('cpu', () => Promise.resolve(new CpuBackend()), 0);
  registerBackend(
    'cuda',
    async () => {
      const cuda = await import('./cuda/cuda-backend.js').catch((e: unknown) => {
        throw new BackendUnavailableError('cuda', `the cuda backend could not be loaded: ${String(e)}`);
      });
      return cuda.createCudaBackend();
    },
    10,
  );
}

export { bestBackend, disposeBackends, getBackend, registerBackend, registeredBackends } from './registry.js';
export type { Backend, BackendName, SavedForBackward } from './backend.js';
export { CpuBackend, type CpuBackendOptions } from './cpu/cpu-backend.js';
