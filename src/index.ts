// native-sparse-attention: Native Sparse Attention (DeepSeek, arXiv 2502.11089) for TypeScript.

import './backends/index.js';

export {
  NSAConfig,
  PAPER_DEFAULTS,
  FLA_PRESET,
  PRESETS,
  PHI_KINDS,
  type NSAConfigOptions,
  type PhiKind,
  type PresetName,
} from './config/nsa-config.js';
export * from './errors.js';
export { Tensor, shapeSize, formatShape, type Shape } from './tensor/tensor.js';
export {
  f32ToBf16,
  bf16ToF32,
  f32ToF16,
  f16ToF32,
  type DType,
  type FloatDType,
  type IntDType,
  type DTypeMap,
} from './tensor/dtype.js';
export { Rng } from './tensor/random.js';
export {
  parseSafetensors,
  serializeSafetensors,
  readSafetensorsFile,
  writeSafetensorsFile,
  type SafetensorsFile,
} from './tensor/safetensors.js';
export { nsaForward, type NsaCallOptions, type NsaForwardResult } from './nsa/operator.js';
export { validateNsaInputs, type NsaRequest } from './nsa/validate.js';
export type { NsaInputs, NsaOutputs, NsaGradients, NsaRunOptions } from './nsa/types.js';
export { createKvCache, type CreateKvCacheOptions } from './nsa/decode/create.js';
export type { KvCache, KvCacheOptions, DecodeQuery, DecodeOptions, DecodeOutput, DecodeOutputs } from './nsa/decode/types.js';
export {
  bestBackend,
  disposeBackends,
  getBackend,
  registerBackend,
  registeredBackends,
  CpuBackend,
  type Backend,
  type BackendName,
  type CpuBackendOptions,
  type SavedForBackward,
} from './backends/index.js';
export { nsaReferenceForward, type NsaReferenceInputs, type NsaReferenceOutputs } from './reference/nsa-forward.js';
export { nsaReferenceBackward, type NsaReferenceGradients } from './reference/nsa-backward.js';
export { denseOracleForward } from './reference/dense-oracle.js';
export { PHI_PARAM_NAMES, type PhiParams, type LinearPhiParams, type MlpPhiParams } from './reference/compress.js';
