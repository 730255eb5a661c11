// Random NSA problems for tests: seeded inputs in float64 for a config and a list of sequence lengths.

import { NSAConfig, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import type { PhiParams } from '../../src/reference/compress.js';
import type { NsaReferenceInputs } from '../../src/reference/nsa-forward.js';
import { Rng } from '../../src/tensor/random.js';

export interface RandomProblemOptions {
  readonly independent?: { cmp?: boolean; slc?: boolean; win?: boolean };
  readonly phiHidden?: number;
  /** Standard deviation of q and k (larger makes attention peakier). */
  readonly std?: number;
}

export function randomArray(rng: Rng, n: number, std = 1): Float64Array {
  const a = new Float64Array(n);
  for (let i = 0; i < n; i++) a[i] = rng.normal() * std;
  return a;
}

export function randomPhi(rng: Rng, config: NSAConfig, dim: number, hidden: number): PhiParams | undefined {
  const H = config.kvHeads;
  const l = config.compressBlock;
  const width = l * dim;
  if (config.phi === 'mean') return undefined;
  const pe = randomArray(rng, H * width, 0.3);
  if (config.phi === 'linear') {
    return { kind: 'linear', pe, w: randomArray(rng, H * width * dim, 1 / Math.sqrt(width)), b: randomArray(rng, H * dim, 0.1) };
  }
  return {
    kind: 'mlp',
    pe,
    hidden,
    w1: randomArray(rng, H * width * hidden, 1 / Math.sqrt(width)),
    b1: randomArray(rng, H * hidden, 0.1),
    w2: randomArray(rng, H * hidden * dim, 1 / Math.sqrt(hidden)),
    b2: randomArray(rng, H * dim, 0.1),
  };
}

export function randomProblem(
  config: NSAConfig,
  seqlens: readonly number[],
  seed: number,
  options: RandomProblemOptions = {},
): NsaReferenceInputs {
  const rng = new Rng(seed);
  const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = config;
  const cuSeqlens = [0];
  for (const len of seqlens) cuSeqlens.push(cuSeqlens[cuSeqlens.length - 1]! + len);
  const N = cuSeqlens[cuSeqlens.length - 1]!;
  const Nc = seqlens.reduce((s, len) => s + config.compressedLength(len), 0);
  const std = options.std ?? 1;
  const gates = new Float64Array(N * Hq * 3);
  for (let i = 0; i < gates.length; i++) gates[i] = rng.next();
  const ind = options.independent ?? {};
  return {
    q: randomArray(rng, N * Hq * dk, std),
    k: randomArray(rng, N * H * dk, std),
    v: randomArray(rng, N * H * dv),
    g: gates,
    cuSeqlens,
    kCmp: ind.cmp ? randomArray(rng, Nc * H * dk, std) : undefined,
    vCmp: ind.cmp ? randomArray(rng, Nc * H * dv) : undefined,
    kSlc: ind.slc ? randomArray(rng, N * H * dk, std) : undefined,
    vSlc: ind.slc ? randomArray(rng, N * H * dv) : undefined,
    kWin: ind.win ? randomArray(rng, N * H * dk, std) : undefined,
    vWin: ind.win ? randomArray(rng, N * H * dv) : undefined,
    phiK: ind.cmp ? undefined : randomPhi(rng, config, dk, options.phiHidden ?? 8),
    phiV: ind.cmp ? undefined : randomPhi(rng, config, dv, options.phiHidden ?? 8),
  };
}

export function config(options: NSAConfigOptions): NSAConfig {
  return new NSAConfig(options);
}
