// The flags commands share: the backend, the NSA config (a preset plus per-field overrides), the head layout,
// the sequence lengths and the random inputs. Parsers reject bad values with a message commander prints as
// `nsa <cmd>: option '...' argument '...' is invalid. <why>`; lengths take k/m suffixes (8k = 8192, 1m = 1048576).

import { InvalidArgumentError, Option, type Command } from 'commander';
import { NSAConfig, PHI_KINDS, PRESETS, type NSAConfigOptions, type PhiKind, type PresetName } from '../config/nsa-config.js';
import { registeredBackends, type BackendName } from '../backends/index.js';
import { UsageError } from './io.js';

export const INPUT_DTYPES = ['f32', 'f16', 'bf16'] as const;
/** Dtypes of the random inputs and of written outputs. */
export type InputDType = (typeof INPUT_DTYPES)[number];

export interface BackendFlags {
  readonly backend?: BackendName;
}

export interface ConfigFlags {
  readonly preset?: PresetName;
  readonly compressBlock?: number;
  readonly compressStride?: number;
  readonly selectBlock?: number;
  readonly selectCount?: number;
  readonly window?: number;
  readonly phi?: PhiKind;
  readonly scale?: number;
}

export interface HeadFlags {
  readonly heads?: number;
  readonly kvHeads?: number;
  readonly headDim?: number;
  readonly valueDim?: number;
}

export interface SequenceFlags {
  readonly seqlen?: number;
  readonly seqlens?: readonly number[];
  readonly batch?: number;
}

export interface InputFlags {
  readonly dtype?: InputDType;
  readonly seed?: number;
}

export type ProblemFlags = ConfigFlags & HeadFlags & SequenceFlags & InputFlags;

/** Sizes a command uses where no flag is given (they differ between the cpu and a GPU). */
export interface ProblemDefaults {
  readonly seqlen: number;
  readonly batch: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly valueDim: number;
  readonly dtype: InputDType;
  readonly preset: PresetName;
}

/** A resolved problem: the validated config and the sequences of the random inputs (packed as [1, N, ...]). */
export interface ProblemSpec {
  readonly config: NSAConfig;
  /** Length of every sequence: --batch equal ones, or the --seqlens. */
  readonly seqlens: readonly number[];
  readonly dtype: InputDType;
  readonly seed: number;
}

export const DEFAULT_SEED = 1;

// ---------------------------------------------------------------------------------------------------------------
// Parsers

const SUFFIXES: Readonly<Record<string, number>> = { '': 1, k: 1024, m: 1024 * 1024 };

/** A positive integer, optionally with a k (1024) or m (1048576) suffix. */
export function parseLength(value: string): number {
  const match = /^\s*(\d+)\s*([kKmM]?)\s*$/.exec(value);
  const n = match === null ? NaN : Number(match[1]) * SUFFIXES[match[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new InvalidArgumentError('expected a positive integer, optionally with a k or m suffix (8k = 8192, 1m = 1048576).');
  }
  return n;
}

/** A comma-separated list of lengths: 8k,16k,32k. */
export function parseLengthList(value: string): number[] {
  const parts = value.split(',').filter((s) => s.trim() !== '');
  if (parts.length === 0) throw new InvalidArgumentError('expected a comma-separated list of lengths such as 8k,16k.');
  return parts.map((part) => {
    try {
      return parseLength(part);
    } catch {
      throw new InvalidArgumentError(`'${part}' is not a length: expected positive integers with an optional k or m suffix.`);
    }
  });
}

export function parsePositiveInt(value: string): number {
  const n = /^\s*\d+\s*$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError('expected a positive integer.');
  return n;
}

export function parseNonNegativeInt(value: string): number {
  const n = /^\s*\d+\s*$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError('expected a non-negative integer.');
  return n;
}

export function parsePositiveNumber(value: string): number {
  const n = value.trim() === '' ? NaN : Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('expected a finite positive number.');
  return n;
}

/** A comma-separated list of positive integers: 1,8,64. */
export function parsePositiveIntList(value: string): number[] {
  const parts = value.split(',').filter((s) => s.trim() !== '');
  if (parts.length === 0) throw new InvalidArgumentError('expected a comma-separated list of positive integers such as 1,8,64.');
  return parts.map((part) => {
    try {
      return parsePositiveInt(part);
    } catch {
      throw new InvalidArgumentError(`'${part}' is not a positive integer.`);
    }
  });
}

/** A comma-separated list of preset names. */
export function parsePresetList(value: string): PresetName[] {
  const names = value.split(',').map((s) => s.trim()).filter((s) => s !== '');
  const known = Object.keys(PRESETS);
  for (const name of names) {
    if (!known.includes(name)) throw new InvalidArgumentError(`unknown preset '${name}' (known: ${known.join(', ')}).`);
  }
  if (names.length === 0) throw new InvalidArgumentError(`expected a comma-separated list of presets (${known.join(', ')}).`);
  return names as PresetName[];
}

// ---------------------------------------------------------------------------------------------------------------
// Option groups

export function addBackendOption(cmd: Command, description: string, { required = false } = {}): Command {
  return cmd.addOption(new Option('--backend <name>', description).choices(registeredBackends()).makeOptionMandatory(required));
}

export function addConfigOptions(cmd: Command, { preset = true, presetNote = 'default: paper' } = {}): Command {
  if (preset) {
    cmd.addOption(new Option('--preset <name>', `NSA hyper-parameters to start from (${presetNote})`).choices(Object.keys(PRESETS)));
  }
  return cmd
    .addOption(new Option('-l, --compress-block <n>', 'l: keys per compression block').argParser(parseLength))
    .addOption(new Option('-d, --compress-stride <n>', 'd: stride between compression blocks (divides l and l\')').argParser(parseLength))
    .addOption(new Option('--select-block <n>', "l': keys per selection block").argParser(parseLength))
    .addOption(new Option('-n, --select-count <n>', 'n: selected blocks per query, forced blocks included').argParser(parsePositiveInt))
    .addOption(new Option('-w, --window <n>', 'w: sliding-window keys, the query itself included').argParser(parseLength))
    .addOption(new Option('--phi <kind>', 'how a block of keys becomes one compressed token').choices(PHI_KINDS))
    .addOption(new Option('--scale <x>', 'softmax scale (default 1/sqrt(Dk))').argParser(parsePositiveNumber));
}

export function addHeadOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--heads <n>', 'Hq: query heads').argParser(parsePositiveInt))
    .addOption(new Option('--kv-heads <n>', 'H: key/value heads (divides Hq)').argParser(parsePositiveInt))
    .addOption(new Option('--head-dim <n>', 'Dk: query/key head dim').argParser(parsePositiveInt))
    .addOption(new Option('--value-dim <n>', 'Dv: value head dim').argParser(parsePositiveInt));
}

export function addSequenceOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--seqlen <T>', 'T: tokens per sequence (8k = 8192)').argParser(parseLength).conflicts('seqlens'))
    .addOption(new Option('--seqlens <list>', 'packed variable-length sequences, e.g. 100,3k,2000 (B = 1)').argParser(parseLengthList))
    .addOption(new Option('--batch <B>', 'B: sequences of length T').argParser(parsePositiveInt));
}

export function addInputOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--dtype <dtype>', 'dtype of the random inputs').choices(INPUT_DTYPES))
    .addOption(new Option('--seed <n>', `seed of the random inputs (default ${DEFAULT_SEED})`).argParser(parseNonNegativeInt));
}

// ---------------------------------------------------------------------------------------------------------------
// Resolution

/** The preset (when given) and the per-field flags, as config options; absent fields stay absent. */
export function configOverrides(flags: ConfigFlags, preset: PresetName | undefined = flags.preset): NSAConfigOptions {
  const fields = defined({
    compressBlock: flags.compressBlock,
    compressStride: flags.compressStride,
    selectBlock: flags.selectBlock,
    selectCount: flags.selectCount,
    window: flags.window,
    phi: flags.phi,
    scale: flags.scale,
  });
  return { ...(preset === undefined ? {} : PRESETS[preset]), ...fields };
}

/** The head layout from flags, falling back to the defaults. */
export function headOptions(flags: HeadFlags, defaults: Pick<ProblemDefaults, 'heads' | 'kvHeads' | 'headDim' | 'valueDim'>): NSAConfigOptions {
  return {
    heads: flags.heads ?? defaults.heads,
    kvHeads: flags.kvHeads ?? defaults.kvHeads,
    headDim: flags.headDim ?? defaults.headDim,
    valueDim: flags.valueDim ?? defaults.valueDim,
  };
}

/** Validates the config (NsaConfigError on a broken rule) and the sequence flags (UsageError). */
export function resolveProblem(flags: ProblemFlags, defaults: ProblemDefaults): ProblemSpec {
  const config = new NSAConfig({ ...configOverrides(flags, flags.preset ?? defaults.preset), ...headOptions(flags, defaults) });
  if (flags.seqlens !== undefined && flags.batch !== undefined && flags.batch !== 1) {
    throw new UsageError(`--seqlens packs the sequences into one batch row: --batch must be 1 (or absent), got ${flags.batch}`);
  }
  const seqlens = flags.seqlens ?? Array.from({ length: flags.batch ?? defaults.batch }, () => flags.seqlen ?? defaults.seqlen);
  return { config, seqlens, dtype: flags.dtype ?? defaults.dtype, seed: flags.seed ?? DEFAULT_SEED };
}

/** "T = 4096", or "3 sequences of 30, 120, 7 tokens (N = 157)". */
export function describeSequences(seqlens: readonly number[]): string {
  if (seqlens.length === 1) return `T = ${seqlens[0]}`;
  const total = seqlens.reduce((a, b) => a + b, 0);
  const lengths = new Set(seqlens).size === 1 ? `${seqlens[0]} tokens each` : `${seqlens.join(', ')} tokens`;
  return `${seqlens.length} packed sequences of ${lengths} (N = ${total})`;
}

/** The flag that sets each config field, for error messages. */
export const FLAG_OF_FIELD: Readonly<Record<string, string>> = {
  compressBlock: '-l, --compress-block',
  compressStride: '-d, --compress-stride',
  selectBlock: '--select-block',
  selectCount: '-n, --select-count',
  window: '-w, --window',
  phi: '--phi',
  scale: '--scale',
  heads: '--heads',
  kvHeads: '--kv-heads',
  headDim: '--head-dim',
  valueDim: '--value-dim',
};

/** The fields of `o` that are not undefined (exactOptionalPropertyTypes keeps absent and undefined apart). */
function defined<T extends object>(o: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as { [K in keyof T]?: Exclude<T[K], undefined> };
}
