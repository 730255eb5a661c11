// Top-n selection by one warp, shared by the prefill scorer (select_blocks.cu) and the decode step (decode.cu).
// The forced blocks (0, the block before t's, t's own: distinct ones, lowest index first) rank above all others;
// the rest go by score, higher first, the lower index on ties. Needs SEL_N (n <= 32) and NSA_NEG_INF.
#pragma once

#define NO_BLOCK 0x7fffffff // the index of an empty (score -inf) pair: after every real one on ties

/** (score, index) order of top-n: higher score first, lower index on ties. */
__device__ __forceinline__ bool topk_better(float s, int j, float bs, int bj) { return s > bs || (s == bs && j < bj); }

/**
 * The warp's best (score, index) pair: every lane passes its own and gets the best, with the `at` (say, where the
 * pair lives) of the lane it came from.
 */
__device__ __forceinline__ void warp_reduce_best(float &bs, int &bj, int &at) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float os = __shfl_xor_sync(0xffffffff, bs, off);
    const int oj = __shfl_xor_sync(0xffffffff, bj, off);
    const int oat = __shfl_xor_sync(0xffffffff, at, off);
    if (topk_better(os, oj, bs, bj)) {
      bs = os;
      bj = oj;
      at = oat;
    }
  }
}

/**
 * The order-preserving key of a (score, index) pair: a larger key is a better pair (higher score, then lower
 * index), so a warp finds the best pair with two 32-bit `redux.sync` maxima instead of shuffling three words per
 * level. 0 is no pair (score -inf or NaN); index in [0, NO_BLOCK]. topk_score_bits is the key's high word alone.
 */
__device__ __forceinline__ unsigned topk_score_bits(float s) {
  if (!(s > NSA_NEG_INF)) return 0u;
  const unsigned u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u); // floats in order as unsigned: above 0x007fffff (-inf's) for all
}
/** The key of score bits u (topk_score_bits; 0: no pair, whatever j) and index j. */
__device__ __forceinline__ unsigned long long topk_key_from_bits(unsigned u, int j) {
  return u == 0u ? 0ull : ((unsigned long long)u << 32) | (unsigned)(NO_BLOCK - j);
}
__device__ __forceinline__ unsigned long long topk_key(float s, int j) { return topk_key_from_bits(topk_score_bits(s), j); }
__device__ __forceinline__ float topk_key_score(unsigned long long key) {
  const unsigned u = (unsigned)(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
__device__ __forceinline__ int topk_key_index(unsigned long long key) { return NO_BLOCK - (int)(unsigned)key; }

/** The largest key any lane of the (whole) warp holds, to every lane. */
__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long key) {
  const unsigned hi = (unsigned)(key >> 32);
  const unsigned top = __reduce_max_sync(0xffffffff, hi);
  const unsigned lo = __reduce_max_sync(0xffffffff, hi == top ? (unsigned)key : 0u);
  return ((unsigned long long)top << 32) | lo;
}

/**
 * The warp's 32 keys, one a lane, sorted best first across the lanes (lane 0 the largest): a bitonic network of 15
 * compare-exchange steps, each a 64-bit shuffle.
 */
__device__ __forceinline__ unsigned long long warp_sort_keys(unsigned long long key, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const unsigned long long other = __shfl_xor_sync(0xffffffff, key, stride);
      // Runs of `size` alternate descending / ascending, so each pair of them is bitonic for the next size.
      const bool keep_max = ((lane & stride) == 0) == ((lane & size) == 0);
      key = keep_max == (other > key) ? other : key;
    }
  }
  return key;
}

/**
 * The best SEL_N keys of a list (lanes 0 .. SEL_N - 1, best first, 0 past its end and in lanes >= SEL_N) and of
 * the warp's 32 keys sorted best first (warp_sort_keys), as such a list. With W the power of two >= SEL_N, the
 * larger of list[i] and sorted[W - 1 - i] are the best W of both (falling, then rising: bitonic), which a merge
 * network of log2 W steps orders.
 */
__device__ __forceinline__ unsigned long long warp_merge_keys(unsigned long long list, unsigned long long sorted, int lane) {
  constexpr int W = SEL_N <= 2 ? 2 : SEL_N <= 4 ? 4 : SEL_N <= 8 ? 8 : SEL_N <= 16 ? 16 : 32;
  const unsigned long long reversed = __shfl_sync(0xffffffff, sorted, (W - 1 - lane) & 31);
  unsigned long long key = lane < W && reversed > list ? reversed : list;
#pragma unroll
  for (int stride = W / 2; stride > 0; stride >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffff, key, stride);
    key = ((lane & stride) == 0) == (other > key) ? other : key;
  }
  return lane < SEL_N ? key : 0ull;
}

/**
 * The warp's best `need` pairs of the keys its lanes hold (E each, 0 for none; keys are distinct), best first, into
 * out_s/out_j[0 .. need), padded with (-inf, NO_BLOCK). Each lane keeps its own best; a round takes the warp's
 * maximum and only the lane it came from looks for its next. Returns how many real pairs it took.
 */
template <int E>
__device__ __forceinline__ int warp_best_keys(unsigned long long (&key)[E], int need, float *out_s, int *out_j, int lane) {
  unsigned long long mine = 0;
#pragma unroll
  for (int e = 0; e < E; e++) mine = key[e] > mine ? key[e] : mine;
  int k = 0;
  for (; k < need; k++) {
    const unsigned long long best = warp_max_key(mine);
    if (best == 0) break;
    if (lane == 0) {
      out_s[k] = topk_key_score(best);
      out_j[k] = topk_key_index(best);
    }
    if (mine == best) { // this lane's: drop it, find the next
      mine = 0;
#pragma unroll
      for (int e = 0; e < E; e++) {
        if (key[e] == best) key[e] = 0;
        mine = key[e] > mine ? key[e] : mine;
      }
    }
  }
  for (int i = k + lane; i < need; i += 32) {
    out_s[i] = NSA_NEG_INF;
    out_j[i] = NO_BLOCK;
  }
  __syncwarp();
  return k;
}

/**
 * The best `need` (score, index) pairs, best first, of those at positions [lo, hi) of s (index_of(position) gives
 * a pair's index), by one warp, to out_s/out_j[0 .. need), padded with (-inf, NO_BLOCK). Up to 32 * E positions
 * go through registers (warp_best_keys); more (or any, with E = 0) are scanned in shared memory each round, and
 * taken ones become -inf in s (shared memory the warp owns). Returns how many real pairs it took.
 */
template <int E, typename IndexOf>
__device__ __forceinline__ int warp_best_of(float *s, int lo, int hi, IndexOf index_of, int need, float *out_s, int *out_j, int lane) {
  if (E > 0 && hi - lo <= 32 * E) {
    unsigned long long key[E > 0 ? E : 1];
#pragma unroll
    for (int e = 0; e < E; e++) {
      const int i = lo + lane + 32 * e;
      key[e] = i < hi ? topk_key(s[i], index_of(i)) : 0ull;
    }
    return warp_best_keys<(E > 0 ? E : 1)>(key, need, out_s, out_j, lane);
  }
  int k = 0;
  for (; k < need; k++) {
    float bs = NSA_NEG_INF;
    int bj = NO_BLOCK;
    int at = -1;
    for (int i = lo + lane; i < hi; i += 32)
      if (topk_better(s[i], index_of(i), bs, bj)) {
        bs = s[i];
        bj = index_of(i);
        at = i;
      }
    warp_reduce_best(bs, bj, at);
    if (bs == NSA_NEG_INF) break;
    if (lane == 0) {
      out_s[k] = bs;
      out_j[k] = bj;
      s[at] = NSA_NEG_INF;
    }
    __syncwarp();
  }
  for (int i = k + lane; i < need; i += 32) {
    out_s[i] = NSA_NEG_INF;
    out_j[i] = NO_BLOCK;
  }
  __syncwarp();
  return k;
}

/** warp_best_of over the scores score[lo .. hi) of blocks lo .. hi (a block's index is its position). */
template <int E>
__device__ __forceinline__ int warp_best_range(float *score, int lo, int hi, int need, float *out_s, int *out_j, int lane) {
  return warp_best_of<E>(score, lo, hi, [](int i) { return i; }, need, out_s, out_j, lane);
}

/** warp_best_of over `count` listed pairs (s[i], jx[i]). */
template <int E>
__device__ __forceinline__ int warp_best_listed(float *s, const int *jx, int count, int need, float *out_s, int *out_j, int lane) {
  return warp_best_of<E>(s, 0, count, [jx](int i) { return jx[i]; }, need, out_s, out_j, lane);
}

/**
 * The warp's best `need` (score, index) pairs of those in its registers, E per lane, into out_s/out_j[0 .. need),
 * padded with (-inf, NO_BLOCK).
 */
template <int E>
__device__ __forceinline__ void warp_best_regs(const float (&sc)[E], const int (&jx)[E], int need, float *out_s, int *out_j, int lane) {
  unsigned long long key[E];
#pragma unroll
  for (int e = 0; e < E; e++) key[e] = topk_key(sc[e], jx[e]);
  warp_best_keys<E>(key, need, out_s, out_j, lane);
}

/**
 * The forced blocks of a query whose own block is `current`: 0, current - 1, current, distinct ones only, lowest
 * first, at most SEL_N. Lane i's `chosen` becomes the i-th of them (lanes past them keep theirs); returns how many.
 */
__device__ __forceinline__ int warp_forced_blocks(int current, int &chosen, int lane) {
  int count = 0;
  int previous = -1;
  const int forced[3] = {0, current - 1, current};
#pragma unroll
  for (int f = 0; f < 3; f++) {
    const int j = forced[f];
    if (count == SEL_N || j <= previous) continue;
    if (lane == count) chosen = j;
    count++;
    previous = j;
  }
  return count;
}

/** Writes the `count` blocks the lanes hold (lane i the i-th) to dst[0 .. SEL_N), ascending, -1 padded. */
__device__ __forceinline__ void warp_write_ascending(int chosen, int count, int *dst, int lane) {
  int rank = 0; // how many chosen blocks are smaller than this lane's
  for (int i = 0; i < count; i++) {
    const int other = __shfl_sync(0xffffffff, chosen, i);
    rank += (lane < count && other < chosen) ? 1 : 0;
  }
  if (lane < count) dst[rank] = chosen;
  for (int i = count + lane; i < SEL_N; i += 32) dst[i] = -1;
}
