// Error measures between a backend's output and the float64 reference: relative RMS (the spec's tolerance
// measure) and max abs over the finite positions, and a count of positions where exactly one side is not finite
// (an lse of -inf marks a branch that sees no key: both sides must agree on where).

export interface ArrayError {
  /** sqrt(sum (a - e)^2 / sum e^2) over positions finite on both sides; the absolute RMS when every e is 0. */
  readonly relRms: number;
  readonly maxAbs: number;
  /** Positions where the reference is not finite (they must match exactly). */
  readonly nonFinite: number;
  /** Positions where the two sides disagree on a non-finite value. */
  readonly mismatched: number;
}

export function compareArrays(actual: ArrayLike<number>, expected: ArrayLike<number>): ArrayError {
  if (actual.length !== expected.length) {
    throw new Error(`cannot compare arrays of ${actual.length} and ${expected.length} elements`);
  }
  let num = 0;
  let den = 0;
  let maxAbs = 0;
  let finite = 0;
  let nonFinite = 0;
  let mismatched = 0;
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i]!;
    const a = actual[i]!;
    if (!Number.isFinite(e) || !Number.isFinite(a)) {
      if (!Number.isFinite(e)) nonFinite++;
      if (!(Object.is(a, e) || (Number.isNaN(a) && Number.isNaN(e)))) mismatched++;
      continue;
    }
    const diff = Math.abs(a - e);
    num += diff * diff;
    den += e * e;
    finite++;
    if (diff > maxAbs) maxAbs = diff;
  }
  const relRms = den > 0 ? Math.sqrt(num / den) : finite > 0 ? Math.sqrt(num / finite) : 0;
  return { relRms, maxAbs, nonFinite, mismatched };
}
