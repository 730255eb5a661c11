// The operator: validate once, run the forward on a backend, and hand back the outputs with a backward that
// reuses what the forward saved (per-branch outputs and lse, the selected blocks, the compressed K/V).

import type { NSAConfig, NSAConfigOptions } from '../config/nsa-config.js';
import { DisposedError } from '../errors.js';
import type { Backend, BackendName } from '../backends/backend.js';
import { bestBackend, getBackend } from '../backends/registry.js';
import type { Tensor } from '../tensor/tensor.js';
import type { NsaGradients, NsaInputs, NsaOutputs, NsaRunOptions } from './types.js';
import { validateDOut, validateNsaInputs, type NsaRequest } from './validate.js';

export interface NsaCallOptions extends NsaRunOptions {
  /** A backend or its name; the best backend present when absent (cuda, else cpu). */
  readonly backend?: Backend | BackendName;
}

export interface NsaForwardResult extends NsaOutputs {
  /** The backend that ran the forward (and will run the backward). */
  readonly backend: Backend;
  /** The validated request (config resolved against the tensors, sequence offsets). */
  readonly request: NsaRequest;
  /** Bytes the backend keeps for backward() until release(). */
  readonly savedBytes: number;
  /** Gradients of sum(dOut * o) with respect to every input. Callable more than once until release(). */
  backward(dOut: Tensor): Promise<NsaGradients>;
  /** Frees what the forward kept for the backward. */
  release(): void;
}

/** Native Sparse Attention forward: o = g_cmp * cmp + g_slc * slc + g_win * win, with every branch's output. */
export async function nsaForward(
  inputs: NsaInputs,
  config: NSAConfig | NSAConfigOptions,
  options: NsaCallOptions = {},
): Promise<NsaForwardResult> {
  const request = validateNsaInputs(inputs, config, { checkFinite: options.checkFinite ?? true });
  const backend = await resolveBackend(options.backend);
  const dtype = options.outputDType ?? 'f32';
  const { outputs, saved } = await backend.forward(request, dtype);
  let released = false;
  return {
    ...outputs,
    backend,
    request,
    savedBytes: saved.bytes,
    async backward(dOut: Tensor): Promise<NsaGradients> {
      if (released) throw new DisposedError('the forward result (release() was called)');
      validateDOut(request, dOut, { checkFinite: options.checkFinite ?? true });
      return backend.backward(request, saved, dOut, dtype);
    },
    release(): void {
      if (!released) saved.release();
      released = true;
    },
  };
}

export async function resolveBackend(backend: Backend | BackendName | undefined): Promise<Backend> {
  if (backend === undefined) return (await bestBackend()).backend;
  return typeof backend === 'string' ? getBackend(backend) : backend;
}
