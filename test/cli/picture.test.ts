// The selection pictures and the keys-per-branch summary on hand-made block indices.

import { PNG } from 'pngjs';
import { describe, expect, it } from 'vitest';
import { NSAConfig } from '../../src/config/nsa-config.js';
import { keysPerBranch } from '../../src/cli/keys.js';
import { Cell, pngPicture, PNG_COLOURS, selectionGrid, textPicture, type GridSource } from '../../src/cli/picture.js';

// One sequence of T = 40, l' = 8 (5 blocks), n = 2, one KV head.
const T = 40;
const n = 2;
const indices = new Int32Array(T * n).fill(-1);
for (let t = 0; t < T; t++) {
  indices[t * n] = 0;
  if (t >= 8) indices[t * n + 1] = Math.floor(t / 8);
}
const source: GridSource = { blockIndices: indices, kvHeads: 1, selectCount: n, selectBlock: 8, start: 0, length: T, head: 0 };

describe('selection pictures', () => {
  it('draws selected, visible and future blocks', () => {
    const grid = selectionGrid(source, [0, 20, 39], 100);
    expect(grid.columns).toBe(5);
    expect(textPicture(grid, 8).slice(1)).toEqual(['  t= 0 |#    |', '  t=20 |#.#  |', '  t=39 |#...#|']);
  });

  it('merges blocks into columns when there are too many', () => {
    const grid = selectionGrid(source, [39], 2);
    expect(grid.blocksPerColumn).toBe(3);
    expect(grid.columns).toBe(2);
    expect(Array.from(grid.cells)).toEqual([Cell.Selected, Cell.Selected]);
    expect(textPicture(grid, 8)[0]).toContain('one column per 3 blocks');
  });

  it('writes a PNG with the three colours', () => {
    const grid = selectionGrid(source, [0, 20, 39], 100);
    const png = PNG.sync.read(pngPicture(grid, 100));
    expect(png.width).toBe(5 * 16);
    expect(png.height).toBe(3 * 16);
    const pixel = (x: number, y: number): number[] => Array.from(png.data.subarray((y * png.width + x) * 4, (y * png.width + x) * 4 + 3));
    expect(pixel(0, 0)).toEqual([...PNG_COLOURS[Cell.Selected]]);
    expect(pixel(16, 0)).toEqual([...PNG_COLOURS[Cell.Future]]);
    expect(pixel(16, 16)).toEqual([...PNG_COLOURS[Cell.Visible]]);
  });
});

describe('keysPerBranch', () => {
  it('counts the keys of each branch', () => {
    const config = new NSAConfig({ compressBlock: 4, compressStride: 4, selectBlock: 8, selectCount: n, window: 4, heads: 1, kvHeads: 1, headDim: 4, valueDim: 4 });
    const keys = keysPerBranch(config, [0, T], indices);
    let cmp = 0;
    let slc = 0;
    let win = 0;
    for (let t = 0; t < T; t++) {
      cmp += t < 3 ? 0 : Math.floor((t - 3) / 4) + 1;
      slc += t < 8 ? t + 1 : 8 + (t % 8) + 1; // block 0 whole, the current block up to t
      win += Math.min(4, t + 1);
    }
    expect(keys.cmp).toBeCloseTo(cmp / T, 12);
    expect(keys.slc).toBeCloseTo(slc / T, 12);
    expect(keys.win).toBeCloseTo(win / T, 12);
    expect(keys.full).toBeCloseTo((T + 1) / 2, 12);
    expect(keys.total).toBeCloseTo(keys.cmp + keys.slc + keys.win, 12);
  });
});
