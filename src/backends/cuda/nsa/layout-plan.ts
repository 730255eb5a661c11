// The host-side index tables the kernels read, built once per request from the sequence offsets:
// which sequence each token and compressed token belongs to, compressed and selection-block offsets per
// sequence, and the tile lists of the tiled kernels (heaviest tiles first, so the long ones start early).

import type { NSAConfig } from '../../../config/nsa-config.js';

export interface LayoutPlan {
  readonly sequences: number;
  readonly totalTokens: number;
  readonly totalCompressed: number;
  readonly totalBlocks: number;
  readonly cuSeqlens: Int32Array;
  readonly cuCmp: Int32Array;
  readonly cuBlocks: Int32Array;
  readonly rowSeq: Int32Array;
  readonly cmpRowSeq: Int32Array;
  readonly blockSeq: Int32Array;
  /** (sequence, first local row) pairs of the flash kernel's query tiles. */
  readonly queryTiles: Int32Array;
  /** (sequence, first local position) pairs of the block-selection kernel's tiles of `positionsPerTile`. */
  readonly selectTiles: Int32Array;
  readonly positionsPerTile: number;
}

export function buildLayoutPlan(
  config: NSAConfig,
  cuSeqlens: readonly number[],
  queryTile: number,
  positionsPerTile: number,
): LayoutPlan {
  const S = cuSeqlens.length - 1;
  const N = cuSeqlens[S]!;
  const cuCmp = new Int32Array(S + 1);
  const cuBlocks = new Int32Array(S + 1);
  for (let s = 0; s < S; s++) {
    const len = cuSeqlens[s + 1]! - cuSeqlens[s]!;
    cuCmp[s + 1] = cuCmp[s]! + config.compressedLength(len);
    const blocks = config.selectBlockCount(len);
    cuBlocks[s + 1] = cuBlocks[s]! + blocks;
  }
  const rowSeq = new Int32Array(N);
  const cmpRowSeq = new Int32Array(cuCmp[S]!);
  const blockSeq = new Int32Array(cuBlocks[S]!);
  for (let s = 0; s < S; s++) {
    rowSeq.fill(s, cuSeqlens[s]!, cuSeqlens[s + 1]!);
    cmpRowSeq.fill(s, cuCmp[s]!, cuCmp[s + 1]!);
    blockSeq.fill(s, cuBlocks[s]!, cuBlocks[s + 1]!);
  }
  return {
    sequences: S,
    totalTokens: N,
    totalCompressed: cuCmp[S]!,
    totalBlocks: cuBlocks[S]!,
    cuSeqlens: Int32Array.from(cuSeqlens),
    cuCmp,
    cuBlocks,
    rowSeq,
    cmpRowSeq,
    blockSeq,
    queryTiles: tiles(cuSeqlens, queryTile),
    selectTiles: tiles(cuSeqlens, positionsPerTile),
    positionsPerTile,
  };
}

/** (sequence, start) pairs of tiles of `size` rows, the tiles with the most keys (latest rows) first. */
function tiles(cuSeqlens: readonly number[], size: number): Int32Array {
  const list: [number, number][] = [];
  for (let s = 0; s + 1 < cuSeqlens.length; s++) {
    const len = cuSeqlens[s + 1]! - cuSeqlens[s]!;
    for (let start = 0; start < len; start += size) list.push([s, start]);
  }
  list.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
  return Int32Array.from(list.flat());
}
