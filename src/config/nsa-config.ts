// NSAConfig: the operator's hyper-parameters and head layout, validated once at construction.
//
// Shape legend used across the library:
//   B   batch size            T   tokens per sequence (or all packed tokens when cuSeqlens is given)
//   Hq  query heads (hq)      H   key/value heads (h)        G = Hq / H, the GQA group size
//   Dk  query/key head dim    Dv  value head dim
//   l   compression block     d   compression stride         l'  selection block
//   n   selected blocks (top-n, forced blocks included)      w   sliding window (keys in (t - w, t])
//   Tc  compressed tokens of a sequence: max(0, floor((T - l) / d) + 1)
//   Ns  selection blocks of a sequence: ceil(T / l')

import { NsaConfigError, type ConfigIssue } from '../errors.js';

export const PHI_KINDS = ['mean', 'linear', 'mlp'] as const;
/** How a block of l keys (or values) becomes one compressed token. */
export type PhiKind = (typeof PHI_KINDS)[number];

/** What a caller may set; every field has a default (the paper's). */
export interface NSAConfigOptions {
  /** l: keys per compression block. */
  readonly compressBlock?: number;
  /** d: stride between compression blocks; divides l and l'. */
  readonly compressStride?: number;
  /** l': keys per selection block. */
  readonly selectBlock?: number;
  /** n: selection blocks per query and KV head, forced blocks included. */
  readonly selectCount?: number;
  /** w: sliding-window length, the query's own key included. */
  readonly window?: number;
  /** phi: mean (parameter-free), linear or mlp (learned; their parameters come with the inputs). */
  readonly phi?: PhiKind;
  /** Softmax scale for all three branches and the scores; 1/sqrt(Dk) when absent. */
  readonly scale?: number;
  /** Hq: query heads. */
  readonly heads?: number;
  /** H: key/value heads; divides Hq. */
  readonly kvHeads?: number;
  /** Dk: query/key head dim. */
  readonly headDim?: number;
  /** Dv: value head dim. */
  readonly valueDim?: number;
}

/** The paper's hyper-parameters (Section 4.1): l = 32, d = 16, l' = 64, n = 16, w = 512, G = 16, Dk = 192, Dv = 128. */
export const PAPER_DEFAULTS = {
  compressBlock: 32,
  compressStride: 16,
  selectBlock: 64,
  selectCount: 16,
  window: 512,
  phi: 'mean',
  heads: 16,
  kvHeads: 1,
  headDim: 192,
  valueDim: 128,
} as const satisfies Required<Omit<NSAConfigOptions, 'scale'>>;

/** fla-org's NSA preset: l = d = l' = 64 with mean pooling (the peers' benchmarks use it). */
export const FLA_PRESET = {
  compressBlock: 64,
  compressStride: 64,
  selectBlock: 64,
  selectCount: 16,
  window: 512,
  phi: 'mean',
} as const satisfies NSAConfigOptions;

export const PRESETS = { paper: {}, fla: FLA_PRESET } as const satisfies Record<string, NSAConfigOptions>;
export type PresetName = keyof typeof PRESETS;

export class NSAConfig {
  readonly compressBlock: number;
  readonly compressStride: number;
  readonly selectBlock: number;
  readonly selectCount: number;
  readonly window: number;
  readonly phi: PhiKind;
  readonly scale: number;
  /** True when the scale was given rather than derived from Dk. */
  readonly scaleGiven: boolean;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly valueDim: number;

  /** Validates every field and throws one NsaConfigError listing each broken rule. */
  constructor(options: NSAConfigOptions = {}) {
    const merged = { ...PAPER_DEFAULTS, ...stripUndefined(options) };
    const issues = validateNsaConfig(merged, options.scale);
    if (issues.length > 0) throw new NsaConfigError(issues);
    this.compressBlock = merged.compressBlock;
    this.compressStride = merged.compressStride;
    this.selectBlock = merged.selectBlock;
    this.selectCount = merged.selectCount;
    this.window = merged.window;
    this.phi = merged.phi;
    this.heads = merged.heads;
    this.kvHeads = merged.kvHeads;
    this.headDim = merged.headDim;
    this.valueDim = merged.valueDim;
    this.scaleGiven = options.scale !== undefined;
    this.scale = options.scale ?? 1 / Math.sqrt(merged.headDim);
    Object.freeze(this);
  }

  /** The paper's preset, with overrides. */
  static paper(overrides: NSAConfigOptions = {}): NSAConfig {
    return new NSAConfig(overrides);
  }

  /** fla's preset (l = d = l' = 64, mean), with overrides. */
  static fla(overrides: NSAConfigOptions = {}): NSAConfig {
    return new NSAConfig({ ...FLA_PRESET, ...stripUndefined(overrides) });
  }

  static preset(name: PresetName, overrides: NSAConfigOptions = {}): NSAConfig {
    return new NSAConfig({ ...PRESETS[name], ...stripUndefined(overrides) });
  }

  /** G: query heads per KV head. */
  get groupSize(): number {
    return this.heads / this.kvHeads;
  }

  /** Tc: compressed tokens owned by a sequence of `length` tokens (complete blocks only). */
  compressedLength(length: number): number {
    return length < this.compressBlock ? 0 : Math.floor((length - this.compressBlock) / this.compressStride) + 1;
  }

  /** Ns: selection blocks covering a sequence of `length` tokens. */
  selectBlockCount(length: number): number {
    return Math.ceil(length / this.selectBlock);
  }

  /** A copy with some fields changed (validated again). */
  with(overrides: NSAConfigOptions): NSAConfig {
    const scale = this.scaleGiven ? { scale: this.scale } : {};
    return new NSAConfig({ ...this.toOptions(), ...scale, ...stripUndefined(overrides) });
  }

  toOptions(): Required<Omit<NSAConfigOptions, 'scale'>> & { scale?: number } {
    const base = {
      compressBlock: this.compressBlock,
      compressStride: this.compressStride,
      selectBlock: this.selectBlock,
      selectCount: this.selectCount,
      window: this.window,
      phi: this.phi,
      heads: this.heads,
      kvHeads: this.kvHeads,
      headDim: this.headDim,
      valueDim: this.valueDim,
    };
    return this.scaleGiven ? { ...base, scale: this.scale } : base;
  }

  toString(): string {
    return (
      `NSAConfig(l=${this.compressBlock}, d=${this.compressStride}, l'=${this.selectBlock}, n=${this.selectCount}, ` +
      `w=${this.window}, phi=${this.phi}, Hq=${this.heads}, H=${this.kvHeads}, Dk=${this.headDim}, Dv=${this.valueDim}, ` +
      `scale=${this.scale.toPrecision(6)})`
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

type Merged = Required<Omit<NSAConfigOptions, 'scale'>>;

function stripUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

/** Every broken rule of a merged config, in field order. */
export function validateNsaConfig(c: Merged, scale: number | undefined): ConfigIssue[] {
  const issues: ConfigIssue[] = [];
  const positiveInt = (path: keyof Merged, value: unknown): boolean => {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
      issues.push({ path, rule: 'must be a positive integer', received: value });
      return false;
    }
    return true;
  };
  const lOk = positiveInt('compressBlock', c.compressBlock);
  const dOk = positiveInt('compressStride', c.compressStride);
  const lsOk = positiveInt('selectBlock', c.selectBlock);
  positiveInt('selectCount', c.selectCount);
  positiveInt('window', c.window);
  if (!(PHI_KINDS as readonly unknown[]).includes(c.phi)) {
    issues.push({ path: 'phi', rule: `must be one of ${PHI_KINDS.join(', ')}`, received: c.phi });
  }
  const hqOk = positiveInt('heads', c.heads);
  const hOk = positiveInt('kvHeads', c.kvHeads);
  positiveInt('headDim', c.headDim);
  positiveInt('valueDim', c.valueDim);
  if (dOk && lOk && c.compressBlock % c.compressStride !== 0) {
    issues.push({
      path: 'compressStride',
      rule: `must divide compressBlock (l = ${c.compressBlock})`,
      received: c.compressStride,
    });
  }
  if (dOk && lsOk && c.selectBlock % c.compressStride !== 0) {
    issues.push({
      path: 'compressStride',
      rule: `must divide selectBlock (l' = ${c.selectBlock})`,
      received: c.compressStride,
    });
  }
  if (lOk && lsOk && c.compressBlock > c.selectBlock) {
    issues.push({
      path: 'compressBlock',
      rule: `must be <= selectBlock (l' = ${c.selectBlock})`,
      received: c.compressBlock,
    });
  }
  if (hqOk && hOk && c.heads % c.kvHeads !== 0) {
    issues.push({ path: 'heads', rule: `must be divisible by kvHeads (H = ${c.kvHeads})`, received: c.heads });
  }
  if (scale !== undefined && (typeof scale !== 'number' || !Number.isFinite(scale) || scale <= 0)) {
    issues.push({ path: 'scale', rule: 'must be a finite positive number', received: scale });
  }
  return issues;
}
