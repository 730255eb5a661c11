// The PyTorch interchange of NSA-SPEC.md: tensor names in safetensors files, and the `nsa_config` metadata.
//   inputs:  q, k, v, g, cu_seqlens, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, phi_k.<param>, phi_v.<param>, do
//   outputs: o, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, block_indices, and with `do` the gradients
//            dq, dk, dv, dg, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_win, dv_win, dphi_k.<param>, dphi_v.<param>

import type { NSAConfigOptions, PhiKind } from '../config/nsa-config.js';
import { NsaConfigError, ShapeError, type ConfigIssue } from '../errors.js';
import type { Tensor } from '../tensor/tensor.js';
import type { NsaGradients, NsaInputs, NsaOutputs } from './types.js';

/** nsa_config keys (snake case, as PyTorch users write them) and the option each sets. */
const CONFIG_KEYS = {
  compress_block: 'compressBlock',
  compress_stride: 'compressStride',
  select_block: 'selectBlock',
  select_count: 'selectCount',
  window: 'window',
  phi: 'phi',
  scale: 'scale',
} as const satisfies Record<string, keyof NSAConfigOptions>;

const INPUT_NAMES = {
  q: 'q',
  k: 'k',
  v: 'v',
  g: 'g',
  k_cmp: 'kCmp',
  v_cmp: 'vCmp',
  k_slc: 'kSlc',
  v_slc: 'vSlc',
  k_win: 'kWin',
  v_win: 'vWin',
} as const satisfies Record<string, keyof NsaInputs>;

/** Parses the `nsa_config` JSON of a file's metadata into config options; unknown keys are errors. */
export function configFromMetadata(metadata: Readonly<Record<string, string>>): NSAConfigOptions {
  const raw = metadata['nsa_config'];
  if (raw === undefined) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw);
  } catch (e) {
    throw new NsaConfigError([{ path: 'nsa_config', rule: `must be JSON (${(e as Error).message})`, received: raw }]);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new NsaConfigError([{ path: 'nsa_config', rule: 'must be a JSON object', received: parsed }]);
  }
  const options: Record<string, number | PhiKind> = {};
  const issues: ConfigIssue[] = [];
  for (const [key, value] of Object.entries(parsed)) {
    const option = (CONFIG_KEYS as Record<string, string>)[key];
    if (option === undefined) {
      issues.push({ path: `nsa_config.${key}`, rule: `unknown key (known: ${Object.keys(CONFIG_KEYS).join(', ')})`, received: value });
    } else {
      options[option] = value as number | PhiKind;
    }
  }
  if (issues.length > 0) throw new NsaConfigError(issues);
  return options as NSAConfigOptions;
}

/** The nsa_config JSON for a config (the inverse of configFromMetadata). */
export function metadataFromConfig(options: NSAConfigOptions): Record<string, string> {
  const json: Record<string, unknown> = {};
  for (const [key, option] of Object.entries(CONFIG_KEYS)) {
    const value = options[option];
    if (value !== undefined) json[key] = value;
  }
  return { nsa_config: JSON.stringify(json) };
}

/** The operator's inputs (and `do`, when present) from the tensors of an inputs file. Unknown names are errors. */
export function inputsFromTensors(tensors: ReadonlyMap<string, Tensor>): { inputs: NsaInputs; dOut: Tensor | undefined } {
  const found: { [K in (typeof INPUT_NAMES)[keyof typeof INPUT_NAMES]]?: Tensor } = {};
  const phiK: Record<string, Tensor> = {};
  const phiV: Record<string, Tensor> = {};
  let cuSeqlens: Tensor | undefined;
  let dOut: Tensor | undefined;
  for (const [name, tensor] of tensors) {
    if (name in INPUT_NAMES) found[INPUT_NAMES[name as keyof typeof INPUT_NAMES]] = tensor;
    else if (name === 'cu_seqlens') cuSeqlens = tensor;
    else if (name === 'do') dOut = tensor;
    else if (name.startsWith('phi_k.')) phiK[name.slice(6)] = tensor;
    else if (name.startsWith('phi_v.')) phiV[name.slice(6)] = tensor;
    else {
      const known = [...Object.keys(INPUT_NAMES), 'cu_seqlens', 'do', 'phi_k.*', 'phi_v.*'].join(', ');
      throw new ShapeError(`${name}: not an NSA input (expected ${known})`);
    }
  }
  const { q, k, v, g } = found;
  if (q === undefined || k === undefined || v === undefined || g === undefined) {
    const missing = (['q', 'k', 'v', 'g'] as const).filter((n) => found[n] === undefined);
    throw new ShapeError(`${missing.join(', ')}: missing from the inputs (q, k, v and g are required)`);
  }
  const inputs: NsaInputs = {
    ...found,
    q,
    k,
    v,
    g,
    cuSeqlens,
    phiK: Object.keys(phiK).length > 0 ? phiK : undefined,
    phiV: Object.keys(phiV).length > 0 ? phiV : undefined,
  };
  return { inputs, dOut };
}

/** Outputs (ungated branch outputs, lse) by interchange name: the field of NsaOutputs each name holds. */
const OUTPUT_NAMES = [
  ['o', 'o'],
  ['o_cmp', 'oCmp'],
  ['o_slc', 'oSlc'],
  ['o_win', 'oWin'],
  ['lse_cmp', 'lseCmp'],
  ['lse_slc', 'lseSlc'],
  ['lse_win', 'lseWin'],
] as const;

const GRADIENT_NAMES = [
  ['dq', 'dq'],
  ['dk', 'dk'],
  ['dv', 'dv'],
  ['dg', 'dg'],
  ['dk_cmp', 'dkCmp'],
  ['dv_cmp', 'dvCmp'],
  ['dk_slc', 'dkSlc'],
  ['dv_slc', 'dvSlc'],
  ['dk_win', 'dkWin'],
  ['dv_win', 'dvWin'],
] as const;

type OutputField = (typeof OUTPUT_NAMES)[number][1];
type GradientField = (typeof GRADIENT_NAMES)[number][1];

/**
 * Outputs and gradients of any representation (host tensors, the reference's arrays) under their interchange
 * names; block_indices is left to the caller (its type differs).
 */
export function byInterchangeName<T>(
  outputs: { readonly [K in OutputField]: T },
  grads?: { readonly [K in GradientField]?: T | undefined } & {
    readonly dPhiK?: Readonly<Record<string, T>> | undefined;
    readonly dPhiV?: Readonly<Record<string, T>> | undefined;
  },
): Map<string, T> {
  const named = new Map<string, T>(OUTPUT_NAMES.map(([name, field]) => [name, outputs[field]]));
  if (grads === undefined) return named;
  for (const [name, field] of GRADIENT_NAMES) {
    const value = grads[field];
    if (value !== undefined) named.set(name, value);
  }
  for (const [prefix, params] of [
    ['dphi_k', grads.dPhiK],
    ['dphi_v', grads.dPhiV],
  ] as const) {
    for (const [p, value] of Object.entries(params ?? {})) named.set(`${prefix}.${p}`, value);
  }
  return named;
}

/** Output tensors (and gradients) under their interchange names. */
export function tensorsFromOutputs(outputs: NsaOutputs, grads?: NsaGradients): Map<string, Tensor> {
  const named = byInterchangeName<Tensor>(outputs, grads);
  named.set('block_indices', outputs.blockIndices);
  return named;
}
