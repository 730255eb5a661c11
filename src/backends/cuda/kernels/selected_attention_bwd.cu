// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DNSA_FP16
// nvcc-check: -DDK=64 -DDV=64 -DSEL_L=128 -DSEL_N=4
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DSLC_BULK -DNSA_FP16
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK -DSLC_DQ_FUSED
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DSLC_BULK -DSLC_DQ_FUSED -DNSA_FP16
// nvcc-check: -DDK=64 -DDV=64 -DSEL_L=128 -DSEL_N=4 -DSLC_DQ_FUSED
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK -DSLC_DQ_FUSED -DSLC_DQ_PARTS_BF16
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DCMP_L=32 -DCMP_D=16 -DSLC_REDUCE_MEAN
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK -DSLC_DQ_FUSED -DSLC_DQ_PARTS_BF16 -DSLC_BWD_WS
// nvcc-check: -DDK=64 -DDV=64 -DSEL_L=128 -DSEL_N=4 -DSLC_BWD_WS -DNSA_FP16
// nvcc-check: -DDK=128 -DDV=64 -DSEL_L=32 -DSEL_N=16 -DSLC_DQ_FUSED -DSLC_BWD_WS
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK -DSLC_DQ_FUSED -DSLC_DQ_PARTS_BF16 -DSLC_BWD_WS -DSLC_WS_TMA_GROUP=16
//
// Backward of the selected branch, with no atomics:
//   nsa_slc_bwd_dq    group-centric like the forward: a CTA per (query position, KV head, 16 heads) streams the
//                     selected blocks; each warp takes 16 keys of a tile, and the warps' dQ parts are summed in
//                     a fixed order at the end
//   nsa_slc_bwd_dkdv  key-centric through the inverse index (inverse_index.cu): a CTA per (KV head, block, 64
//                     keys) walks the (token, slot) pairs that chose the block, G heads each, in token order, and
//                     keeps dK, dV in registers. With SLC_DQ_FUSED it also writes each (token, head, slot, sub)
//                     row's dQ part dS K over its 64 keys, summed in slot order by nsa_slc_bwd_dq_reduce or by
//                     the cmp + win dQ launch (flash_attention_bwd.cu). Why: at small G the group-centric dQ uses G of its 16 MMA rows and re-reads every block's K/V
//                     per token, while here the key tile is already in shared memory and all 64 rows are used
// P = exp(s - lse_slc), dS = P * (g_slc * dO V^T - delta_slc). Gradients are fp32 and added into their buffers.
#include "nsa_common.cuh"
#include "nsa_gather_tiles.cuh"
#include "nsa_dq_parts.cuh"
#include "nsa_wgmma.cuh"

// SLC_BWD_WS (set by the host on sm_90a for dk, dv <= 128): the warp-specialised nsa_slc_bwd_dkdv on wgmma.
#if defined(SLC_BWD_WS) && defined(NSA_HAS_WGMMA)
#define SLC_USE_WS 1
#else
#define SLC_USE_WS 0
#endif

#define WARPS 4
#define THREADS (32 * WARPS)
#define ROWS 16
#define TILE 64

// SLC_BULK (sm_90): the gathered rows (dQ: the selected keys/values; dK/dV: the choosing queries and their dO)
// come with one bulk copy per row (as the forward does): nsa_gather_tiles.cuh.
#define SUBS DQ_PART_PIECES // dK/dV CTAs (64 keys each, TILE) per selection block

extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_slc_bwd_dq(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                   const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                   const float *__restrict__ delta, const int *__restrict__ block_indices, const int *__restrict__ row_seq,
                   const int *__restrict__ cu_seqlens, float *__restrict__ dq, int Hq, int H, float scale_log2, float scale) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw); // ROWS x DK
  elem_t *dosmem = qsmem + ROWS * DK;                   // ROWS x DV
  elem_t *ksmem = dosmem + ROWS * DV;                   // TILE x K_ROW
  elem_t *vsmem = ksmem + TILE * K_ROW;                 // TILE x V_ROW
  __shared__ int sel[SEL_N];
#if SLC_USE_BULK
  __shared__ __align__(8) unsigned long long tile_bar;
#endif

  const i64 row = blockIdx.x;
  const int h = blockIdx.y;
  const int G = Hq / H;
  const int head0 = blockIdx.z * ROWS;
  const int rows = min(ROWS, G - head0);
  const int seq_start = cu_seqlens[row_seq[row]];
  const int t = (int)(row - seq_start);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  if (threadIdx.x < SEL_N) sel[threadIdx.x] = block_indices[(row * H + h) * SEL_N + threadIdx.x];
  load_tile_async<DK, THREADS>(qsmem, ROWS, [&](int r) -> const elem_t * {
    return r < rows ? q + (row * Hq + h * G + head0 + r) * DK : nullptr;
  });
  load_tile_async<DV, THREADS>(dosmem, ROWS, [&](int r) -> const elem_t * {
    return r < rows ? dout + (row * Hq + h * G + head0 + r) * DV : nullptr;
  });
  cp_async_commit();
#if SLC_USE_BULK
  // Rows a tile leaves unfilled keep what they held, and both sides are multiplied by zeros there (values by
  // p = 0, keys by dS = 0 in dQ += dS K): they must be finite, so the tile starts zeroed, before any copy.
  for (int i = threadIdx.x; i < TILE * (K_ROW + V_ROW) / 8; i += THREADS) reinterpret_cast<uint4 *>(ksmem)[i] = make_uint4(0, 0, 0, 0);
  if (threadIdx.x == 0) mbarrier_init(&tile_bar, THREADS);
  mbarrier_init_fence();
  fence_proxy_async_shared();
#endif
  __syncthreads();
  int nsel = 0;
  while (nsel < SEL_N && sel[nsel] >= 0) nsel++;
  const int total = nsel * SEL_L;
  auto key_pos = [&](int i) { return sel[i / SEL_L] * SEL_L + i % SEL_L; };

  // Per-row softmax terms of this thread's two rows (heads head0 + g and head0 + g + 8).
  float lse2[2], g[2], d[2];
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = lane / 4 + hh * 8;
    const i64 orow = row * Hq + h * G + head0 + r;
    const bool in = r < rows;
    lse2[hh] = in ? lse[orow] * NSA_LOG2E : 0.f;
    g[hh] = in ? gate[orow * 3 + 1] : 0.f;
    d[hh] = in ? delta[orow * 3 + 1] : 0.f;
  }

  float dq_acc[DK / 8][4];
  zero_frags<DK / 8>(dq_acc);
  u32 qfrag[DK / 16][4];
  for (int k0 = 0; k0 < total; k0 += TILE) {
    __syncthreads();
#if SLC_USE_BULK
    {
      // Thread r < TILE copies key row r, thread TILE + r value row r (THREADS = 2 * TILE).
      const bool is_value = threadIdx.x >= TILE;
      const int r = threadIdx.x - (is_value ? TILE : 0);
      const int i = k0 + r;
      const bool valid = i < total && key_pos(i) <= t;
      const u32 bytes = valid ? (is_value ? DV : DK) * 2 : 0;
      mbarrier_arrive_expect_tx(&tile_bar, bytes);
      if (valid) {
        const i64 token = seq_start + key_pos(i);
        if (is_value) bulk_copy_g2s(vsmem + r * V_ROW, v + (token * H + h) * DV, bytes, &tile_bar);
        else bulk_copy_g2s(ksmem + r * K_ROW, k + (token * H + h) * DK, bytes, &tile_bar);
      }
      if (k0 == 0) {
        cp_async_wait<0>(); // the query and dO rows
        __syncthreads();
      }
      mbarrier_wait(&tile_bar, (k0 / TILE) & 1);
    }
#else
    load_tile_async<DK, THREADS>(ksmem, TILE, [&](int r) -> const elem_t * {
      const int i = k0 + r;
      return i < total && key_pos(i) <= t ? k + ((i64)(seq_start + key_pos(i)) * H + h) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(vsmem, TILE, [&](int r) -> const elem_t * {
      const int i = k0 + r;
      return i < total && key_pos(i) <= t ? v + ((i64)(seq_start + key_pos(i)) * H + h) * DV : nullptr;
    });
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#endif
    if (k0 == 0) load_a_fragments<DK>(qfrag, qsmem, 0, lane);
    float s[2][4];
    zero_frags<2>(s);
    qk_mma<DK, 1, KTile>(s, qfrag, ksmem, warp * 16, lane);
    float dp[2][4];
    zero_frags<2>(dp);
    qk_mma_smem<DV, 1, SwizzledTile<DV>, VTile>(dp, dosmem, 0, vsmem, warp * 16, lane);
#pragma unroll
    for (int n = 0; n < 2; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = k0 + warp * 16 + n * 8 + (lane % 4) * 2 + (e & 1);
        const int hh = e >> 1;
        const bool ok = i < total && key_pos(i) <= t;
        const float p = ok ? fast_exp2(s[n][e] * scale_log2 - lse2[hh]) : 0.f;
        s[n][e] = p * (g[hh] * dp[n][e] - d[hh]);
      }
    }
    pv_mma<DK, 1, KTile>(dq_acc, s, ksmem, warp * 16, lane);
  }
  cp_async_wait<0>(); // no tile at all: the query rows are still to land before the tile memory is reused

  // Sum the warps' dQ parts in warp order through shared memory (reusing the key tile).
  __syncthreads();
  float *part = reinterpret_cast<float *>(ksmem); // WARPS x ROWS x DK floats
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = lane / 4 + hh * 8;
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      part[(warp * ROWS + r) * DK + col] = dq_acc[n][2 * hh];
      part[(warp * ROWS + r) * DK + col + 1] = dq_acc[n][2 * hh + 1];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * DK; idx += THREADS) {
    const int r = idx / DK;
    const int col = idx % DK;
    float sum = 0.f;
    for (int w = 0; w < WARPS; w++) sum += part[(w * ROWS + r) * DK + col];
    dq[(row * Hq + h * G + head0 + r) * DK + col] += sum * scale;
  }
}

#ifdef SLC_DQ_FUSED
/**
 * dQ parts of tile rows warp*16 .. +15 (row r: entry r / G's token and slot, head r % G) over the CTA's 64 keys:
 * dS (A, from the staged dS^T by transposed ldmatrix) times K, 32 columns at a time: beside dK, dV's accumulators
 * wider column blocks spill at dk = 192 (ptxas). Row (token, head, slot, sub) of partial_q gets its own [DK]
 * parts, unscaled.
 */
__device__ __forceinline__ void fused_dq_rows(part_t *__restrict__ partial_q, const elem_t *dssmem, const elem_t *ksmem,
                                              const int2 *__restrict__ entries, int rows, int G, int Hq, int h, int warp,
                                              int lane) {
  part_t *dst[2];
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = warp * 16 + lane / 4 + hh * 8;
    const int2 e = r < rows ? entries[r / G] : make_int2(0, 0);
    dst[hh] = r < rows ? partial_q + ((((i64)e.x * Hq + h * G + r % G) * SEL_N + e.y) * SUBS + blockIdx.y) * DK : nullptr;
  }
#pragma unroll 1
  for (int c0 = 0; c0 < DK; c0 += 32) {
    float acc[4][4];
    zero_frags<4>(acc);
#pragma unroll
    for (int ks = 0; ks < TILE / 16; ks++) {
      u32 a[4];
      ldmatrix_x4_trans(a, dssmem + SwizzledTile<TILE>::offset(ks * 16 + (lane & 7) + (lane >> 4) * 8, warp * 16 + ((lane >> 3) & 1) * 8));
      const int key = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int n = 0; n < 2; n++) {
        u32 b[4];
        ldmatrix_x4_trans(b, ksmem + SwizzledTile<DK>::offset(key, c0 + n * 16 + (lane >> 4) * 8));
        mma_16816(acc[2 * n], a, b);
        mma_16816(acc[2 * n + 1], a, b + 2);
      }
    }
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      if (dst[hh] == nullptr) continue;
      store_part_pairs<4>(dst[hh], c0 / 8, lane % 4, acc, hh);
    }
  }
}
#endif

/**
 * The dK/dV work of CTA (blockIdx.x, blockIdx.y): work item `item` (item_order[blockIdx.x], or blockIdx.x without an
 * order), keys [key0, key0 + nk) (local tokens of the sequence starting at row seq_start) of KV head h's selection
 * block, and the (token, slot) entries [e_begin, e_end) that chose it: up to `item_entries` of the block's, item
 * item - item_offsets[key] of them. False where the grid's upper bound on the items, or the block's end, leaves
 * this CTA nothing.
 */
struct DkdvItem {
  int item, h, seq_start, key0, nk, e_begin, e_end;
};
__device__ __forceinline__ bool dkdv_item(const int *__restrict__ offsets, const int *__restrict__ item_offsets,
                                          const int *__restrict__ item_order, const int *__restrict__ block_seq,
                                          const int *__restrict__ cu_blocks, const int *__restrict__ cu_seqlens, int H,
                                          int total_blocks, int item_entries, DkdvItem &w) {
  const int nkeys_total = H * total_blocks;
  if ((int)blockIdx.x >= item_offsets[nkeys_total]) return false;
  const int b = item_order == nullptr ? blockIdx.x : item_order[blockIdx.x];
  w.item = b;
  const int key = range_holding(item_offsets, nkeys_total, b); // the key whose item range holds b
  const IndexKey ik = index_key(key, total_blocks, block_seq, cu_blocks, cu_seqlens);
  const int block_end = min((ik.j + 1) * SEL_L, ik.seq_len);
  w.h = ik.h;
  w.seq_start = ik.seq_start;
  w.key0 = ik.j * SEL_L + blockIdx.y * TILE; // first local token of this CTA's keys
  if (w.key0 >= block_end) return false;
  w.nk = min(TILE, block_end - w.key0);
  w.e_begin = offsets[key] + (b - item_offsets[key]) * item_entries;
  w.e_end = min(offsets[key + 1], w.e_begin + item_entries);
  return true;
}

/**
 * This item's partial rows ([item][sub][64 keys][D]) from a warp's dK (times scale) and dV C fragments: rows warp *
 * 16 + lane / 4 (+ 8) are the keys, in the mma.sync layout and in wgmma's alike.
 */
__device__ __forceinline__ void write_item_rows(const float dk_acc[DK / 8][4], const float dv_acc[DV / 8][4],
                                                float *__restrict__ partial_k, float *__restrict__ partial_v, int b, int warp,
                                                int lane, float scale) {
  const i64 prow0 = ((i64)b * gridDim.y + blockIdx.y) * TILE;
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = warp * 16 + lane / 4 + hh * 8;
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      *reinterpret_cast<float2 *>(partial_k + (prow0 + r) * DK + col) = make_float2(dk_acc[n][2 * hh] * scale, dk_acc[n][2 * hh + 1] * scale);
    }
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      *reinterpret_cast<float2 *>(partial_v + (prow0 + r) * DV + col) = make_float2(dv_acc[n][2 * hh], dv_acc[n][2 * hh + 1]);
    }
  }
}

// nsa_slc_bwd_dkdv's parameters, one list for both of its builds (the host launches either with the same arguments).
#define SLC_BWD_DKDV_PARAMS                                                                                                    \
  const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v, const elem_t *__restrict__ dout,    \
      const float *__restrict__ lse, const float *__restrict__ gate, const float *__restrict__ delta,                            \
      const int *__restrict__ offsets, const int *__restrict__ item_offsets, const int *__restrict__ item_order,                  \
      const int2 *__restrict__ entries,                                                                                          \
      const int *__restrict__ block_seq, const int *__restrict__ cu_blocks, const int *__restrict__ cu_seqlens,                  \
      float *__restrict__ partial_k, float *__restrict__ partial_v, void *__restrict__ partial_q, int Hq, int H, int total_blocks, \
      int item_entries, float scale_log2, float scale

#if SLC_USE_WS
#ifndef SLC_WS_STAGES
#define SLC_WS_STAGES 5 // ring of gathered query/dO rows: two being multiplied, up to three being copied
#endif
#ifndef SLC_WS_IN_FLIGHT
#define SLC_WS_IN_FLIGHT 3 // tiles whose copies the producer keeps in flight
#endif
#define WS_THREADS 384
// SLC_WS_TMA_GROUP=G (the host's default on sm_90 for G = 8 .. 64): the producer gathers each live entry's G query
// rows and G dO rows (contiguous in [N, Hq, d]) as TMA boxes of 64 columns x G heads, 128-byte swizzled into the
// tile, issued by the entry's first thread, instead of 16-byte cp.async per chunk; rows past the tile's entries are
// still zero-filled by cp.async. The row terms stay cp.async.
#if defined(SLC_WS_TMA_GROUP) && defined(NSA_HAS_BULK_COPY)
#define SLC_WS_USE_TMA 1
#define SLC_WS_TMA_ARRIVALS (TILE / SLC_WS_TMA_GROUP) // entries a tile, each announcing its boxes
static_assert(64 % SLC_WS_TMA_GROUP == 0 && SLC_WS_TMA_GROUP >= 8, "whole entries a 64-row tile, 8-row swizzle atoms");
#else
#define SLC_WS_USE_TMA 0
#define SLC_WS_TMA_ARRIVALS 0
#endif
/**
 * nsa_slc_bwd_dkdv warp-specialised (SLC_BWD_WS, sm_90a, dk, dv <= 128): the same work items, outputs and sums
 * as the mma.sync kernel below, by three warpgroups. Warpgroup 0 gathers the query/dO rows of the item's tiles
 * (16-byte cp.async, or TMA boxes with SLC_WS_TMA_GROUP, into 128-byte-swizzled tiles) and their row terms into a
 * ring of SLC_WS_STAGES stages (full and empty mbarriers); warpgroups 1 and 2 take the tiles in turn on wgmma, each
 * keeping its own dK, dV: S^T = K Q^T and dP^T = V dO^T (K, V as A), then dV += (P^T g) dO and dK += dS^T Q with
 * P^T, dS^T as register A operands;
 * with SLC_DQ_FUSED each stores its dS (stmatrix, transposed) and multiplies the rows' dQ parts dS K, 64 columns at
 * a time. At the end warpgroup 1 adds warpgroup 2's dK, dV to its own (a fixed order) and writes the item's rows.
 * One warpgroup's chain (gather, products, softmax terms, products, dQ) no longer leaves the tensor cores idle:
 * the other's products and the next tiles' gathers run under it.
 */
extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)
    nsa_slc_bwd_dkdv(SLC_BWD_DKDV_PARAMS
#if SLC_WS_USE_TMA
                     , const __grid_constant__ TensorMapBytes q_map, const __grid_constant__ TensorMapBytes dout_map
#endif
                     ) {
  static_assert(DK <= 128 && DV <= 128, "the warp-specialised dK/dV takes dk, dv <= 128");
  static_assert(SLC_WS_IN_FLIGHT + 2 <= SLC_WS_STAGES, "stages for the tiles in flight and the two being multiplied");
  typedef WgmmaTile<TILE, DK> WK;
  typedef WgmmaTile<TILE, DV> WV;
  constexpr int S = SLC_WS_STAGES;
  constexpr int STAGE = TILE * (DK + DV); // elements of one stage: query rows, then dO rows
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *ksmem = reinterpret_cast<elem_t *>(wgmma_aligned(smem_raw)); // TILE keys x DK
  elem_t *vsmem = ksmem + TILE * DK;                                    // TILE keys x DV
  elem_t *rowbuf = vsmem + TILE * DV;                                   // S stages
  __shared__ __align__(16) float row_lse[S][TILE], row_gate[S][TILE], row_delta[S][TILE];
  __shared__ __align__(16) int row_t[S][TILE];
#ifdef SLC_DQ_FUSED
  __shared__ __align__(16) int row_slot[S][TILE]; // the entries' slots, where the dQ parts go
#endif
  __shared__ __align__(8) unsigned long long full_bar[S], empty_bar[S], kv_bar;

  DkdvItem w;
  if (!dkdv_item(offsets, item_offsets, item_order, block_seq, cu_blocks, cu_seqlens, H, total_blocks, item_entries, w)) return;
  const int h = w.h, seq_start = w.seq_start, key0 = w.key0, nk = w.nk, e_begin = w.e_begin, e_end = w.e_end;
  const int b = w.item;
  const int G = Hq / H;
  const int per_tile = max(1, TILE / G);
  const int ntiles = (e_end - e_begin + per_tile - 1) / per_tile;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; s++) {
      // With TMA rows, each entry's first thread also arrives once a tile, announcing its boxes' bytes.
      mbarrier_init(&full_bar[s], 128 + SLC_WS_TMA_ARRIVALS);
      mbarrier_init(&empty_bar[s], 128);
    }
    mbarrier_init(&kv_bar, 128);
  }
  mbarrier_init_fence();
  __syncthreads();
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    // Producer: the key/value tile once, then each tile's rows into stage it % S once its last reader let go.
    setmaxnreg_dec<40>();
    load_tile_async<DK, 128, WK>(ksmem, TILE, [&](int r) -> const elem_t * {
      return r < nk ? k + ((i64)(seq_start + key0 + r) * H + h) * DK : nullptr;
    });
    load_tile_async<DV, 128, WV>(vsmem, TILE, [&](int r) -> const elem_t * {
      return r < nk ? v + ((i64)(seq_start + key0 + r) * H + h) * DV : nullptr;
    });
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async_shared(); // cp.async writes, before wgmma reads them through the async proxy
    mbarrier_arrive(&kv_bar);
    // Two threads a row of each tile (half of its query chunks and half of its dO chunks, and half of its row
    // terms, all by cp.async); the row's (token, slot) entry is fetched a tile ahead, so that nothing the
    // producer issues waits on a load.
    const int r = threadIdx.x / 2;
    const int half = threadIdx.x % 2;
    auto entry_of = [&](int it) -> int2 {
      const int e0 = e_begin + it * per_tile;
      return it < ntiles && r < min(per_tile, e_end - e0) * G ? entries[e0 + r / G] : make_int2(-1, 0);
    };
    int2 en = entry_of(0);
    for (int it = 0; it < ntiles; it++) {
      const int2 en_next = entry_of(it + 1);
      const int s = it % S;
      if (it >= S) mbarrier_wait(&empty_bar[s], ((it / S) - 1) & 1);
      elem_t *qs = rowbuf + s * STAGE;
      const bool live = en.x >= 0;
      const i64 qrow = live ? (i64)en.x * Hq + h * G + r % G : 0;
#if SLC_WS_USE_TMA
      // The entry's first thread announces and issues its rows' boxes (G heads are contiguous rows of q and dout);
      // dead rows are zero-filled below, so no stale value meets a zero probability.
      if (half == 0 && r % SLC_WS_TMA_GROUP == 0) {
        mbarrier_arrive_expect_tx(&full_bar[s], live ? SLC_WS_TMA_GROUP * (DK + DV) * 2 : 0);
        if (live) {
#pragma unroll
          for (int c = 0; c < DK / 64; c++) tma_load_3d(qs + c * TILE * 64 + r * 64, &q_map, c * 64, h * G, en.x, &full_bar[s]);
#pragma unroll
          for (int c = 0; c < DV / 64; c++) tma_load_3d(qs + TILE * DK + c * TILE * 64 + r * 64, &dout_map, c * 64, h * G, en.x, &full_bar[s]);
        }
      }
      if (!live) {
#pragma unroll
        for (int c = half; c < DK / 8; c += 2) cp_async_16(qs + WK::offset(r, c * 8), qs, false);
#pragma unroll
        for (int c = half; c < DV / 8; c += 2) cp_async_16(qs + TILE * DK + WV::offset(r, c * 8), qs, false);
      }
#else
#pragma unroll
      for (int c = half; c < DK / 8; c += 2) cp_async_16(qs + WK::offset(r, c * 8), live ? q + qrow * DK + c * 8 : qs, live);
#pragma unroll
      for (int c = half; c < DV / 8; c += 2) cp_async_16(qs + TILE * DK + WV::offset(r, c * 8), live ? dout + qrow * DV + c * 8 : qs, live);
#endif
      // Row terms (zeros past the tile's rows): the lse in natural log, as stored.
      if (half == 0) {
        cp_async_4(&row_lse[s][r], lse + qrow, live);
        row_t[s][r] = live ? en.x - seq_start : -1;
#ifdef SLC_DQ_FUSED
        row_slot[s][r] = en.y;
#endif
      } else {
        cp_async_4(&row_gate[s][r], gate + qrow * 3 + 1, live);
        cp_async_4(&row_delta[s][r], delta + qrow * 3 + 1, live);
      }
      cp_async_commit();
      en = en_next;
      // The copies of tile it - (IN_FLIGHT - 1) are in: hand its stage over (the later tiles' stay in flight).
      if (it >= SLC_WS_IN_FLIGHT - 1) {
        cp_async_wait<SLC_WS_IN_FLIGHT - 1>();
        fence_proxy_async_shared();
        mbarrier_arrive(&full_bar[(it - (SLC_WS_IN_FLIGHT - 1)) % S]);
      }
    }
    cp_async_wait<0>();
    fence_proxy_async_shared();
    for (int t = max(0, ntiles - (SLC_WS_IN_FLIGHT - 1)); t < ntiles; t++) mbarrier_arrive(&full_bar[t % S]);
    return;
  }

  // Consumers: warpgroup 1 takes tiles 0, 2, 4 ..., warpgroup 2 tiles 1, 3, 5 ...
  setmaxnreg_inc<232>();
  const int c = wg - 1;
  const int tid = threadIdx.x - 128 * wg;
  const int warp = tid / 32;
  const int lane = tid % 32;
#ifdef SLC_DQ_FUSED
  elem_t *dssmem = rowbuf + S * STAGE + c * TILE * TILE; // WgmmaTile<TILE, TILE>: this warpgroup's dS (rows x keys)
#endif
  float dk_acc[DK / 8][4];
  float dv_acc[DV / 8][4];
  zero_frags<DK / 8>(dk_acc);
  zero_frags<DV / 8>(dv_acc);
  const int key_lo = key0 + warp * 16 + lane / 4; // local tokens of this thread's two keys
  const int key_hi = key_lo + 8;
  mbarrier_wait(&kv_bar, 0);
  for (int it = c; it < ntiles; it += 2) {
    const int s = it % S;
    const elem_t *qs = rowbuf + s * STAGE;
    const elem_t *dos = qs + TILE * DK;
    mbarrier_wait(&full_bar[s], (it / S) & 1);
    float pt[TILE / 8][4];
    float dpt[TILE / 8][4];
    // Descriptors: one base each, stepped through the k-steps (wgmma_kmajor_at).
    const u64 kd = wgmma_desc_kmajor<TILE>(ksmem, 0, 0), vd = wgmma_desc_kmajor<TILE>(vsmem, 0, 0);
    const u64 qd = wgmma_desc_kmajor<TILE>(qs, 0, 0), dod = wgmma_desc_kmajor<TILE>(dos, 0, 0);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++) {
      wgmma_ss<TILE>(pt, wgmma_kmajor_at<TILE>(kd, ks), wgmma_kmajor_at<TILE>(qd, ks), ks > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int ks = 0; ks < DV / 16; ks++) {
      wgmma_ss<TILE>(dpt, wgmma_kmajor_at<TILE>(vd, ks), wgmma_kmajor_at<TILE>(dod, ks), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<1>();
    wgmma_fence_operands<TILE / 8>(pt);
    // P^T (while dP^T may still run), then dS^T = P^T (g dP^T - delta) and P^T g. Usually every row of the tile
    // sees all of this warp's 16 keys (live rows at or after its last key, which exists): then no mask. (TILE = 64
    // rows: lanes read rows lane and lane + 32.)
    const bool full = warp * 16 + 15 < nk && __reduce_min_sync(0xffffffffu, min(row_t[s][lane], row_t[s][lane + 32])) >= key0 + warp * 16 + 15;
    if (full) {
#pragma unroll
      for (int n = 0; n < TILE / 8; n++) {
        const float2 l2 = *reinterpret_cast<const float2 *>(&row_lse[s][n * 8 + (lane % 4) * 2]);
        const float lse2[2] = {l2.x * NSA_LOG2E, l2.y * NSA_LOG2E};
#pragma unroll
        for (int e = 0; e < 4; e++) pt[n][e] = fast_exp2(pt[n][e] * scale_log2 - lse2[e & 1]);
      }
    } else {
#pragma unroll
      for (int n = 0; n < TILE / 8; n++) {
        const int rl = n * 8 + (lane % 4) * 2; // the local row of elements 0 and 2 (1 and 3: rl + 1)
        const int2 t2 = *reinterpret_cast<const int2 *>(&row_t[s][rl]);
        const float2 l2 = *reinterpret_cast<const float2 *>(&row_lse[s][rl]);
        const float lse2[2] = {l2.x * NSA_LOG2E, l2.y * NSA_LOG2E};
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const bool odd = e & 1;
          const int rt = odd ? t2.y : t2.x;
          const int kk = e < 2 ? key_lo : key_hi;
          const bool ok = rt >= 0 && kk - key0 < nk && kk <= rt;
          pt[n][e] = ok ? fast_exp2(pt[n][e] * scale_log2 - lse2[odd]) : 0.f;
        }
      }
    }
    wgmma_wait<0>();
    wgmma_fence_operands<TILE / 8>(dpt);
    softmax_grad_terms<TILE / 8>(pt, dpt, row_gate[s], row_delta[s], lane);
    u32 pa[TILE / 16][4];
    u32 da[TILE / 16][4];
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) {
      pack_a(pa[kk], pt[2 * kk], pt[2 * kk + 1]);
      pack_a(da[kk], dpt[2 * kk], dpt[2 * kk + 1]);
    }
#ifdef SLC_DQ_FUSED
    // dS (rows x keys) for dQ: this warp's 16 keys of every row, transposed out of the dS^T A fragments (rounded
    // as dK's product rounds them).
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) {
      stmatrix_x4_trans(dssmem + WgmmaTile<TILE, TILE>::offset(kk * 16 + (lane & 7) + (lane >> 4) * 8, warp * 16 + ((lane >> 3) & 1) * 8), da[kk]);
    }
#endif
    const u64 qt = wgmma_desc_mnmajor<TILE>(qs, 0), dot = wgmma_desc_mnmajor<TILE>(dos, 0);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs<DV, 1>(dv_acc, pa[kk], wgmma_mnmajor_at(dot, kk), 1);
#pragma unroll
    for (int kk = 0; kk < TILE / 16; kk++) wgmma_rs<DK, 1>(dk_acc, da[kk], wgmma_mnmajor_at(qt, kk), 1);
    wgmma_commit();
#ifdef SLC_DQ_FUSED
    // Rows warp*16 + lane/4 (+ 8) of the tile (row r: entry r / G's token and slot, head r % G): their own [DK]
    // parts of (token, head, slot, sub), unscaled.
    const int e0 = e_begin + it * per_tile;
    const int rows = min(per_tile, e_end - e0) * G;
    part_t *dst[2];
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const int r = warp * 16 + lane / 4 + hh * 8;
      const int token = seq_start + row_t[s][r]; // the producer's copy of the row's entry
      dst[hh] = r < rows ? static_cast<part_t *>(partial_q) + ((((i64)token * Hq + h * G + r % G) * SEL_N + row_slot[s][r]) * SUBS + blockIdx.y) * DK
                         : nullptr;
    }
    fence_proxy_async_shared(); // the dS stores, before wgmma reads them
    named_barrier_sync(1 + c, 128);
    const u64 kt = wgmma_desc_mnmajor<TILE>(ksmem, 0), dsd = wgmma_desc_kmajor<TILE>(dssmem, 0, 0);
    // dQ parts, 64 columns at a time (one accumulator live: the registers go to dK, dV); the stage is released
    // once dK/dV's products, its last readers, are done.
    for (int c0 = 0; c0 < DK; c0 += 64) {
      float acc[8][4];
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < TILE / 16; ks++) {
        wgmma_ss<64, 1>(acc, wgmma_kmajor_at<TILE>(dsd, ks),
                        wgmma_desc_advance(kt, (c0 / 64) * TILE * 128 + wgmma_mnmajor_step(ks)), ks > 0);
      }
      wgmma_commit();
      if (c0 == 0) {
        wgmma_wait<1>();
        wgmma_fence_operands<DV / 8>(dv_acc);
        wgmma_fence_operands<DK / 8>(dk_acc);
        mbarrier_arrive(&empty_bar[s]);
      }
      wgmma_wait<0>();
      wgmma_fence_operands<8>(acc);
#pragma unroll
      for (int hh = 0; hh < 2; hh++) {
        if (dst[hh] == nullptr) continue;
        store_part_pairs<8>(dst[hh], c0 / 8, lane % 4, acc, hh);
      }
    }
#else
    wgmma_wait<0>();
    wgmma_fence_operands<DV / 8>(dv_acc);
    wgmma_fence_operands<DK / 8>(dk_acc);
    mbarrier_arrive(&empty_bar[s]);
#endif
  }

  // Warpgroup 2's dK, dV through shared memory (the stages are free: every tile was consumed) into warpgroup 1's.
  named_barrier_sync(3, 256);
  float *scratch = reinterpret_cast<float *>(rowbuf); // [(DK + DV) / 8 * 4][128]
  if (c == 1) {
#pragma unroll
    for (int n = 0; n < DK / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) scratch[(n * 4 + e) * 128 + tid] = dk_acc[n][e];
#pragma unroll
    for (int n = 0; n < DV / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) scratch[((DK / 8 + n) * 4 + e) * 128 + tid] = dv_acc[n][e];
  }
  named_barrier_sync(3, 256);
  if (c == 1) return;
#pragma unroll
  for (int n = 0; n < DK / 8; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) dk_acc[n][e] += scratch[(n * 4 + e) * 128 + tid];
#pragma unroll
  for (int n = 0; n < DV / 8; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) dv_acc[n][e] += scratch[((DK / 8 + n) * 4 + e) * 128 + tid];

  write_item_rows(dk_acc, dv_acc, partial_k, partial_v, b, warp, lane, scale);
}
#else
/**
 * Partial dK, dV of keys [sub * 64, sub * 64 + 64) (sub = blockIdx.y) of one selection block, over one work item:
 * up to `item_entries` consecutive (token, slot) pairs of the pairs [offsets[key], offsets[key + 1]) that chose
 * the block (key = h * total_blocks + global block). Items of a key are numbered from item_offsets[key]; the grid
 * is an upper bound on the items. Each item writes its own partial rows; nsa_slc_bwd_reduce sums them in order.
 * (Block 0 is chosen by every token: one CTA per block would serialise all of them.) With SLC_DQ_FUSED each tile
 * also writes its query rows' dQ parts into partial_q (else unused), for nsa_slc_bwd_dq_reduce.
 */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_slc_bwd_dkdv(SLC_BWD_DKDV_PARAMS) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *ksmem = reinterpret_cast<elem_t *>(smem_raw); // TILE x DK
  elem_t *vsmem = ksmem + TILE * DK;                    // TILE x DV
  elem_t *qsmem = vsmem + TILE * DV;                    // TILE x K_ROW (gathered rows)
  elem_t *dosmem = qsmem + TILE * K_ROW;                // TILE x V_ROW
#ifdef SLC_DQ_FUSED
  elem_t *dssmem = dosmem + TILE * V_ROW; // TILE keys x TILE rows: dS^T of the tile, for dQ = dS K
#endif
  __shared__ float row_lse[TILE], row_gate[TILE], row_delta[TILE];
  __shared__ int row_t[TILE];
#if SLC_USE_BULK
  __shared__ __align__(8) unsigned long long rows_bar;
  // Rows a tile leaves unfilled keep what they held and are multiplied by zeros (p, dS): they must be finite, so
  // the row tiles start zeroed, before any copy.
  for (int i = threadIdx.x; i < TILE * (K_ROW + V_ROW) / 8; i += THREADS) reinterpret_cast<uint4 *>(qsmem)[i] = make_uint4(0, 0, 0, 0);
  if (threadIdx.x == 0) mbarrier_init(&rows_bar, THREADS);
  mbarrier_init_fence();
  fence_proxy_async_shared();
  __syncthreads();
#endif

  DkdvItem w;
  if (!dkdv_item(offsets, item_offsets, item_order, block_seq, cu_blocks, cu_seqlens, H, total_blocks, item_entries, w)) return;
  const int h = w.h, seq_start = w.seq_start, key0 = w.key0, nk = w.nk, e_begin = w.e_begin, e_end = w.e_end;
  const int b = w.item;
  const int G = Hq / H;
  const int per_tile = max(1, TILE / G);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  load_tile_async<DK, THREADS>(ksmem, TILE, [&](int r) -> const elem_t * {
    return r < nk ? k + ((i64)(seq_start + key0 + r) * H + h) * DK : nullptr;
  });
  load_tile_async<DV, THREADS>(vsmem, TILE, [&](int r) -> const elem_t * {
    return r < nk ? v + ((i64)(seq_start + key0 + r) * H + h) * DV : nullptr;
  });
  cp_async_commit();

  float dk_acc[DK / 8][4];
  float dv_acc[DV / 8][4];
  zero_frags<DK / 8>(dk_acc);
  zero_frags<DV / 8>(dv_acc);
  const int key_lo = key0 + warp * 16 + lane / 4; // local tokens of this thread's two keys
  const int key_hi = key_lo + 8;

  for (int e0 = e_begin; e0 < e_end; e0 += per_tile) {
    const int nent = min(per_tile, e_end - e0);
    const int rows = nent * G;
    __syncthreads();
#if SLC_USE_BULK
    {
      // Thread r < TILE copies query row r, thread TILE + r dO row r (THREADS = 2 * TILE).
      const bool is_do = threadIdx.x >= TILE;
      const int r = threadIdx.x - (is_do ? TILE : 0);
      const u32 bytes = r < rows ? (is_do ? DV : DK) * 2 : 0;
      mbarrier_arrive_expect_tx(&rows_bar, bytes);
      if (r < rows) {
        const i64 qrow = (i64)entries[e0 + r / G].x * Hq + h * G + r % G;
        if (is_do) bulk_copy_g2s(dosmem + r * V_ROW, dout + qrow * DV, bytes, &rows_bar);
        else bulk_copy_g2s(qsmem + r * K_ROW, q + qrow * DK, bytes, &rows_bar);
      }
    }
#else
    load_tile_async<DK, THREADS>(qsmem, TILE, [&](int r) -> const elem_t * {
      return r < rows ? q + ((i64)entries[e0 + r / G].x * Hq + h * G + r % G) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(dosmem, TILE, [&](int r) -> const elem_t * {
      return r < rows ? dout + ((i64)entries[e0 + r / G].x * Hq + h * G + r % G) * DV : nullptr;
    });
#endif
    cp_async_commit();
    if (threadIdx.x < TILE) {
      const int r = threadIdx.x;
      if (r < rows) {
        const int token = entries[e0 + r / G].x;
        const i64 orow = (i64)token * Hq + h * G + r % G;
        row_t[r] = token - seq_start;
        row_lse[r] = lse[orow] * NSA_LOG2E;
        row_gate[r] = gate[orow * 3 + 1];
        row_delta[r] = delta[orow * 3 + 1];
      } else {
        row_t[r] = -1;
        row_lse[r] = row_gate[r] = row_delta[r] = 0.f;
      }
    }
    cp_async_wait<0>();
#if SLC_USE_BULK
    mbarrier_wait(&rows_bar, ((e0 - e_begin) / per_tile) & 1);
#endif
    __syncthreads();
    float pt[TILE / 8][4];
    zero_frags<TILE / 8>(pt);
    qk_mma_smem<DK, TILE / 16, SwizzledTile<DK>, KTile>(pt, ksmem, warp * 16, qsmem, 0, lane);
    float dpt[TILE / 8][4];
    zero_frags<TILE / 8>(dpt);
    qk_mma_smem<DV, TILE / 16, SwizzledTile<DV>, VTile>(dpt, vsmem, warp * 16, dosmem, 0, lane);
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int rl = n * 8 + (lane % 4) * 2 + (e & 1);
        const int kk = e < 2 ? key_lo : key_hi;
        const bool ok = row_t[rl] >= 0 && kk - key0 < nk && kk <= row_t[rl];
        const float p = ok ? fast_exp2(pt[n][e] * scale_log2 - row_lse[rl]) : 0.f;
        dpt[n][e] = p * (row_gate[rl] * dpt[n][e] - row_delta[rl]);
        pt[n][e] = p * row_gate[rl];
      }
    }
    pv_mma<DV, TILE / 16, VTile>(dv_acc, pt, dosmem, 0, lane);
#ifdef SLC_DQ_FUSED
    // dQ needs dS with the keys as the contraction, but each warp holds 16 keys' rows: stage the tile's dS^T
    // (rounded as the dK MMA rounds it) for all warps.
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
      for (int hh = 0; hh < 2; hh++) {
        const int kl = warp * 16 + lane / 4 + hh * 8;
        *reinterpret_cast<u32 *>(dssmem + SwizzledTile<TILE>::offset(kl, n * 8 + (lane % 4) * 2)) =
            pack_elem2(dpt[n][2 * hh], dpt[n][2 * hh + 1]);
      }
    }
#endif
    pv_mma<DK, TILE / 16, KTile>(dk_acc, dpt, qsmem, 0, lane);
#ifdef SLC_DQ_FUSED
    __syncthreads();
    if (warp * 16 < rows) fused_dq_rows(static_cast<part_t *>(partial_q), dssmem, ksmem, entries + e0, rows, G, Hq, h, warp, lane);
#endif
  }
  cp_async_wait<0>();

  write_item_rows(dk_acc, dv_acc, partial_k, partial_v, b, warp, lane, scale);
}

#endif // SLC_USE_WS

/**
 * dK, dV of the selected branch: for each key row (token of KV head h), the sum in item order of its block's
 * items' partial rows, added into dk, dv. One thread per (key row, channel): grid.x over tokens * H.
 * SLC_REDUCE_MEAN (phi = mean, the compressed and selected keys both the shared k, v): also adds the mean's
 * backward, dKc[i] / l of each compressed block i covering the token (dkc, dvc [Nc, H, D], cu_cmp), which saves
 * nsa_compress_mean_bwd's read and write of dk, dv. Otherwise dkc, dvc, cu_cmp are unused.
 */
extern "C" __global__ void nsa_slc_bwd_reduce(const float *__restrict__ partial_k, const float *__restrict__ partial_v,
                                              const int *__restrict__ item_offsets, const int *__restrict__ row_seq,
                                              const int *__restrict__ cu_seqlens, const int *__restrict__ cu_blocks,
                                              float *__restrict__ dk, float *__restrict__ dv, int H, int total_blocks,
                                              int subs, const float *__restrict__ dkc, const float *__restrict__ dvc,
                                              const int *__restrict__ cu_cmp) {
  const i64 krow = blockIdx.x; // token * H + h
  const int token = (int)(krow / H);
  const int h = (int)(krow % H);
  const int seq = row_seq[token];
  const int tau = token - cu_seqlens[seq];
  const int key = h * total_blocks + cu_blocks[seq] + tau / SEL_L;
  const int within = tau % SEL_L;
  const int sub = within / TILE;
  const int r = within % TILE;
  const int first = item_offsets[key];
  const int last = item_offsets[key + 1];
  for (int c = threadIdx.x; c < DK + DV; c += blockDim.x) {
    const bool is_key = c < DK;
    const int col = is_key ? c : c - DK;
    const int dim = is_key ? DK : DV;
    const float *src = is_key ? partial_k : partial_v;
    float sum = 0.f;
    for (int item = first; item < last; item++) sum += src[(((i64)item * subs + sub) * TILE + r) * dim + col];
#ifdef SLC_REDUCE_MEAN
    {
      // As nsa_compress_mean_bwd adds it, after the selected branch's sum.
      const int c_start = cu_cmp[seq];
      int i_lo, i_hi;
      blocks_covering(tau, cu_cmp[seq + 1] - c_start, &i_lo, &i_hi);
      const float *csrc = is_key ? dkc : dvc;
      float acc = 0.f;
      for (int i = i_lo; i <= i_hi; i++) acc += csrc[((i64)(c_start + i) * H + h) * dim + col];
      float *dst = is_key ? dk : dv;
      dst[krow * dim + col] = (dst[krow * dim + col] + sum) + acc * (1.f / CMP_L);
      continue;
    }
#endif
    float *dst = is_key ? dk : dv;
    dst[krow * dim + col] += sum;
  }
}


/**
 * dQ of the selected branch from the dK/dV pass's parts (SLC_DQ_FUSED): dq[row] += scale * the sum of the row's
 * parts over its valid slots in slot order, then sub order. A slot is valid up to the first block index -1 (as
 * the inverse index counts them); a sub is written only where its keys start inside the sequence. One thread per
 * 4 columns of a (token, head) row.
 */
extern "C" __global__ void nsa_slc_bwd_dq_reduce(const part_t *__restrict__ partial_q, const int *__restrict__ block_indices,
                                                 const int *__restrict__ row_seq, const int *__restrict__ cu_seqlens,
                                                 float *__restrict__ dq, int Hq, int H, i64 rows, float scale) {
  constexpr int C4 = DK / 4;
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 qrow = idx / C4; // token * Hq + head
  if (qrow >= rows) return;
  const int c4 = (int)(idx % C4);
  const int token = (int)(qrow / Hq);
  const int h = (int)(qrow % Hq) / (Hq / H);
  const int seq = row_seq[token];
  const int seq_len = cu_seqlens[seq + 1] - cu_seqlens[seq];
  const int *sel = block_indices + ((i64)token * H + h) * SEL_N;
  const part_t *src = partial_q + qrow * (SEL_N * SUBS * DK) + c4 * 4; // parts at offsets c4 * 4 .. + 3: two pairs
  // The loads first (zeros for the slots and subs nobody wrote), then the sum in order, so that no load has to
  // wait for the adds before it.
  float4 parts[SEL_N * SUBS];
  bool valid = true;
#pragma unroll
  for (int s = 0; s < SEL_N; s++) {
    const int j = sel[s];
    valid = valid && j >= 0;
#pragma unroll
    for (int sub = 0; sub < SUBS; sub++) {
      const bool written = valid && (sub == 0 || j * SEL_L + sub * TILE < seq_len);
      parts[s * SUBS + sub] = written ? load_part4(src + (s * SUBS + sub) * DK) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int i = 0; i < SEL_N * SUBS; i++) {
    sum.x += parts[i].x;
    sum.y += parts[i].y;
    sum.z += parts[i].z;
    sum.w += parts[i].w;
  }
  float2 *lo = reinterpret_cast<float2 *>(dq + qrow * DK + dq_part_column(c4 * 4));
  float2 *hi = reinterpret_cast<float2 *>(dq + qrow * DK + dq_part_column(c4 * 4 + 2));
  const float2 a = *lo, b = *hi;
  *lo = make_float2(a.x + sum.x * scale, a.y + sum.y * scale);
  *hi = make_float2(b.x + sum.z * scale, b.y + sum.w * scale);
}
