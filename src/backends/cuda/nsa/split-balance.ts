// How many ways to split the query walks of the compressed keys' dK/dV (flash backward, mode 1). Its CTAs own a
// tile of compressed keys and walk every query tile that sees them, so their work differs by the tile's place (the
// earliest keys are seen by every later row) and there are few of them: each tile's walk is split into equal parts,
// and the launch lists the parts heaviest first, as a longest-first schedule over the SMs. Which split count
// leaves the least idle tail depends on the tiles' lengths, so this simulates that schedule for each count.

const MAX_SIMULATED_PARTS = 1 << 18;

/** Query tiles a CTA iterates for a compressed key tile: G heads x the 64-row tiles from the first row seeing it. */
export function cmpKeyTileIterations(
  cuSeqlens: readonly number[],
  cuCmp: readonly number[],
  keysPerTile: number,
  config: { readonly compressBlock: number; readonly compressStride: number; readonly groupSize: number },
): number[] {
  const iterations: number[] = [];
  for (let s = 0; s + 1 < cuSeqlens.length; s++) {
    const seqLen = cuSeqlens[s + 1]! - cuSeqlens[s]!;
    const keys = cuCmp[s + 1]! - cuCmp[s]!;
    for (let k0 = 0; k0 < keys; k0 += keysPerTile) {
      const first = k0 * config.compressStride + config.compressBlock - 1; // the first row that sees key k0
      const qstart = Math.floor(first / 64) * 64;
      iterations.push(config.groupSize * Math.max(0, Math.ceil((seqLen - qstart) / 64)));
    }
  }
  return iterations;
}

/**
 * The split count in [minSplits, maxSplits] whose longest-first schedule of the parts (each of the `heads` copies of
 * every tile in `iterations` cut into equal parts, plus `overhead` iterations a CTA) on `machines` CTA slots ends
 * soonest; the smallest such count within 2% of the best, since each split adds partial sums to write and reduce.
 * Remembered per input: the search takes milliseconds (20 ms at 128k tokens, G = 4, paper preset), and a training
 * loop builds a backward for the same shapes every step.
 */
export function chooseSplits(iterations: readonly number[], heads: number, machines: number, minSplits: number, maxSplits = 32, overhead = 2): number {
  const key = `${heads}:${machines}:${minSplits}:${maxSplits}:${overhead}:${iterations.join(',')}`;
  let splits = chosen.get(key);
  if (splits === undefined) {
    splits = searchSplits(iterations, heads, machines, minSplits, maxSplits, overhead);
    if (chosen.size >= 64) chosen.clear();
    chosen.set(key, splits);
  }
  return splits;
}

const chosen = new Map<string, number>();

function searchSplits(iterations: readonly number[], heads: number, machines: number, minSplits: number, maxSplits: number, overhead: number): number {
  const lo = Math.max(1, Math.min(minSplits, maxSplits));
  // Many tiles fill the SMs unsplit, and simulating them all would cost more than it saves: stop at ~256k parts.
  const hi = Math.max(lo, Math.min(maxSplits, Math.floor(MAX_SIMULATED_PARTS / Math.max(1, iterations.length * heads))));
  const spans: number[] = [];
  for (let splits = lo; splits <= hi; splits++) spans.push(longestFirstSpan(iterations, heads, splits, machines, overhead));
  const best = Math.min(...spans);
  return lo + spans.findIndex((span) => span <= best * 1.02);
}

/** When the last of the parts ends, each part to the slot that frees first, parts taken heaviest first. */
function longestFirstSpan(iterations: readonly number[], heads: number, splits: number, machines: number, overhead: number): number {
  const parts: number[] = [];
  for (const total of iterations) {
    const per = Math.ceil(total / splits);
    for (let k = 0; k < splits; k++) {
      const work = Math.max(0, Math.min(total, (k + 1) * per) - k * per);
      for (let h = 0; h < heads; h++) parts.push(work + overhead);
    }
  }
  parts.sort((a, b) => b - a);
  const slots = new MinHeap(Math.max(1, machines));
  for (const work of parts) slots.replaceMin(slots.min() + work);
  return slots.max();
}

/** Slot end times; the earliest on top. */
class MinHeap {
  private readonly items: number[];
  constructor(size: number) {
    this.items = new Array<number>(size).fill(0);
  }
  min(): number {
    return this.items[0]!;
  }
  max(): number {
    return Math.max(...this.items);
  }
  /** Replaces the earliest end with `value` and restores the heap. */
  replaceMin(value: number): void {
    const a = this.items;
    a[0] = value;
    for (let i = 0; ; ) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < a.length && a[l]! < a[m]!) m = l;
      if (r < a.length && a[r]! < a[m]!) m = r;
      if (m === i) return;
      [a[i], a[m]] = [a[m]!, a[i]!];
      i = m;
    }
  }
}
