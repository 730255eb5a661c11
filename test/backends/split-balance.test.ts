// The compressed dK/dV's split count: the simulated longest-first schedule, and the per-tile work it is fed.

import { describe, expect, it } from 'vitest';
import { chooseSplits, cmpKeyTileIterations } from '../../src/backends/cuda/nsa/split-balance.js';

describe('cmpKeyTileIterations', () => {
  it('counts G heads x the 64-row query tiles from the first row that sees each key tile, per sequence', () => {
    // l = 32, d = 16: key c is first seen by row 16c + 31. Tiles of 4 keys: rows 31 -> tiles from 0; key 4: row 95 -> 64.
    const config = { compressBlock: 32, compressStride: 16, groupSize: 2 };
    expect(cmpKeyTileIterations([0, 200, 300], [0, 11, 16], 4, config)).toEqual([
      2 * 4, // sequence 0 (200 rows), keys 0..3: rows 0..199, 4 tiles
      2 * 3, // keys 4..7: from row 64, 3 tiles
      2 * 2, // keys 8..10: first row 159 -> from 128, 2 tiles
      2 * 2, // sequence 1 (100 rows), keys 0..3: 2 tiles
      2 * 1, // keys 4: from row 64, 1 tile
    ]);
  });
});

describe('chooseSplits', () => {
  it('keeps the smallest count where the parts already fill the slots evenly', () => {
    expect(chooseSplits([8, 8, 8, 8], 1, 4, 1, 32, 0)).toBe(1);
    expect(chooseSplits([8, 8, 8, 8], 2, 4, 2, 32, 0)).toBe(2);
  });

  it('splits further where the longest-first schedule would leave a tail', () => {
    // Five equal walks on four slots: unsplit, one slot runs two of them (span 16); in two, 10 parts of 4 (span 12);
    // in three, parts of 3, 3, 2 (span 11); in four, 20 parts of 2 fill every slot to 10, the least there is.
    expect(chooseSplits([8, 8, 8, 8, 8], 1, 4, 1, 32, 0)).toBe(4);
  });

  it('charges each part a fixed cost, so it does not split without need', () => {
    expect(chooseSplits([64], 1, 1, 1, 32, 2)).toBe(1);
  });

  it('stays within [minSplits, maxSplits]', () => {
    const s = chooseSplits([1000, 10], 1, 132, 40, 32);
    expect(s).toBe(32);
    expect(chooseSplits([5, 4, 3, 2, 1], 1, 2, 3, 6)).toBeGreaterThanOrEqual(3);
  });
});
