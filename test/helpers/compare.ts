// Comparisons with named tolerances: relative RMS error, and element-wise closeness that reports the first
// offending index with both values. -Infinity and NaN must match exactly where they occur.

import { expect } from 'vitest';

export function relativeRmsError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i]!;
    const a = actual[i]!;
    if (!Number.isFinite(e) || !Number.isFinite(a)) continue;
    num += (a - e) ** 2;
    den += e * e;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/** Positions where one side is not finite must hold the same value on the other. */
export function expectSameNonFinite(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string): void {
  expect(actual.length, `${what}: length`).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i]!;
    const a = actual[i]!;
    if (Number.isFinite(e) && Number.isFinite(a)) continue;
    if (Object.is(a, e) || (Number.isNaN(a) && Number.isNaN(e))) continue;
    throw new Error(`${what}[${i}]: expected ${e}, got ${a}`);
  }
}

export interface RmsOptions {
  readonly rtol: number;
  /**
   * An RMS the error is measured against when the expected values are smaller (a sum whose terms cancel, such as
   * a gradient that is exactly 0, is checked against the size of comparable sums that do not cancel).
   */
  readonly scale?: number;
}

export function rms(values: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < values.length; i++) sum += values[i]! ** 2;
  return values.length === 0 ? 0 : Math.sqrt(sum / values.length);
}

export function expectRelativeRms(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  what: string,
  { rtol, scale = 0 }: RmsOptions,
): void {
  expectSameNonFinite(actual, expected, what);
  const err = scale > rms(expected) ? rms(Array.from(expected, (e, i) => actual[i]! - e)) / scale : relativeRmsError(actual, expected);
  // NSA_TEST_REPORT=1 prints every comparison's error, to see how much room a tolerance leaves.
  if (process.env['NSA_TEST_REPORT'] === '1') console.log(`${what}: relative RMS error ${err.toExponential(3)} (limit ${rtol.toExponential(1)})`);
  if (!(err <= rtol)) throw new Error(`${what}: relative RMS error ${err.toExponential(3)} > ${rtol.toExponential(1)}`);
}

export interface CloseOptions {
  readonly atol: number;
  readonly rtol: number;
}

export function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string, tol: CloseOptions): void {
  expect(actual.length, `${what}: length`).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i]!;
    const a = actual[i]!;
    if (Object.is(a, e) || (Number.isNaN(a) && Number.isNaN(e))) continue;
    if (!(Math.abs(a - e) <= tol.atol + tol.rtol * Math.abs(e))) {
      throw new Error(`${what}[${i}]: expected ${e}, got ${a} (|diff| ${Math.abs(a - e).toExponential(3)})`);
    }
  }
}
