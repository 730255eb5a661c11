// Pictures of the selection: for some queries of one sequence and one KV head, each selection block is
// selected, visible but not selected, or in the future (it starts after the query). As text, one row per query
// and one character per block (several blocks per character when there are many); as a PNG, many queries, with
// the cells scaled up and three colours.

import { PNG } from 'pngjs';

/** The state of a block for a query. */
export const Cell = { Future: 0, Visible: 1, Selected: 2 } as const;
export type Cell = (typeof Cell)[keyof typeof Cell];

export interface SelectionGrid {
  /** Local positions of the queries, one per grid row. */
  readonly queries: readonly number[];
  /** Selection blocks of the sequence (Ns). */
  readonly blocks: number;
  /** Blocks merged into one column (1 when every block has its own column). */
  readonly blocksPerColumn: number;
  readonly columns: number;
  /** [queries, columns]: the strongest state among a column's blocks (selected > visible > future). */
  readonly cells: Uint8Array;
}

export interface GridSource {
  /** [N, H, n] selected blocks per packed row and KV head, -1 padded. */
  readonly blockIndices: Int32Array;
  readonly kvHeads: number;
  readonly selectCount: number;
  /** l': keys per selection block. */
  readonly selectBlock: number;
  /** Packed row of the sequence's first token, and its length. */
  readonly start: number;
  readonly length: number;
  /** The KV head to draw. */
  readonly head: number;
}

/** The grid for the given query positions, at most `maxColumns` wide. */
export function selectionGrid(src: GridSource, queries: readonly number[], maxColumns: number): SelectionGrid {
  const blocks = Math.ceil(src.length / src.selectBlock);
  const blocksPerColumn = Math.max(1, Math.ceil(blocks / maxColumns));
  const columns = Math.ceil(blocks / blocksPerColumn);
  const cells = new Uint8Array(queries.length * columns);
  queries.forEach((t, r) => {
    const visibleBlocks = Math.floor(t / src.selectBlock) + 1;
    for (let j = 0; j < visibleBlocks; j++) mark(cells, r * columns + Math.floor(j / blocksPerColumn), Cell.Visible);
    const base = ((src.start + t) * src.kvHeads + src.head) * src.selectCount;
    for (let i = 0; i < src.selectCount; i++) {
      const j = src.blockIndices[base + i]!;
      if (j >= 0) mark(cells, r * columns + Math.floor(j / blocksPerColumn), Cell.Selected);
    }
  });
  return { queries, blocks, blocksPerColumn, columns, cells };
}

const CHARS: Readonly<Record<Cell, string>> = { [Cell.Future]: ' ', [Cell.Visible]: '.', [Cell.Selected]: '#' };

/** One line per query: `t=<pos> |<one char per column>|`, after a legend. */
export function textPicture(grid: SelectionGrid, selectBlock: number): string[] {
  const per =
    grid.blocksPerColumn === 1
      ? `one column per block of ${selectBlock} keys`
      : `one column per ${grid.blocksPerColumn} blocks of ${selectBlock} keys (${grid.blocks} blocks), '#' if any of them is selected`;
  const width = String(Math.max(...grid.queries, 0)).length;
  const lines = [`  legend: '#' selected, '.' visible but not selected, ' ' future; ${per}`];
  grid.queries.forEach((t, r) => {
    let row = '';
    for (let c = 0; c < grid.columns; c++) row += CHARS[grid.cells[r * grid.columns + c]! as Cell];
    lines.push(`  t=${String(t).padStart(width)} |${row}|`);
  });
  return lines;
}

/** Colours (RGB) of the three states in the PNG. */
export const PNG_COLOURS: Readonly<Record<Cell, readonly [number, number, number]>> = {
  [Cell.Future]: [255, 255, 255],
  [Cell.Visible]: [198, 219, 239],
  [Cell.Selected]: [203, 24, 29],
};

/** A PNG of the grid, each cell drawn as a block of pixels so that the image is a few hundred pixels a side. */
export function pngPicture(grid: SelectionGrid, targetPixels = 768): Buffer {
  const scale = (cells: number): number => Math.min(16, Math.max(1, Math.floor(targetPixels / Math.max(1, cells))));
  const sx = scale(grid.columns);
  const sy = scale(grid.queries.length);
  const png = new PNG({ width: grid.columns * sx, height: grid.queries.length * sy });
  for (let y = 0; y < png.height; y++) {
    const r = Math.floor(y / sy);
    for (let x = 0; x < png.width; x++) {
      const [red, green, blue] = PNG_COLOURS[grid.cells[r * grid.columns + Math.floor(x / sx)]! as Cell];
      const p = (y * png.width + x) * 4;
      png.data[p] = red;
      png.data[p + 1] = green;
      png.data[p + 2] = blue;
      png.data[p + 3] = 255;
    }
  }
  return PNG.sync.write(png);
}

function mark(cells: Uint8Array, i: number, state: Cell): void {
  if (cells[i]! < state) cells[i] = state;
}
