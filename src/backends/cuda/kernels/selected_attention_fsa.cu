// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DGROUP=4
// nvcc-check: -DDK=64 -DDV=64 -DSEL_L=32 -DSEL_N=8 -DNSA_FP16 -DGROUP=3
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DGROUP=1 -DFSA_MIN_BLOCKS=4
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DGROUP=2
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DGROUP=4 -DFSA_MIN_BLOCKS=3
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DGROUP=4 -DFSA_MIN_BLOCKS=3 -DFSA_STAGE_OUT
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DGROUP=4 -DFSA_MIN_BLOCKS=3 -DFSA_STAGE_OUT -DFSA_BULK_Q
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DGROUP=2 -DFSA_STAGE_OUT
// nvcc-check: -DDK=64 -DDV=64 -DSEL_L=32 -DSEL_N=8 -DGROUP=3 -DFSA_STAGE_OUT
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DGROUP=2 -DFSA_BULK_Q
// nvcc-check: -DDK=64 -DDV=64 -DSEL_L=32 -DSEL_N=8 -DNSA_FP16 -DGROUP=3 -DFSA_STAGE_OUT -DFSA_BULK_Q
//
// Selected attention for small G, FSA's loop order: the outer loop runs over (KV head, key block), and each CTA
// gathers the queries that selected its block into one MMA tile, so a K/V block is read once per tile of queries
// instead of once per query. Each (query row, slot) gets a partial result (its output over that one block and the
// block's lse); a reduction merges the n partials of a row with their lse, deterministically (no atomics on
// outputs: a row's partials are computed independently of which other rows shared the tile).
//   nsa_fsa_attend: per tile, attention of the gathered rows over one block -> partials; the tiles come from
//                   the inverse index (inverse_index.cu: for each (h, block), the (token, slot) pairs that chose
//                   it, and where each key's tiles of per_tile pairs start)
//   nsa_fsa_reduce: merge the partials of each (token, head), gate, add into `out`
// The partial outputs are stored in the element type (bf16/f16): they are the largest traffic of this order
// (n rows of Dv per query row, written once and read once), and each is a normalised average, rounded once.
// Blocks are numbered globally: block j of sequence s is cu_blocks[s] + j; key = h * total_blocks + block.
#include "nsa_common.cuh"

#define THREADS 128
#define ROWS 64
#define BLOCK_N 64
// FSA_BULK_Q (sm_90; the host's default there, NSA_FSA_BULK_Q=0 turns it off): the persistent kernel gathers its
// query rows by one bulk copy a row (into rows padded by 16 bytes, completing on a per-warp mbarrier) instead of
// eight 16-byte cp.async copies a thread through L1, the kernel's busiest unit (selected stage 2-3% faster at G = 4).
#if defined(FSA_BULK_Q) && defined(NSA_HAS_BULK_COPY)
#define FSA_USE_BULK_Q 1
typedef PaddedTile<DK> FsaQLayout;
#define FSA_Q_ROW (DK + 8)
#define FSA_Q_BASE 128 // the warps' mbarriers first, the tiles 128-byte aligned after them
#else
#define FSA_USE_BULK_Q 0
typedef SwizzledTile<DK> FsaQLayout;
#define FSA_Q_ROW DK
#define FSA_Q_BASE 0
#endif
// GROUP: G, the query heads per KV head (baked in: the row -> (pair, head) arithmetic runs per gathered row).

/**
 * Rows [0, 64) of a swizzled [64, COLS] tile, two threads a row: thread t copies row t / 2's 16-byte chunks t % 2,
 * t % 2 + 2, ... from `row` (null: zeros), so that each gathered row's address (an entries lookup) is computed
 * once, not once a chunk, and each pair of threads fills whole 32-byte sectors.
 */
template <int COLS> __device__ __forceinline__ void load_row_pairs_async(elem_t *tile, const elem_t *row) {
  static_assert(THREADS == 2 * 64, "two threads a row");
  const int r = threadIdx.x / 2;
#pragma unroll
  for (int c = threadIdx.x % 2; c < COLS / 8; c += 2) {
    cp_async_16(tile + SwizzledTile<COLS>::offset(r, c * 8), row == nullptr ? tile : row + c * 8, row != nullptr);
  }
}

/**
 * One tile: up to `per_tile` (token, slot) entries of one (h, block), all G heads of each -> rows = entries * G.
 * Writes partial_o [N, Hq, SEL_N, DV] (normalised over the block, element type) and partial_lse [N, Hq, SEL_N].
 */
#ifdef FSA_MIN_BLOCKS
#define FSA_BOUNDS __launch_bounds__(THREADS, FSA_MIN_BLOCKS) // the host's NSA_FSA_MIN_BLOCKS, for tuning
#else
#define FSA_BOUNDS __launch_bounds__(THREADS)
#endif
/**
 * Scales the scores of a tile of keys tile0 .. tile0 + nk - 1 (of BLOCK_N columns) to log2 units, and masks the keys
 * a row may not see (after its token t, or past nk) and padding rows (t < 0) with -inf. Most tiles see the whole
 * block (the tokens after it): then no mask at all.
 */
__device__ __forceinline__ void scale_and_mask(float s[BLOCK_N / 8][4], int tile0, int nk, int t_lo, int t_hi, float scale_log2, int lane) {
  const int last = tile0 + BLOCK_N - 1;
  const bool whole = nk == BLOCK_N && __all_sync(0xffffffff, (t_lo < 0 || t_lo >= last) && (t_hi < 0 || t_hi >= last));
  if (whole) {
#pragma unroll
    for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) s[n][e] *= scale_log2;
    }
    return;
  }
#pragma unroll
  for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int pos = tile0 + n * 8 + (lane % 4) * 2 + (e & 1);
      const int t = e < 2 ? t_lo : t_hi;
      s[n][e] = (t >= 0 && pos - tile0 < nk && pos <= t) ? s[n][e] * scale_log2 : NSA_NEG_INF;
    }
  }
}

/**
 * Half hh of a thread's rows (tile row r, entry (token, slot) ent) of KV head h at a tile's end: its partial row
 * (-1 for padding rows, r >= rows, which write nothing), its lse written there, and 1 / l for its outputs. The whole
 * warp calls it (the row sums are shuffles).
 */
__device__ __forceinline__ i64 finish_partial_row(const SoftmaxRows &st, int hh, int r, int2 ent, int rows, int h, int Hq,
                                                  float *partial_lse, int lane, float *inv) {
  float lse;
  const float l = softmax_finish_row(st, hh, &lse);
  *inv = l > 0.f ? 1.f / l : 0.f;
  if (r >= rows) return -1;
  const i64 prow = ((i64)ent.x * Hq + h * GROUP + r % GROUP) * SEL_N + ent.y;
  if (lane % 4 == 0) partial_lse[prow] = lse;
  return prow;
}

/**
 * A tile's epilogue: for this thread's two rows (tile rows r_lo, r_hi; entries (token, slot) ent_lo, ent_hi) of KV
 * head h, the lse and the normalised output of this key block into the (token, head, slot) partials. Padding rows
 * (r >= rows) write nothing.
 */
__device__ __forceinline__ void write_partials(const SoftmaxRows &st, const float o[DV / 8][4], int r_lo, int r_hi, int2 ent_lo,
                                               int2 ent_hi, int rows, int h, int Hq, elem_t *partial_o, float *partial_lse,
                                               int lane) {
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    float inv;
    const i64 prow = finish_partial_row(st, hh, hh == 0 ? r_lo : r_hi, hh == 0 ? ent_lo : ent_hi, rows, h, Hq, partial_lse, lane, &inv);
    if (prow < 0) continue;
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      *reinterpret_cast<u32 *>(partial_o + prow * DV + col) = pack_elem2(o[n][2 * hh] * inv, o[n][2 * hh + 1] * inv);
    }
  }
}

// FSA_STAGE_OUT (the host's NSA_FSA_STAGE): a warp writes its 16 rows of partial outputs through a stage of its own
// in shared memory, 16 bytes a lane along whole rows, instead of 4 bytes a lane straight from the accumulator
// fragments, where each store instruction half-fills the 32-byte sectors of 8 rows (Nsight Compute, G = 4, 64k:
// 15.3 of 32 bytes a sector used, L1 the busiest unit at 76%).
#ifdef FSA_STAGE_OUT
#define STAGE_STRIDE (DV + 8) // elements: consecutive rows 16 bytes apart in bank terms, so the fragments' stores do not conflict
#define STAGE_WARP_BYTES (16 * STAGE_STRIDE * 2 + 16 * 8) // a warp's 16 rows, then their partial rows (i64)

/**
 * write_partials through this warp's stage (`stage`: STAGE_WARP_BYTES of shared memory): the rows' normalised
 * outputs go to the stage in the fragments' layout, their partial rows beside them, and then out along whole rows.
 */
__device__ __forceinline__ void write_partials_staged(const SoftmaxRows &st, const float o[DV / 8][4], int r_lo, int r_hi,
                                                      int2 ent_lo, int2 ent_hi, int rows, int h, int Hq, elem_t *partial_o,
                                                      float *partial_lse, unsigned char *stage, int lane) {
  elem_t *srows = reinterpret_cast<elem_t *>(stage);
  i64 *sprow = reinterpret_cast<i64 *>(stage + 16 * STAGE_STRIDE * 2);
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    float inv;
    const i64 prow = finish_partial_row(st, hh, hh == 0 ? r_lo : r_hi, hh == 0 ? ent_lo : ent_hi, rows, h, Hq, partial_lse, lane, &inv);
    const int local = lane / 4 + hh * 8;
    if (lane % 4 == 0) sprow[local] = prow;
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      *reinterpret_cast<u32 *>(srows + local * STAGE_STRIDE + n * 8 + (lane % 4) * 2) = pack_elem2(o[n][2 * hh] * inv, o[n][2 * hh + 1] * inv);
    }
  }
  __syncwarp();
  constexpr int CHUNKS = DV / 8; // 16-byte chunks a row
  static_assert(32 % CHUNKS == 0, "a warp covers whole rows");
#pragma unroll
  for (int rr = lane / CHUNKS; rr < 16; rr += 32 / CHUNKS) {
    const i64 prow = sprow[rr];
    const uint4 x = *reinterpret_cast<const uint4 *>(srows + rr * STAGE_STRIDE + (lane % CHUNKS) * 8);
    if (prow >= 0) *reinterpret_cast<uint4 *>(partial_o + prow * DV + (lane % CHUNKS) * 8) = x;
  }
  __syncwarp(); // every lane has read the stage before the next tile rewrites it
}
#endif

extern "C" __global__ void FSA_BOUNDS
    nsa_fsa_attend(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                   const int *__restrict__ offsets, const int *__restrict__ tile_offsets, const int2 *__restrict__ entries,
                   const int *__restrict__ block_seq, const int *__restrict__ cu_blocks, const int *__restrict__ cu_seqlens,
                   elem_t *__restrict__ partial_o, float *__restrict__ partial_lse, int Hq, int H, int total_blocks,
                   int per_tile, float scale_log2) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw); // ROWS x DK
  elem_t *ksmem = qsmem + ROWS * DK;                    // BLOCK_N x DK
  elem_t *vsmem = ksmem + BLOCK_N * DK;                 // BLOCK_N x DV
  const int nkeys_total = H * total_blocks;
  const int b = blockIdx.x;
  if (b >= tile_offsets[nkeys_total]) return; // the grid is an upper bound on the tiles
  const int key = range_holding(tile_offsets, nkeys_total, b); // the key whose tile range holds b
  const IndexKey ik = index_key(key, total_blocks, block_seq, cu_blocks, cu_seqlens);
  const int h = ik.h;
  const int j = ik.j;
  const int seq_start = ik.seq_start;
  const int seq_len = ik.seq_len;
  constexpr int G = GROUP;
  const int e0 = offsets[key] + (b - tile_offsets[key]) * per_tile;
  const int nentries = min(per_tile, offsets[key + 1] - e0);
  const int rows = nentries * G;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int key0 = j * SEL_L; // first token of the block

  {
    const int r = threadIdx.x / 2; // this thread's query row (the key/value rows' addresses need no lookup)
    load_row_pairs_async<DK>(qsmem, r < rows ? q + ((i64)entries[e0 + r / G].x * Hq + h * G + r % G) * DK : nullptr);
    cp_async_commit();
  }

  // This thread's two rows and the local positions of their tokens.
  const int r_lo = warp * 16 + lane / 4;
  const int r_hi = r_lo + 8;
  const int2 ent_lo = r_lo < rows ? entries[e0 + r_lo / G] : make_int2(-1, 0);
  const int2 ent_hi = r_hi < rows ? entries[e0 + r_hi / G] : make_int2(-1, 0);
  const int t_lo = ent_lo.x >= 0 ? ent_lo.x - seq_start : -1;
  const int t_hi = ent_hi.x >= 0 ? ent_hi.x - seq_start : -1;

  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  u32 qfrag[DK / 16][4];
  for (int k0 = 0; k0 < SEL_L; k0 += BLOCK_N) {
    const int nk = min(BLOCK_N, min(SEL_L - k0, seq_len - key0 - k0));
    load_tile_async<DK, THREADS>(ksmem, BLOCK_N, [&](int r) -> const elem_t * {
      return r < nk ? k + ((i64)(seq_start + key0 + k0 + r) * H + h) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(vsmem, BLOCK_N, [&](int r) -> const elem_t * {
      return r < nk ? v + ((i64)(seq_start + key0 + k0 + r) * H + h) * DV : nullptr;
    });
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (k0 == 0) load_a_fragments<DK>(qfrag, qsmem, warp * 16, lane);
    float s[BLOCK_N / 8][4];
    zero_frags<BLOCK_N / 8>(s);
    qk_mma<DK, BLOCK_N / 16>(s, qfrag, ksmem, 0, lane);
    scale_and_mask(s, key0 + k0, nk, t_lo, t_hi, scale_log2, lane);
    softmax_update<BLOCK_N / 8, DV>(st, s, o);
    pv_mma<DV, BLOCK_N / 16>(o, s, vsmem, 0, lane);
    __syncthreads();
  }
#ifdef FSA_STAGE_OUT
  write_partials_staged(st, o, r_lo, r_hi, ent_lo, ent_hi, rows, h, Hq, partial_o, partial_lse,
                        reinterpret_cast<unsigned char *>(vsmem + BLOCK_N * DV) + warp * STAGE_WARP_BYTES, lane);
#else
  write_partials(st, o, r_lo, r_hi, ent_lo, ent_hi, rows, h, Hq, partial_o, partial_lse, lane);
#endif
}

#if SEL_L <= BLOCK_N
/** Where one key's (KV head h, selection block) tiles and pairs lie, and its block's place in its sequence. */
struct FsaKey {
  int h;
  int seq_start; // first token of the block's sequence
  int key0;      // the block's first key, local to the sequence
  int nk;        // its keys inside the sequence (<= SEL_L)
  int tile0;     // its first tile
  int tile_end;  // one past its last tile
  int e_begin;   // its first (token, slot) pair
  int e_end;     // one past its last pair
};

__device__ __forceinline__ FsaKey fsa_key(int key, const int *__restrict__ offsets, const int *__restrict__ tile_offsets,
                                          const int *__restrict__ block_seq, const int *__restrict__ cu_blocks,
                                          const int *__restrict__ cu_seqlens, int total_blocks) {
  const IndexKey ik = index_key(key, total_blocks, block_seq, cu_blocks, cu_seqlens);
  FsaKey f;
  f.h = ik.h;
  f.seq_start = ik.seq_start;
  f.key0 = ik.j * SEL_L;
  f.nk = min(SEL_L, ik.seq_len - f.key0);
  f.tile0 = tile_offsets[key];
  f.tile_end = tile_offsets[key + 1];
  f.e_begin = offsets[key];
  f.e_end = offsets[key + 1];
  return f;
}

/**
 * nsa_fsa_attend's tiles by persistent CTAs (the host's default for blocks of at most 64 keys): CTA c takes tiles
 * [c T / grid, (c + 1) T / grid) of a phase's T tiles in order, so that consecutive tiles mostly share their key,
 * phase by phase (phase_keys keys a phase: one KV head's by default, so that the CTAs running together gather the
 * query rows of one head, which L2 then holds more of; or all keys in one phase). The key's K/V block stays in
 * shared memory until the key changes, and each warp gathers its 16 query rows of the next tile while this one
 * computes: its A fragments are in registers once loaded, and thread t always fills row t / 2, so a warp's rows
 * are its own (no block-wide barrier between tiles of one key). The token of a thread's next row is loaded a tile
 * ahead, so that no gather waits on its lookup.
 */
extern "C" __global__ void FSA_BOUNDS
    nsa_fsa_attend_persistent(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                              const int *__restrict__ offsets, const int *__restrict__ tile_offsets,
                              const int2 *__restrict__ entries, const int *__restrict__ block_seq,
                              const int *__restrict__ cu_blocks, const int *__restrict__ cu_seqlens,
                              elem_t *__restrict__ partial_o, float *__restrict__ partial_lse, int Hq, int H,
                              int total_blocks, int per_tile, float scale_log2, int phase_keys) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw + FSA_Q_BASE); // ROWS x FSA_Q_ROW
  elem_t *ksmem = qsmem + ROWS * FSA_Q_ROW;                            // BLOCK_N x DK
  elem_t *vsmem = ksmem + BLOCK_N * DK;                                // BLOCK_N x DV
#ifdef FSA_STAGE_OUT
  unsigned char *stage = reinterpret_cast<unsigned char *>(vsmem + BLOCK_N * DV) + (threadIdx.x / 32) * STAGE_WARP_BYTES;
#endif
  constexpr int G = GROUP;
  const int nkeys_total = H * total_blocks;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int my_row = threadIdx.x / 2; // the query row this thread gathers
#if FSA_USE_BULK_Q
  // A warp's 16 rows complete on its own mbarrier, one phase a gather. Rows no pair fills keep what they held: zeros
  // at first, then another tile's finite rows; a row's scores and outputs are its own, and padding rows are not written.
  unsigned long long *qbar = reinterpret_cast<unsigned long long *>(smem_raw) + warp;
  u32 qphase = 0;
  if (lane == 0) mbarrier_init(qbar, 1);
  for (int i = threadIdx.x; i < ROWS * FSA_Q_ROW / 8; i += THREADS) reinterpret_cast<uint4 *>(qsmem)[i] = make_uint4(0, 0, 0, 0);
  mbarrier_init_fence();
  fence_proxy_async_shared();
  __syncthreads();
#endif

  // The token of this thread's row in tile b of key f, -1 past the tile's rows.
  auto token_of = [&](const FsaKey &f, int b) -> int {
    const int e0 = f.e_begin + (b - f.tile0) * per_tile;
    const int rows = min(per_tile, f.e_end - e0) * G;
    return my_row < rows ? entries[e0 + my_row / G].x : -1;
  };
  auto gather_rows = [&](const FsaKey &f, int token) {
#if FSA_USE_BULK_Q
    // The even lane of each row's pair copies it; lane 0 announces the warp's bytes before any copy can land.
    const bool mine = (lane & 1) == 0 && token >= 0;
    const u32 copies = __popc(__ballot_sync(0xffffffff, mine));
    fence_proxy_async_shared(); // this warp's reads of the rows (ldmatrix) before the copies rewrite them
    if (lane == 0) mbarrier_arrive_expect_tx(qbar, copies * DK * (u32)sizeof(elem_t));
    __syncwarp();
    if (mine) bulk_copy_g2s(qsmem + FsaQLayout::offset(my_row, 0), q + ((i64)token * Hq + f.h * G + my_row % G) * DK, DK * sizeof(elem_t), qbar);
#else
    load_row_pairs_async<DK>(qsmem, token >= 0 ? q + ((i64)token * Hq + f.h * G + my_row % G) * DK : nullptr);
#endif
  };
  auto load_block = [&](const FsaKey &f) {
    load_tile_async<DK, THREADS>(ksmem, BLOCK_N, [&](int r) -> const elem_t * {
      return r < f.nk ? k + ((i64)(f.seq_start + f.key0 + r) * H + f.h) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(vsmem, BLOCK_N, [&](int r) -> const elem_t * {
      return r < f.nk ? v + ((i64)(f.seq_start + f.key0 + r) * H + f.h) * DV : nullptr;
    });
  };

  // The keys in phases of phase_keys (a KV head's, or all): every CTA takes its share of a phase's tiles before the
  // next phase's, so that the CTAs running together gather the query rows of one head.
  for (int p0 = 0; p0 < nkeys_total; p0 += phase_keys) {
    const int phase_first = tile_offsets[p0];
    const int phase_tiles = tile_offsets[min(nkeys_total, p0 + phase_keys)] - phase_first;
    const int b_begin = phase_first + (int)((i64)phase_tiles * blockIdx.x / gridDim.x);
    const int b_end = phase_first + (int)((i64)phase_tiles * (blockIdx.x + 1) / gridDim.x);
    if (b_begin >= b_end) continue;
    __syncthreads(); // every warp is done with the previous phase's block
    int key = range_holding(tile_offsets, nkeys_total, b_begin);
    FsaKey f = fsa_key(key, offsets, tile_offsets, block_seq, cu_blocks, cu_seqlens, total_blocks);
    load_block(f);
    gather_rows(f, token_of(f, b_begin));
    cp_async_commit();
    bool block_fresh = true;
    int next_token = b_begin + 1 < min(b_end, f.tile_end) ? token_of(f, b_begin + 1) : -1;

    for (int b = b_begin; b < b_end; b++) {
      cp_async_wait<0>();
#if FSA_USE_BULK_Q
      mbarrier_wait(qbar, qphase); // this warp's rows
      qphase ^= 1;
#endif
      if (block_fresh) __syncthreads(); // the K/V block came from every thread
      else __syncwarp();                // this warp's rows came from its own lanes
      block_fresh = false;
      const int e0 = f.e_begin + (b - f.tile0) * per_tile;
      const int rows = min(per_tile, f.e_end - e0) * G;
      const int r_lo = warp * 16 + lane / 4;
      const int r_hi = r_lo + 8;
      const int2 ent_lo = r_lo < rows ? entries[e0 + r_lo / G] : make_int2(-1, 0);
      const int2 ent_hi = r_hi < rows ? entries[e0 + r_hi / G] : make_int2(-1, 0);
      u32 qfrag[DK / 16][4];
      load_a_fragments<DK, FsaQLayout>(qfrag, qsmem, warp * 16, lane);
      __syncwarp(); // every lane has read its fragments before the rows are refilled
      const bool next_same_key = b + 1 < min(b_end, f.tile_end);
      if (next_same_key) gather_rows(f, next_token);
      cp_async_commit();
      next_token = b + 2 < min(b_end, f.tile_end) ? token_of(f, b + 2) : -1;

      const int t_lo = ent_lo.x >= 0 ? ent_lo.x - f.seq_start : -1;
      const int t_hi = ent_hi.x >= 0 ? ent_hi.x - f.seq_start : -1;
      float o[DV / 8][4];
      zero_frags<DV / 8>(o);
      SoftmaxRows st;
      st.init();
      float s[BLOCK_N / 8][4];
      zero_frags<BLOCK_N / 8>(s);
      qk_mma<DK, BLOCK_N / 16>(s, qfrag, ksmem, 0, lane);
      scale_and_mask(s, f.key0, f.nk, t_lo, t_hi, scale_log2, lane);
      softmax_update<BLOCK_N / 8, DV>(st, s, o);
      pv_mma<DV, BLOCK_N / 16>(o, s, vsmem, 0, lane);
#ifdef FSA_STAGE_OUT
      write_partials_staged(st, o, r_lo, r_hi, ent_lo, ent_hi, rows, f.h, Hq, partial_o, partial_lse, stage, lane);
#else
      write_partials(st, o, r_lo, r_hi, ent_lo, ent_hi, rows, f.h, Hq, partial_o, partial_lse, lane);
#endif

      if (!next_same_key && b + 1 < b_end) {
        // The next tile is the next key's (keys nobody chose have no tiles): a new block, loaded by every thread.
        while (tile_offsets[key + 1] <= b + 1) key++;
        f = fsa_key(key, offsets, tile_offsets, block_seq, cu_blocks, cu_seqlens, total_blocks);
        __syncthreads(); // every warp is done with the old block
        load_block(f);
        gather_rows(f, token_of(f, b + 1));
        cp_async_commit();
        block_fresh = true;
        next_token = b + 2 < min(b_end, f.tile_end) ? token_of(f, b + 2) : -1;
      }
    }
  }
}
#endif

/** The bits of CPL consecutive partial elements (NVRTC has no <type_traits>). */
template <int CPL> struct PartialWord;
template <> struct PartialWord<2> { typedef u32 type; };
template <> struct PartialWord<4> { typedef uint2 type; };

/**
 * Merges the n partials of each (token, query head); one warp per (token, head). Lane s < SEL_N takes slot s's
 * lse (empty slots, block index < 0, and slots that saw no key count -inf), the warp reduces them to the row's
 * lse, and each lane then takes DV / 32 columns: it issues all n partial loads before the first add, so that a
 * row costs one round trip to memory, not n (the loads are this kernel's whole time: the partials are read once).
 */
extern "C" __global__ void nsa_fsa_reduce(const elem_t *__restrict__ partial_o, const float *__restrict__ partial_lse,
                                          const int *__restrict__ block_indices, const float *__restrict__ gate,
                                          float *__restrict__ out, elem_t *__restrict__ out_final,
                                          void *__restrict__ branch_out, int branch_half, float *__restrict__ lse_out,
                                          i64 rows, int Hq, int H) {
  static_assert(DV % 64 == 0 && SEL_N <= 32, "a lane takes 2 or 4 columns and a slot");
  constexpr int CPL = DV / 32; // columns per lane: 2 (one 4-byte load a partial) or 4 (8 bytes)
  typedef typename PartialWord<CPL>::type word_t;
  const i64 r = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; // token * Hq + hq
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const i64 token = r / Hq;
  const int h = (int)(r % Hq) / (Hq / H);
  float pl = NSA_NEG_INF;
  if (lane < SEL_N && block_indices[(token * H + h) * SEL_N + lane] >= 0) pl = partial_lse[r * SEL_N + lane];
  float m = pl;
#pragma unroll
  for (int d = 16; d > 0; d /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, d));
  float e = pl != NSA_NEG_INF ? __expf(pl - m) : 0.f;
#pragma unroll
  for (int d = 16; d > 0; d /= 2) e += __shfl_xor_sync(0xffffffff, e, d);
  const float lse = e > 0.f ? m + __logf(e) : NSA_NEG_INF;
  const float w = pl != NSA_NEG_INF ? __expf(pl - lse) : 0.f; // this lane's slot's weight
  if (lane == 0) lse_out[r] = lse;

  const int col = lane * CPL;
  const i64 at = r * DV + col;
  float y[CPL];
#pragma unroll
  for (int c = 0; c < CPL; c++) y[c] = out[at + c]; // in flight with the partials
  const word_t *src = reinterpret_cast<const word_t *>(partial_o + r * SEL_N * DV + col);
  word_t parts[SEL_N];
  float ws[SEL_N];
#pragma unroll
  for (int s = 0; s < SEL_N; s++) {
    ws[s] = __shfl_sync(0xffffffff, w, s);
    parts[s] = ws[s] > 0.f ? src[s * (DV / CPL)] : word_t{}; // slots not written are not read
  }
  float acc[CPL];
#pragma unroll
  for (int c = 0; c < CPL; c++) acc[c] = 0.f;
#pragma unroll
  for (int s = 0; s < SEL_N; s++) {
    const elem_t *x = reinterpret_cast<const elem_t *>(&parts[s]);
#pragma unroll
    for (int c = 0; c < CPL; c++) acc[c] += ws[s] * elem_to_float(x[c]);
  }
  const float g = gate[r * 3 + 1];
#pragma unroll
  for (int c = 0; c < CPL; c++) y[c] += g * acc[c];
  if (branch_out != nullptr) {
#pragma unroll
    for (int c = 0; c < CPL; c += 2) store_branch2(branch_out, at + c, acc[c], acc[c + 1], branch_half != 0);
  }
  if (out_final != nullptr) {
#pragma unroll
    for (int c = 0; c < CPL; c += 2) *reinterpret_cast<u32 *>(out_final + at + c) = pack_elem2(y[c], y[c + 1]);
  } else {
#pragma unroll
    for (int c = 0; c < CPL; c++) out[at + c] = y[c];
  }
}
