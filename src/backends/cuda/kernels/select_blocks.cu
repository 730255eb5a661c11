// nvcc-check: -DDK=128 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=16
// nvcc-check: -DDK=192 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=4 -DNSA_FP16
// nvcc-check: -DDK=64 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=3
// nvcc-check: -DDK=64 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=32
// nvcc-check: -DDK=128 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=16 -DFA_WGMMA
// nvcc-check: -DDK=192 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=3 -DNSA_FP16 -DFA_WGMMA
// nvcc-check: -DDK=128 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=16 -DFA_WGMMA -DSCORE_RING_MIN=512
// nvcc-check: -DDK=128 -DCMP_L=128 -DCMP_D=32 -DSEL_L=32 -DSEL_N=8 -DGROUP=8 -DFA_WGMMA
// nvcc-check: -DDK=128 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=16 -DFA_WGMMA -DOFFER_MIN=32 -DSEL_MIN_BLOCKS=3 -DSELECT_TMA
// nvcc-check: -DDK=192 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=3 -DNSA_FP16 -DFA_WGMMA -DSEL_MIN_BLOCKS=2 -DSELECT_TMA
// nvcc-check: -DDK=64 -DCMP_L=32 -DCMP_D=16 -DSEL_L=32 -DSEL_N=5 -DGROUP=2 -DTOPK_MERGE_MIN=1
// nvcc-check: -DDK=128 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=4 -DFA_WGMMA -DSEL_MIN_BLOCKS=2 -DSELECT_TMA -DSELECT_DIRECT
// nvcc-check: -DDK=128 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=4 -DFA_WGMMA -DSEL_MIN_BLOCKS=3 -DSELECT_TMA -DSELECT_DIRECT -DSELECT_WARP_LOCAL -DSELECT_REG_LISTS
// nvcc-check: -DDK=128 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=16 -DFA_WGMMA -DSEL_MIN_BLOCKS=3 -DSELECT_TMA -DSELECT_WARP_LOCAL -DSELECT_REG_LISTS
// nvcc-check: -DDK=192 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=4 -DNSA_FP16 -DSELECT_WARP_LOCAL
// nvcc-check: -DDK=64 -DCMP_L=16 -DCMP_D=8 -DSEL_L=32 -DSEL_N=5 -DGROUP=2 -DSELECT_WARP_LOCAL -DSELECT_REG_LISTS
// nvcc-check: -DDK=192 -DCMP_L=32 -DCMP_D=32 -DSEL_L=32 -DSEL_N=7 -DGROUP=3 -DNSA_FP16 -DSELECT_DIRECT
// nvcc-check: -DDK=64 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=32 -DFA_WGMMA -DSELECT_DIRECT -DTOPK_MERGE_MIN=33
//
// Block scores and top-n, without the [T, Hq, Tc] probability matrix ever reaching global memory.
// A CTA takes P consecutive query positions of one sequence and all G query heads of one KV head (rows = P*G
// <= 128, 8 warps of 16 rows, row r = position r / G, head r % G). For each tile of 64 compressed keys it
// recomputes the scores, turns them into the cmp branch's probabilities with the lse of the cmp pass
// (p = exp(s - lse)), sums them over the G heads (in registers with warp shuffles when G is a power of two,
// through shared memory otherwise) and spreads them over the selection blocks they overlap (weight overlap / d, unrolled at compile time).
// G (GROUP) is compiled in. A block's score is final once the tiles holding its compressed keys are done, so the
// scores live in a ring of SCORE_RING blocks per position, and once OFFER_BATCH final blocks have gathered the
// warp owning a position offers them to it: each position keeps its best n candidates (score descending, lower
// index on ties; the forced blocks 0, the block before t's and t's own are not candidates) in a sorted list. At
// the end the forced blocks and the best of the list make the n blocks, sorted ascending, to block_indices
// [N, H, n].
// Shared memory thus does not grow with the sequence, and the top-n work runs between the tiles' loads. With one
// compressed key per selection block (l = d = l', SELECT_DIRECT) there is no ring: each tile's block scores are final,
// and the warps offer them straight from the head sums.
// The summation order is fixed, so the choice is the same run to run.
// FA_WGMMA (sm_90a): the scores come from wgmma (two warpgroups of 64 rows, Q and K in 128-byte-swizzled shared
// tiles, see nsa_wgmma.cuh); the accumulators have the mma.sync fragment layout, so everything after is shared.
#include "nsa_common.cuh"
#include "nsa_topk.cuh"
#include "nsa_wgmma.cuh"
#if defined(FA_WGMMA) && defined(NSA_HAS_WGMMA)
#define SEL_USE_WGMMA 1
#else
#define SEL_USE_WGMMA 0
#endif
// SELECT_TMA (the host's, with wgmma): the compressed key tiles come by TMA boxes, one thread issuing them, into
// stages that complete on mbarriers, instead of every thread computing the addresses of its 16-byte cp.async copies
// (the kernel is bound by issuing instructions; that arithmetic held ~22% of its stall samples in Nsight Compute).
#if SEL_USE_WGMMA && defined(SELECT_TMA)
#define SEL_TMA 1
#else
#define SEL_TMA 0
#endif

#define ROWS 128
#define BLOCK_N 64
#define THREADS 256
#define WARPS (THREADS / 32)
#define POW2_GROUP ((GROUP & (GROUP - 1)) == 0)
// Power-of-two G: a warp's 16 rows hold SEGS whole positions (G <= 16) or a sixteenth-multiple of one (G > 16).
#define SEGS (GROUP >= 16 ? 1 : 16 / GROUP)
#define PSTRIDE (BLOCK_N + 1) // padded rows of the generic path's probability tile (fewer bank conflicts)
// Selection blocks one tile of compressed keys can touch, and the per-position ring of block scores: a power of
// two that holds them and at least OFFER_MIN final blocks more. Final blocks wait in the ring until OFFER_BATCH of
// them are there, so a tile's open blocks always find room. OFFER_MIN is 64 (offering after every tile measured
// slower at G = 16), or 32 where the smaller ring lets a third CTA share an SM (the host's selectShape).
#define TILE_BLOCKS (((BLOCK_N - 1) * CMP_D + CMP_L - 1 + SEL_L - 1) / SEL_L + 1)
#ifndef SCORE_RING_MIN
#define SCORE_RING_MIN 128 // the host's NSA_SELECT_RING, for tuning
#endif
#ifndef OFFER_MIN
#define OFFER_MIN 64
#endif
// CTAs an SM the registers must allow, with wgmma: as many as shared memory holds, up to 3 (the host's
// selectShape); otherwise ptxas chooses.
#ifdef SEL_MIN_BLOCKS
#define SELECT_BOUNDS __launch_bounds__(THREADS, SEL_MIN_BLOCKS)
#else
#define SELECT_BOUNDS __launch_bounds__(THREADS)
#endif
#define SCORE_RING (TILE_BLOCKS + OFFER_MIN <= 128 && SCORE_RING_MIN <= 128 ? 128 : TILE_BLOCKS + OFFER_MIN <= 256 && SCORE_RING_MIN <= 256 ? 256 : 512)
#define OFFER_BATCH (SCORE_RING - TILE_BLOCKS)
// A round of 32 offered blocks with at least this many above the list's last is sorted and merged into the list
// (21 shuffle steps) instead of inserted one key at a time (a chain of dependent warp votes, reductions and
// shuffles each). Rounds that full come early in a position's walk, while its list is filling. 8 measured best
// (H100, 64k, G = 4, fla: select 3.83-3.89 -> 3.43-3.47 ms; 4 and 16 close); 33 never merges. The host's
// NSA_SELECT_MERGE_MIN.
#ifndef TOPK_MERGE_MIN
#define TOPK_MERGE_MIN 8
#endif
// One compressed key per selection block (fla's l = d = l'): a tile's block scores are final as soon as its head
// sums are, so the warp owning a position offers them to its list straight from those, a tile at a time
// (SELECT_DIRECT, the host's default there; NSA_SELECT_DIRECT=0 keeps the ring). No ring of open scores to add into,
// clear and walk again: the same rounds of 32 blocks, so the same inserts and merges and the same choice.
#if defined(SELECT_DIRECT) && CMP_L == CMP_D && CMP_D == SEL_L
#define SEL_DIRECT 1
#define RING_FLOATS 0
#else
#define SEL_DIRECT 0
#define RING_FLOATS SCORE_RING
#endif
// Where a warp's 16 rows are whole positions (G a power of two up to 16), the warp that sums a position's heads owns
// the position (SELECT_WARP_LOCAL, the host's default; NSA_SELECT_WARP_LOCAL=0 deals positions to warps in turn): it
// folds and offers its scores and keeps its list, reading only its own head sums, so no CTA barrier comes between
// the sums and the fold or offers.
#if defined(SELECT_WARP_LOCAL) && POW2_GROUP && GROUP <= 16
#define SEL_WARP_LOCAL 1
#else
#define SEL_WARP_LOCAL 0
#endif
// Its lists then live in its lanes' registers, a (score bits, block) pair a lane and position, where it owns at most
// four positions (G >= 4; SELECT_REG_LISTS, the host's): no shared memory a position, which with direct offers lets a
// third CTA share an SM at G = 4.
#if SEL_WARP_LOCAL && SEGS <= 4 && defined(SELECT_REG_LISTS)
#define SEL_REG_LISTS 1
#define LIST_KEYS 0
#else
#define SEL_REG_LISTS 0
#define LIST_KEYS SEL_N
#endif
#if SEL_USE_WGMMA
typedef WgmmaTile<ROWS, DK> QTile;
typedef WgmmaTile<BLOCK_N, DK> KTile;
#else
typedef SwizzledTile<DK> QTile;
typedef SwizzledTile<DK> KTile;
#endif

__device__ __forceinline__ int cmp_visible(int t, int tc) {
  return t < CMP_L - 1 ? 0 : min(tc, (t - CMP_L + 1) / CMP_D + 1);
}

/**
 * One round of offers to a position's list of its best SEL_N candidates, by one warp: lane i offers block j0 + i with
 * score bits ks (topk_score_bits; 0 if it is no candidate). The list is held a lane each (lane i its i-th: score bits
 * ms, 0 for none, and block mj), `last` is its SEL_N-th score bits. Every listed block has a lower index than the
 * offered ones, so a new block enters only with a score above the list's last, and below any listed one of equal
 * score; lanes hold consecutive blocks, so the lowest lane of equal scores goes first. The one-at-a-time inserts
 * therefore compare 32-bit scores alone (about a third fewer instructions than 64-bit keys); the merges of full
 * rounds work on the keys (topk_key_from_bits).
 */
__device__ __forceinline__ void offer_round(unsigned &ms, int &mj, unsigned &last, unsigned ks, int j0, int lane) {
  unsigned cand = ks > last ? ks : 0u;
#if TOPK_MERGE_MIN <= 32
  if (__popc(__ballot_sync(0xffffffff, cand != 0u)) >= TOPK_MERGE_MIN) {
    const unsigned long long merged = warp_merge_keys(topk_key_from_bits(ms, mj), warp_sort_keys(topk_key_from_bits(cand, j0 + lane), lane), lane);
    ms = (unsigned)(merged >> 32);
    mj = topk_key_index(merged);
    last = __shfl_sync(0xffffffff, ms, SEL_N - 1);
    return;
  }
#endif
  while (__any_sync(0xffffffff, cand != 0u)) {
    const unsigned top = __reduce_max_sync(0xffffffff, cand);
    const int src = __ffs(__ballot_sync(0xffffffff, cand == top)) - 1; // the lowest block of that score
    const int rank = __popc(__ballot_sync(0xffffffff, ms >= top));     // listed ones of equal score stay above
    const unsigned above_s = __shfl_up_sync(0xffffffff, ms, 1);
    const int above_j = __shfl_up_sync(0xffffffff, mj, 1);
    if (lane == rank) {
      ms = top;
      mj = j0 + src;
    } else if (lane > rank && lane < SEL_N) {
      ms = above_s;
      mj = above_j;
    }
    last = __shfl_sync(0xffffffff, ms, SEL_N - 1);
    cand = lane != src && cand > last ? cand : 0u;
  }
}

/** A position's list (`list`, topk_key keys best first, 0 for none) into a warp's lanes for offer_round, and back. */
struct OfferList {
  unsigned ms; // lane i: the i-th's score bits (0: none)
  int mj;      // its block
  unsigned last;
  __device__ __forceinline__ void load(const unsigned long long *list, int lane) {
    const unsigned long long listed = lane < SEL_N ? list[lane] : 0ull;
    ms = (unsigned)(listed >> 32);
    mj = topk_key_index(listed);
    last = __shfl_sync(0xffffffff, ms, SEL_N - 1);
  }
  __device__ __forceinline__ void store(unsigned long long *list, int lane) const {
    if (lane < SEL_N) list[lane] = topk_key_from_bits(ms, mj);
  }
};

/**
 * Offers the final blocks lo .. hi (scores in `ring`, by block modulo SCORE_RING) to a position's list `l`, rounds
 * of 32 by one warp; only blocks 1 .. current - 2 are candidates (0, current - 1 and current are forced). Every
 * offered block's ring slot is cleared for the block SCORE_RING on.
 */
__device__ __forceinline__ void offer_ring(float *ring, OfferList &l, int lo, int hi, int current, int lane) {
  for (int j0 = lo; j0 <= hi; j0 += 32) {
    const int j = j0 + lane;
    unsigned ks = 0u; // this lane's block's score bits, 0 if it is no candidate
    if (j <= hi) {
      float *slot = ring + j % SCORE_RING;
      if (j >= 1 && j <= current - 2) ks = topk_score_bits(*slot);
      *slot = 0.f;
    }
    offer_round(l.ms, l.mj, l.last, ks, j0, lane);
  }
}

extern "C" __global__ void SELECT_BOUNDS
    nsa_select_blocks(const elem_t *__restrict__ q, const elem_t *__restrict__ kc, const float *__restrict__ lse_cmp,
                      const int *__restrict__ cu_seqlens, const int *__restrict__ cu_cmp, const int2 *__restrict__ tiles,
                      int *__restrict__ block_indices, int Hq, int H, int P, float scale_log2
#if SEL_TMA
                      , const __grid_constant__ TensorMapBytes kc_map // [Nc, H, DK], boxes of 64 columns x 64 rows
#endif
) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
#if SEL_USE_WGMMA
  elem_t *qsmem = reinterpret_cast<elem_t *>(wgmma_aligned(smem_raw));
#else
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw);
#endif
  elem_t *ksmem = qsmem + ROWS * DK;                                      // 2 stages of BLOCK_N x DK
  // Per-tile head sums: [WARPS][SEGS][BLOCK_N] (power-of-two G) or the probabilities [ROWS][PSTRIDE].
  float *psmem = reinterpret_cast<float *>(ksmem + 2 * BLOCK_N * DK);
  float *ring = psmem + (POW2_GROUP ? WARPS * SEGS * BLOCK_N : ROWS * PSTRIDE); // [P][RING_FLOATS] open block scores
  // [P][LIST_KEYS] each position's best candidates so far as topk_key keys, best first, 0 for none yet.
  unsigned long long *best = reinterpret_cast<unsigned long long *>(ring + P * RING_FLOATS);
#if SEL_TMA
  unsigned long long *stage_full = best + P * LIST_KEYS; // one mbarrier a key stage
#endif

  const int2 tile = tiles[blockIdx.x];
  const int seq = tile.x;
  const int pos0 = tile.y;
  const int h = blockIdx.y;
  const int G = GROUP;
  const int seq_start = cu_seqlens[seq];
  const int seq_len = cu_seqlens[seq + 1] - seq_start;
  const int c_start = cu_cmp[seq];
  const int tc = cu_cmp[seq + 1] - c_start;
  const int npos = min(P, seq_len - pos0);
  const int rows = npos * G;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < P * RING_FLOATS; i += THREADS) ring[i] = 0.f;
  for (int i = threadIdx.x; i < P * LIST_KEYS; i += THREADS) best[i] = 0ull;
#if SEL_TMA
  if (threadIdx.x == 0) {
    mbarrier_init(&stage_full[0], 1);
    mbarrier_init(&stage_full[1], 1);
    mbarrier_init_fence();
  }
#endif
  load_tile_async<DK, THREADS, QTile>(qsmem, ROWS, [&](int r) -> const elem_t * {
    if (r >= rows) return nullptr;
    return q + ((i64)(seq_start + pos0 + r / G) * Hq + h * G + r % G) * DK;
  });
  cp_async_commit();

#if !SEL_DIRECT
  int done_lo = 0; // the first selection block not yet offered to the positions' lists
#endif
#if SEL_REG_LISTS
  OfferList lists[SEGS]; // this warp's positions' lists, empty
#pragma unroll
  for (int seg = 0; seg < SEGS; seg++) lists[seg] = OfferList{0u, NO_BLOCK, 0u};
#endif
  // body(pos, list) for each position this warp owns (its rows', or every WARPS-th), with the position's list.
  auto each_position = [&](auto &&body) {
#if SEL_REG_LISTS
#pragma unroll
    for (int seg = 0; seg < SEGS; seg++) {
      if (warp * SEGS + seg < npos) body(warp * SEGS + seg, lists[seg]);
    }
#else
#if SEL_WARP_LOCAL
    for (int pos = warp * SEGS; pos < min(npos, (warp + 1) * SEGS); pos++) {
#else
    for (int pos = warp; pos < npos; pos += WARPS) {
#endif
      OfferList l;
      l.load(best + pos * SEL_N, lane);
      body(pos, l);
      l.store(best + pos * SEL_N, lane);
    }
#endif
  };
  const int last = pos0 + npos - 1;
  const int nkeys = cmp_visible(last, tc);
  const int ntiles = (nkeys + BLOCK_N - 1) / BLOCK_N;
#if SEL_TMA
  // Rows past the sequence's visible keys are another sequence's (or zeros past the tensor): the masks weigh them 0.
  // A stage is refilled only after both warpgroups' products that read it have completed (the barriers between).
  auto issue = [&](int it) {
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(&stage_full[it & 1], BLOCK_N * DK * (u32)sizeof(elem_t));
      tma_load_tile<BLOCK_N, DK>(ksmem + (it & 1) * BLOCK_N * DK, &kc_map, h, c_start + it * BLOCK_N, &stage_full[it & 1]);
    }
  };
  cp_async_wait<0>(); // the queries
  fence_proxy_async_shared(); // the cp.async writes and the ring's, before the async proxy reads or writes
  __syncthreads(); // the queries, the cleared ring and lists, the mbarriers' inits
  if (ntiles > 0) issue(0);
#else
  auto issue = [&](int it) {
    const int k0 = it * BLOCK_N;
    load_tile_async<DK, THREADS, KTile>(ksmem + (it & 1) * BLOCK_N * DK, BLOCK_N, [&](int r) -> const elem_t * {
      return k0 + r < nkeys ? kc + ((i64)(c_start + k0 + r) * H + h) * DK : nullptr;
    });
    cp_async_commit();
  };
  if (ntiles > 0) issue(0);
#endif

  // This thread's two rows: local position, and lse in log2 units (rows past the CTA's positions are inert).
  const int r_lo = warp * 16 + lane / 4;
  const int r_hi = r_lo + 8;
  const int t_lo = r_lo < rows ? pos0 + r_lo / G : -1;
  const int t_hi = r_hi < rows ? pos0 + r_hi / G : -1;
  const float lse_lo = t_lo >= 0 ? lse_cmp[(i64)(seq_start + t_lo) * Hq + h * G + r_lo % G] * NSA_LOG2E : 0.f;
  const float lse_hi = t_hi >= 0 ? lse_cmp[(i64)(seq_start + t_hi) * Hq + h * G + r_hi % G] * NSA_LOG2E : 0.f;
  const int vis_lo = t_lo >= 0 ? cmp_visible(t_lo, tc) : 0;
  const int vis_hi = t_hi >= 0 ? cmp_visible(t_hi, tc) : 0;

#if !SEL_USE_WGMMA
  u32 qfrag[DK / 16][4];
#endif
  for (int it = 0; it < ntiles; it++) {
#if SEL_TMA
    if (it + 1 < ntiles) issue(it + 1);
    mbarrier_wait(&stage_full[it & 1], (it >> 1) & 1);
#else
    if (it + 1 < ntiles) issue(it + 1);
    else cp_async_commit();
    cp_async_wait<1>();
#if SEL_USE_WGMMA
    fence_proxy_async_shared(); // the cp.async writes, before wgmma reads them through the async proxy
#endif
    __syncthreads();
#endif
    const int k0 = it * BLOCK_N;
    const elem_t *ktile = ksmem + (it & 1) * BLOCK_N * DK;
    float s[BLOCK_N / 8][4];
#if SEL_USE_WGMMA
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++) {
      wgmma_ss<BLOCK_N>(s, wgmma_desc_kmajor<ROWS>(qsmem, (warp / 4) * 64, ks), wgmma_desc_kmajor<BLOCK_N>(ktile, 0, ks), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands<BLOCK_N / 8>(s);
#else
    if (it == 0) load_a_fragments<DK>(qfrag, qsmem, warp * 16, lane);
    zero_frags<BLOCK_N / 8>(s);
    qk_mma<DK, BLOCK_N / 16>(s, qfrag, ktile, 0, lane);
#endif
    // p = exp(s - lse); keys past a row's visible ones weigh 0 (only the last tiles have any).
    if (k0 + BLOCK_N <= min(vis_lo, vis_hi)) {
#pragma unroll
      for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) s[n][e] = fast_exp2(fmaf(s[n][e], scale_log2, -(e >= 2 ? lse_hi : lse_lo)));
      }
    } else {
#pragma unroll
      for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int key = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
          const bool hi = e >= 2;
          const bool ok = key < (hi ? vis_hi : vis_lo);
          s[n][e] = ok ? fast_exp2(fmaf(s[n][e], scale_log2, -(hi ? lse_hi : lse_lo))) : 0.f;
        }
      }
    }
#if POW2_GROUP
    // Sum over the heads of each position: its rows sit in the lanes of one quad column (g = lane / 4 picks the
    // row), LEVELS lane bits of them. A reduce-scatter: each level halves the list a lane keeps and adds the half
    // its partner kept, so a lane ends with the sums of its own slice of the values (14 shuffles at G >= 16 where
    // a plain butterfly per value took 48). Values are i = n * PER_N + e; after it, head_sum[j] is the sum of
    // value ((g & (2^LEVELS - 1)) << log2(KEPT)) | j.
    constexpr int PER_N = GROUP >= 16 ? 2 : 4;          // values per 8-key group: rows lo + hi added first at G >= 16
    constexpr int LEVELS = GROUP >= 8 ? 3 : (GROUP == 4 ? 2 : (GROUP == 2 ? 1 : 0));
    constexpr int COUNT = (BLOCK_N / 8) * PER_N;
    constexpr int KEPT = COUNT >> LEVELS;
    float head_sum[COUNT];
#pragma unroll
    for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
      for (int e = 0; e < PER_N; e++) head_sum[n * PER_N + e] = GROUP >= 16 ? s[n][e] + s[n][e + 2] : s[n][e];
    }
#pragma unroll
    for (int step = 0; step < LEVELS; step++) {
      const int mask = 4 << (LEVELS - 1 - step);
      const bool upper = (lane & mask) != 0;
#pragma unroll
      for (int i = 0; i < COUNT / 2; i++) {
        const int half = COUNT >> (step + 1);
        if (i < half) {
          const float send = upper ? head_sum[i] : head_sum[i + half];
          const float keep = upper ? head_sum[i + half] : head_sum[i];
          head_sum[i] = keep + __shfl_xor_sync(0xffffffff, send, mask);
        }
      }
    }
    {
      const int g = lane / 4;
#pragma unroll
      for (int j = 0; j < KEPT; j++) {
        const int i = ((g & ((1 << LEVELS) - 1)) * KEPT) | j;
        const int n = i / PER_N;
        const int e = i % PER_N;
        const int seg = GROUP >= 16 ? 0 : (e < 2 ? g : g + 8) / GROUP;
        psmem[(warp * SEGS + seg) * BLOCK_N + n * 8 + (lane % 4) * 2 + (e & 1)] = head_sum[j];
      }
    }
#else
#pragma unroll
    for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) psmem[(e >= 2 ? r_hi : r_lo) * PSTRIDE + n * 8 + (lane % 4) * 2 + (e & 1)] = s[n][e];
    }
#endif
#if SEL_WARP_LOCAL
    __syncwarp();
#else
    __syncthreads();
#endif
    // Fold this tile into the block scores. The tile's probability of compressed key i (local) at a position:
    auto tile_prob = [&](int pos, int i) {
#if POW2_GROUP
      if (GROUP >= 16) {
        float ps = 0.f;
        for (int w = 0; w < GROUP / 16; w++) ps += psmem[(pos * (GROUP / 16) + w) * BLOCK_N + i];
        return ps;
      }
      return psmem[pos * BLOCK_N + i]; // warp * SEGS + seg == pos
#else
      float ps = 0.f;
      for (int g = 0; g < G; g++) ps += psmem[(pos * G + g) * PSTRIDE + i];
      return ps;
#endif
    };
#if SEL_DIRECT
    // Block k0 + i is compressed key k0 + i: each position's warp offers the tile's candidates (blocks 1 .. current
    // - 2) in rounds of 32, lane i the (round's) i-th block. With SEL_WARP_LOCAL the warp's positions are its rows'.
    each_position([&](int pos, OfferList &l) {
      const int hi = min((pos0 + pos) / SEL_L - 2, k0 + BLOCK_N - 1);
      const int lo = max(k0, 1);
      for (int j0 = k0; j0 <= hi; j0 += 32) { // none where lo > hi, uniform across the warp
        const int j = j0 + lane;
        offer_round(l.ms, l.mj, l.last, j >= lo && j <= hi ? topk_score_bits(tile_prob(pos, j - k0)) : 0u, j0, lane);
      }
    });
#else
    // One thread per (position, selection block) the tile touches (with SEL_WARP_LOCAL, one lane of the warp that
    // owns the position; otherwise across the CTA). d divides l and l' (the config requires it), so
    // block j overlaps the R + C - 1 compressed keys j R - C + 1 + u, u = 0 .. R + C - 2 (R = l'/d, C = l/d), the
    // u-th by a fixed number of tokens: the loop and the overlaps unroll at compile time (the paper's preset:
    // 9.20 -> 7.93 ms at 64k, G = 4, against a loop over each block's keys with their overlaps computed).
    static_assert(SEL_L % CMP_D == 0 && CMP_L % CMP_D == 0, "d divides l and l'");
    constexpr int R = SEL_L / CMP_D;
    constexpr int C = CMP_L / CMP_D;
    const int j_first = (k0 * CMP_D) / SEL_L;
    const int j_last = ((min(k0 + BLOCK_N, nkeys) - 1) * CMP_D + CMP_L - 1) / SEL_L;
    const int nj = j_last - j_first + 1;
    const int i_end = min(k0 + BLOCK_N, nkeys);
#if SEL_WARP_LOCAL
    const int own0 = warp * SEGS;
    for (int w = lane; w < max(0, min(SEGS, npos - own0)) * nj; w += 32) {
      const int pos = own0 + w / nj;
#else
    for (int w = threadIdx.x; w < npos * nj; w += THREADS) {
      const int pos = w / nj;
#endif
      const int j = j_first + w % nj;
      const int i0 = j * R - C + 1;
      float acc = 0.f;
#pragma unroll
      for (int u = 0; u < R + C - 1; u++) {
        const int i = i0 + u;
        const int overlap = min((u + 1) * CMP_D, SEL_L) - max((u - C + 1) * CMP_D, 0);
        if (i >= k0 && i < i_end) acc += tile_prob(pos, i - k0) * (float)overlap;
      }
      ring[pos * SCORE_RING + j % SCORE_RING] += acc * (1.f / CMP_D);
    }
#endif
    __syncthreads();
#if !SEL_DIRECT
    // Blocks whose compressed keys all lie before k0 + BLOCK_N are final; offered OFFER_BATCH or more at a time
    // (the rest after the last tile).
    const int done_hi = ((k0 + BLOCK_N) * CMP_D) / SEL_L - 1;
    if (it + 1 < ntiles && done_hi - done_lo + 1 >= OFFER_BATCH) {
      each_position([&](int pos, OfferList &l) { offer_ring(ring + pos * SCORE_RING, l, done_lo, done_hi, (pos0 + pos) / SEL_L, lane); });
      done_lo = done_hi + 1;
    }
#endif
  }

  // The choice of position pos from its list (`key`: lane i the i-th best candidate's topk_key, 0 for none): the
  // forced blocks, then the best candidates, ascending.
  auto choose = [&](int pos, unsigned long long key) {
    const int t = pos0 + pos;
    int chosen = -1; // lane i keeps the i-th chosen block
    int count = warp_forced_blocks(t / SEL_L, chosen, lane);
    const unsigned long long taken = __shfl_sync(0xffffffff, key, (lane - count) & 31);
    if (lane >= count && lane < SEL_N && taken != 0) chosen = topk_key_index(taken);
    count += min(SEL_N - count, __popc(__ballot_sync(0xffffffff, key != 0)));
    warp_write_ascending(chosen, count, block_indices + ((i64)(seq_start + t) * H + h) * SEL_N, lane);
  };
  // The rest up to each position's own block (scores of blocks no visible key touched are 0), then the choice.
  each_position([&](int pos, OfferList &l) {
#if !SEL_DIRECT
    offer_ring(ring + pos * SCORE_RING, l, done_lo, (pos0 + pos) / SEL_L, (pos0 + pos) / SEL_L, lane);
#endif
    choose(pos, topk_key_from_bits(l.ms, l.mj)); // 0 past the list (lanes >= SEL_N hold no pair)
  });
}

/**
 * The selection where no sequence is longer than n l' (the host's check): every visible block is chosen, so token t
 * of its sequence takes blocks 0 .. t / l' ascending, -1 after them, for every KV head: what nsa_select_blocks would
 * write there, without its scores. One thread per (token, KV head); block_indices [N, H, n].
 */
extern "C" __global__ void nsa_all_visible_blocks(int *__restrict__ block_indices, const int *__restrict__ row_seq,
                                                  const int *__restrict__ cu_seqlens, int N, int H) {
  const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (i64)N * H) return;
  const int row = (int)(i / H);
  const int t = row - cu_seqlens[row_seq[row]];
#pragma unroll
  for (int j = 0; j < SEL_N; j++) block_indices[i * SEL_N + j] = j <= t / SEL_L ? j : -1;
}
