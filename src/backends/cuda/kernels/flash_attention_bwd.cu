// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=0
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=1 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DNSA_FP16
// nvcc-check: -DDK=192 -DDV=128 -DNSA_MODE=2 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=0 -DFA_WGMMA
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=0 -DFA_WGMMA -DFB_DQ_WG=2 -DFB_DKDV_WG=2
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=1 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DNSA_FP16 -DFA_WGMMA -DFB_DQ_WG=2 -DFB_STAGES=2
// nvcc-check: -DDK=128 -DDV=64 -DNSA_MODE=2 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DFA_WGMMA -DFB_DKDV_WG=2
// nvcc-check: -DDK=192 -DDV=128 -DNSA_MODE=2 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DFA_WGMMA -DFB_DKDV_WG=2
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=3 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DSEL_L=64 -DSEL_N=16 -DSLC_DQ_PARTS_BF16 -DFA_WGMMA
// nvcc-check: -DDK=192 -DDV=128 -DNSA_MODE=3 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DSEL_L=64 -DSEL_N=16 -DNSA_FP16
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=3 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DSEL_L=128 -DSEL_N=8 -DFA_WGMMA -DFB_DQ_WG=2
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=2 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DFA_WGMMA -DFB_DEFER
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=3 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DSEL_L=64 -DSEL_N=16 -DSLC_DQ_PARTS_BF16 -DFA_WGMMA -DFB_DEFER
//
// Backward of the flash-attention branches (FlashAttention-2's algorithm, split in two kernels so that no
// gradient is summed with atomics and every run gives the same bits):
//   nsa_bwd_preprocess     per (row, query head): dot_b = dO . o_b for each branch b; dg_b = dot_b and
//                          delta_b = g_b * dot_b (the softmax backward's row term of dO_b = g_b * dO)
//   nsa_flash_bwd_dkdv     a CTA owns 64 keys of one KV head (64 per warpgroup with wgmma) and walks every query
//                          tile of 64 rows (all G heads) that sees them: dV += P^T dO_b, dK += dS^T Q * scale, kept
//                          in registers, written once
//   nsa_flash_bwd_dq       a CTA owns 64 query rows of one head (64 per warpgroup with wgmma) and walks their key
//                          tiles of 64: dQ += dS K * scale
//   nsa_flash_bwd_dq_cmp_win  (NSA_MODE 3) the same for the cmp keys, then the window's, into one accumulator:
//                          Q and dO are read once and dq written once for both branches; given the selected
//                          branch's fused dQ parts (nsa_dq_parts.cuh), it adds them too before that write
// with P = exp(s - lse) from the forward's lse and dS = P * (g_b * dO V^T - delta_b). NSA_MODE picks the key
// set as in flash_attention.cu: 0 dense causal (the baseline, gate 1), 1 compressed (cmp), 2 sliding window (win).
// Outputs are fp32 and added (+=) into the gradient buffers when `accumulate` is set; each row is owned by one
// CTA, so the sums are race-free and ordered.
//
// FA_WGMMA (set by the host on sm_90a): Hopper's wgmma from 128-byte-swizzled shared tiles (nsa_wgmma.cuh).
// dK/dV: S^T = K Q^T and dP^T = V dO^T with K, V as A and Q, dO as B (all K-major), then dV += (P^T g) dO and
// dK += dS^T Q with P^T, dS^T as register A operands and dO, Q read MN-major. dQ: S = Q K^T, dP = dO V^T, then
// dQ += dS K with K read MN-major. FB_DKDV_WG / FB_DQ_WG warpgroups (1 or 2) per CTA share the walked tiles, so a
// CTA owns 64 or 128 keys (rows) and the host's tile lists follow (programs.ts flashBackwardWarpgroups: 2 for dK/dV,
// 2 for the dense dQ, 1 for the cmp/win dQ). Each iteration waits for its wgmma before the next tile's barrier, so
// the other stage refills while this one is multiplied. dK = 192 takes dK += dS^T Q as 128 + 64 columns. The
// elementwise code is the mma.sync path's: wgmma's accumulator layout per warp is mma.sync's C fragment layout.
//
// The _tma kernels (nsa_flash_bwd_dkdv_tma, nsa_flash_bwd_dq_tma, nsa_flash_bwd_dq_cmp_win_tma; sm_90, the host's
// default there) compute the same with the walked tiles arriving by TMA through rings of FB_STAGES / FB_DQ_STAGES
// mbarrier stages, no __syncthreads per tile, and two warpgroups taking turns at the tensor cores. With FB_DEFER
// (the host's default) a tile's last product (dK^T in dK/dV, dQ in dQ) is not waited for at the end of the tile:
// it runs on while the next tile's S and dP are issued, and the wait for those retires it and frees its stage.
#include "nsa_common.cuh"
#include "nsa_dq_parts.cuh"
#include "nsa_wgmma.cuh"
#if defined(FA_WGMMA) && defined(NSA_HAS_WGMMA)
#define FB_USE_WGMMA 1
#else
#define FB_USE_WGMMA 0
#endif

#ifndef NSA_MODE
#define NSA_MODE 0
#endif
#ifndef CMP_L
#define CMP_L 1
#define CMP_D 1
#endif
#ifndef WINDOW
#define WINDOW 1
#endif

#define TILE 64 // the tiles a CTA walks: query rows (dK/dV) or keys (dQ)
#if FB_USE_WGMMA
#ifndef FB_DQ_WG
#define FB_DQ_WG 1
#endif
#ifndef FB_DKDV_WG
#define FB_DKDV_WG 1
#endif
#define DQ_ROWS (64 * FB_DQ_WG)     // query rows a dQ CTA owns
#define DKDV_KEYS (64 * FB_DKDV_WG) // keys a dK/dV CTA owns
typedef WgmmaTile<DKDV_KEYS, DK> DkdvKTile;
typedef WgmmaTile<DKDV_KEYS, DV> DkdvVTile;
typedef WgmmaTile<DQ_ROWS, DK> DqQTile;
typedef WgmmaTile<DQ_ROWS, DV> DqDoTile;
typedef WgmmaTile<TILE, DK> WalkKTile; // walked query (dK/dV) or key (dQ) tiles of DK columns
typedef WgmmaTile<TILE, DV> WalkVTile; // walked dO (dK/dV) or value (dQ) tiles of DV columns
#else
#define DQ_ROWS 64
#define DKDV_KEYS 64
typedef SwizzledTile<DK> DkdvKTile;
typedef SwizzledTile<DV> DkdvVTile;
typedef SwizzledTile<DK> DqQTile;
typedef SwizzledTile<DV> DqDoTile;
typedef SwizzledTile<DK> WalkKTile;
typedef SwizzledTile<DV> WalkVTile;
#endif
#define DQ_THREADS (2 * DQ_ROWS)     // a warp per 16 rows
#define DKDV_THREADS (2 * DKDV_KEYS) // a warp per 16 keys

__device__ __forceinline__ int cmp_visible(int t, int tc) {
  return t < CMP_L - 1 ? 0 : min(tc, (t - CMP_L + 1) / CMP_D + 1);
}

/** Whether query row t (local) sees key `key` (a local token, or a compressed index in mode 1). */
template <int MODE> __device__ __forceinline__ bool visible_in(int t, int key, int tc) {
  if (MODE == 1) return key < cmp_visible(t, tc);
  if (MODE == 2) return key <= t && key > t - WINDOW;
  return key <= t;
}

/** Whether every row of [t_first, t_last] sees every key of [key_first, key_last] (the tile needs no mask). */
template <int MODE> __device__ __forceinline__ bool all_visible_in(int t_first, int t_last, int key_first, int key_last, int tc) {
  if (MODE == 1) return key_last < cmp_visible(t_first, tc);
  if (MODE == 2) return key_last <= t_first && key_first > t_last - WINDOW;
  return key_last <= t_first;
}

__device__ __forceinline__ bool visible(int t, int key, int tc) { return visible_in<NSA_MODE>(t, key, tc); }
__device__ __forceinline__ bool all_visible(int t_first, int t_last, int key_first, int key_last, int tc) {
  return all_visible_in<NSA_MODE>(t_first, t_last, key_first, key_last, tc);
}

/** The first local query row that can see key `key`, and one past the last. */
__device__ __forceinline__ void rows_seeing(int key, int seq_len, int *first, int *end) {
#if NSA_MODE == 1
  *first = key * CMP_D + CMP_L - 1;
  *end = seq_len;
#elif NSA_MODE == 2
  *first = key;
  *end = min(seq_len, key + WINDOW);
#else
  *first = key;
  *end = seq_len;
#endif
}

/** Dynamic shared memory, 1024-byte aligned for wgmma's 128-byte swizzle (the host adds the slack). */
__device__ __forceinline__ elem_t *smem_tiles(unsigned char *raw) {
#if FB_USE_WGMMA
  return reinterpret_cast<elem_t *>(wgmma_aligned(raw));
#else
  return reinterpret_cast<elem_t *>(raw);
#endif
}

#if FB_USE_WGMMA
/**
 * d += A * B with B (the reduction dim by N columns) read MN-major from a WgmmaTile<ROWS, N> at `tile`, rows
 * [16 kk, 16 kk + 16): N = 64 or 128 in one wgmma, N = 192 or 256 as 128 + the rest (the column blocks past the
 * second start 2 * ROWS * 64 elements on).
 */
template <int N, int ROWS>
__device__ __forceinline__ void wgmma_rs_mn(float d[N / 8][4], const u32 a[4], const elem_t *tile, int kk) {
  // One base descriptor (the same for every kk, so computed once by the caller's loop), stepped to kk.
  const u64 base = wgmma_desc_mnmajor<ROWS>(tile, 0);
  if constexpr (N <= 128) {
    wgmma_rs<N, 1>(d, a, wgmma_mnmajor_at(base, kk), 1);
  } else {
    wgmma_rs<128, 1>(d, a, wgmma_mnmajor_at(base, kk), 1);
    wgmma_rs<N - 128, 1>(d + 16, a, wgmma_desc_advance(base, 2 * ROWS * 128 + wgmma_mnmajor_step(kk)), 1);
  }
}

/**
 * Starts the two products of a backward tile on a warpgroup's 64 rows, both operands K-major: s = A_s B_s^T over
 * DK (S, or S^T in dK/dV) and dp = A_p B_p^T over DV (dP, or dP^T), as two commit groups; waits for s only, so dp
 * may still run while s becomes probabilities. A_ROWS: the rows of the A tiles, whose rows row0 .. row0 + 64 are
 * this warpgroup's.
 */
template <int A_ROWS>
__device__ __forceinline__ void wgmma_s_and_dp_issue(float s[TILE / 8][4], float dp[TILE / 8][4], const elem_t *a_s, const elem_t *b_s,
                                                     const elem_t *a_p, const elem_t *b_p, int row0) {
  // One base descriptor per operand, stepped through the k-steps (wgmma_kmajor_at).
  const u64 as = wgmma_desc_kmajor<A_ROWS>(a_s, row0, 0), bs = wgmma_desc_kmajor<TILE>(b_s, 0, 0);
  const u64 ap = wgmma_desc_kmajor<A_ROWS>(a_p, row0, 0), bp = wgmma_desc_kmajor<TILE>(b_p, 0, 0);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < DK / 16; ks++) {
    wgmma_ss<TILE>(s, wgmma_kmajor_at<A_ROWS>(as, ks), wgmma_kmajor_at<TILE>(bs, ks), ks > 0);
  }
  wgmma_commit();
#pragma unroll
  for (int ks = 0; ks < DV / 16; ks++) {
    wgmma_ss<TILE>(dp, wgmma_kmajor_at<A_ROWS>(ap, ks), wgmma_kmajor_at<TILE>(bp, ks), ks > 0);
  }
  wgmma_commit();
}
template <int A_ROWS>
__device__ __forceinline__ void wgmma_s_and_dp(float s[TILE / 8][4], float dp[TILE / 8][4], const elem_t *a_s, const elem_t *b_s,
                                               const elem_t *a_p, const elem_t *b_p, int row0) {
  wgmma_s_and_dp_issue<A_ROWS>(s, dp, a_s, b_s, a_p, b_p, row0);
  wgmma_wait<1>();
  wgmma_fence_operands<TILE / 8>(s);
}
#endif


/** dst[c] = (add ? dst[c] : 0) + acc * scale over a thread's C-fragment columns of its row hh (0: lane / 4, 1: + 8). */
template <int D>
__device__ __forceinline__ void store_row_frags(float *__restrict__ dst, const float acc[D / 8][4], int hh, float scale, bool add, int lane) {
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    float2 *p = reinterpret_cast<float2 *>(dst + n * 8 + (lane % 4) * 2);
    float2 sum = add ? *p : make_float2(0.f, 0.f);
    sum.x += acc[n][2 * hh] * scale;
    sum.y += acc[n][2 * hh + 1] * scale;
    *p = sum;
  }
}

/**
 * Per (row, head), a warp each: dg_b = dO . o_b and delta_b = g_b * dg_b for the branches given (o_b fp32, or
 * elem_t with branch_half).
 */
extern "C" __global__ void nsa_bwd_preprocess(const elem_t *__restrict__ dout, const void *__restrict__ o0,
                                              const void *__restrict__ o1, const void *__restrict__ o2, int branch_half,
                                              const float *__restrict__ gate, float *__restrict__ dg,
                                              float *__restrict__ delta, i64 rows) {
  const i64 r = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; // token * Hq + hq
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const void *o[3] = {o0, o1, o2};
  for (int b = 0; b < 3; b++) {
    if (o[b] == nullptr) continue;
    float dot = 0.f;
    for (int c = 2 * lane; c < DV; c += 64) { // two columns a lane (DV is even)
      const elem2_t d = *reinterpret_cast<const elem2_t *>(dout + r * DV + c);
      dot += elem_to_float(d.x) * load_branch(o[b], r * DV + c, branch_half != 0) +
             elem_to_float(d.y) * load_branch(o[b], r * DV + c + 1, branch_half != 0);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, off);
    if (lane == 0) {
      if (dg != nullptr) dg[r * 3 + b] = dot;
      delta[r * 3 + b] = (gate == nullptr ? 1.f : gate[r * 3 + b]) * dot;
    }
  }
}

#if NSA_MODE != 3
/** A dK/dV CTA's work: its key tile, KV head and split, and the (head, query tile) iterations it walks. */
struct DkdvWork {
  int k0;        // the tile's first key (local)
  int h;         // KV head
  int split;     // gridDim.z index
  int seq_start; // the sequence's first token row
  int seq_len;
  int key_base;  // the sequence's first key row (tokens, or compressed tokens in mode 1)
  int nkeys;
  int qstart;    // the first query tile's first row (local)
  int nq;        // query tiles per head: iteration it is head h * G + it / nq, tile it % nq
  int it_begin;  // this split's iterations [it_begin, it_end)
  int it_end;
};

__device__ __forceinline__ DkdvWork dkdv_work(const int *__restrict__ cu_seqlens, const int *__restrict__ cu_keys,
                                              const int2 *__restrict__ tiles, int G) {
  DkdvWork w;
#if NSA_MODE == 2
  // The window's key tiles all have about the same work, and neighbouring tiles of one head share most of their
  // query rows: block order (tile fastest) keeps those reads close together in L2.
  const int tile_index = blockIdx.x;
  w.h = blockIdx.y;
  w.split = blockIdx.z;
#else
  // The launch is (key tiles, KV heads, splits) and the tiles are listed heaviest first (earliest keys: the most
  // query rows see them). CTAs start in block order, x fastest, so the CTA takes the tile from the slowest-varying
  // part of its linear index: every head's and split's share of the heaviest tiles starts first and the light ones
  // fill the tail (longest work first), where x-fastest order started some heavy CTAs last (cmp dK/dV at 64k:
  // 5.06 -> 4.10 ms at G = 4, 10.76 -> 7.84 ms at G = 16, fla; H100).
  const int linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int tile_index = linear / (gridDim.y * gridDim.z);
  w.h = linear % gridDim.y;
  w.split = (linear / gridDim.y) % gridDim.z;
#endif
  const int2 tile = tiles[tile_index];
  const int seq = tile.x;
  w.k0 = tile.y;
  w.seq_start = cu_seqlens[seq];
  w.seq_len = cu_seqlens[seq + 1] - w.seq_start;
  w.key_base = cu_keys[seq];
  w.nkeys = cu_keys[seq + 1] - w.key_base;
  int first, unused, last_end;
  rows_seeing(w.k0, w.seq_len, &first, &unused);
  rows_seeing(min(w.k0 + DKDV_KEYS, w.nkeys) - 1, w.seq_len, &unused, &last_end);
  w.qstart = (first / TILE) * TILE;
  w.nq = last_end > w.qstart ? (last_end - w.qstart + TILE - 1) / TILE : 0;
  const int iters = G * w.nq;
  const int per_split = (iters + gridDim.z - 1) / gridDim.z;
  w.it_end = min(iters, (w.split + 1) * per_split);
  w.it_begin = w.split * per_split;
  return w;
}

/**
 * P^T = 2^(S^T scale_log2 - lse lse_mul) in place, for a warp's 16 keys from key_w x the 64 rows of query tile q0
 * (zero where a row does not see a key, or past the end); lse_row: the tile's 64 lse values.
 */
__device__ __forceinline__ void dkdv_probabilities(float pt[TILE / 8][4], const float *lse_row, float lse_mul, int q0, int key_w,
                                                   int seq_len, int nkeys, float scale_log2, int lane) {
  const bool full = q0 + TILE <= seq_len && key_w + 15 < nkeys && all_visible(q0, q0 + TILE - 1, key_w, key_w + 15, nkeys);
  const int key_lo = key_w + lane / 4;
  // One warp-uniform branch for the tile, not one per element: the masks are needed near the diagonal only.
  auto pass = [&](auto masked) {
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
      const int rl = n * 8 + (lane % 4) * 2; // local query row of elements 0 and 2 (1 and 3: rl + 1)
      const float2 l2 = *reinterpret_cast<const float2 *>(&lse_row[rl]);
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const bool odd = e & 1;
        float p = fast_exp2(fmaf(pt[n][e], scale_log2, -(odd ? l2.y : l2.x) * lse_mul));
        if constexpr (decltype(masked)::value) {
          const int t = q0 + rl + odd;
          const int key = e < 2 ? key_lo : key_lo + 8;
          if (!(t < seq_len && key < nkeys && visible(t, key, nkeys))) p = 0.f;
        }
        pt[n][e] = p;
      }
    }
  };
  if (full) pass(BoolConstant<false>());
  else pass(BoolConstant<true>());
}

/**
 * Writes a warp's 16 keys' dK (times scale) and dV from the C fragments: added into dk/dv when `accumulate`, or
 * into this split's partial when the work is split.
 */
__device__ __forceinline__ void dkdv_write(const float dk_acc[DK / 8][4], const float dv_acc[DV / 8][4], const DkdvWork &w, int key_w,
                                           int H, float *__restrict__ dk, float *__restrict__ dv, float *__restrict__ partial_k,
                                           float *__restrict__ partial_v, i64 key_rows, bool accumulate, float scale, int lane) {
  float *dk_dst = dk;
  float *dv_dst = dv;
  bool add = accumulate;
  if (gridDim.z > 1) {
    dk_dst = partial_k + w.split * key_rows * DK;
    dv_dst = partial_v + w.split * key_rows * DV;
    add = false;
  }
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int key = key_w + lane / 4 + hh * 8;
    if (key >= w.nkeys) continue;
    const i64 krow = (i64)(w.key_base + key) * H + w.h;
    store_row_frags<DK>(dk_dst + krow * DK, dk_acc, hh, scale, add, lane);
    store_row_frags<DV>(dv_dst + krow * DV, dv_acc, hh, 1.f, add, lane);
  }
}

/**
 * dK, dV of DKDV_KEYS keys (a warp per 16) of one KV head. q [N, Hq, DK], dout [N, Hq, DV], lse/gate/delta
 * per (row, head); keys k/v are [rows, H, D] with local key i at row key_base + i (compressed rows in mode 1).
 */
extern "C" __global__ void __launch_bounds__(DKDV_THREADS)
    nsa_flash_bwd_dkdv(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                       const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                       const float *__restrict__ delta, float *__restrict__ dk, float *__restrict__ dv,
                       const int *__restrict__ cu_seqlens, const int *__restrict__ cu_keys, const int2 *__restrict__ tiles,
                       int Hq, int H, int branch, float scale_log2, float scale, int accumulate,
                       float *__restrict__ partial_k, float *__restrict__ partial_v, i64 key_rows) {
  // Split over gridDim.z: split z walks its share of the (head, query tile) iterations and, when there are
  // several splits, writes its partial dK, dV to partial_*[z] for nsa_bwd_reduce_splits to sum in split order.
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *ksmem = smem_tiles(smem_raw);      // DKDV_KEYS x DK
  elem_t *vsmem = ksmem + DKDV_KEYS * DK;    // DKDV_KEYS x DV
  elem_t *qbuf = vsmem + DKDV_KEYS * DV;     // 2 stages of TILE x DK
  elem_t *dobuf = qbuf + 2 * TILE * DK;      // 2 stages of TILE x DV
  __shared__ __align__(16) float row_lse[2][TILE], row_gate[2][TILE], row_delta[2][TILE];

  const int G = Hq / H;
  const DkdvWork w = dkdv_work(cu_seqlens, cu_keys, tiles, G);
  const int seq_start = w.seq_start;
  const int seq_len = w.seq_len;
  const int nkeys = w.nkeys;
  const int k0 = w.k0;
  const int h = w.h;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  copy_rows<DKDV_KEYS, DK, DkdvKTile, DKDV_THREADS>(ksmem, k + ((i64)(w.key_base + k0) * H + h) * DK, (i64)H * DK, nkeys - k0);
  copy_rows<DKDV_KEYS, DV, DkdvVTile, DKDV_THREADS>(vsmem, v + ((i64)(w.key_base + k0) * H + h) * DV, (i64)H * DV, nkeys - k0);
  cp_async_commit();

  float dk_acc[DK / 8][4];
  float dv_acc[DV / 8][4];
  zero_frags<DK / 8>(dk_acc);
  zero_frags<DV / 8>(dv_acc);
  const int key_w = k0 + warp * 16; // this warp's 16 keys
  const int qstart = w.qstart;
  const int nq = w.nq;
  const int it_begin = w.it_begin;
  const int it_end = w.it_end;
  // Stage the query rows, dO rows and row terms of iteration `it` (head, query tile) into buffer `st`; the next
  // iteration's copies run while this one computes.
  auto issue = [&](int it, int st) {
    const int hq = h * G + it / nq;
    const int q0 = qstart + (it % nq) * TILE;
    const i64 row0 = (i64)(seq_start + q0) * Hq + hq;
    copy_rows<TILE, DK, WalkKTile, DKDV_THREADS>(qbuf + st * TILE * DK, q + row0 * DK, (i64)Hq * DK, seq_len - q0);
    copy_rows<TILE, DV, WalkVTile, DKDV_THREADS>(dobuf + st * TILE * DV, dout + row0 * DV, (i64)Hq * DV, seq_len - q0);
    cp_async_commit();
    if (threadIdx.x < TILE) {
      const int t = q0 + threadIdx.x;
      const i64 row = row0 + (i64)threadIdx.x * Hq;
      const bool in = t < seq_len;
      row_lse[st][threadIdx.x] = in ? lse[row] * NSA_LOG2E : 0.f;
      row_gate[st][threadIdx.x] = in ? (gate == nullptr ? 1.f : gate[row * 3 + branch]) : 0.f;
      row_delta[st][threadIdx.x] = in ? delta[row * 3 + branch] : 0.f;
    }
  };
  auto probabilities = [&](float pt[TILE / 8][4], int q0, int st) {
    dkdv_probabilities(pt, row_lse[st], 1.f, q0, key_w, seq_len, nkeys, scale_log2, lane);
  };
  // dS^T = P^T (g dP^T - delta) into dpt, and P^T g in place (for dV += (P^T g) dO).
  auto gradients = [&](float pt[TILE / 8][4], float dpt[TILE / 8][4], int st) {
    softmax_grad_terms<TILE / 8>(pt, dpt, row_gate[st], row_delta[st], lane);
  };
  if (it_begin < it_end) issue(it_begin, 0);
#if FB_USE_WGMMA
  const int wg_row0 = (threadIdx.x / 128) * 64; // this warpgroup's keys in the tile
  // Iteration it: its stage landed; every warp finished the previous iteration's MMAs (each waits for its
  // wgmma before the barrier), so the other stage refills while this one is multiplied.
  for (int it = it_begin; it < it_end; it++) {
    const int st = (it - it_begin) & 1;
    const int q0 = qstart + (it % nq) * TILE;
    const elem_t *qs = qbuf + st * TILE * DK;
    const elem_t *dos = dobuf + st * TILE * DV;
    cp_async_wait<0>();
    fence_proxy_async_shared(); // cp.async writes, before wgmma reads them through the async proxy
    __syncthreads();
    if (it + 1 < it_end) issue(it + 1, st ^ 1);
    float pt[TILE / 8][4];
    float dpt[TILE / 8][4];
    wgmma_s_and_dp<DKDV_KEYS>(pt, dpt, ksmem, qs, vsmem, dos, wg_row0); // S^T done; dP^T may still run
    probabilities(pt, q0, st);
    wgmma_wait<0>();
    wgmma_fence_operands<TILE / 8>(dpt);
    gradients(pt, dpt, st);
    u32 pa[TILE / 16][4];
    u32 da[TILE / 16][4];
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) {
      pack_a(pa[kk], pt[2 * kk], pt[2 * kk + 1]);
      pack_a(da[kk], dpt[2 * kk], dpt[2 * kk + 1]);
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs_mn<DV, TILE>(dv_acc, pa[kk], dos, kk);
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs_mn<DK, TILE>(dk_acc, da[kk], qs, kk);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands<DV / 8>(dv_acc);
    wgmma_fence_operands<DK / 8>(dk_acc);
  }
#else
  for (int it = it_begin; it < it_end; it++) {
    const int st = (it - it_begin) & 1;
    const int q0 = qstart + (it % nq) * TILE;
    const elem_t *qsmem = qbuf + st * TILE * DK;
    const elem_t *dosmem = dobuf + st * TILE * DV;
    if (it + 1 < it_end) issue(it + 1, st ^ 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    // S^T and dP^T (this warp's 16 keys x 64 rows), then dS^T and P^T g.
    float pt[TILE / 8][4];
    zero_frags<TILE / 8>(pt);
    qk_mma_smem<DK, TILE / 16>(pt, ksmem, warp * 16, qsmem, 0, lane);
    probabilities(pt, q0, st);
    float dpt[TILE / 8][4];
    zero_frags<TILE / 8>(dpt);
    qk_mma_smem<DV, TILE / 16>(dpt, vsmem, warp * 16, dosmem, 0, lane);
    gradients(pt, dpt, st);
    pv_mma<DV, TILE / 16>(dv_acc, pt, dosmem, 0, lane);
    pv_mma<DK, TILE / 16>(dk_acc, dpt, qsmem, 0, lane);
    __syncthreads(); // stage st is refilled by the iteration after next
  }
#endif

  cp_async_wait<0>(); // (no query tile: the K/V copies are still pending)

  dkdv_write(dk_acc, dv_acc, w, key_w, H, dk, dv, partial_k, partial_v, key_rows, accumulate, scale, lane);
}

#endif

#if NSA_MODE != 3
#ifndef FB_STAGES
#define FB_STAGES 3
#endif
/**
 * nsa_flash_bwd_dkdv on sm_90 with an asynchronous pipeline (the host's NSA_FA_BWD_TMA; same arguments, plus
 * q_map and do_map: 3-D tensor maps [rows][Hq][cols] with boxes of 64 columns x 1 head x TILE rows, 128-byte
 * swizzle, tensor-map.ts). A stage's query and dO tiles arrive by TMA and its row terms by 4-byte cp.async, all
 * completing on the stage's mbarrier, so no thread issues or waits for copies of tiles it does not multiply and no
 * __syncthreads couples the warps: the last warp done with a stage refills it, FB_STAGES - 1 iterations ahead.
 * With two warpgroups they take turns issuing their S^T and dP^T products (two named barriers: FlashAttention-3's
 * ping-pong), so one's softmax terms run while the other's products hold the tensor cores. Within a warpgroup,
 * dV += (P^T g) dO is issued before dS^T is computed and runs under it.
 */
extern "C" __global__ void __launch_bounds__(DKDV_THREADS)
    nsa_flash_bwd_dkdv_tma(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                           const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                           const float *__restrict__ delta, float *__restrict__ dk, float *__restrict__ dv,
                           const int *__restrict__ cu_seqlens, const int *__restrict__ cu_keys, const int2 *__restrict__ tiles,
                           int Hq, int H, int branch, float scale_log2, float scale, int accumulate,
                           float *__restrict__ partial_k, float *__restrict__ partial_v, i64 key_rows,
                           const __grid_constant__ TensorMapBytes q_map, const __grid_constant__ TensorMapBytes do_map) {
#if FB_USE_WGMMA && defined(NSA_HAS_BULK_COPY)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *ksmem = smem_tiles(smem_raw);          // DKDV_KEYS x DK
  elem_t *vsmem = ksmem + DKDV_KEYS * DK;        // DKDV_KEYS x DV
  elem_t *qbuf = vsmem + DKDV_KEYS * DV;         // FB_STAGES x TILE x DK
  elem_t *dobuf = qbuf + FB_STAGES * TILE * DK;  // FB_STAGES x TILE x DV
  __shared__ __align__(16) float row_lse[FB_STAGES][TILE], row_gate[FB_STAGES][TILE], row_delta[FB_STAGES][TILE];
  __shared__ __align__(8) unsigned long long stage_full[FB_STAGES];
  __shared__ int stage_done[FB_STAGES]; // warps done with the stage's current iteration

  const int G = Hq / H;
  const DkdvWork w = dkdv_work(cu_seqlens, cu_keys, tiles, G);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int count = max(0, w.it_end - w.it_begin);
  constexpr int WARPS = DKDV_THREADS / 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < FB_STAGES; s++) {
      mbarrier_init(&stage_full[s], 33); // the TMA's expect_tx arrival and the loading warp's 32 cp.async arrivals
      stage_done[s] = 0;
    }
    mbarrier_init_fence();
  }
  __syncthreads();
  // One warp stages iteration `it` (head, query tile) into stage `st`. Rows past the sequence load whatever follows
  // it (zeros past the tensor); their probabilities are masked to zero, and their row terms arrive as zeros.
  auto fill = [&](int it, int st) {
    const int hq = w.h * G + it / w.nq;
    const int q0 = w.qstart + (it % w.nq) * TILE;
    if (lane == 0) {
      mbarrier_arrive_expect_tx(&stage_full[st], TILE * (DK + DV) * (u32)sizeof(elem_t));
      tma_load_tile<TILE, DK>(qbuf + st * TILE * DK, &q_map, hq, w.seq_start + q0, &stage_full[st]);
      tma_load_tile<TILE, DV>(dobuf + st * TILE * DV, &do_map, hq, w.seq_start + q0, &stage_full[st]);
    }
    const i64 row0 = (i64)(w.seq_start + q0) * Hq + hq;
#pragma unroll
    for (int r = lane; r < TILE; r += 32) {
      const bool in = q0 + r < w.seq_len;
      const i64 row = in ? row0 + (i64)r * Hq : 0;
      cp_async_4(&row_lse[st][r], lse + row, in);
      cp_async_4(&row_gate[st][r], gate == nullptr ? lse : gate + row * 3 + branch, in && gate != nullptr);
      cp_async_4(&row_delta[st][r], delta + row * 3 + branch, in);
    }
    cp_async_mbarrier_arrive(&stage_full[st]);
  };
  if (warp == 0) {
    for (int j = 0; j < min(FB_STAGES, count); j++) fill(w.it_begin + j, j);
  }
  copy_rows<DKDV_KEYS, DK, DkdvKTile, DKDV_THREADS>(ksmem, k + ((i64)(w.key_base + w.k0) * H + w.h) * DK, (i64)H * DK, w.nkeys - w.k0);
  copy_rows<DKDV_KEYS, DV, DkdvVTile, DKDV_THREADS>(vsmem, v + ((i64)(w.key_base + w.k0) * H + w.h) * DV, (i64)H * DV, w.nkeys - w.k0);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async_shared(); // cp.async writes, before wgmma reads them through the async proxy
  __syncthreads();

  float dk_acc[DK / 8][4];
  float dv_acc[DV / 8][4];
  zero_frags<DK / 8>(dk_acc);
  zero_frags<DV / 8>(dv_acc);
  const int wg = threadIdx.x / 128;
  const int key_w = w.k0 + warp * 16; // this warp's 16 keys
  const bool gated = gate != nullptr;
#if FB_DKDV_WG == 2
  // Turns: warpgroup i waits on barrier 1 + i before issuing its first products and then opens the other's;
  // warpgroup 0 goes first. Both walk the same iterations, so every arrival is matched (warpgroup 1 skips its last).
  if (wg == 1 && count > 0) named_barrier_arrive(1, 256);
#endif
  for (int j = 0; j < count; j++) {
    const int it = w.it_begin + j;
    const int st = j % FB_STAGES;
    const int q0 = w.qstart + (it % w.nq) * TILE;
    const elem_t *qs = qbuf + st * TILE * DK;
    const elem_t *dos = dobuf + st * TILE * DV;
    mbarrier_wait(&stage_full[st], (j / FB_STAGES) & 1);
    float pt[TILE / 8][4];
    float dpt[TILE / 8][4];
#if FB_DKDV_WG == 2
    named_barrier_sync(1 + wg, 256);
#endif
    wgmma_s_and_dp_issue<DKDV_KEYS>(pt, dpt, ksmem, qs, vsmem, dos, wg * 64);
#if FB_DKDV_WG == 2
    if (wg == 0 || j + 1 < count) named_barrier_arrive(2 - wg, 256);
#endif
    wgmma_wait<1>();
    wgmma_fence_operands<TILE / 8>(pt);
#ifdef FB_DEFER
    // The previous iteration's dV and dK products, committed before these scores, have completed with them.
    if (j > 0) {
      wgmma_fence_operands<DV / 8>(dv_acc);
      wgmma_fence_operands<DK / 8>(dk_acc);
      if (ring_stage_release(&stage_done[(j - 1) % FB_STAGES], WARPS) && j - 1 + FB_STAGES < count) fill(it - 1 + FB_STAGES, (j - 1) % FB_STAGES);
    }
#endif
    dkdv_probabilities(pt, row_lse[st], NSA_LOG2E, q0, key_w, w.seq_len, w.nkeys, scale_log2, lane);
    // dV += (P^T g) dO, running while dS^T = P^T (g dP^T - delta) is computed.
    u32 pa[TILE / 16][4];
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) {
      float lo[4], hi[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int rl = kk * 16 + (lane % 4) * 2 + (e & 1);
        lo[e] = pt[2 * kk][e] * (gated ? row_gate[st][rl] : 1.f);
        hi[e] = pt[2 * kk + 1][e] * (gated ? row_gate[st][rl + 8] : 1.f);
      }
      pack_a(pa[kk], lo, hi);
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs_mn<DV, TILE>(dv_acc, pa[kk], dos, kk);
    wgmma_commit();
    wgmma_wait<1>(); // dP^T, committed before the dV products, has landed
    wgmma_fence_operands<TILE / 8>(dpt);
    u32 da[TILE / 16][4];
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
      const int rl = n * 8 + (lane % 4) * 2;
      const float2 g = gated ? *reinterpret_cast<const float2 *>(&row_gate[st][rl]) : make_float2(1.f, 1.f);
      const float2 d = *reinterpret_cast<const float2 *>(&row_delta[st][rl]);
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const bool odd = e & 1;
        dpt[n][e] = pt[n][e] * fmaf(odd ? g.y : g.x, dpt[n][e], -(odd ? d.y : d.x));
      }
    }
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) pack_a(da[kk], dpt[2 * kk], dpt[2 * kk + 1]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs_mn<DK, TILE>(dk_acc, da[kk], qs, kk);
    wgmma_commit();
#ifndef FB_DEFER
    wgmma_wait<0>();
    wgmma_fence_operands<DV / 8>(dv_acc);
    wgmma_fence_operands<DK / 8>(dk_acc);
    // This warp is done with stage st (its products have completed, its row-term reads are in registers); the
    // last warp to say so refills it.
    if (ring_stage_release(&stage_done[st], WARPS) && j + FB_STAGES < count) fill(it + FB_STAGES, st);
#endif
    // (FB_DEFER: dK^T's product runs on while the next iteration issues its scores; the stage is released there.)
  }
#ifdef FB_DEFER
  wgmma_wait<0>();
  wgmma_fence_operands<DV / 8>(dv_acc);
  wgmma_fence_operands<DK / 8>(dk_acc);
#endif
  dkdv_write(dk_acc, dv_acc, w, key_w, H, dk, dv, partial_k, partial_v, key_rows, accumulate, scale, lane);
#endif
}
#endif

/** target[i] += sum over splits s (in order) of partial[s * n + i]. */
extern "C" __global__ void nsa_bwd_reduce_splits(const float *__restrict__ partial, float *__restrict__ target, i64 n, int splits) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < splits; s++) sum += partial[s * n + i];
    target[i] += sum;
  }
}

/** What a dQ phase reads of its branch: keys and values, the forward's lse, the gate column, the key offsets. */
struct DqBranch {
  const elem_t *k;
  const elem_t *v;
  const float *lse;
  int branch;   // column of gate and delta: 0 cmp, 1 slc, 2 win
  int key_base; // the sequence's first key row (tokens, or compressed tokens in mode 1)
  int nkeys;
};

/** The dQ CTA's query tile: DQ_ROWS rows of query head hq, Q and dO staged in shared memory. */
struct DqTile {
  int seq;
  int q0;
  int q1;
  int seq_start;
  int seq_len;
  int hq;
  int h;
};

/** The keys [first, end) of a branch that a dQ tile's rows may see, in `ntiles` tiles of TILE. */
struct DqKeys {
  int first;
  int end;
  int ntiles;
};

template <int MODE> __device__ __forceinline__ DqKeys dq_keys(const DqTile &t, int nkeys) {
  const int first = MODE == 2 ? max(0, t.q0 - WINDOW + 1) : 0;
  const int end = MODE == 1 ? cmp_visible(t.q1 - 1, nkeys) : t.q1;
  return {first, end, end > first ? (end - first + TILE - 1) / TILE : 0};
}

/** A dQ thread's row terms of one branch for its two rows (t_lo, t_lo + 8): lse in log2 units, gate, delta. */
struct DqRowTerms {
  float lse_lo, lse_hi, g_lo, g_hi, d_lo, d_hi;
};

__device__ __forceinline__ DqRowTerms dq_row_terms(const DqBranch &b, const DqTile &t, const float *__restrict__ gate,
                                                   const float *__restrict__ delta, int Hq) {
  const int t_lo = t.q0 + (int)(threadIdx.x / 32) * 16 + (threadIdx.x % 32) / 4;
  const int t_hi = t_lo + 8;
  auto row_of = [&](int r) { return (i64)(t.seq_start + r) * Hq + t.hq; };
  const int branch = b.branch;
  DqRowTerms r;
  r.lse_lo = t_lo < t.seq_len ? b.lse[row_of(t_lo)] * NSA_LOG2E : NSA_NEG_INF;
  r.lse_hi = t_hi < t.seq_len ? b.lse[row_of(t_hi)] * NSA_LOG2E : NSA_NEG_INF;
  r.g_lo = t_lo < t.seq_len ? (gate == nullptr ? 1.f : gate[row_of(t_lo) * 3 + branch]) : 0.f;
  r.g_hi = t_hi < t.seq_len ? (gate == nullptr ? 1.f : gate[row_of(t_hi) * 3 + branch]) : 0.f;
  r.d_lo = t_lo < t.seq_len ? delta[row_of(t_lo) * 3 + branch] : 0.f;
  r.d_hi = t_hi < t.seq_len ? delta[row_of(t_hi) * 3 + branch] : 0.f;
  return r;
}

/**
 * P = 2^(S scale_log2 - lse) in place, for a warp's 16 rows from t_w x key tile kt (zero where a row does not see a
 * key, or past the end).
 */
template <int MODE>
__device__ __forceinline__ void dq_probabilities(float s[TILE / 8][4], const DqRowTerms &r, int t_w, int seq_len, int kt, int kend, int nkeys,
                                                 float scale_log2, int lane) {
  const int t_lo = t_w + lane / 4;
  const bool full = t_w + 15 < seq_len && kt + TILE <= kend && all_visible_in<MODE>(t_w, t_w + 15, kt, kt + TILE - 1, nkeys);
  // One warp-uniform branch for the tile, not one per element (as in dkdv_probabilities).
  auto pass = [&](auto masked) {
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const bool hi = e >= 2;
        const float l2 = hi ? r.lse_hi : r.lse_lo;
        float p = fast_exp2(fmaf(s[n][e], scale_log2, -l2));
        if constexpr (decltype(masked)::value) {
          const int key = kt + n * 8 + (lane % 4) * 2 + (e & 1);
          const int row = hi ? t_lo + 8 : t_lo;
          if (!(row < seq_len && key < kend && l2 != NSA_NEG_INF && visible_in<MODE>(row, key, nkeys))) p = 0.f;
        }
        s[n][e] = p;
      }
    }
  };
  if (full) pass(BoolConstant<false>());
  else pass(BoolConstant<true>());
}

/** dS = P (g dP - delta) into s. */
__device__ __forceinline__ void dq_gradients(float s[TILE / 8][4], const float dp[TILE / 8][4], const DqRowTerms &r) {
#pragma unroll
  for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const bool hi = e >= 2;
      s[n][e] *= fmaf(hi ? r.g_hi : r.g_lo, dp[n][e], -(hi ? r.d_hi : r.d_lo));
    }
  }
}

/** Starts the copy of key tile `it` of a branch into stage `stage` (committed). */
__device__ __forceinline__ void dq_issue(const DqBranch &b, const DqKeys &keys, const DqTile &t, int it, int stage, elem_t *ksmem,
                                         elem_t *vsmem, int H) {
  const int kt = keys.first + it * TILE;
  const i64 krow0 = (i64)(b.key_base + kt) * H + t.h;
  copy_rows<TILE, DK, WalkKTile, DQ_THREADS>(ksmem + stage * TILE * DK, b.k + krow0 * DK, (i64)H * DK, keys.end - kt);
  copy_rows<TILE, DV, WalkVTile, DQ_THREADS>(vsmem + stage * TILE * DV, b.v + krow0 * DV, (i64)H * DV, keys.end - kt);
  cp_async_commit();
}

/**
 * dq_acc += dS K over the keys of one branch (MODE 1 cmp, 2 win, 0 dense) for this CTA's rows, walking key tiles of
 * TILE through two shared stages, tile it in stage (stage0 + it) & 1. Q and dO are in qsmem/dosmem (their copies
 * may still be in flight: the first iteration waits for them). With `first_issued` the caller started tile 0
 * already; `next` (if any) starts the next phase's first tile during this one's last iteration, in the stage this
 * one does not read then, so that the next phase starts without waiting for memory.
 */
template <int MODE, typename Next>
__device__ __forceinline__ void dq_phase(float dq_acc[DK / 8][4], const DqBranch b, const DqKeys keys, const DqTile &t,
                                         const float *__restrict__ gate, const float *__restrict__ delta, const elem_t *qsmem,
                                         const elem_t *dosmem, elem_t *ksmem, elem_t *vsmem, int Hq, int H, float scale_log2,
                                         int stage0, bool first_issued, Next next) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int seq_len = t.seq_len;
  const int nkeys = b.nkeys;
  const int kfirst = keys.first;
  const int kend = keys.end;
  const int ntiles = keys.ntiles;
  auto issue = [&](int it) { dq_issue(b, keys, t, it, (stage0 + it) & 1, ksmem, vsmem, H); };
  if (ntiles > 0 && !first_issued) issue(0);

  const int t_w = t.q0 + warp * 16; // this warp's 16 rows
  const DqRowTerms r = dq_row_terms(b, t, gate, delta, Hq);
  auto probabilities = [&](float s[TILE / 8][4], int kt) { dq_probabilities<MODE>(s, r, t_w, seq_len, kt, kend, nkeys, scale_log2, lane); };
  auto gradients = [&](float s[TILE / 8][4], const float dp[TILE / 8][4]) { dq_gradients(s, dp, r); };

#if FB_USE_WGMMA
  const int wg_row0 = (threadIdx.x / 128) * 64; // this warpgroup's rows in the tile
  // Iteration it: key tile it landed; every warp finished the previous iteration's MMAs (each waits for its wgmma
  // before the barrier), so the other stage refills while this one is multiplied.
  for (int it = 0; it < ntiles; it++) {
    const int kt = kfirst + it * TILE;
    const elem_t *ks = ksmem + ((stage0 + it) & 1) * TILE * DK;
    const elem_t *vs = vsmem + ((stage0 + it) & 1) * TILE * DV;
    cp_async_wait<0>();
    fence_proxy_async_shared(); // cp.async writes, before wgmma reads them through the async proxy
    __syncthreads();
    if (it + 1 < ntiles) issue(it + 1);
    else next((stage0 + it + 1) & 1);
    float s[TILE / 8][4];
    float dp[TILE / 8][4];
    wgmma_s_and_dp<DQ_ROWS>(s, dp, qsmem, ks, dosmem, vs, wg_row0); // S done; dP may still run
    probabilities(s, kt);
    wgmma_wait<0>();
    wgmma_fence_operands<TILE / 8>(dp);
    gradients(s, dp);
    u32 da[TILE / 16][4];
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) pack_a(da[kk], s[2 * kk], s[2 * kk + 1]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs_mn<DK, TILE>(dq_acc, da[kk], ks, kk);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands<DK / 8>(dq_acc);
  }
#else
  u32 qfrag[DK / 16][4];
  for (int it = 0; it < ntiles; it++) {
    if (it + 1 < ntiles) issue(it + 1);
    else if (!next((stage0 + it + 1) & 1)) cp_async_commit(); // one group either way: wait<1> leaves it in flight
    cp_async_wait<1>();
    __syncthreads();
    if (it == 0) load_a_fragments<DK>(qfrag, qsmem, warp * 16, lane);
    const int kt = kfirst + it * TILE;
    const elem_t *ks = ksmem + ((stage0 + it) & 1) * TILE * DK;
    const elem_t *vs = vsmem + ((stage0 + it) & 1) * TILE * DV;
    float s[TILE / 8][4];
    zero_frags<TILE / 8>(s);
    qk_mma<DK, TILE / 16>(s, qfrag, ks, 0, lane);
    probabilities(s, kt);
    float dp[TILE / 8][4];
    zero_frags<TILE / 8>(dp);
    qk_mma_smem<DV, TILE / 16>(dp, dosmem, warp * 16, vs, 0, lane);
    gradients(s, dp);
    pv_mma<DK, TILE / 16>(dq_acc, s, ks, 0, lane);
    __syncthreads();
  }
#endif
}

/** A dQ CTA's shared tiles: its Q and dO rows, and two stages of the walked keys and values. */
struct DqSmem {
  elem_t *q;    // DQ_ROWS x DK
  elem_t *dout; // DQ_ROWS x DV
  elem_t *k;    // 2 x TILE x DK
  elem_t *v;    // 2 x TILE x DV
};

__device__ __forceinline__ DqSmem dq_smem(unsigned char *raw) {
  elem_t *q = smem_tiles(raw);
  elem_t *dout = q + DQ_ROWS * DK;
  elem_t *k = dout + DQ_ROWS * DV;
  return {q, dout, k, k + 2 * TILE * DK};
}

/** The dQ CTA's prologue: its tile, and the copies of its Q and dO rows into shared memory (committed, in flight). */
/** The dQ CTA's query tile: tiles[blockIdx.x] of query head blockIdx.y. */
__device__ __forceinline__ DqTile dq_tile(const int *__restrict__ cu_seqlens, const int2 *__restrict__ tiles, int Hq, int H) {
  const int2 tile = tiles[blockIdx.x];
  const int hq = blockIdx.y;
  const int seq_start = cu_seqlens[tile.x];
  const int seq_len = cu_seqlens[tile.x + 1] - seq_start;
  return DqTile{tile.x, tile.y, min(tile.y + DQ_ROWS, seq_len), seq_start, seq_len, hq, hq / (Hq / H)};
}

__device__ __forceinline__ DqTile dq_begin(const elem_t *__restrict__ q, const elem_t *__restrict__ dout, const int *__restrict__ cu_seqlens,
                                           const int2 *__restrict__ tiles, int Hq, int H, elem_t *qsmem, elem_t *dosmem) {
  const DqTile t = dq_tile(cu_seqlens, tiles, Hq, H);
  const i64 qrow0 = (i64)(t.seq_start + t.q0) * Hq + t.hq;
  copy_rows<DQ_ROWS, DK, DqQTile, DQ_THREADS>(qsmem, q + qrow0 * DK, (i64)Hq * DK, t.seq_len - t.q0);
  copy_rows<DQ_ROWS, DV, DqDoTile, DQ_THREADS>(dosmem, dout + qrow0 * DV, (i64)Hq * DV, t.seq_len - t.q0);
  cp_async_commit();
  return t;
}

/** dq (fp32) = (accumulate ? dq : 0) + dq_acc * scale for this thread's two rows. */
__device__ __forceinline__ void dq_write(float *__restrict__ dq, const float dq_acc[DK / 8][4], const DqTile &t, int Hq, float scale,
                                         int accumulate) {
  const int lane = threadIdx.x % 32;
  const int t_lo = t.q0 + (int)(threadIdx.x / 32) * 16 + lane / 4;
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = t_lo + 8 * hh;
    if (r >= t.seq_len) continue;
    const i64 row = (i64)(t.seq_start + r) * Hq + t.hq;
    store_row_frags<DK>(dq + row * DK, dq_acc, hh, scale, accumulate, lane);
  }
}

/** The pipelined dQ's parts hook where there are none to add (modes 0, 1, 2). */
struct NoDqParts {
  static constexpr bool DEFERRABLE = true; // see dq_ring_walk
  static constexpr int UNITS = 0;          // parts units, streamed in with key tiles 0 .. UNITS - 1
  __device__ __forceinline__ void load(int) {}
  __device__ __forceinline__ void add(float[DK / 8][4]) const {}
};

#if NSA_MODE == 3
#if !defined(SEL_L) || !defined(SEL_N)
#error "NSA_MODE 3 adds the selected branch's dQ parts: it needs SEL_L and SEL_N"
#endif
#define DQ_PART_UNITS (SEL_N * DQ_PART_PIECES) // parts per (token, head): (slot, piece)
// The dQ CTA's dynamic shared tiles (Q, dO and at least two key/value stages), in 16-bit words.
#define DQ_REGION_WORDS ((DQ_ROWS + 2 * TILE) * (DK + DV))

/** Whether a row's selection wrote its parts `unit` (slot j = that slot's block, -1 for none). */
__device__ __forceinline__ bool dq_part_written(int j, int unit, int seq_len) {
  const int piece = unit % DQ_PART_PIECES;
  return j >= 0 && (piece == 0 || j * SEL_L + piece * DQ_PART_KEYS < seq_len);
}

/**
 * A dQ thread's share of the selected dQ parts of its two rows, one (slot, piece) unit at a time, in registers:
 * load(u) starts the loads of unit u (its columns of each row, and the rows' block of that slot), add() adds them
 * (where the row's selection wrote them) once the caller has other work in between. The pipelined dQ loads unit j
 * with key tile j and adds it after that tile's products, so the parts stream in with the walk.
 */
struct DqPartsInFlight {
  // Adding a unit into dq_acc between products made ptxas serialise every wgmma of the kernel under FB_DEFER.
  static constexpr bool DEFERRABLE = false;
  static constexpr int UNITS = DQ_PART_UNITS;
  static constexpr int CHUNKS = DK / 8 / DQ_PART_PAIRS; // this thread's 16-byte chunks of a row's parts
  const part_t *row[2]; // the row's unit 0; nullptr: no parts, or past the sequence
  const int *sel[2];    // the row's selected blocks
  int seq_len;
  int unit;
  int j[2];
  part_chunk_t v[2][CHUNKS];

  __device__ __forceinline__ void init(const part_t *__restrict__ partial_q, const int *__restrict__ block_indices, const DqTile &t,
                                       int Hq, int H) {
    const int lane = threadIdx.x % 32;
    seq_len = t.seq_len;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int r = t.q0 + (int)(threadIdx.x / 32) * 16 + lane / 4 + 8 * hh;
      const bool in = partial_q != nullptr && r < t.seq_len;
      const i64 token = t.seq_start + r;
      row[hh] = in ? partial_q + (token * Hq + t.hq) * ((i64)DQ_PART_UNITS * DK) : nullptr;
      sel[hh] = in ? block_indices + (token * H + t.h) * SEL_N : nullptr;
    }
  }
  __device__ __forceinline__ void load(int u) {
    unit = u;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      if (row[hh] == nullptr) continue;
      j[hh] = sel[hh][u / DQ_PART_PIECES];
      // Read once: streamed past L1 and first out of L2.
#pragma unroll
      for (int k = 0; k < CHUNKS; k++) {
        v[hh][k] = __ldcs(reinterpret_cast<const part_chunk_t *>(row[hh] + u * DK + dq_part_offset(k * DQ_PART_PAIRS, threadIdx.x % 4)));
      }
    }
  }
  __device__ __forceinline__ void add(float dq_acc[DK / 8][4]) const {
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      if (row[hh] == nullptr || !dq_part_written(j[hh], unit, seq_len)) continue;
#pragma unroll
      for (int k = 0; k < CHUNKS; k++) {
#pragma unroll
        for (int i = 0; i < DQ_PART_PAIRS; i++) {
          const float2 p = part_chunk_pair(v[hh][k], i);
          dq_acc[k * DQ_PART_PAIRS + i][2 * hh] += p.x;
          dq_acc[k * DQ_PART_PAIRS + i][2 * hh + 1] += p.y;
        }
      }
    }
  }
};

/**
 * dq_acc += the selected branch's dQ parts (nsa_dq_parts.cuh) units [first, DQ_PART_UNITS) of this CTA's rows, each
 * row's in (slot, piece) order, skipping those its selection did not write (slot -1, or a piece past the sequence):
 * the sum nsa_slc_bwd_dq_reduce would do, without its read and write of dq. A row's parts are contiguous; they
 * come coalesced by cp.async (evict-first: read once) into `region`, the shared tiles the key walk is done with, a
 * batch of units for all rows at a time, two batches in flight. Called by every thread after the walk (`first` the
 * same in all).
 */
__device__ __forceinline__ void dq_add_selected_parts(float dq_acc[DK / 8][4], const part_t *__restrict__ partial_q,
                                                      const int *__restrict__ block_indices, const DqTile &t, int Hq, int H,
                                                      unsigned short *region, int first) {
  static_assert(DQ_PART_UNITS <= 64, "a row's written parts are a 64-bit mask");
  if (first >= DQ_PART_UNITS) return;
  constexpr int CHUNKS = DQ_PART_WORDS / 8;         // 16-byte chunks of a part row
  constexpr int UNIT = DQ_ROWS * DQ_PART_WORDS;     // words of one part of every row
  constexpr int CAP = DQ_REGION_WORDS / UNIT;       // parts of every row the region holds (>= 1)
  constexpr int NBUF = CAP >= 2 ? 2 : 1;
  constexpr int BATCH = CAP / NBUF < DQ_PART_UNITS ? CAP / NBUF : DQ_PART_UNITS;
  const int rounds = (DQ_PART_UNITS - first + BATCH - 1) / BATCH;
  typedef SwizzledTile<DQ_PART_WORDS> PartTile; // chunks XOR (row % 8): rows 256 bytes apart spread over the banks
  const int lane = threadIdx.x % 32;
  const int rows = min(DQ_ROWS, t.seq_len - t.q0);
  const i64 row_parts = (i64)DQ_PART_UNITS * DK;
  const part_t *src = partial_q + ((i64)(t.seq_start + t.q0) * Hq + t.hq) * row_parts;
  const i64 row_stride = (i64)Hq * row_parts;
  const unsigned long long policy = l2_evict_first_policy();
  auto issue = [&](int round) {
    unsigned short *dst = region + (round % NBUF) * BATCH * UNIT;
#pragma unroll
    for (int u = 0; u < BATCH; u++) {
      const int unit = first + round * BATCH + u;
      if (unit >= DQ_PART_UNITS) break;
      for (int i = threadIdx.x; i < DQ_ROWS * CHUNKS; i += DQ_THREADS) {
        const int r = i / CHUNKS;
        const int c = i % CHUNKS;
        const part_t *from = r < rows ? src + r * row_stride + unit * DK + c * (16 / (int)sizeof(part_t)) : partial_q;
        cp_async_16_hinted(dst + u * UNIT + PartTile::offset(r, c * 8), from, r < rows, policy);
      }
    }
    cp_async_commit();
  };
  __syncthreads(); // every warp is done with the walk's tiles
  issue(0);
  if (NBUF == 2 && rounds > 1) issue(1);

  // Which of its two rows' parts this thread adds: the mask of (slot, piece) units their selection wrote.
  unsigned long long written[2];
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = (int)(threadIdx.x / 32) * 16 + lane / 4 + 8 * hh;
    unsigned long long m = 0;
    if (r < rows) {
      const int *sel = block_indices + ((i64)(t.seq_start + t.q0 + r) * H + t.h) * SEL_N;
#pragma unroll
      for (int s = 0; s < SEL_N; s++) {
        const int j = sel[s];
#pragma unroll
        for (int piece = 0; piece < DQ_PART_PIECES; piece++) {
          const int unit = s * DQ_PART_PIECES + piece;
          if (dq_part_written(j, unit, t.seq_len)) m |= 1ull << unit;
        }
      }
    }
    written[hh] = m;
  }

  for (int round = 0; round < rounds; round++) {
    if (NBUF == 2 && round + 1 < rounds) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    const unsigned short *at = region + (round % NBUF) * BATCH * UNIT;
#pragma unroll
    for (int u = 0; u < BATCH; u++) {
      const int unit = first + round * BATCH + u;
      if (unit >= DQ_PART_UNITS) break;
#pragma unroll
      for (int hh = 0; hh < 2; hh++) {
        if (!((written[hh] >> unit) & 1)) continue;
        const int r = (int)(threadIdx.x / 32) * 16 + lane / 4 + 8 * hh;
#pragma unroll
        for (int n0 = 0; n0 < DK / 8; n0 += DQ_PART_PAIRS) {
          const int word = dq_part_offset(n0, lane % 4) * (int)(sizeof(part_t) / 2);
          const part_chunk_t c = *reinterpret_cast<const part_chunk_t *>(at + u * UNIT + PartTile::offset(r, word));
#pragma unroll
          for (int i = 0; i < DQ_PART_PAIRS; i++) {
            const float2 p = part_chunk_pair(c, i);
            dq_acc[n0 + i][2 * hh] += p.x;
            dq_acc[n0 + i][2 * hh + 1] += p.y;
          }
        }
      }
    }
    __syncthreads(); // the batch's buffer is read: it may refill
    if (round + NBUF < rounds) issue(round + NBUF);
  }
}
#endif

#if FB_USE_WGMMA && defined(NSA_HAS_BULK_COPY)
#ifndef FB_DQ_STAGES
#define FB_DQ_STAGES 2
#endif
/** One branch's key walk in the pipelined dQ: its keys and the tensor maps of its K and V ([rows][H][cols]). */
struct DqWalk {
  DqBranch b;
  DqKeys keys;
  const TensorMapBytes *k_map;
  const TensorMapBytes *v_map;
};

/** The pipelined dQ's ring of key/value stages: tile j (RingWalks says whose) in stage j % FB_DQ_STAGES. */
struct DqRing {
  elem_t *k; // FB_DQ_STAGES x TILE x DK
  elem_t *v; // FB_DQ_STAGES x TILE x DV
  unsigned long long *full;
  int *done;
  RingWalks w; // tiles of TILE keys
};

/** Starts tile j's TMA copies into stage st (one thread). */
__device__ __forceinline__ void dq_ring_fill(const DqRing &g, int j, int st) {
  mbarrier_arrive_expect_tx(&g.full[st], TILE * (DK + DV) * (u32)sizeof(elem_t));
  tma_load_tile<TILE, DK>(g.k + st * TILE * DK, g.w.k_map(j), g.w.h, g.w.row(j), &g.full[st]);
  tma_load_tile<TILE, DV>(g.v + st * TILE * DV, g.w.v_map(j), g.w.h, g.w.row(j), &g.full[st]);
}

/**
 * dq_acc += dS K over ring tiles [j0, j1), the keys of walk w (MODE 0, 1 or 2), for this CTA's rows (Q and dO in
 * shared memory). Each warp marks a stage done after its products; the last refills it FB_DQ_STAGES tiles ahead.
 * With two warpgroups they take turns issuing S and dP (named barriers 1 and 2, warpgroup 0 first).
 */
template <int MODE, typename Parts>
__device__ __forceinline__ void dq_ring_walk(float dq_acc[DK / 8][4], const DqRing &g, int j0, int j1, const DqWalk &w, const DqTile &t,
                                             const float *__restrict__ gate, const float *__restrict__ delta, const elem_t *qsmem,
                                             const elem_t *dosmem, int Hq, float scale_log2, Parts &parts) {
  constexpr int WARPS = DQ_THREADS / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wg = threadIdx.x / 128;
  const int t_w = t.q0 + warp * 16;
  const DqRowTerms r = dq_row_terms(w.b, t, gate, delta, Hq);
  // Starts S = Q K_j^T and dP = dO V_j^T once tile j has landed (in turn with the other warpgroup).
  auto issue = [&](int j, float s[TILE / 8][4], float dp[TILE / 8][4]) {
    const int st = j % FB_DQ_STAGES;
    mbarrier_wait(&g.full[st], (j / FB_DQ_STAGES) & 1);
#if FB_DQ_WG == 2
    named_barrier_sync(1 + wg, 256);
#endif
    wgmma_s_and_dp_issue<DQ_ROWS>(s, dp, qsmem, g.k + st * TILE * DK, dosmem, g.v + st * TILE * DV, wg * 64);
#if FB_DQ_WG == 2
    if (wg == 0 || j + 1 < g.w.total) named_barrier_arrive(2 - wg, 256);
#endif
  };
  // This warp is done with tile j's stage (its products have completed); the last warp to say so refills it.
  auto release = [&](int j) {
    const int st = j % FB_DQ_STAGES;
    if (ring_stage_release(&g.done[st], WARPS) && lane == 0 && j + FB_DQ_STAGES < g.w.total) dq_ring_fill(g, j + FB_DQ_STAGES, st);
  };
  // dS = P (g dP - delta) from the landed S and dP, then dQ += dS K_j (committed, not waited for).
  auto finish = [&](int j, float s[TILE / 8][4], float dp[TILE / 8][4]) {
    const int st = j % FB_DQ_STAGES;
    dq_probabilities<MODE>(s, r, t_w, t.seq_len, w.keys.first + (j - j0) * TILE, w.keys.end, w.b.nkeys, scale_log2, lane);
    wgmma_wait<0>();
    wgmma_fence_operands<TILE / 8>(dp);
    dq_gradients(s, dp, r);
    u32 da[TILE / 16][4];
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) pack_a(da[kk], s[2 * kk], s[2 * kk + 1]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs_mn<DK, TILE>(dq_acc, da[kk], g.k + st * TILE * DK, kk);
    wgmma_commit();
  };
#ifdef FB_DEFER
  constexpr bool defer = Parts::DEFERRABLE;
#else
  constexpr bool defer = false;
#endif
  if constexpr (defer) {
    // Tile j's dQ product runs on while tile j + 1's S and dP are issued (FB_DEFER); it has completed once S has.
    for (int j = j0; j < j1; j++) {
      float s[TILE / 8][4];
      float dp[TILE / 8][4];
      issue(j, s, dp);
      wgmma_wait<1>();
      wgmma_fence_operands<TILE / 8>(s);
      if (j > j0) release(j - 1);
      finish(j, s, dp);
    }
    wgmma_wait<0>();
    wgmma_fence_operands<DK / 8>(dq_acc);
    if (j1 > j0) release(j1 - 1);
  } else {
    for (int j = j0; j < j1; j++) {
      float s[TILE / 8][4];
      float dp[TILE / 8][4];
      issue(j, s, dp);
      if (j < Parts::UNITS) parts.load(j);
      wgmma_wait<1>();
      wgmma_fence_operands<TILE / 8>(s);
      finish(j, s, dp);
      wgmma_wait<0>();
      wgmma_fence_operands<DK / 8>(dq_acc);
      release(j);
      if (j < Parts::UNITS) parts.add(dq_acc);
    }
  }
}

/**
 * The pipelined dQ (NSA_FA_BWD_TMA, sm_90): the CTA's Q and dO rows and every key/value tile arrive by TMA, tiles
 * through an FB_DQ_STAGES ring of mbarrier stages, so no thread issues or waits for copies of tiles it does not
 * multiply and no __syncthreads couples the warps. MODE_B < 0: one branch (walk a); else walk a (cmp) then b (win).
 */
template <int MODE_A, int MODE_B, typename Parts>
__device__ __forceinline__ int dq_pipelined(float dq_acc[DK / 8][4], unsigned char *smem_raw, const DqTile &t, const DqWalk &a, const DqWalk &b,
                                            const TensorMapBytes *q_map, const TensorMapBytes *do_map, const float *__restrict__ gate,
                                            const float *__restrict__ delta, int Hq, float scale_log2, Parts &parts) {
  elem_t *qsmem = smem_tiles(smem_raw);
  elem_t *dosmem = qsmem + DQ_ROWS * DK;
  elem_t *kbuf = dosmem + DQ_ROWS * DV;
  __shared__ __align__(8) unsigned long long stage_full[FB_DQ_STAGES];
  __shared__ __align__(8) unsigned long long rows_full;
  __shared__ int stage_done[FB_DQ_STAGES];
  const int na = a.keys.ntiles;
  const int total = na + (MODE_B >= 0 ? b.keys.ntiles : 0); // two key sets: the third is never reached
  const DqRing g{kbuf, kbuf + FB_DQ_STAGES * TILE * DK, stage_full, stage_done,
                 {na, total, total, TILE, a.b.key_base + a.keys.first, b.b.key_base + b.keys.first, 0, t.h,
                  a.k_map, a.v_map, b.k_map, b.v_map, b.k_map, b.v_map}};
  if (threadIdx.x == 0) {
    mbarrier_init(&rows_full, 1);
    for (int st = 0; st < FB_DQ_STAGES; st++) {
      mbarrier_init(&stage_full[st], 1);
      stage_done[st] = 0;
    }
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Q and dO rows (rows past the sequence are masked, and not written).
    mbarrier_arrive_expect_tx(&rows_full, DQ_ROWS * (DK + DV) * (u32)sizeof(elem_t));
    tma_load_tile<DQ_ROWS, DK>(qsmem, q_map, t.hq, t.seq_start + t.q0, &rows_full);
    tma_load_tile<DQ_ROWS, DV>(dosmem, do_map, t.hq, t.seq_start + t.q0, &rows_full);
    for (int j = 0; j < min(FB_DQ_STAGES, g.w.total); j++) dq_ring_fill(g, j, j);
  }
#if FB_DQ_WG == 2
  if (threadIdx.x / 128 == 1 && g.w.total > 0) named_barrier_arrive(1, 256); // warpgroup 0 takes the first turn
#endif
  mbarrier_wait(&rows_full, 0);
  dq_ring_walk<MODE_A>(dq_acc, g, 0, na, a, t, gate, delta, qsmem, dosmem, Hq, scale_log2, parts);
  if constexpr (MODE_B >= 0) dq_ring_walk<MODE_B>(dq_acc, g, na, g.w.total, b, t, gate, delta, qsmem, dosmem, Hq, scale_log2, parts);
  return g.w.total;
}
#endif

#if NSA_MODE != 3
/** nsa_flash_bwd_dq with the TMA pipeline (dq_pipelined); q/do/k/v maps as in tensor-map.ts, boxes 64 x 1 x 64. */
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nsa_flash_bwd_dq_tma(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                         const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                         const float *__restrict__ delta, float *__restrict__ dq, const int *__restrict__ cu_seqlens,
                         const int *__restrict__ cu_keys, const int2 *__restrict__ tiles, int Hq, int H, int branch,
                         float scale_log2, float scale, int accumulate, const __grid_constant__ TensorMapBytes q_map,
                         const __grid_constant__ TensorMapBytes do_map, const __grid_constant__ TensorMapBytes k_map,
                         const __grid_constant__ TensorMapBytes v_map) {
#if FB_USE_WGMMA && defined(NSA_HAS_BULK_COPY)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const DqTile t = dq_tile(cu_seqlens, tiles, Hq, H);
  const DqBranch b{k, v, lse, branch, cu_keys[t.seq], cu_keys[t.seq + 1] - cu_keys[t.seq]};
  const DqWalk walk{b, dq_keys<NSA_MODE>(t, b.nkeys), &k_map, &v_map};
  float dq_acc[DK / 8][4];
  zero_frags<DK / 8>(dq_acc);
  NoDqParts none;
  dq_pipelined<NSA_MODE, -1>(dq_acc, smem_raw, t, walk, walk, &q_map, &do_map, gate, delta, Hq, scale_log2, none);
  dq_write(dq, dq_acc, t, Hq, scale, accumulate);
#endif
}
#else
/** nsa_flash_bwd_dq_cmp_win with the TMA pipeline (dq_pipelined): the cmp keys' tiles, then the window's, one ring. */
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nsa_flash_bwd_dq_cmp_win_tma(const elem_t *__restrict__ q, const elem_t *__restrict__ kc, const elem_t *__restrict__ vc,
                                 const elem_t *__restrict__ k, const elem_t *__restrict__ v, const elem_t *__restrict__ dout,
                                 const float *__restrict__ lse_cmp, const float *__restrict__ lse_win, const float *__restrict__ gate,
                                 const float *__restrict__ delta, float *__restrict__ dq, const int *__restrict__ cu_seqlens,
                                 const int *__restrict__ cu_cmp, const int2 *__restrict__ tiles, int Hq, int H, float scale_log2,
                                 float scale, int accumulate, const part_t *__restrict__ partial_q,
                                 const int *__restrict__ block_indices, const __grid_constant__ TensorMapBytes q_map,
                                 const __grid_constant__ TensorMapBytes do_map, const __grid_constant__ TensorMapBytes kc_map,
                                 const __grid_constant__ TensorMapBytes vc_map, const __grid_constant__ TensorMapBytes k_map,
                                 const __grid_constant__ TensorMapBytes v_map) {
#if FB_USE_WGMMA && defined(NSA_HAS_BULK_COPY)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const DqTile t = dq_tile(cu_seqlens, tiles, Hq, H);
  const DqBranch cmp{kc, vc, lse_cmp, 0, cu_cmp[t.seq], cu_cmp[t.seq + 1] - cu_cmp[t.seq]};
  const DqBranch win{k, v, lse_win, 2, t.seq_start, t.seq_len};
  const DqWalk cmp_walk{cmp, dq_keys<1>(t, cmp.nkeys), &kc_map, &vc_map};
  const DqWalk win_walk{win, dq_keys<2>(t, win.nkeys), &k_map, &v_map};
  float dq_acc[DK / 8][4];
  zero_frags<DK / 8>(dq_acc);
  // The selected dQ parts stream in with the key tiles (unit j with tile j); units past the tiles come after them.
  DqPartsInFlight parts;
  parts.init(partial_q, block_indices, t, Hq, H);
  const int walked = dq_pipelined<1, 2>(dq_acc, smem_raw, t, cmp_walk, win_walk, &q_map, &do_map, gate, delta, Hq, scale_log2, parts);
  if (partial_q != nullptr) dq_add_selected_parts(dq_acc, partial_q, block_indices, t, Hq, H, reinterpret_cast<unsigned short *>(smem_tiles(smem_raw)), walked);
  dq_write(dq, dq_acc, t, Hq, scale, accumulate);
#endif
}
#endif

#if NSA_MODE != 3
/** dQ of DQ_ROWS query rows (a warp per 16) of query head blockIdx.y over the branch's keys; adds into dq (fp32). */
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nsa_flash_bwd_dq(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                     const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                     const float *__restrict__ delta, float *__restrict__ dq, const int *__restrict__ cu_seqlens,
                     const int *__restrict__ cu_keys, const int2 *__restrict__ tiles, int Hq, int H, int branch,
                     float scale_log2, float scale, int accumulate) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const DqSmem m = dq_smem(smem_raw);
  const DqTile t = dq_begin(q, dout, cu_seqlens, tiles, Hq, H, m.q, m.dout);
  const int seq = t.seq;
  const DqBranch b{k, v, lse, branch, cu_keys[seq], cu_keys[seq + 1] - cu_keys[seq]};
  float dq_acc[DK / 8][4];
  zero_frags<DK / 8>(dq_acc);
  dq_phase<NSA_MODE>(dq_acc, b, dq_keys<NSA_MODE>(t, b.nkeys), t, gate, delta, m.q, m.dout, m.k, m.v, Hq, H, scale_log2, 0, false,
                     [](int) { return false; });
  dq_write(dq, dq_acc, t, Hq, scale, accumulate);
}
#else
/**
 * dQ of the cmp and win branches in one pass (NSA_MODE 3): the CTA's Q and dO rows are loaded once, both branches'
 * dS K go into one accumulator, and dq is written once, instead of two launches each reading Q and dO and adding
 * into dq. kc/vc are the compressed keys and values (rows under cu_cmp), k/v the window's (rows under cu_seqlens).
 */
extern "C" __global__ void __launch_bounds__(DQ_THREADS)
    nsa_flash_bwd_dq_cmp_win(const elem_t *__restrict__ q, const elem_t *__restrict__ kc, const elem_t *__restrict__ vc,
                             const elem_t *__restrict__ k, const elem_t *__restrict__ v, const elem_t *__restrict__ dout,
                             const float *__restrict__ lse_cmp, const float *__restrict__ lse_win, const float *__restrict__ gate,
                             const float *__restrict__ delta, float *__restrict__ dq, const int *__restrict__ cu_seqlens,
                             const int *__restrict__ cu_cmp, const int2 *__restrict__ tiles, int Hq, int H, float scale_log2,
                             float scale, int accumulate, const part_t *__restrict__ partial_q, const int *__restrict__ block_indices) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const DqSmem m = dq_smem(smem_raw);
  const DqTile t = dq_begin(q, dout, cu_seqlens, tiles, Hq, H, m.q, m.dout);
  const int seq = t.seq;
  float dq_acc[DK / 8][4];
  zero_frags<DK / 8>(dq_acc);
  const DqBranch cmp{kc, vc, lse_cmp, 0, cu_cmp[seq], cu_cmp[seq + 1] - cu_cmp[seq]};
  const DqBranch win{k, v, lse_win, 2, t.seq_start, t.seq_len};
  const DqKeys cmp_keys = dq_keys<1>(t, cmp.nkeys);
  const DqKeys win_keys = dq_keys<2>(t, win.nkeys);
  // The window's first tile loads during the cmp phase's last iteration, into the stage that iteration does not
  // read (with no cmp keys, the window phase starts it itself); each iteration's barrier keeps the stages apart.
  const int win_stage0 = cmp_keys.ntiles & 1;
  dq_phase<1>(dq_acc, cmp, cmp_keys, t, gate, delta, m.q, m.dout, m.k, m.v, Hq, H, scale_log2, 0, false, [&](int stage) {
    if (win_keys.ntiles > 0) dq_issue(win, win_keys, t, 0, stage, m.k, m.v, H);
    return win_keys.ntiles > 0;
  });
  dq_phase<2>(dq_acc, win, win_keys, t, gate, delta, m.q, m.dout, m.k, m.v, Hq, H, scale_log2, win_stage0, cmp_keys.ntiles > 0,
              [](int) { return false; });
  if (partial_q != nullptr) dq_add_selected_parts(dq_acc, partial_q, block_indices, t, Hq, H, reinterpret_cast<unsigned short *>(m.q), 0);
  dq_write(dq, dq_acc, t, Hq, scale, accumulate);
}
#endif
