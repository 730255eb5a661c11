// nvcc-check: -DDK=128 -DDV=128 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DWINDOW=512 -DDECODE_DISCARD
// nvcc-check: -DDK=64 -DDV=64 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=4 -DWINDOW=100 -DNSA_FP16 -DDECODE_DISCARD
// nvcc-check: -DDK=192 -DDV=128 -DCMP_L=32 -DCMP_D=16 -DSEL_L=48 -DSEL_N=32 -DWINDOW=64
// nvcc-check: -DDK=128 -DDV=128 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DWINDOW=512 -DDECODE_BULK -DDECODE_DISCARD
// nvcc-check: -DDK=192 -DDV=128 -DCMP_L=32 -DCMP_D=16 -DSEL_L=48 -DSEL_N=32 -DWINDOW=64 -DDECODE_BULK -DNSA_FP16 -DDECODE_DISCARD
//
// Decoding against a KV cache, flash-decoding style: every branch's keys are cut into chunks (a multiple of 64
// keys, chosen by the host so the GPU fills), one CTA per (query, KV head, 16 query heads, chunk), so a single
// sequence at long context still fills the GPU, and each K/V tile is loaded once for the G heads of a group.
//
// The step is one launch, nsa_decode_fused, whose CTAs take work items in ticket order (an atomic counter, so an
// item only ever waits for items that started before it): first every chunk of the compressed keys, then every
// chunk of the window, then every chunk of the selected blocks (by default; `lag` interleaves the slc items of a
// row with the cmp items of a later row instead).
//   cmp item   partial softmax over a chunk of the visible compressed keys; it also folds its probabilities,
//              relative to the warp's running max, into per-selection-block sums for each slice of 16 compressed
//              keys (SLICE_W floats per slice and head: the sums, then the max they are relative to). The last cmp
//              item of a (query, KV head) then selects its blocks (fused_select): the cmp lse of the G heads,
//              the block scores from the slices, top-n after the forced blocks, and raises the pair's flag
//   win item   partial softmax over a chunk of the window
//   slc item   waits for its pair's flag, then partial softmax over a chunk of the selected blocks' keys
// The last win or slc item of a (query, KV head, 16 heads) merges the cmp, slc and win chunks and writes the gated
// sum (o_cmp is merged there rather than in the select, whose latency the pair's slc items wait out).
// Counters reset themselves or count on (the 64-bit ticket counter: ticket / items is the launch's generation, which
// the pairs' flags are compared against), so the launch can be replayed as a graph. A select by one CTA per pair
// reads all of the pair's slices and sits on the critical path when the batch is small, so for small batches and
// very long contexts the host uses three launches instead (same items, a launch boundary between the phases, the
// selection spread over several CTAs per pair):
//   nsa_decode_cmp_win   cmp chunks (blockIdx.z < split) and window chunks (the rest)
//   nsa_decode_select    per (query, KV head, range of candidate blocks): the cmp lse of every head, the block
//                        scores, a local top-n; the last CTA of a pair merges the local lists with the forced
//                        blocks. Each CTA also merges the cmp output of some heads (o_cmp, lse_cmp)
//   nsa_decode_slc       slc chunks; the last CTA of a (query, KV head, 16 heads) merges and writes the gated sum
//   nsa_decode_dense + nsa_decode_combine_dense: dense attention over the whole cache (the baseline)
//
// The cache is a few buffers per sequence, k and v [cap, D] per KV head (head-major: a selected block's keys are
// one contiguous run) or [cap, H, D] (token-major), kc/vc likewise with the compressed capacity. query_ptrs holds,
// per query (its sequence's, so that no launch reads a query's sequence before its cache: one round trip, not
// two), SEQ_WORDS words: the addresses of k, v, kc, vc, then the row stride and the head strides (raw,
// compressed), in rows: row i of head h of k is k + (i * stride + h * head_stride) * DK, then the tokens held.
// Query r attends at position q_pos[r]; its K/V are already in the cache. Partial
// results partial_m/l/o are [Q, Hq, slots] (+ DV for o), m in log2 units, o unnormalised; the slots of a row are
// laid out cmp, slc, win. Slices are [Q, H, slice_stride] floats: per slice of 16 compressed keys a record of
// SREC = G * SLICE_W floats rounded up to a multiple of 4 (so that records can be staged with 16-byte copies).
//
// With DECODE_BULK (sm_90) the selected key/value rows of a tile come by bulk copies (thread i < TILE the key row
// i, thread TILE + i the value row i) completing on the stage's mbarrier, into padded rows, instead of 16 cp.async
// of 16 bytes per row. The contiguous branches keep cp.async into swizzled rows.
#include "nsa_common.cuh"
#include "nsa_topk.cuh"

#define THREADS 128
#define ROWS 16
#define TILE 64
#define SLICE 16 // compressed keys per slice: one warp's share of a tile
// Selection blocks a slice touches (slice starts are multiples of SLICE * CMP_D tokens) and its record per head.
#define SLICE_BLOCKS (((SLICE - 1) * CMP_D + CMP_L - 1) / SEL_L + ((SLICE * CMP_D) % SEL_L == 0 ? 1 : 2))
#define SLICE_W (SLICE_BLOCKS + 1)
#define SEL_THREADS 256
#define SEL_PER_THREAD 4 // candidate blocks per thread of nsa_decode_select: at most 1024 per CTA
#define MAX_G 128
#define SEL_STAGE 8192 // floats of nsa_decode_select's staging area (dynamic shared memory)
// The words per query in query_ptrs, in this order; SEQ_WORDS counts them.
enum SeqWord { SEQ_K, SEQ_V, SEQ_KC, SEQ_VC, SEQ_ROW_STRIDE, SEQ_RAW_HEAD_STRIDE, SEQ_CMP_HEAD_STRIDE, SEQ_TOKENS_HELD, SEQ_WORDS };

// Tokens held by the cache of query r's sequence.
__device__ __forceinline__ int query_tokens_held(const unsigned long long *query_ptrs, int r) {
  return (int)query_ptrs[(i64)r * SEQ_WORDS + SEQ_TOKENS_HELD];
}

#if defined(DECODE_BULK) && defined(NSA_HAS_BULK_COPY)
#define DECODE_USE_BULK 1
#else
#define DECODE_USE_BULK 0
#endif

__device__ __forceinline__ int cmp_visible(int t, int tc) {
  return t < CMP_L - 1 ? 0 : min(tc, (t - CMP_L + 1) / CMP_D + 1);
}

/** The compressed keys a sequence holding len tokens has: one per full block of l, every d tokens. */
__device__ __forceinline__ int cmp_held(int len) { return len < CMP_L ? 0 : (len - CMP_L) / CMP_D + 1; }

/** The compressed keys a query at position t of a sequence holding len tokens sees. */
__device__ __forceinline__ int cmp_visible_in(int t, int len) { return cmp_visible(t, cmp_held(len)); }

/** Shared memory of the attention kernels besides the dynamic Q/K/V tiles. */
struct AttendShared {
  int sel[SEL_N];
  float merge_m[4][ROWS];
  float merge_l[4][ROWS];
  int last;
  unsigned long long waited; // the fused step's trace: when an slc item's wait ended
#if DECODE_USE_BULK
  __align__(8) unsigned long long stage_bar[2];
#endif
};

/** Spins (thread 0 of a CTA) until *flag == target, reading it with acquire semantics at GPU scope. */
__device__ __forceinline__ void wait_flag_equals(const int *flag, int target) {
  for (;;) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
    if (v == target) return;
    __nanosleep(128);
  }
}

/** Sets *flag = value with release semantics at GPU scope (the writes before it are seen by who acquires it). */
__device__ __forceinline__ void release_flag(int *flag, int value) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(flag), "r"(value) : "memory");
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/**
 * Drops the L2 lines lying wholly inside [p, p + bytes) without writing them back (DECODE_DISCARD): the step's
 * slices and partial outputs are dead once their select or merge has read them, and written back they would cost
 * DRAM bandwidth that the K/V streams need. Every thread of the CTA takes a share; call after the CTA's last read.
 */
__device__ __forceinline__ void discard_l2(const void *p, i64 bytes) {
#ifdef DECODE_DISCARD
  const unsigned long long a = reinterpret_cast<unsigned long long>(p);
  const unsigned long long hi = (a + (unsigned long long)bytes) & ~127ull;
  for (unsigned long long x = ((a + 127) & ~127ull) + threadIdx.x * 128ull; x < hi; x += blockDim.x * 128ull)
    asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(x) : "memory");
#endif
}

/** tf32 rounding of x (round to nearest, ties away), as a b32 operand of a tf32 mma. */
__device__ __forceinline__ u32 to_tf32(float x) {
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

/** C[16 x 8] += A[16 x 8] * B[8 x 8] in tf32 (sm_80+), fp32 accumulate. */
__device__ __forceinline__ void mma_1688_tf32(float c[4], const u32 a[4], const u32 b[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/** Tokens that compressed key `key` (covering [key d, key d + l)) shares with selection block j: its score weight. */
__device__ __forceinline__ int block_overlap(int key, int j) {
  const int start = key * CMP_D;
  return max(0, min(start + CMP_L, (j + 1) * SEL_L) - max(start, j * SEL_L));
}

/**
 * A cmp item's slice fold: the probabilities p (a warp's 16 rows x 16 compressed keys k0 .. k0 + 16, in the C
 * fragments of its scores) times the overlap weights W[key][block] (16 x SLICE_BLOCKS), written as the slice's
 * per-head block sums to dst[row * SLICE_W + block] for rows < rows. On the tensor cores in tf32 with p split into
 * a high and a low tf32 part (~22 bits, fp32's range; W is a small integer, exact), instead of a loop of scalar FMAs
 * over a shared-memory copy of p that stalled every tile of the attention loop. The mma's k index c of k-tile n
 * stands for key n * 8 + 2c and c + 4 for key n * 8 + 2c + 1, so the C fragments serve as A without a shuffle.
 */
__device__ __forceinline__ void fold_slice(const float s[2][4], int k0, int rows, float *dst, int lane) {
  constexpr int JT = (SLICE_BLOCKS + 7) / 8; // 8-block column tiles
  const int g = lane / 4;
  const int c = lane % 4;
  const int jmin = k0 * CMP_D / SEL_L; // the first block the slice touches
  // One column tile at a time (the split of p done again for each), so that only four accumulators are live.
#pragma unroll 1
  for (int jt = 0; jt < JT; jt++) {
    const int j = jt * 8 + g; // this lane's column of W
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int n = 0; n < 2; n++) {
      const float p[4] = {s[n][0], s[n][2], s[n][1], s[n][3]}; // rows g, g + 8 of key 2c, then of key 2c + 1
      u32 hi[4], lo[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        hi[e] = to_tf32(p[e]);
        lo[e] = to_tf32(p[e] - __uint_as_float(hi[e]));
      }
      const int key = k0 + n * 8 + 2 * c;
      u32 w[2];
      w[0] = __float_as_uint(j < SLICE_BLOCKS ? (float)block_overlap(key, jmin + j) : 0.f);
      w[1] = __float_as_uint(j < SLICE_BLOCKS ? (float)block_overlap(key + 1, jmin + j) : 0.f);
      mma_1688_tf32(acc, hi, w);
      mma_1688_tf32(acc, lo, w);
    }
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int row = g + (e >= 2 ? 8 : 0);
      const int col = jt * 8 + 2 * c + (e & 1);
      if (row < rows && col < SLICE_BLOCKS) dst[row * SLICE_W + col] = acc[e];
    }
  }
}

/** Floats of a slice record (G heads' SLICE_W floats, rounded up to a multiple of 4). */
__device__ __forceinline__ int slice_record(int G) { return (G * SLICE_W + 3) & ~3; }

struct Cache {
  const elem_t *q; // [Q, Hq, DK]
  const unsigned long long *query_ptrs; // [Q, SEQ_WORDS]
  const int *q_pos;
};

/**
 * Partial attention of query r's heads of row group y (KV head y / gchunks, 16 heads at a time) over chunk zc of a
 * branch's keys (BRANCH 0 cmp, 1 slc, 2 win, 3 dense), written to slot `slot` of its rows. Branch 0 also writes
 * its slices. Branch 1 first waits for *wait_flag == wait_target when wait_flag is set (the fused step).
 */
template <int BRANCH>
__device__ __forceinline__ void attend_chunk(const Cache &c, const int *block_indices, float *partial_m, float *partial_l,
                                             float *partial_o, int slots, int slot, int r, int y, int zc, int chunk,
                                             float scale_log2, int Hq, int H, float *slices, i64 slice_stride,
                                             unsigned char *smem_raw, AttendShared &sh,
                                             const int *wait_flag = nullptr, int wait_target = 0) {
  // Only the selected blocks' rows (gathered from anywhere in the cache) come by bulk copies: on the contiguous
  // branches they measured no faster, and the padding costs the cmp + win launch a CTA per SM (H100).
  constexpr bool BULK = DECODE_USE_BULK && BRANCH == 1;
  typedef typename StageTile<BULK, DK>::Layout KTile;
  typedef typename StageTile<BULK, DV>::Layout VTile;
  constexpr int K_ROW = StageTile<BULK, DK>::ROW;
  constexpr int V_ROW = StageTile<BULK, DV>::ROW;
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw); // ROWS x DK
  elem_t *ksmem = qsmem + ROWS * DK;                    // 2 x TILE x K_ROW
  elem_t *vsmem = ksmem + 2 * TILE * K_ROW;             // 2 x TILE x V_ROW

  const int G = Hq / H;
  const int gchunks = (G + ROWS - 1) / ROWS;
  const int h = y / gchunks;
  const int head0 = (y % gchunks) * ROWS;
  const int rows = min(ROWS, G - head0);
  const unsigned long long *sp = c.query_ptrs + (i64)r * SEQ_WORDS;
  const int t = c.q_pos[r];
  const int len = (int)sp[SEQ_TOKENS_HELD];
  const int tc = cmp_held(len);
  const elem_t *kbase = reinterpret_cast<const elem_t *>(sp[BRANCH == 0 ? SEQ_KC : SEQ_K]);
  const elem_t *vbase = reinterpret_cast<const elem_t *>(sp[BRANCH == 0 ? SEQ_VC : SEQ_V]);
  const i64 rstride = (i64)sp[SEQ_ROW_STRIDE]; // rows between tokens
  const i64 hoff = (i64)h * (i64)sp[BRANCH == 0 ? SEQ_CMP_HEAD_STRIDE : SEQ_RAW_HEAD_STRIDE]; // rows before head h's first token
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // The branch's keys as indices 0 .. nkeys and where index i lives (a cache row; -1 when hidden from t).
  const i64 prow = (i64)r * Hq + h * G + head0; // first output row (query r, head head0)
  load_tile_async<DK, THREADS>(qsmem, ROWS, [&](int i) -> const elem_t * { return i < rows ? c.q + (prow + i) * DK : nullptr; });
  int nkeys;
  int first = 0;
  if (BRANCH == 1) {
    if (wait_flag != nullptr) {
      if (threadIdx.x == 0) {
        wait_flag_equals(wait_flag, wait_target);
        sh.waited = global_ns();
      }
      __syncthreads();
    }
    if (threadIdx.x < SEL_N) sh.sel[threadIdx.x] = __ldcg(block_indices + ((i64)r * H + h) * SEL_N + threadIdx.x);
    __syncthreads();
    int nsel = 0;
    while (nsel < SEL_N && sh.sel[nsel] >= 0) nsel++;
    nkeys = nsel * SEL_L;
  } else if (BRANCH == 0) {
    nkeys = cmp_visible(t, tc);
  } else if (BRANCH == 2) {
    first = max(0, t - WINDOW + 1);
    nkeys = t - first + 1;
  } else {
    nkeys = t + 1;
  }
  auto key_row = [&](int i) -> int {
    if (BRANCH == 1) {
      const int pos = sh.sel[i / SEL_L] * SEL_L + i % SEL_L;
      return pos <= t ? pos : -1;
    }
    return first + i;
  };
  const int c0 = zc * chunk;
  const int c1 = min(nkeys, c0 + chunk);
  if (c0 >= c1) {
    cp_async_commit();
    cp_async_wait<0>();
    for (int i = threadIdx.x; i < rows; i += THREADS) {
      partial_m[(prow + i) * slots + slot] = NSA_NEG_INF;
      partial_l[(prow + i) * slots + slot] = 0.f;
    }
    return;
  }
  const int ntiles = (c1 - c0 + TILE - 1) / TILE;
#if DECODE_USE_BULK
  if constexpr (BULK) {
    // Rows a tile does not fill keep what they held; values must be finite there (p = 0 multiplies them), so the
    // value stages start zeroed. The zeros are ordinary stores that later bulk copies overwrite: fence the proxies.
    for (int i = threadIdx.x; i < 2 * TILE * V_ROW / 8; i += THREADS) reinterpret_cast<uint4 *>(vsmem)[i] = make_uint4(0, 0, 0, 0);
    if (threadIdx.x < 2) mbarrier_init(&sh.stage_bar[threadIdx.x], THREADS);
    mbarrier_init_fence();
    fence_proxy_async_shared();
    __syncthreads();
    cp_async_commit(); // the query rows
  }
#endif
  // With BULK every thread arrives once per issue (with the bytes of its row, maybe none: thread i < TILE copies
  // key row i, thread TILE + i value row i); the phase of stage it & 1 that tile it completes has parity (it / 2) & 1.
  // Every key/value row is read once per step: streamed through L2 as evict-first, so that the partials and
  // slices written during the step, read again by the selects and merges, stay in L2.
  const unsigned long long stream_policy = l2_evict_first_policy();
  auto issue = [&](int it) {
#if DECODE_USE_BULK
    if constexpr (BULK) {
      const int stage = it & 1;
      const bool is_value = threadIdx.x >= TILE;
      const int i = threadIdx.x - (is_value ? TILE : 0);
      const int key = c0 + it * TILE + i;
      const int row = key < c1 ? key_row(key) : -1;
      const u32 bytes = row >= 0 ? (is_value ? DV : DK) * 2 : 0;
      mbarrier_arrive_expect_tx(&sh.stage_bar[stage], bytes);
      if (row >= 0) {
        if (is_value)
          bulk_copy_g2s_hinted(vsmem + (stage * TILE + i) * V_ROW, vbase + ((i64)row * rstride + hoff) * DV, bytes, &sh.stage_bar[stage],
                               stream_policy);
        else
          bulk_copy_g2s_hinted(ksmem + (stage * TILE + i) * K_ROW, kbase + ((i64)row * rstride + hoff) * DK, bytes, &sh.stage_bar[stage],
                               stream_policy);
      }
      return;
    }
#endif
    const int k0 = c0 + it * TILE;
    load_tile_async_hinted<DK, THREADS>(ksmem + (it & 1) * TILE * DK, TILE, [&](int i) -> const elem_t * {
      const int row = k0 + i < c1 ? key_row(k0 + i) : -1;
      return row >= 0 ? kbase + ((i64)row * rstride + hoff) * DK : nullptr;
    }, stream_policy);
    load_tile_async_hinted<DV, THREADS>(vsmem + (it & 1) * TILE * DV, TILE, [&](int i) -> const elem_t * {
      const int row = k0 + i < c1 ? key_row(k0 + i) : -1;
      return row >= 0 ? vbase + ((i64)row * rstride + hoff) * DV : nullptr;
    }, stream_policy);
    cp_async_commit();
  };
  issue(0);

  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  u32 qfrag[DK / 16][4];
  float *slice_base = BRANCH == 0 ? slices + ((i64)r * H + h) * slice_stride : nullptr;
  for (int it = 0; it < ntiles; it++) {
    if (BULK) {
      if (it + 1 < ntiles) issue(it + 1);
      if (it == 0) {
        cp_async_wait<0>();
        __syncthreads();
      }
#if DECODE_USE_BULK
      mbarrier_wait(&sh.stage_bar[it & 1], (it >> 1) & 1);
#endif
    } else {
      if (it + 1 < ntiles) issue(it + 1);
      else cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
    }
    if (it == 0) load_a_fragments<DK>(qfrag, qsmem, 0, lane);
    const int k0 = c0 + it * TILE + warp * 16;
    float s[2][4];
    zero_frags<2>(s);
    qk_mma<DK, 1, KTile>(s, qfrag, ksmem + (it & 1) * TILE * K_ROW, warp * 16, lane);
#pragma unroll
    for (int n = 0; n < 2; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
        const bool ok = i < c1 && key_row(i) >= 0;
        s[n][e] = ok ? s[n][e] * scale_log2 : NSA_NEG_INF;
      }
    }
    softmax_update<2, DV>(st, s, o);
    if (BRANCH == 0 && k0 < c1) {
      // This warp's slice (compressed keys k0 .. k0 + 16): its probabilities exp2(s - st.m) summed per selection
      // block with the overlap weights (in tokens), on the tensor cores, and st.m itself.
      float *dst = slice_base + (i64)(k0 / SLICE) * slice_record(G) + head0 * SLICE_W;
      fold_slice(s, k0, rows, dst, lane);
      if (lane % 4 == 0) {
        if (lane / 4 < rows) dst[(lane / 4) * SLICE_W + SLICE_BLOCKS] = st.m[0];
        if (lane / 4 + 8 < rows) dst[(lane / 4 + 8) * SLICE_W + SLICE_BLOCKS] = st.m[1];
      }
    }
    pv_mma<DV, 1, VTile>(o, s, vsmem + (it & 1) * TILE * V_ROW, warp * 16, lane);
    __syncthreads();
  }

  // Merge the four warps' states, then write this chunk's partial for each row.
  float *merge_o = reinterpret_cast<float *>(ksmem); // 4 x ROWS x DV floats
  stage_warp_state<DV, 4>(st, o, sh.merge_m, sh.merge_l, merge_o, warp, lane);
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * DV; idx += THREADS) {
    const int row = idx / DV;
    const int col = idx % DV;
    float m, l, acc[1];
    merge_warp_states<DV, 4>(sh.merge_m, sh.merge_l, merge_o, row, col, &m, &l, acc);
    const i64 at = (prow + row) * slots + slot;
    partial_o[at * DV + col] = acc[0];
    if (col == 0) {
      partial_m[at] = m;
      partial_l[at] = l;
    }
  }
}

/** Launch 1: chunks of the compressed keys (blockIdx.z < split, slots cmp0 + z) and of the window (the rest). */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_decode_cmp_win(const elem_t *__restrict__ q, const unsigned long long *__restrict__ query_ptrs, const int *__restrict__ q_pos,
                       float *__restrict__ partial_m, float *__restrict__ partial_l, float *__restrict__ partial_o, int slots,
                       int split, int cmp_chunk, int win_slot0, int win_chunk, float *__restrict__ slices, i64 slice_stride,
                       int Hq, int H, float scale_log2) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ AttendShared sh;
  const Cache c{q, query_ptrs, q_pos};
  const int z = blockIdx.z;
  if (z < split)
    attend_chunk<0>(c, nullptr, partial_m, partial_l, partial_o, slots, z, blockIdx.x, blockIdx.y, z, cmp_chunk, scale_log2, Hq, H,
                    slices, slice_stride, smem_raw, sh);
  else
    attend_chunk<2>(c, nullptr, partial_m, partial_l, partial_o, slots, win_slot0 + z - split, blockIdx.x, blockIdx.y, z - split,
                    win_chunk, scale_log2, Hq, H, nullptr, 0, smem_raw, sh);
}

/** The dense baseline's chunks. */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_decode_dense(const elem_t *__restrict__ q, const unsigned long long *__restrict__ query_ptrs, const int *__restrict__ q_pos,
                     float *__restrict__ partial_m, float *__restrict__ partial_l, float *__restrict__ partial_o, int slots,
                     int chunk, int Hq, int H, float scale_log2) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ AttendShared sh;
  const Cache c{q, query_ptrs, q_pos};
  attend_chunk<3>(c, nullptr, partial_m, partial_l, partial_o, slots, blockIdx.z, blockIdx.x, blockIdx.y, blockIdx.z, chunk, scale_log2,
                  Hq, H, nullptr, 0, smem_raw, sh);
}

/** Marks this CTA done with its share of `counter`'s work; true in the last of `total` (which resets the counter). */
__device__ __forceinline__ bool last_to_finish(int *counter, int total, int *flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool last = atomicAdd(counter, 1) == total - 1;
    if (last) *counter = 0;
    *flag = last;
  }
  __syncthreads();
  const bool last = *flag != 0;
  if (last) __threadfence();
  return last;
}

/**
 * Query r's heads of row group y: merges each branch's partial results (slots [0, cmp_n) when cmp_n > 0, the slc
 * slots [slc_slot0, win_slot0), the win slots [win_slot0, slots)) and writes the branches' outputs and lse and the
 * gated sum. With cmp_n == 0, o_cmp was merged before (nsa_decode_select) and is read instead. A branch output or
 * lse passed as null is not written (a step without its branches' outputs: their stores measurably lengthen the
 * merges that end the step). Everything is read through L2: other CTAs of the same launch may have written it.
 * Uses the first 2 * ROWS * (slots - first merged slot) floats of `smem`.
 */
__device__ __forceinline__ void merge_outputs(int r, int y, const float *partial_m, const float *partial_l, const float *partial_o,
                                              int slots, int cmp_n, int slc_slot0, int win_slot0, int Hq, int H, const float *gate,
                                              float *o_cmp, float *o_slc, float *o_win, float *out, float *lse_cmp, float *lse_slc,
                                              float *lse_win, unsigned char *smem, unsigned long long *stamps = nullptr) {
  const unsigned long long t_entry = stamps != nullptr ? global_ns() : 0;
  const int G = Hq / H;
  const int gchunks = (G + ROWS - 1) / ROWS;
  const int h = y / gchunks;
  const int head0 = (y % gchunks) * ROWS;
  const int rows = min(ROWS, G - head0);
  const i64 prow = (i64)r * Hq + h * G + head0;
  const int first = cmp_n > 0 ? 0 : slc_slot0; // the first merged slot
  const int ns = slots - first;
  // Each branch's slots, relative to `first`: cmp [0, b1), slc [b1, b2), win [b2, ns).
  const int b1 = slc_slot0 - first;
  const int b2 = win_slot0 - first;
  // Each (row, slot)'s m and l into shared memory, then per (row, branch) the branch's m and l, and each slot's
  // weight exp2(m_s - m) / l in place of its m.
  float *wm = reinterpret_cast<float *>(smem); // [ROWS][ns]
  float *wl = wm + ROWS * ns;
  for (int i = threadIdx.x; i < rows * ns; i += THREADS) {
    const i64 at = (prow + i / ns) * slots + first + i % ns;
    wm[i] = __ldcg(partial_m + at);
    wl[i] = __ldcg(partial_l + at);
  }
  __syncthreads();
  float bm = NSA_NEG_INF, bl = 0.f;
  const int row = threadIdx.x >> 2;
  const int b = threadIdx.x & 3; // 0 cmp, 1 slc, 2 win
  const int s0 = b == 0 ? 0 : b == 1 ? b1 : b2;
  const int s1 = b == 0 ? b1 : b == 1 ? b2 : ns;
  const bool mine = row < rows && b < 3 && s0 < s1;
  if (mine) {
    for (int s = s0; s < s1; s++) bm = fmaxf(bm, wm[row * ns + s]);
    for (int s = s0; s < s1; s++) {
      const float ms = wm[row * ns + s];
      bl += ms == NSA_NEG_INF ? 0.f : exp2f(ms - bm) * wl[row * ns + s];
    }
    const float lse = bm == NSA_NEG_INF ? NSA_NEG_INF : (bm + log2f(bl)) * NSA_LN2;
    float *lse_b = b == 0 ? lse_cmp : b == 1 ? lse_slc : lse_win;
    if (lse_b != nullptr) lse_b[prow + row] = lse;
  }
  __syncthreads();
  if (mine) {
    for (int s = s0; s < s1; s++) {
      const float ms = wm[row * ns + s];
      wm[row * ns + s] = ms == NSA_NEG_INF ? 0.f : exp2f(ms - bm) / bl;
    }
  }
  __syncthreads();
  const unsigned long long t_weights = stamps != nullptr ? global_ns() : 0;
  auto add_slots = [&](float4 &acc, const float4 *po, const float *w, int from, int to) {
#pragma unroll 4
    for (int s = from; s < to; s++) {
      const float4 v = __ldcg(po + (i64)s * (DV / 4));
      acc.x += w[s] * v.x, acc.y += w[s] * v.y, acc.z += w[s] * v.z, acc.w += w[s] * v.w;
    }
  };
  for (int idx = threadIdx.x; idx < rows * (DV / 4); idx += THREADS) {
    const int rr = idx / (DV / 4);
    const int col = (idx % (DV / 4)) * 4;
    const i64 orow = prow + rr;
    const float *w = wm + rr * ns;
    const float4 *po = reinterpret_cast<const float4 *>(partial_o + (orow * slots + first) * DV + col);
    float4 ac = make_float4(0.f, 0.f, 0.f, 0.f), as = ac, aw = ac;
    add_slots(ac, po, w, 0, b1);
    add_slots(as, po, w, b1, b2);
    add_slots(aw, po, w, b2, ns);
    if (cmp_n == 0) ac = __ldcg(reinterpret_cast<const float4 *>(o_cmp + orow * DV + col));
    else if (o_cmp != nullptr) *reinterpret_cast<float4 *>(o_cmp + orow * DV + col) = ac;
    const float g0 = gate[orow * 3], g1 = gate[orow * 3 + 1], g2 = gate[orow * 3 + 2];
    if (o_slc != nullptr) *reinterpret_cast<float4 *>(o_slc + orow * DV + col) = as;
    if (o_win != nullptr) *reinterpret_cast<float4 *>(o_win + orow * DV + col) = aw;
    *reinterpret_cast<float4 *>(out + orow * DV + col) =
        make_float4(g0 * ac.x + g1 * as.x + g2 * aw.x, g0 * ac.y + g1 * as.y + g2 * aw.y, g0 * ac.z + g1 * as.z + g2 * aw.z,
                    g0 * ac.w + g1 * as.w + g2 * aw.w);
  }
  if (stamps != nullptr && threadIdx.x == 0) {
    stamps[0] = t_entry;
    stamps[1] = t_weights;
    stamps[2] = global_ns(); // thread 0's outputs written
  }
#ifdef DECODE_DISCARD
  __syncthreads(); // every slot read
  for (int rr = 0; rr < rows; rr++) discard_l2(partial_o + ((prow + rr) * slots + first) * DV, (i64)ns * DV * 4);
#endif
}

/**
 * Launch 3: chunk blockIdx.z of the selected blocks' keys (slots slc_slot0 + z); the last CTA of its rows then
 * merges the slc chunks and the win chunks (slots win_slot0 .. slots) and writes the outputs and the gated sum.
 */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_decode_slc(const elem_t *__restrict__ q, const unsigned long long *__restrict__ query_ptrs, const int *__restrict__ q_pos,
                   const int *__restrict__ block_indices, float *__restrict__ partial_m, float *__restrict__ partial_l,
                   float *__restrict__ partial_o, int slots, int slc_slot0, int chunk, int win_slot0, int Hq, int H,
                   float scale_log2, const float *__restrict__ gate,
                   float *__restrict__ o_cmp, float *__restrict__ o_slc, float *__restrict__ o_win, float *__restrict__ out,
                   float *__restrict__ lse_slc, float *__restrict__ lse_win, int *__restrict__ counters) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ AttendShared sh;
  const Cache c{q, query_ptrs, q_pos};
  attend_chunk<1>(c, block_indices, partial_m, partial_l, partial_o, slots, slc_slot0 + blockIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                  chunk, scale_log2, Hq, H, nullptr, 0, smem_raw, sh);
  if (!last_to_finish(counters + (i64)blockIdx.x * gridDim.y + blockIdx.y, gridDim.z, &sh.last)) return;
  merge_outputs(blockIdx.x, blockIdx.y, partial_m, partial_l, partial_o, slots, 0, slc_slot0, win_slot0, Hq, H, gate, o_cmp, o_slc,
                o_win, out, nullptr, lse_slc, lse_win, smem_raw);
}

/**
 * Launch 2, per (query r, KV head h, z < gridDim.z): the cmp lse of the G heads; o_cmp / lse_cmp of the heads
 * g = z mod gridDim.z; the block scores of the candidates in this CTA's range (the forced ones excluded) and their
 * top SEL_N, to cand_s/cand_j [Q, H, gridDim.z, SEL_N]. The last CTA of (r, h) merges those lists after the forced
 * blocks into block_indices [Q, H, SEL_N] (ascending, -1 padded). Dynamic shared memory: SEL_STAGE floats and
 * gridDim.z * SEL_N (score, index) pairs, whichever is larger.
 */
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    nsa_decode_select(const float *__restrict__ partial_m, const float *__restrict__ partial_l, const float *__restrict__ partial_o,
                      const float *__restrict__ slices, i64 slice_stride, const unsigned long long *__restrict__ query_ptrs,
                      const int *__restrict__ q_pos, float *__restrict__ o_cmp,
                      float *__restrict__ lse_cmp, int *__restrict__ block_indices, float *__restrict__ cand_s,
                      int *__restrict__ cand_j, int *__restrict__ counters, int Hq, int H, int slots, int cmp_slots) {
  extern __shared__ __align__(16) unsigned char sel_smem[];
  __shared__ float lse2[MAX_G], head_m[MAX_G], head_l[MAX_G];
  __shared__ float warp_s[SEL_THREADS / 32][SEL_N];
  __shared__ int warp_j[SEL_THREADS / 32][SEL_N];
  __shared__ int last_flag;
  const int r = blockIdx.x;
  const int h = blockIdx.y;
  const int z = blockIdx.z;
  const int nz = gridDim.z;
  const int G = Hq / H;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int t = q_pos[r];
  const int len = query_tokens_held(query_ptrs, r);
  const int visible = cmp_visible_in(t, len);

  // The cmp lse of every head (a warp per head): m and l over the cmp chunks.
  for (int g = warp; g < G; g += SEL_THREADS / 32) {
    const i64 row = (i64)r * Hq + h * G + g;
    const float *pm = partial_m + row * slots;
    const float *pl = partial_l + row * slots;
    float m = NSA_NEG_INF;
    for (int s = lane; s < cmp_slots; s += 32) m = fmaxf(m, pm[s]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
    float l = 0.f;
    for (int s = lane; s < cmp_slots; s += 32) l += pm[s] == NSA_NEG_INF ? 0.f : exp2f(pm[s] - m) * pl[s];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffff, l, off);
    if (lane == 0) {
      head_m[g] = m;
      head_l[g] = l;
      lse2[g] = m == NSA_NEG_INF ? NSA_NEG_INF : m + log2f(l);
      if (g % nz == z && lse_cmp != nullptr) lse_cmp[row] = m == NSA_NEG_INF ? NSA_NEG_INF : (m + log2f(l)) * NSA_LN2;
    }
  }
  __syncthreads();
  // o_cmp of the heads g = z, z + nz, ...: a thread per (head, 4 columns).
  const int my_heads = z < G ? (G - z + nz - 1) / nz : 0;
  for (int idx = threadIdx.x; idx < my_heads * (DV / 4); idx += SEL_THREADS) {
    const int g = z + (idx / (DV / 4)) * nz;
    const int col = (idx % (DV / 4)) * 4;
    const i64 row = (i64)r * Hq + h * G + g;
    const float m = head_m[g];
    const float *pm = partial_m + row * slots;
    const float4 *po = reinterpret_cast<const float4 *>(partial_o + row * slots * DV + col);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = 0; s < cmp_slots; s++) {
      const float w = pm[s] == NSA_NEG_INF ? 0.f : exp2f(pm[s] - m);
      const float4 v = po[(i64)s * (DV / 4)];
      acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
    }
    const float inv = m == NSA_NEG_INF ? 0.f : 1.f / head_l[g];
    *reinterpret_cast<float4 *>(o_cmp + row * DV + col) = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  }

  // Block scores of this CTA's candidates, SEL_THREADS at a time (the forced blocks 0, current - 1 and current
  // are left out here): the slices they need are staged in shared memory, heads gcnt at a time, with each
  // slice's reference max replaced by its factor exp2(max - lse).
  const int current = t / SEL_L;
  const int per = (current + nz) / nz; // ceil((current + 1) / nz) <= SEL_THREADS * SEL_PER_THREAD (the host's nz)
  const int jb0 = z * per;
  const int jb1 = min(current + 1, jb0 + per);
  const float *base = slices + ((i64)r * H + h) * slice_stride;
  const int srec = slice_record(G);
  float *stage = reinterpret_cast<float *>(sel_smem);
  float sc[SEL_PER_THREAD];
  int jx[SEL_PER_THREAD];
#pragma unroll
  for (int e = 0; e < SEL_PER_THREAD; e++) {
    const int r0 = jb0 + e * SEL_THREADS; // this round's blocks r0 .. r1
    const int r1 = min(jb1, r0 + SEL_THREADS);
    const int j = r0 + threadIdx.x;
    sc[e] = NSA_NEG_INF;
    jx[e] = NO_BLOCK;
    if (r0 >= r1) continue; // uniform across the CTA
    const int i_first = max(0, (r0 * SEL_L - CMP_L + CMP_D) / CMP_D);
    const int i_last = min(visible, (r1 * SEL_L - 1) / CMP_D + 1); // exclusive
    const int i_lo = max(0, (j * SEL_L - CMP_L + CMP_D) / CMP_D);
    const int i_hi = min(visible, ((j + 1) * SEL_L - 1) / CMP_D + 1);
    const bool mine = j < r1 && j != 0 && j < current - 1;
    float acc = 0.f;
    if (i_first < i_last) {
      const int sg0 = i_first / SLICE;
      const int nsl = (i_last - 1) / SLICE - sg0 + 1;
      const int gcnt = min(G, SEL_STAGE / (nsl * SLICE_W)); // >= 1: the host checks it
      for (int g0 = 0; g0 < G; g0 += gcnt) {
        const int gn = min(gcnt, G - g0);
        __syncthreads();
        const int width = gn * SLICE_W;
#pragma unroll 8
        for (int i = threadIdx.x; i < nsl * width; i += SEL_THREADS) {
          const int sl = i / width;
          const int rem = i - sl * width;
          float v = base[(i64)(sg0 + sl) * srec + g0 * SLICE_W + rem];
          if (rem % SLICE_W == SLICE_BLOCKS) v = exp2f(v - lse2[g0 + rem / SLICE_W]);
          stage[i] = v;
        }
        __syncthreads();
        if (mine && i_lo < i_hi) {
          const int s_lo = i_lo / SLICE - sg0;
          const int s_hi = (i_hi - 1) / SLICE - sg0;
          for (int g = 0; g < gn; g++)
            for (int sl = s_lo; sl <= s_hi; sl++) {
              const float *rec = stage + sl * width + g * SLICE_W;
              acc += rec[SLICE_BLOCKS] * rec[j - (sg0 + sl) * SLICE * CMP_D / SEL_L];
            }
        }
      }
    }
    if (mine) {
      sc[e] = acc * (1.f / CMP_D);
      jx[e] = j;
    }
  }
  __syncthreads(); // the staging area becomes the last CTA's candidate lists
  warp_best_regs<SEL_PER_THREAD>(sc, jx, SEL_N, warp_s[warp], warp_j[warp], lane);
  __syncthreads();
  const i64 list = ((i64)r * H + h) * nz;
  if (warp == 0) {
    float *ls = cand_s + (list + z) * SEL_N;
    int *lj = cand_j + (list + z) * SEL_N;
    warp_best_listed<(SEL_THREADS / 32 * SEL_N + 31) / 32>(&warp_s[0][0], &warp_j[0][0], (SEL_THREADS / 32) * SEL_N, SEL_N, ls, lj, lane);
  }
  if (!last_to_finish(counters + (i64)r * H + h, nz, &last_flag)) return;
  if (warp != 0) return;

  // The last CTA: the forced blocks (distinct, lowest index first), then the best of the nz lists.
  float *all_s = reinterpret_cast<float *>(sel_smem);
  int *all_j = reinterpret_cast<int *>(all_s + nz * SEL_N);
  for (int i = lane; i < nz * SEL_N; i += 32) {
    all_s[i] = __ldcg(cand_s + list * SEL_N + i);
    all_j[i] = __ldcg(cand_j + list * SEL_N + i);
  }
  __syncwarp();
  int chosen = -1; // lane i keeps the i-th chosen block
  int count = warp_forced_blocks(current, chosen, lane);
  // The rest by score: reuse warp_s[0] / warp_j[0] for the picks.
  const int need = SEL_N - count;
  // From registers (4 a lane) where nz * SEL_N <= 128, which the host keeps where it can (SELECT_MERGE_ENTRIES).
  const int got = warp_best_listed<4>(all_s, all_j, nz * SEL_N, need, &warp_s[0][0], &warp_j[0][0], lane);
  for (int k = 0; k < got; k++)
    if (lane == count + k) chosen = warp_j[0][k];
  count += got;
  warp_write_ascending(chosen, count, block_indices + ((i64)r * H + h) * SEL_N, lane);
}

/** Floats fused_select keeps for the cmp slots' m and l (half each) when 2 * G * slots fits (else it reads L2 twice). */
#define FUSED_ML 2048
/**
 * Floats of fused_select's fixed part of the work area (per-head lse, the cmp slots' m and l, the warps' lists, the
 * picks), 16-byte rounded.
 */
#define FUSED_SELECT_FIXED ((MAX_G + FUSED_ML + 10 * SEL_N + 3) & ~3)

/**
 * The selection of query r, KV head h by one CTA (the last cmp item of the pair), from the partials and slices
 * its cmp chunks wrote (read through L2): the cmp lse of the G heads (o_cmp and lse_cmp are left to the rows'
 * merges, off this critical path); the block scores, from the slices staged `ns` at a time (every head's record),
 * each record's max turned into its factor exp2(max - lse), summed over the heads per (slice, block), then
 * gathered per block; the top-n of the blocks that are not forced (four warps over a quarter each, then one warp
 * over their lists), after the forced blocks, to block_indices.
 * `work` is the CTA's dynamic shared memory, `work_floats` of it: the fixed part, the scores of the current + 1
 * candidates, then per round of ns slices their records and per-block head sums (the host checks that at least
 * eight slices, or all, fit).
 */
__device__ __noinline__ void fused_select(int r, int h, const unsigned long long *__restrict__ query_ptrs, const int *__restrict__ q_pos,
                             const float *partial_m, const float *partial_l, int slots, int cmp_slots, const float *slices,
                             i64 slice_stride, int *block_indices, int Hq, int H, float *work, int work_floats,
                             unsigned long long *stamps) {
  const unsigned long long t_entry = stamps != nullptr ? global_ns() : 0;
  const int G = Hq / H;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int t = q_pos[r];
  const int len = query_tokens_held(query_ptrs, r);
  const int visible = cmp_visible_in(t, len);
  const int current = t / SEL_L;
  const int ncand = current + 1;
  float *lse2 = work;
  float *ml = work + MAX_G; // [2][G][cmp_slots]: the cmp slots' m, then their l
  const int nml = G * cmp_slots;
  const bool keep_ml = 2 * nml <= FUSED_ML;
  float *list_s = ml + FUSED_ML; // [4][SEL_N]
  int *list_j = reinterpret_cast<int *>(list_s + 4 * SEL_N);
  float *pick_s = list_s + 8 * SEL_N;
  int *pick_j = reinterpret_cast<int *>(pick_s + SEL_N);
  float *score = work + FUSED_SELECT_FIXED;
  float *stage = score + ((ncand + 3) & ~3);
  const int srec = slice_record(G);
  const int ns = max(1, (int)((work_floats - (stage - work)) / (srec + SLICE_BLOCKS)));
  float *head_sums = stage + ns * srec; // [ns][SLICE_BLOCKS]
  const int nsv = (visible + SLICE - 1) / SLICE; // slices holding visible compressed keys
  const float *base = slices + ((i64)r * H + h) * slice_stride;
  auto stage_round = [&](int s0) {
    const int nsl = min(ns, nsv - s0);
    const float *src = base + (i64)s0 * srec;
    for (int i = threadIdx.x; i < nsl * srec / 4; i += THREADS) cp_async_16(stage + 4 * i, src + 4 * i, true);
    cp_async_commit();
  };
  if (nsv > 0) stage_round(0); // in flight while the lse are merged

  // The cmp lse of every head: all (head, slot) m and l in one round trip where they fit, then a warp per head.
  if (keep_ml) {
    for (int i = threadIdx.x; i < nml; i += THREADS) {
      const i64 at = ((i64)r * Hq + h * G + i / cmp_slots) * slots + i % cmp_slots;
      ml[i] = __ldcg(partial_m + at);
      ml[nml + i] = __ldcg(partial_l + at);
    }
    __syncthreads();
  }
  for (int g = warp; g < G; g += THREADS / 32) {
    const i64 at = ((i64)r * Hq + h * G + g) * slots;
    auto slot_m = [&](int s) { return keep_ml ? ml[g * cmp_slots + s] : __ldcg(partial_m + at + s); };
    auto slot_l = [&](int s) { return keep_ml ? ml[nml + g * cmp_slots + s] : __ldcg(partial_l + at + s); };
    float m = NSA_NEG_INF;
    for (int s = lane; s < cmp_slots; s += 32) m = fmaxf(m, slot_m(s));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
    float l = 0.f;
    for (int s = lane; s < cmp_slots; s += 32) {
      const float pm = slot_m(s);
      l += pm == NSA_NEG_INF ? 0.f : exp2f(pm - m) * slot_l(s);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffff, l, off);
    if (lane == 0) lse2[g] = m == NSA_NEG_INF ? NSA_NEG_INF : m + log2f(l);
  }
  for (int j = threadIdx.x; j < ncand; j += THREADS) score[j] = 0.f;
  const unsigned long long t_lse = stamps != nullptr ? global_ns() : 0;

  // Block scores, ns slices a round.
  for (int s0 = 0; s0 < nsv; s0 += ns) {
    const int nsl = min(ns, nsv - s0);
    if (s0 > 0) stage_round(s0);
    cp_async_wait<0>();
    __syncthreads();
    for (int i = threadIdx.x; i < nsl * G; i += THREADS) {
      float *mx = stage + (i / G) * srec + (i % G) * SLICE_W + SLICE_BLOCKS;
      *mx = exp2f(*mx - lse2[i % G]);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nsl * SLICE_BLOCKS; i += THREADS) {
      const float *rec = stage + (i / SLICE_BLOCKS) * srec;
      const int b = i % SLICE_BLOCKS;
      float acc = 0.f;
      for (int g = 0; g < G; g++) acc += rec[g * SLICE_W + SLICE_BLOCKS] * rec[g * SLICE_W + b];
      head_sums[i] = acc;
    }
    __syncthreads();
    // The blocks these slices touch; a block's compressed keys i_lo .. i_hi may span slices of two rounds, whose
    // parts add up in round order.
    const int jlo = (s0 * SLICE * CMP_D) / SEL_L;
    const int jhi = min(current, ((s0 + nsl - 1) * SLICE * CMP_D) / SEL_L + SLICE_BLOCKS - 1);
    for (int j = jlo + threadIdx.x; j <= jhi; j += THREADS) {
      const int i_lo = max(0, (j * SEL_L - CMP_L + CMP_D) / CMP_D);
      const int i_hi = min(visible, ((j + 1) * SEL_L - 1) / CMP_D + 1);
      if (i_lo >= i_hi) continue;
      const int sl_lo = max(i_lo / SLICE, s0);
      const int sl_hi = min((i_hi - 1) / SLICE, s0 + nsl - 1);
      float acc = 0.f;
      for (int sl = sl_lo; sl <= sl_hi; sl++) acc += head_sums[(sl - s0) * SLICE_BLOCKS + j - (sl * SLICE * CMP_D) / SEL_L];
      score[j] += acc;
    }
    __syncthreads();
  }

  discard_l2(base, (i64)nsv * srec * 4); // every round is staged and summed (the loop ends on a barrier)
  const unsigned long long t_scores = stamps != nullptr ? global_ns() : 0;
  // Top-n: blocks 1 .. current - 2 by score (0, current - 1 and current are forced).
  const int lo = 1;
  const int hi = max(lo, current - 1);
  const int per = (hi - lo + 3) / 4;
  // Scanned in shared memory, not through registers as in nsa_decode_select: with the keys in registers the
  // select took 3 us less but the fused step measured 3% slower with the fla preset (H100, 64k, B = 64).
  warp_best_range<0>(score, lo + warp * per, min(hi, lo + (warp + 1) * per), SEL_N, list_s + warp * SEL_N, list_j + warp * SEL_N, lane);
  __syncthreads();
  if (warp == 0) {
    int chosen = -1; // lane i keeps the i-th chosen block
    int count = warp_forced_blocks(current, chosen, lane);
    const int got = warp_best_listed<0>(list_s, list_j, 4 * SEL_N, SEL_N - count, pick_s, pick_j, lane);
    for (int k = 0; k < got; k++)
      if (lane == count + k) chosen = pick_j[k];
    count += got;
    warp_write_ascending(chosen, count, block_indices + ((i64)r * H + h) * SEL_N, lane);
    if (stamps != nullptr && lane == 0) {
      stamps[0] = t_entry;
      stamps[1] = t_lse;
      stamps[2] = t_scores;
      stamps[3] = global_ns();
      stamps[4] = (nsv + ns - 1) / ns; // rounds of slices
    }
  }
}

/**
 * The whole NSA step in one launch: each CTA takes a ticket and does that work item (the header lists them).
 * counters: [0, 2) the tickets taken so far (64 bits: every launch takes gridDim.x of them, so ticket / gridDim.x
 * is the launch's generation and ticket % gridDim.x its item), [2, 4) unused, then Q * H cmp-chunk counters, Q * H
 * selection flags (generation + 1 once a pair's blocks are chosen), Q * H * gchunks merge counters. With `trace`
 * set, each CTA writes TRACE_WORDS words at trace + TRACE_WORDS * item: item, start, end of its wait (slc items), end
 * of its attention, end of its select or merge, 1 if it selected + 2 if it merged, its SM, its kind (0 cmp, 1 slc,
 * 2 win); a select adds its entry (after the chunk counter), the end of its lse, of its block scores and of its
 * top-n, and its rounds of slices; a merge its entry (after the row's counter), the end of its weights (the slots'
 * m and l read) and of its outputs (thread 0's, before the discards). Times are globaltimer nanoseconds.
 */
#define TRACE_WORDS 13
extern "C" __global__ void __launch_bounds__(THREADS, 3)
    nsa_decode_fused(const elem_t *__restrict__ q, const unsigned long long *__restrict__ query_ptrs, const int *__restrict__ q_pos,
                     float *partial_m, float *partial_l, float *partial_o, int slots, int cmp_n, int cmp_chunk, int slc_slot0,
                     int slc_n, int slc_chunk, int win_slot0, int win_n, int win_chunk, float *slices, i64 slice_stride, int Q,
                     int Hq, int H, float scale_log2,
                     const float *__restrict__ gate, float *o_cmp, float *o_slc, float *o_win, float *out, float *lse_cmp,
                     float *lse_slc, float *lse_win, int *block_indices, int *counters, int work_floats, int lag,
                     unsigned long long *trace) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ AttendShared sh;
  __shared__ unsigned long long ticket_sh;
  const unsigned long long t_start = trace != nullptr ? global_ns() : 0;
  if (threadIdx.x == 0) {
    ticket_sh = atomicAdd(reinterpret_cast<unsigned long long *>(counters), 1ull);
    sh.waited = 0;
  }
  __syncthreads();
  const int item = (int)(ticket_sh % gridDim.x);
  const int target = (int)(ticket_sh / gridDim.x) + 1;
  const Cache c{q, query_ptrs, q_pos};
  const int G = Hq / H;
  const int gchunks = (G + ROWS - 1) / ROWS;
  const int ny = H * gchunks;
  const int rows = Q * ny;
  int *cmp_done = counters + 4;
  int *sel_flag = cmp_done + Q * H;
  int *merge_done = sel_flag + Q * H;
  bool merge = false;
  bool selected = false;
  unsigned long long t_attended = 0;
  // Ticket order: the cmp items of row p, then (from row `lag` on) the slc items of row p - lag, for each row p;
  // then every win item; then the slc items of the last `lag` rows. (lag >= rows: all cmp, all win, all slc.)
  int kind, row, z; // kind 0 cmp, 1 slc, 2 win
  const int lead = min(lag, rows);
  const int lagged = rows - lead; // rows whose slc items follow a later row's cmp items
  const int phase_a = rows * cmp_n + lagged * slc_n;
  if (item < lead * cmp_n) {
    kind = 0;
    row = item / cmp_n;
    z = item % cmp_n;
  } else if (item < phase_a) {
    const int u = item - lead * cmp_n;
    const int w = u % (cmp_n + slc_n);
    kind = w < cmp_n ? 0 : 1;
    row = u / (cmp_n + slc_n) + (w < cmp_n ? lead : 0);
    z = w < cmp_n ? w : w - cmp_n;
  } else if (item < phase_a + rows * win_n) {
    kind = 2;
    row = (item - phase_a) / win_n;
    z = (item - phase_a) % win_n;
  } else {
    kind = 1;
    row = lagged + (item - phase_a - rows * win_n) / slc_n;
    z = (item - phase_a - rows * win_n) % slc_n;
  }
  const int r = row / ny;
  const int y = row % ny;
  const int h = y / gchunks;
  if (kind == 0) {
    attend_chunk<0>(c, nullptr, partial_m, partial_l, partial_o, slots, z, r, y, z, cmp_chunk, scale_log2, Hq, H, slices, slice_stride,
                    smem_raw, sh);
    if (trace != nullptr) t_attended = global_ns();
    if (last_to_finish(cmp_done + r * H + h, cmp_n * gchunks, &sh.last)) {
      selected = true;
      fused_select(r, h, query_ptrs, q_pos, partial_m, partial_l, slots, cmp_n, slices, slice_stride, block_indices, Hq, H,
                   reinterpret_cast<float *>(smem_raw), work_floats, trace != nullptr ? trace + TRACE_WORDS * (i64)item + 8 : nullptr);
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) release_flag(sel_flag + r * H + h, target);
    }
  } else if (kind == 2) {
    attend_chunk<2>(c, nullptr, partial_m, partial_l, partial_o, slots, win_slot0 + z, r, y, z, win_chunk, scale_log2, Hq, H, nullptr, 0,
                    smem_raw, sh);
    if (trace != nullptr) t_attended = global_ns();
    merge = last_to_finish(merge_done + row, win_n + slc_n, &sh.last);
  } else {
    attend_chunk<1>(c, block_indices, partial_m, partial_l, partial_o, slots, slc_slot0 + z, r, y, z, slc_chunk, scale_log2, Hq, H, nullptr,
                    0, smem_raw, sh, sel_flag + r * H + h, target);
    if (trace != nullptr) t_attended = global_ns();
    merge = last_to_finish(merge_done + row, win_n + slc_n, &sh.last);
  }
  // The last win or slc item of a row merges: every slc item of the row waited for the pair's flag before it
  // counted itself done, so o_cmp is there.
  if (merge)
    merge_outputs(r, y, partial_m, partial_l, partial_o, slots, cmp_n, slc_slot0, win_slot0, Hq, H, gate, o_cmp, o_slc, o_win, out,
                  lse_cmp, lse_slc, lse_win, smem_raw, trace != nullptr ? trace + TRACE_WORDS * (i64)item + 8 : nullptr);
  if (trace != nullptr && threadIdx.x == 0) {
    unsigned int smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    unsigned long long *rec = trace + TRACE_WORDS * (i64)item;
    rec[0] = item;
    rec[1] = t_start;
    rec[2] = sh.waited;
    rec[3] = t_attended;
    rec[4] = global_ns();
    rec[5] = (selected ? 1 : 0) + (merge ? 2 : 0);
    rec[6] = smid;
    rec[7] = kind;
  }
}

/**
 * phi = mean in the cache's layout (appendRandom): compressed token first + blockIdx.x of a sequence, KV head
 * blockIdx.y, averages its tokens [i*d, i*d + l) in fp32, rounded once (threads [0, DK/8) keys, the rest values,
 * 8 channels each). Row strides as in query_ptrs: token i of head h at (i * rstride + h * hstride) rows, compressed
 * rows with hstride_c.
 */
extern "C" __global__ void nsa_decode_compress_mean(const elem_t *__restrict__ k, const elem_t *__restrict__ v, elem_t *__restrict__ kc,
                                                    elem_t *__restrict__ vc, int first, i64 rstride, i64 hstride, i64 hstride_c) {
  const i64 i = first + (i64)blockIdx.x;
  const int h = blockIdx.y;
  const bool is_key = threadIdx.x < DK / 8;
  const int dim = is_key ? DK : DV;
  const int c0 = (is_key ? threadIdx.x : threadIdx.x - DK / 8) * 8;
  const elem_t *src = is_key ? k : v;
  const uint4 packed = mean_of_rows8<CMP_L>(src + (i * CMP_D * rstride + h * hstride) * dim + c0, rstride * dim);
  elem_t *dst = is_key ? kc : vc;
  *reinterpret_cast<uint4 *>(dst + (i * rstride + h * hstride_c) * dim + c0) = packed;
}

/** Dense baseline: merges each (query, head)'s chunks into its output. */
extern "C" __global__ void nsa_decode_combine_dense(const float *__restrict__ partial_m, const float *__restrict__ partial_l,
                                                    const float *__restrict__ partial_o, float *__restrict__ out, i64 rows,
                                                    int slots) {
  const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float *pm = partial_m + row * slots;
  const float *pl = partial_l + row * slots;
  float m = NSA_NEG_INF;
  for (int s = 0; s < slots; s++) m = fmaxf(m, pm[s]);
  if (m == NSA_NEG_INF) {
    for (int c = lane; c < DV; c += 32) out[row * DV + c] = 0.f;
    return;
  }
  float l = 0.f;
  for (int s = 0; s < slots; s++) l += pm[s] == NSA_NEG_INF ? 0.f : exp2f(pm[s] - m) * pl[s];
  for (int c = lane; c < DV; c += 32) {
    float acc = 0.f;
    for (int s = 0; s < slots; s++)
      if (pm[s] != NSA_NEG_INF) acc += exp2f(pm[s] - m) * partial_o[(row * slots + s) * DV + c];
    out[row * DV + c] = acc / l;
  }
}
