// NSAConfig: the paper's defaults, the fla preset, and every validation rule. Each broken rule must come back as an
// NsaConfigError whose message names the field, the rule and the value given; several broken rules are all listed.

import { describe, expect, it } from 'vitest';
import { FLA_PRESET, NSAConfig, PAPER_DEFAULTS, type NSAConfigOptions } from '../../src/config/nsa-config.js';
import { NsaConfigError, type ConfigIssue } from '../../src/errors.js';

/** The NsaConfigError thrown by `make` (fails the test when nothing or something else is thrown). */
function configError(make: () => unknown): NsaConfigError {
  try {
    make();
  } catch (e) {
    expect(e).toBeInstanceOf(NsaConfigError);
    return e as NsaConfigError;
  }
  throw new Error('expected an NsaConfigError, but the config was accepted');
}

/** Options that break rules on purpose (wrong types included), as a JavaScript caller could pass them. */
function loose(options: Record<string, unknown>): NSAConfigOptions {
  return options as NSAConfigOptions;
}

interface RuleCase {
  readonly name: string;
  readonly options: Record<string, unknown>;
  readonly path: string;
  /** A fragment of the rule's wording. */
  readonly rule: string;
  /** The value as the message prints it. */
  readonly shown: string;
}

const RULES: readonly RuleCase[] = [
  { name: 'd divides l', options: { compressBlock: 32, compressStride: 12, selectBlock: 48 }, path: 'compressStride', rule: 'must divide compressBlock (l = 32)', shown: '12' },
  { name: "d divides l'", options: { compressBlock: 32, compressStride: 32, selectBlock: 48 }, path: 'compressStride', rule: "must divide selectBlock (l' = 48)", shown: '32' },
  { name: "l <= l'", options: { compressBlock: 128, compressStride: 16, selectBlock: 64 }, path: 'compressBlock', rule: "must be <= selectBlock (l' = 64)", shown: '128' },
  { name: 'n >= 1', options: { selectCount: 0 }, path: 'selectCount', rule: 'must be a positive integer', shown: '0' },
  { name: 'n not negative', options: { selectCount: -3 }, path: 'selectCount', rule: 'must be a positive integer', shown: '-3' },
  { name: 'w >= 1', options: { window: 0 }, path: 'window', rule: 'must be a positive integer', shown: '0' },
  { name: 'l >= 1', options: { compressBlock: 0 }, path: 'compressBlock', rule: 'must be a positive integer', shown: '0' },
  { name: 'd >= 1', options: { compressStride: 0 }, path: 'compressStride', rule: 'must be a positive integer', shown: '0' },
  { name: "l' >= 1", options: { selectBlock: -64 }, path: 'selectBlock', rule: 'must be a positive integer', shown: '-64' },
  { name: 'hq divisible by h', options: { heads: 6, kvHeads: 4 }, path: 'heads', rule: 'must be divisible by kvHeads (H = 4)', shown: '6' },
  { name: 'h larger than hq', options: { heads: 4, kvHeads: 8 }, path: 'heads', rule: 'must be divisible by kvHeads (H = 8)', shown: '4' },
  { name: 'hq >= 1', options: { heads: 0 }, path: 'heads', rule: 'must be a positive integer', shown: '0' },
  { name: 'h >= 1', options: { kvHeads: 0 }, path: 'kvHeads', rule: 'must be a positive integer', shown: '0' },
  { name: 'positive Dk', options: { headDim: 0 }, path: 'headDim', rule: 'must be a positive integer', shown: '0' },
  { name: 'positive Dv', options: { valueDim: -8 }, path: 'valueDim', rule: 'must be a positive integer', shown: '-8' },
  { name: 'integer Dk', options: { headDim: 63.5 }, path: 'headDim', rule: 'must be a positive integer', shown: '63.5' },
  { name: 'integer Dv', options: { valueDim: 1.25 }, path: 'valueDim', rule: 'must be a positive integer', shown: '1.25' },
  { name: 'integer l', options: { compressBlock: 32.5 }, path: 'compressBlock', rule: 'must be a positive integer', shown: '32.5' },
  { name: 'integer d', options: { compressStride: 16.5 }, path: 'compressStride', rule: 'must be a positive integer', shown: '16.5' },
  { name: "integer l'", options: { selectBlock: 64.1 }, path: 'selectBlock', rule: 'must be a positive integer', shown: '64.1' },
  { name: 'integer n', options: { selectCount: 2.5 }, path: 'selectCount', rule: 'must be a positive integer', shown: '2.5' },
  { name: 'integer w', options: { window: 511.9 }, path: 'window', rule: 'must be a positive integer', shown: '511.9' },
  { name: 'integer hq', options: { heads: 16.5 }, path: 'heads', rule: 'must be a positive integer', shown: '16.5' },
  { name: 'integer h', options: { kvHeads: 0.5 }, path: 'kvHeads', rule: 'must be a positive integer', shown: '0.5' },
  { name: 'a number, not a string', options: { window: '512' }, path: 'window', rule: 'must be a positive integer', shown: '"512"' },
  { name: 'not null', options: { selectCount: null }, path: 'selectCount', rule: 'must be a positive integer', shown: 'null' },
  { name: 'known phi', options: { phi: 'max' }, path: 'phi', rule: 'must be one of mean, linear, mlp', shown: '"max"' },
  { name: 'phi is case-sensitive', options: { phi: 'Mean' }, path: 'phi', rule: 'must be one of mean, linear, mlp', shown: '"Mean"' },
  { name: 'positive scale', options: { scale: 0 }, path: 'scale', rule: 'must be a finite positive number', shown: '0' },
  { name: 'negative scale', options: { scale: -0.125 }, path: 'scale', rule: 'must be a finite positive number', shown: '-0.125' },
  { name: 'scale a number', options: { scale: '0.125' }, path: 'scale', rule: 'must be a finite positive number', shown: '"0.125"' },
];

describe('NSAConfig defaults and presets', () => {
  it("defaults are the paper's (l = 32, d = 16, l' = 64, n = 16, w = 512, mean)", () => {
    const c = new NSAConfig();
    expect([c.compressBlock, c.compressStride, c.selectBlock, c.selectCount, c.window]).toEqual([32, 16, 64, 16, 512]);
    expect(c.phi).toBe('mean');
    expect([c.heads, c.kvHeads, c.headDim, c.valueDim]).toEqual([16, 1, 192, 128]);
    expect(c.groupSize).toBe(16);
    expect(c.toOptions()).toEqual(PAPER_DEFAULTS);
    expect(NSAConfig.paper().toOptions()).toEqual(c.toOptions());
    expect(NSAConfig.preset('paper').toOptions()).toEqual(c.toOptions());
  });

  it("fla preset: l = d = l' = 64 with mean compression, other fields the paper's", () => {
    const c = NSAConfig.fla();
    expect([c.compressBlock, c.compressStride, c.selectBlock]).toEqual([64, 64, 64]);
    expect(c.phi).toBe('mean');
    expect([c.selectCount, c.window]).toEqual([16, 512]);
    expect(NSAConfig.preset('fla').toOptions()).toEqual(c.toOptions());
    expect(FLA_PRESET).toMatchObject({ compressBlock: 64, compressStride: 64, selectBlock: 64, phi: 'mean' });
  });

  it('presets take overrides, and undefined overrides keep the preset', () => {
    const c = NSAConfig.fla(loose({ compressStride: 32, heads: 8, kvHeads: 2, window: undefined }));
    expect([c.compressBlock, c.compressStride, c.selectBlock, c.window, c.heads, c.kvHeads]).toEqual([64, 32, 64, 512, 8, 2]);
    expect(NSAConfig.paper({ selectCount: 1 }).selectCount).toBe(1);
    expect(() => NSAConfig.fla({ compressStride: 48 })).toThrow(NsaConfigError);
  });

  it('scale defaults to 1/sqrt(Dk) and follows Dk; a given scale is kept', () => {
    expect(new NSAConfig().scale).toBe(1 / Math.sqrt(192));
    const c = new NSAConfig({ headDim: 64 });
    expect(c.scale).toBe(0.125);
    expect(c.scaleGiven).toBe(false);
    expect(c.toOptions()).not.toHaveProperty('scale');
    expect(c.with({ headDim: 16 }).scale).toBe(0.25);
    const given = new NSAConfig({ headDim: 64, scale: 0.5 });
    expect([given.scale, given.scaleGiven]).toEqual([0.5, true]);
    expect(given.with({ headDim: 16 }).scale).toBe(0.5);
    expect(given.toOptions().scale).toBe(0.5);
    expect(new NSAConfig(loose({ scale: undefined })).scaleGiven).toBe(false);
  });

  it('derived sizes: G, Tc (complete blocks only) and Ns', () => {
    const c = new NSAConfig({ heads: 8, kvHeads: 2 });
    expect(c.groupSize).toBe(4);
    expect([0, 1, 31, 32, 47, 48, 100].map((t) => c.compressedLength(t))).toEqual([0, 0, 0, 1, 1, 2, 5]);
    expect([1, 64, 65, 128].map((t) => c.selectBlockCount(t))).toEqual([1, 1, 2, 2]);
  });

  it('is frozen', () => {
    const c = new NSAConfig();
    expect(Object.isFrozen(c)).toBe(true);
    expect(() => {
      (c as { window: number }).window = 4;
    }).toThrow(TypeError);
  });

  it('accepts the edge values: n = 1, w = 1, G = 1, l = d = l\' = 1', () => {
    const c = new NSAConfig({ compressBlock: 1, compressStride: 1, selectBlock: 1, selectCount: 1, window: 1, heads: 3, kvHeads: 3, headDim: 1, valueDim: 1 });
    expect(c.groupSize).toBe(1);
  });
});

describe('NSAConfig validation', () => {
  for (const rule of RULES) {
    it(`${rule.name}: names the field, the rule and the value`, () => {
      const e = configError(() => new NSAConfig(loose(rule.options)));
      expect(e.code).toBe('config');
      expect(e.issues).toHaveLength(1);
      const issue = e.issues[0]!;
      expect(issue.path).toBe(rule.path);
      expect(issue.rule).toContain(rule.rule);
      expect(e.message).toContain(`${rule.path}: ${rule.rule}`);
      expect(e.message).toContain(`(got ${rule.shown})`);
    });
  }

  // formatConfigIssue prints the value with JSON.stringify, which writes NaN and +-Infinity as `null`. The issue
  // itself carries the value; the message does not (reported to the lead: src/errors.ts is not ours to edit).
  for (const [name, options, path] of [
    ['NaN scale', { scale: NaN }, 'scale'],
    ['infinite scale', { scale: Infinity }, 'scale'],
    ['NaN window', { window: NaN }, 'window'],
    ['infinite head dim', { headDim: Infinity }, 'headDim'],
  ] as const) {
    it(`${name}: the issue names the field, the rule and the value`, () => {
      const e = configError(() => new NSAConfig(loose(options)));
      expect(e.issues).toHaveLength(1);
      expect(e.issues[0]!.path).toBe(path);
      expect(Object.is(e.issues[0]!.received, Object.values(options)[0])).toBe(true);
      expect(e.message).toContain(`${path}: must be a`);
    });
    it(`${name}: the message prints the value as written`, () => {
      const e = configError(() => new NSAConfig(loose(options)));
      expect(e.message).toContain(`(got ${String(Object.values(options)[0])})`);
    });
  }

  it('a BigInt value is an NsaConfigError', () => {
    const e = configError(() => new NSAConfig(loose({ window: 512n })));
    expect(e.message).toContain('window: must be a positive integer (got 512');
  });

  it('lists every broken rule, one per line', () => {
    const e = configError(
      () => new NSAConfig(loose({ compressStride: 0, window: 0, phi: 'max', heads: 6, kvHeads: 4, valueDim: 2.5, scale: -1 })),
    );
    const paths = e.issues.map((i: ConfigIssue) => i.path);
    expect(paths).toEqual(['compressStride', 'window', 'phi', 'valueDim', 'heads', 'scale']);
    const lines = e.message.split('\n');
    expect(lines[0]).toBe('invalid NSA config:');
    expect(lines).toHaveLength(1 + e.issues.length);
    for (const path of paths) expect(e.message).toContain(`  - ${path}: `);
  });

  it('lists both divisibility rules of d when d divides neither l nor l\'', () => {
    const e = configError(() => new NSAConfig({ compressBlock: 32, compressStride: 24, selectBlock: 64 }));
    expect(e.issues.map((i) => i.rule)).toEqual(['must divide compressBlock (l = 32)', "must divide selectBlock (l' = 64)"]);
  });

  it('does not pile derived rules on a field that is already invalid', () => {
    // d = 0 cannot divide anything; only its own rule is reported.
    expect(configError(() => new NSAConfig({ compressStride: 0 })).issues).toHaveLength(1);
    // kvHeads = 0: no divisibility complaint about heads.
    expect(configError(() => new NSAConfig({ kvHeads: 0 })).issues.map((i) => i.path)).toEqual(['kvHeads']);
  });

  it('with() revalidates and keeps the other fields', () => {
    const c = new NSAConfig({ heads: 8, kvHeads: 2, headDim: 64, valueDim: 32 });
    const e = configError(() => c.with({ selectBlock: 40 }));
    expect(e.message).toContain("compressStride: must divide selectBlock (l' = 40) (got 16)");
    expect(configError(() => c.with({ kvHeads: 3 })).message).toContain('heads: must be divisible by kvHeads (H = 3) (got 8)');
    expect(configError(() => c.with(loose({ phi: 'pool' }))).issues[0]!.path).toBe('phi');
    const changed = c.with({ window: 64, phi: 'linear' });
    expect(changed.toOptions()).toEqual({ ...c.toOptions(), window: 64, phi: 'linear' });
    expect(c.window).toBe(512);
    expect(c.with({}).toOptions()).toEqual(c.toOptions());
  });

  it('toString names every field', () => {
    expect(new NSAConfig({ headDim: 64 }).toString()).toBe(
      "NSAConfig(l=32, d=16, l'=64, n=16, w=512, phi=mean, Hq=16, H=1, Dk=64, Dv=128, scale=0.125000)",
    );
  });
});
