// A learned phi's parameter tensors (validated: names and shapes) as the reference's arrays.

import type { NSAConfig } from '../config/nsa-config.js';
import type { FloatArray } from '../reference/layout.js';
import { PHI_PARAM_NAMES, type PhiParams } from '../reference/compress.js';
import type { Tensor } from '../tensor/tensor.js';

/**
 * The parameters of config.phi from their tensors, each read by `read` (f32 for the backends, exact doubles for
 * checks); undefined for phi = mean or when none were given. `hidden` is the mlp's width (validatePhiParams).
 */
export function phiParamsOf(
  config: NSAConfig,
  params: Readonly<Record<string, Tensor>> | undefined,
  hidden: number,
  read: (t: Tensor) => FloatArray = (t) => t.toFloat32(),
): PhiParams | undefined {
  if (params === undefined || config.phi === 'mean') return undefined;
  const p = Object.fromEntries(PHI_PARAM_NAMES[config.phi].map((name) => [name, read(params[name]!)]));
  if (config.phi === 'linear') return { kind: 'linear', pe: p['pe']!, w: p['w']!, b: p['b']! };
  return { kind: 'mlp', pe: p['pe']!, w1: p['w1']!, b1: p['b1']!, w2: p['w2']!, b2: p['b2']!, hidden };
}
