// The Backend interface every implementation (cpu, cuda, webgpu) provides. The operator in nsa/ validates
// inputs once and hands backends an NsaRequest they can trust; backends return host tensors.

import type { NsaRequest } from '../nsa/validate.js';
import type { NsaGradients, NsaOutputs } from '../nsa/types.js';
import type { FloatDType } from '../tensor/dtype.js';
import type { Tensor } from '../tensor/tensor.js';

export type BackendName = 'cpu' | 'cuda' | 'webgpu';

/**
 * What a forward keeps for its backward (per-branch lse and outputs, the selected blocks, the compressed K/V),
 * on the backend that made it. `bytes` says how much memory it holds until released.
 */
export interface SavedForBackward {
  readonly backend: BackendName;
  readonly bytes: number;
  release(): void;
}

export interface BackendForwardResult {
  readonly outputs: NsaOutputs;
  readonly saved: SavedForBackward;
}

export interface Backend {
  readonly name: BackendName;
  /** One line for humans: the device and how the backend runs on it. */
  readonly description: string;
  forward(request: NsaRequest, outputDType: FloatDType): Promise<BackendForwardResult>;
  backward(request: NsaRequest, saved: SavedForBackward, dOut: Tensor, outputDType: FloatDType): Promise<NsaGradients>;
  dispose(): void;
}
