// The flag parsers and the resolution of flags into a problem.

import { InvalidArgumentError } from 'commander';
import { describe, expect, it } from 'vitest';
import { NsaConfigError } from '../../src/errors.js';
import { UsageError } from '../../src/cli/io.js';
import { parseLength, parseLengthList, parsePresetList, resolveProblem, type ProblemDefaults } from '../../src/cli/options.js';
import { spreadEvenly } from '../../src/cli/spread.js';

const DEFAULTS: ProblemDefaults = { seqlen: 128, batch: 1, heads: 4, kvHeads: 2, headDim: 16, valueDim: 8, dtype: 'f32', preset: 'paper' };

describe('lengths', () => {
  it('take k and m suffixes', () => {
    expect(parseLength('300')).toBe(300);
    expect(parseLength('8k')).toBe(8192);
    expect(parseLength('64K')).toBe(65536);
    expect(parseLength('1m')).toBe(1048576);
  });

  it('reject zero, negatives, fractions and words', () => {
    for (const bad of ['0', '-1', '1.5k', 'k', '8kb', '', 'lots']) expect(() => parseLength(bad), bad).toThrow(InvalidArgumentError);
  });

  it('come in comma-separated lists', () => {
    expect(parseLengthList('8k,16k, 32k')).toEqual([8192, 16384, 32768]);
    expect(() => parseLengthList('8k,x')).toThrow(/'x' is not a length/);
  });

  it('presets are checked by name', () => {
    expect(parsePresetList('fla,paper')).toEqual(['fla', 'paper']);
    expect(() => parsePresetList('fla,nope')).toThrow(/unknown preset 'nope'/);
  });
});

describe('resolveProblem', () => {
  it('takes the defaults, then the preset, then the flags', () => {
    const spec = resolveProblem({ preset: 'fla', window: 32 }, DEFAULTS);
    expect(spec.config.compressBlock).toBe(64);
    expect(spec.config.window).toBe(32);
    expect(spec.config.heads).toBe(4);
    expect(spec.seqlens).toEqual([128]);
  });

  it('packs --seqlens into one batch row', () => {
    expect(resolveProblem({ seqlens: [10, 20, 30] }, DEFAULTS).seqlens).toEqual([10, 20, 30]);
    expect(() => resolveProblem({ seqlens: [10, 20], batch: 3 }, DEFAULTS)).toThrow(UsageError);
  });

  it('repeats --seqlen over the batch', () => {
    expect(resolveProblem({ seqlen: 50, batch: 3 }, DEFAULTS).seqlens).toEqual([50, 50, 50]);
  });

  it('throws NsaConfigError naming each broken field', () => {
    try {
      resolveProblem({ compressBlock: 8, compressStride: 3 }, DEFAULTS);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(NsaConfigError);
      expect((e as NsaConfigError).issues.map((i) => i.path)).toContain('compressStride');
    }
  });
});

describe('spreadEvenly', () => {
  it('includes the first and the last', () => {
    expect(spreadEvenly(100, 5)).toEqual([0, 25, 50, 74, 99]);
    expect(spreadEvenly(3, 8)).toEqual([0, 1, 2]);
    expect(spreadEvenly(10, 1)).toEqual([0]);
  });
});
