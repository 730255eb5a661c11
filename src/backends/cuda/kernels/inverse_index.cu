// nvcc-check: -DSEL_N=16
// nvcc-check: -DSEL_N=3
//
// The inverse of the selection, deterministically: for each key (KV head h, selection block), the (token, slot)
// pairs that chose it, in token order. Used by the FSA-ordered selected attention and by the selected branch's
// dK/dV, whose sums then run in the same order on every run (no atomic decides the order of a sum; the work
// items' schedule below uses one, which only changes when an item runs).
// Keys are numbered h * total_blocks + cu_blocks[sequence] + j. Tokens are cut into C chunks; a stable counting
// sort places each chunk's pairs after the earlier chunks' pairs of the same key:
//   nsa_index_count          counts[key * C + chunk], one thread per (chunk, h), walking its tokens in order
//   nsa_index_key_totals     per-key totals (sum over chunks), a warp per key
//   nsa_index_scan           exclusive scans of the totals -> key offsets, and of the tiles they need
//   nsa_index_chunk_starts   where each (key, chunk) run starts: key offset + earlier chunks' counts, a warp per key
//   nsa_index_fill           entries (token, slot), one thread per (chunk, h) again, in token order
// or, where a chunk's keys fit shared memory (the host's rule), count and fill by a warp per (chunk, h) over counters
// in shared memory (nsa_index_count_ranked, nsa_index_fill_ranked: no global read-modify-write chain per token).
#include "nsa_common.cuh"

/**
 * The walk shared by count and fill: tokens [c * chunk, end) of KV head h in order, each token's valid slots
 * (up to its first -1) handed to `visit(t, base, blocks, valid)`, base being the key of the token's block 0. The
 * next token's slots and base load while this one's are visited.
 */
template <typename Visit>
__device__ __forceinline__ void walk_chunk(const int *__restrict__ block_indices, const int *__restrict__ row_seq,
                                           const int *__restrict__ cu_blocks, int t0, int end, int H, int h,
                                           int total_blocks, Visit visit) {
  int next[SEL_N];
  int next_base = 0;
  auto load = [&](int t) {
    const int *sel = block_indices + ((i64)t * H + h) * SEL_N;
#pragma unroll
    for (int s = 0; s < SEL_N; s++) next[s] = t < end ? sel[s] : -1;
    if (t < end) next_base = h * total_blocks + cu_blocks[row_seq[t]];
  };
  load(t0);
  for (int t = t0; t < end; t++) {
    int blocks[SEL_N];
#pragma unroll
    for (int s = 0; s < SEL_N; s++) blocks[s] = next[s];
    const int base = next_base;
    load(t + 1);
    int valid = SEL_N; // slots before the first -1
#pragma unroll
    for (int s = SEL_N - 1; s >= 0; s--) valid = blocks[s] < 0 ? s : valid;
    visit(t, base, blocks, valid);
  }
}

/**
 * counts[key * C + chunk] (each counter belongs to one thread). A token's blocks are distinct (top-n picks
 * distinct blocks), so its counters are distinct: all are read, then all written, one round trip a token
 * instead of one a slot.
 */
extern "C" __global__ void nsa_index_count(const int *__restrict__ block_indices, const int *__restrict__ row_seq,
                                           const int *__restrict__ cu_blocks, int *__restrict__ counts, int N, int H,
                                           int total_blocks, int chunk, int chunks) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x; // (chunk, h)
  if (idx >= chunks * H) return;
  const int c = idx / H;
  const int h = idx % H;
  walk_chunk(block_indices, row_seq, cu_blocks, c * chunk, min(N, (c + 1) * chunk), H, h, total_blocks,
             [&](int, int base, const int *blocks, int valid) {
               int n[SEL_N];
#pragma unroll
               for (int s = 0; s < SEL_N; s++) n[s] = s < valid ? counts[(i64)(base + blocks[s]) * chunks + c] : 0;
#pragma unroll
               for (int s = 0; s < SEL_N; s++) {
                 if (s < valid) counts[(i64)(base + blocks[s]) * chunks + c] = n[s] + 1;
               }
             });
}

/** One warp per key: its lanes read consecutive chunks' counts (coalesced), summed in a fixed order. */
extern "C" __global__ void nsa_index_key_totals(const int *__restrict__ counts, int *__restrict__ totals, int keys, int chunks) {
  const int key = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (key >= keys) return;
  int sum = 0;
  for (int c = lane; c < chunks; c += 32) sum += counts[(i64)key * chunks + c];
#pragma unroll
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffff, sum, d);
  if (lane == 0) totals[key] = sum;
}

/** Exclusive scans of totals -> offsets and of ceil(total / per_tile) -> tile_offsets (n + 1 entries each). */
extern "C" __global__ void __launch_bounds__(1024)
    nsa_index_scan(const int *__restrict__ totals, int *__restrict__ offsets, int *__restrict__ tile_offsets, int n, int per_tile) {
  __shared__ int sums[2][1024];
  const int per_thread = (n + 1023) / 1024;
  const int begin = min(n, (int)threadIdx.x * per_thread);
  const int end = min(n, begin + per_thread);
  int c = 0;
  int t = 0;
  for (int i = begin; i < end; i++) {
    c += totals[i];
    t += (totals[i] + per_tile - 1) / per_tile;
  }
  sums[0][threadIdx.x] = c;
  sums[1][threadIdx.x] = t;
  __syncthreads();
  for (int off = 1; off < 1024; off <<= 1) { // Hillis-Steele inclusive scan
    const int a = threadIdx.x >= off ? sums[0][threadIdx.x - off] : 0;
    const int b = threadIdx.x >= off ? sums[1][threadIdx.x - off] : 0;
    __syncthreads();
    sums[0][threadIdx.x] += a;
    sums[1][threadIdx.x] += b;
    __syncthreads();
  }
  c = threadIdx.x > 0 ? sums[0][threadIdx.x - 1] : 0;
  t = threadIdx.x > 0 ? sums[1][threadIdx.x - 1] : 0;
  for (int i = begin; i < end; i++) {
    offsets[i] = c;
    tile_offsets[i] = t;
    c += totals[i];
    t += (totals[i] + per_tile - 1) / per_tile;
  }
  if (threadIdx.x == 1023) {
    offsets[n] = sums[0][1023];
    tile_offsets[n] = sums[1][1023];
  }
}

/** One warp per key: 32 chunks a round, a warp scan of their counts on top of the rounds before. */
extern "C" __global__ void nsa_index_chunk_starts(const int *__restrict__ counts, const int *__restrict__ offsets,
                                                  int *__restrict__ starts, int keys, int chunks) {
  const int key = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (key >= keys) return;
  int at = offsets[key];
  for (int c0 = 0; c0 < chunks; c0 += 32) {
    const int c = c0 + lane;
    const int n = c < chunks ? counts[(i64)key * chunks + c] : 0;
    int inclusive = n;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int other = __shfl_up_sync(0xffffffff, inclusive, d);
      if (lane >= d) inclusive += other;
    }
    if (c < chunks) starts[(i64)key * chunks + c] = at + inclusive - n;
    at += __shfl_sync(0xffffffff, inclusive, 31);
  }
}

/** entries in token order within each (key, chunk) run; the cursors as the counts above (distinct per token). */
extern "C" __global__ void nsa_index_fill(const int *__restrict__ block_indices, const int *__restrict__ row_seq,
                                          const int *__restrict__ cu_blocks, int *__restrict__ starts,
                                          int2 *__restrict__ entries, int N, int H, int total_blocks, int chunk, int chunks) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= chunks * H) return;
  const int c = idx / H;
  const int h = idx % H;
  walk_chunk(block_indices, row_seq, cu_blocks, c * chunk, min(N, (c + 1) * chunk), H, h, total_blocks,
             [&](int t, int base, const int *blocks, int valid) {
               int at[SEL_N]; // this thread's own (key, chunk) cursors
#pragma unroll
               for (int s = 0; s < SEL_N; s++) at[s] = s < valid ? starts[(i64)(base + blocks[s]) * chunks + c] : 0;
#pragma unroll
               for (int s = 0; s < SEL_N; s++) {
                 if (s < valid) {
                   entries[at[s]] = make_int2(t, s);
                   starts[(i64)(base + blocks[s]) * chunks + c] = at[s] + 1;
                 }
               }
             });
}

/**
 * The ranked walks' warp: chunk c of KV head h (warp w of the CTA takes (chunk, h) number blockIdx.x * warps + w),
 * and its counters in shared memory, one per key the chunk can have chosen: keys h * total_blocks + first .. +
 * first + span - 1, first being the global number of block 0 of the chunk's first token's sequence (a token chooses
 * no block after its own; the host's span covers every chunk's range).
 */
struct RankedChunk {
  int c, h, t0, end;
  int first;   // global block number of the first sequence's block 0
  int limit;   // counters in use: min(span, total_blocks - first)
  bool valid;  // a (chunk, h) exists for this warp
  bool single; // the chunk's tokens all lie in one sequence (the usual case): every token's offset is 0
};
__device__ __forceinline__ RankedChunk ranked_chunk(const int *__restrict__ row_seq, const int *__restrict__ cu_blocks, int N,
                                                    int H, int total_blocks, int chunk, int chunks, int span) {
  RankedChunk r;
  const int idx = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  r.c = idx / H;
  r.h = idx % H;
  r.t0 = r.c * chunk;
  r.end = min(N, r.t0 + chunk);
  r.valid = idx < chunks * H && r.t0 < r.end;
  const int seq = r.valid ? row_seq[r.t0] : 0;
  r.single = r.valid && row_seq[r.end - 1] == seq;
  r.first = r.valid ? cu_blocks[seq] : 0;
  r.limit = min(span, total_blocks - r.first);
  return r;
}

/** Token t's blocks (-1 past the chunk's end): SEL_N / 4 vector loads where SEL_N is a multiple of 4. */
__device__ __forceinline__ void ranked_blocks(const int *__restrict__ block_indices, int t, const RankedChunk &rc, int H, int blocks[SEL_N]) {
  const int *sel = block_indices + ((i64)t * H + rc.h) * SEL_N;
  if (SEL_N % 4 == 0) { // a token's row is 16-byte aligned
#pragma unroll
    for (int s = 0; s < SEL_N; s += 4) {
      const int4 v = t < rc.end ? *reinterpret_cast<const int4 *>(sel + s) : make_int4(-1, -1, -1, -1);
      blocks[s] = v.x;
      blocks[s + 1] = v.y;
      blocks[s + 2] = v.z;
      blocks[s + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int s = 0; s < SEL_N; s++) blocks[s] = t < rc.end ? sel[s] : -1;
  }
}

/**
 * Token t's offset from the chunk's first block 0 (0 without a load where the chunk lies in one sequence), and its
 * valid slots (before the first -1, as walk_chunk counts them).
 */
__device__ __forceinline__ int ranked_offset(const int *__restrict__ row_seq, const int *__restrict__ cu_blocks, int t,
                                             const RankedChunk &rc, const int blocks[SEL_N], int *offset) {
  *offset = rc.single || t >= rc.end ? 0 : cu_blocks[row_seq[t]] - rc.first;
  int valid = SEL_N;
#pragma unroll
  for (int s = SEL_N - 1; s >= 0; s--) valid = blocks[s] < 0 ? s : valid;
  return valid;
}

/** nsa_index_count's counts by a warp per (chunk, h): the chunk's counts summed in shared memory, written once. */
extern "C" __global__ void nsa_index_count_ranked(const int *__restrict__ block_indices, const int *__restrict__ row_seq,
                                                  const int *__restrict__ cu_blocks, int *__restrict__ counts, int N, int H,
                                                  int total_blocks, int chunk, int chunks, int span) {
  extern __shared__ int ranked_smem[];
  const RankedChunk rc = ranked_chunk(row_seq, cu_blocks, N, H, total_blocks, chunk, chunks, span);
  if (!rc.valid) return; // the whole warp
  const int lane = threadIdx.x % 32;
  int *hist = ranked_smem + (threadIdx.x / 32) * 2 * span;
  int next[SEL_N]; // the next round's blocks, loading while this one counts
  ranked_blocks(block_indices, rc.t0 + lane, rc, H, next);
  for (int i = lane; i < rc.limit; i += 32) hist[i] = 0;
  __syncwarp();
  for (int r0 = rc.t0; r0 < rc.end; r0 += 32) {
    int blocks[SEL_N];
#pragma unroll
    for (int s = 0; s < SEL_N; s++) blocks[s] = next[s];
    if (r0 + 32 < rc.end) ranked_blocks(block_indices, r0 + 32 + lane, rc, H, next);
    int offset;
    const int valid = ranked_offset(row_seq, cu_blocks, r0 + lane, rc, blocks, &offset);
#pragma unroll
    for (int s = 0; s < SEL_N; s++) {
      if (s < valid) atomicAdd(&hist[offset + blocks[s]], 1);
    }
  }
  __syncwarp();
  const i64 key_lo = (i64)rc.h * total_blocks + rc.first;
  for (int i = lane; i < rc.limit; i += 32) {
    if (hist[i] != 0) counts[(key_lo + i) * chunks + rc.c] = hist[i]; // the host zeroed the others
  }
}

/**
 * nsa_index_fill's entries by a warp per (chunk, h): the chunk's (key, chunk) cursors loaded into shared memory,
 * 32 tokens a round (a lane a token). In a round the lanes that chose one key mark a bit each in that key's mask,
 * then each takes the place its bit's rank gives (lanes in token order, so each (key, chunk) run stays in token
 * order), and the lowest of them advances the cursor: the same entries as nsa_index_fill. A lane reads all its
 * slots' masks and cursors before it uses any (the rounds are chains of shared-memory round trips, ~100 cycles an
 * instruction when each slot waited for its own), and the lowest lanes keep what they read for the cursor's update.
 */
extern "C" __global__ void nsa_index_fill_ranked(const int *__restrict__ block_indices, const int *__restrict__ row_seq,
                                                 const int *__restrict__ cu_blocks, const int *__restrict__ starts,
                                                 int2 *__restrict__ entries, int N, int H, int total_blocks, int chunk,
                                                 int chunks, int span) {
  extern __shared__ int ranked_smem[];
  const RankedChunk rc = ranked_chunk(row_seq, cu_blocks, N, H, total_blocks, chunk, chunks, span);
  if (!rc.valid) return; // the whole warp
  const int lane = threadIdx.x % 32;
  int *cursor = ranked_smem + (threadIdx.x / 32) * 2 * span;
  unsigned *mask = reinterpret_cast<unsigned *>(cursor + span);
  const i64 key_lo = (i64)rc.h * total_blocks + rc.first;
  int next[SEL_N]; // the next round's blocks, loading while this one runs (and the cursors load)
  ranked_blocks(block_indices, rc.t0 + lane, rc, H, next);
  for (int i = lane; i < rc.limit; i += 32) {
    cursor[i] = starts[(key_lo + i) * chunks + rc.c];
    mask[i] = 0;
  }
  __syncwarp();
  const unsigned below = (1u << lane) - 1; // the lanes (tokens) before this one
  for (int r0 = rc.t0; r0 < rc.end; r0 += 32) {
    const int t = r0 + lane;
    int blocks[SEL_N];
#pragma unroll
    for (int s = 0; s < SEL_N; s++) blocks[s] = next[s];
    if (r0 + 32 < rc.end) ranked_blocks(block_indices, t + 32, rc, H, next);
    int offset;
    const int valid = ranked_offset(row_seq, cu_blocks, t, rc, blocks, &offset);
    int key[SEL_N]; // the slots' counters (slots past valid read block 0's, harmlessly: their results go unused)
#pragma unroll
    for (int s = 0; s < SEL_N; s++) key[s] = offset + max(blocks[s], 0);
#pragma unroll
    for (int s = 0; s < SEL_N; s++) {
      if (s < valid) atomicOr(&mask[key[s]], 1u << lane);
    }
    __syncwarp();
    unsigned m[SEL_N];
    int at[SEL_N];
#pragma unroll
    for (int s = 0; s < SEL_N; s++) {
      m[s] = mask[key[s]];
      at[s] = cursor[key[s]];
    }
#pragma unroll
    for (int s = 0; s < SEL_N; s++) {
      if (s < valid) entries[at[s] + __popc(m[s] & below)] = make_int2(t, s);
    }
    __syncwarp(); // every lane has read the round's masks and cursors
#pragma unroll
    for (int s = 0; s < SEL_N; s++) {
      if (s < valid && (m[s] & below) == 0) { // the key's lowest lane
        cursor[key[s]] = at[s] + __popc(m[s]);
        mask[key[s]] = 0;
      }
    }
    __syncwarp();
  }
}

// The order the selected dK/dV runs its work items in (not what they sum: each item writes its own partial rows,
// reduced in item order). Items are numbered key by key, so CTAs running together took neighbouring blocks'
// items, whose choosing tokens lie all over the sequence, and their gathered query/dO rows came from DRAM. Run by
// (KV head, token of the item's first pair / bucket_tokens) instead, CTAs running together gather rows of nearby
// tokens of one head, which neighbouring items read again while they are in L2:
//   nsa_index_item_buckets   each item's bucket and its place in it (an atomic: that place varies run to run)
//   nsa_index_scan           bucket starts (per_tile 1)
//   nsa_index_item_order     item_order[bucket start + place] = item

/** Item b's bucket (KV head h * buckets_per_head + first token / bucket_tokens) and its place among the bucket's. */
extern "C" __global__ void nsa_index_item_buckets(const int *__restrict__ offsets, const int *__restrict__ item_offsets,
                                                  const int2 *__restrict__ entries, int *__restrict__ bucket_counts,
                                                  int2 *__restrict__ item_bucket, int keys, int total_blocks, int item_entries,
                                                  int buckets_per_head, int bucket_tokens) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= item_offsets[keys]) return;
  // The key whose items hold b: the last with item_offsets[key] <= b (a thread's own search: range_holding is a
  // warp's, for one b).
  int key = 0;
  for (int hi = keys - 1; key < hi;) {
    const int mid = (key + hi + 1) / 2;
    if (item_offsets[mid] <= b) key = mid;
    else hi = mid - 1;
  }
  const int first = offsets[key] + (b - item_offsets[key]) * item_entries; // every item holds at least one pair
  const int bucket = (key / total_blocks) * buckets_per_head + entries[first].x / bucket_tokens;
  item_bucket[b] = make_int2(bucket, atomicAdd(&bucket_counts[bucket], 1));
}

extern "C" __global__ void nsa_index_item_order(const int *__restrict__ item_offsets, const int2 *__restrict__ item_bucket,
                                                const int *__restrict__ bucket_starts, int *__restrict__ item_order, int keys) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= item_offsets[keys]) return;
  const int2 at = item_bucket[b];
  item_order[bucket_starts[at.x] + at.y] = b;
}
