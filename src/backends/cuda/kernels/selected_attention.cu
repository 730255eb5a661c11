// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DNSA_FP16
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_WARPS=2 -DSLC_STAGES=4
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DSLC_BULK -DNSA_FP16
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK -DSLC_TMA
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DSLC_BULK -DSLC_TMA -DNSA_FP16
//
// Selected attention, group-centric (the NSA paper's kernel, for large G): a CTA takes one query position t and
// up to 16 query heads of one KV head (the G heads of a group share one selection), so each selected K/V block
// is fetched once for the whole group. The n selected blocks (block t's own cut at t) are streamed as tiles of
// 16 * SLC_WARPS keys through a SLC_STAGES-deep cp.async pipeline (the kernel is bound by how many bytes are in
// flight); each warp takes 16 keys of a tile with its own online softmax, and the warps' partial results are
// merged at the end (flash-decoding style). The epilogue adds g_slc * o_slc to the
// fp32 accumulator `out` holding the other branches, and optionally writes the final output in the input dtype.
//
// With SLC_BULK (sm_90) each key/value row of a tile is one bulk copy issued by one thread and completing on the
// stage's mbarrier, into padded (unswizzled) rows: the 16-byte cp.async path spends more of the SM on address
// arithmetic than on the attention (Nsight Compute, H100, 64k: ALU the busiest pipe, 64% issue slots busy,
// L2 at a third of its throughput).
//
// With SLC_TMA as well (the host's default on sm_90 where l' is a multiple of the tile and dk, dv of 64): a tile is
// BLOCK_N consecutive tokens of one block, so it comes as a few TMA boxes (64 columns x BLOCK_N tokens each, 128-byte
// swizzled) issued by one thread. The per-row copies were the kernel's largest cost: each lane's bulk copy is issued
// through the uniform datapath one lane at a time (Nsight Compute, H100, 16k: half of the stall samples). Keys past
// t within the tile arrive too and are masked; past the tensor's end TMA fills zeros. (Where the tiles come by TMA,
// the host's default is selected_attention_union.cu, three positions a CTA over the union of their blocks;
// NSA_SLC_UNION=0 keeps this kernel.)
#include "nsa_common.cuh"
#include "nsa_gather_tiles.cuh"
#include "nsa_wgmma.cuh"

#ifndef SLC_WARPS
#define SLC_WARPS 2
#endif
#ifndef SLC_STAGES
#define SLC_STAGES 1
#endif
#ifndef SLC_MIN_BLOCKS
#define SLC_MIN_BLOCKS 8 // CTAs per SM the register budget must allow
#endif
#define BLOCK_N (16 * SLC_WARPS)
#define THREADS (32 * SLC_WARPS)
#define ROWS 16

#if defined(SLC_TMA) && SLC_USE_BULK
#define SLC_USE_TMA 1
static_assert(SEL_L % BLOCK_N == 0 && DK % 64 == 0 && DV % 64 == 0, "TMA tiles: whole tiles of a block, 64-column boxes");
static_assert(ROWS * DK * 2 % 1024 == 0 && BLOCK_N * 128 % 1024 == 0, "the boxes' swizzle: Q rows and each 64-column block keep 1024-byte alignment");
typedef WgmmaTile<BLOCK_N, DK> SlcKTile; // the boxes' 128-byte swizzle
typedef WgmmaTile<BLOCK_N, DV> SlcVTile;
#define SLC_K_ROW DK
#define SLC_V_ROW DV
#else
#define SLC_USE_TMA 0
typedef KTile SlcKTile;
typedef VTile SlcVTile;
#define SLC_K_ROW K_ROW
#define SLC_V_ROW V_ROW
#endif

extern "C" __global__ void __launch_bounds__(THREADS, SLC_MIN_BLOCKS)
    nsa_selected_attention(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                           const float *__restrict__ gate, const int *__restrict__ block_indices,
                           const int *__restrict__ row_seq, const int *__restrict__ cu_seqlens, float *__restrict__ out,
                           elem_t *__restrict__ out_final, void *__restrict__ branch_out, int branch_half,
                           float *__restrict__ lse_out, int Hq, int H, float scale_log2
#if SLC_USE_TMA
                           , const __grid_constant__ TensorMapBytes k_map, const __grid_constant__ TensorMapBytes v_map
#endif
                           ) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
#if SLC_USE_TMA
  elem_t *qsmem = reinterpret_cast<elem_t *>(wgmma_aligned(smem_raw)); // ROWS x DK (a multiple of 1024 bytes)
#else
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw);           // ROWS x DK
#endif
  elem_t *ksmem = qsmem + ROWS * DK;                               // SLC_STAGES x BLOCK_N x SLC_K_ROW
  elem_t *vsmem = ksmem + SLC_STAGES * BLOCK_N * SLC_K_ROW;        // SLC_STAGES x BLOCK_N x SLC_V_ROW
  __shared__ int sel[SEL_N];
#if SLC_USE_BULK
  __shared__ __align__(8) unsigned long long stage_bar[SLC_STAGES];
#endif
  __shared__ float merge_m[SLC_WARPS][ROWS];
  __shared__ float merge_l[SLC_WARPS][ROWS];

  const i64 row = blockIdx.x; // packed token
  const int h = blockIdx.y;
  const int G = Hq / H;
  const int head0 = blockIdx.z * ROWS; // first head of this CTA within the group
  const int rows = min(ROWS, G - head0);
  const int seq = row_seq[row];
  const int seq_start = cu_seqlens[seq];
  const int t = (int)(row - seq_start);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  int nsel = 0;
  if (threadIdx.x < SEL_N) sel[threadIdx.x] = block_indices[(row * H + h) * SEL_N + threadIdx.x];
#if SLC_USE_TMA
  if (threadIdx.x < SLC_STAGES) mbarrier_init(&stage_bar[threadIdx.x], 1); // TMA fills every row of a loaded tile
  mbarrier_init_fence();
#elif SLC_USE_BULK
  // Rows a tile does not fill keep what they held; values must be finite there (p = 0 multiplies them), so the
  // value stages start zeroed. The zeros are ordinary stores that later bulk copies overwrite: fence the proxies.
  for (int i = threadIdx.x; i < SLC_STAGES * BLOCK_N * V_ROW / 8; i += THREADS) {
    reinterpret_cast<uint4 *>(vsmem)[i] = make_uint4(0, 0, 0, 0);
  }
  if (threadIdx.x < SLC_STAGES) mbarrier_init(&stage_bar[threadIdx.x], THREADS);
  mbarrier_init_fence();
  fence_proxy_async_shared();
#endif
  __syncthreads();
  while (nsel < SEL_N && sel[nsel] >= 0) nsel++;
  const int total = nsel * SEL_L;
  const int ntiles = (total + BLOCK_N - 1) / BLOCK_N;

  load_tile_async<DK, THREADS>(qsmem, ROWS, [&](int r) -> const elem_t * {
    return r < rows ? q + (row * Hq + h * G + head0 + r) * DK : nullptr;
  });
  // Key i of the concatenated selection is token sel[i / l'] * l' + i % l' of the sequence (if <= t).
  auto key_pos = [&](int i) { return sel[i / SEL_L] * SEL_L + i % SEL_L; };
#if SLC_USE_TMA
  // One thread loads tile it: BLOCK_N consecutive tokens of one block, as 64-column boxes. A tile wholly past t
  // (the tail of t's own block) is not loaded: every key of it is masked.
  auto issue = [&](int it) {
    if (threadIdx.x != 0) return;
    const int stage = it % SLC_STAGES;
    const int first = key_pos(it * BLOCK_N);
    if (first > t) {
      mbarrier_arrive(&stage_bar[stage]);
      return;
    }
    mbarrier_arrive_expect_tx(&stage_bar[stage], BLOCK_N * (DK + DV) * 2);
    const int token = seq_start + first;
#pragma unroll
    for (int c = 0; c < DK / 64; c++) tma_load_3d(ksmem + (stage * DK + c * 64) * BLOCK_N, &k_map, c * 64, h, token, &stage_bar[stage]);
#pragma unroll
    for (int c = 0; c < DV / 64; c++) tma_load_3d(vsmem + (stage * DV + c * 64) * BLOCK_N, &v_map, c * 64, h, token, &stage_bar[stage]);
  };
  for (int st = 0; st < SLC_STAGES - 1 && st < ntiles; st++) issue(st);
  cp_async_commit();
#elif SLC_USE_BULK
  // Thread r < BLOCK_N copies key row r of the tile, thread BLOCK_N + r value row r (THREADS = 2 * BLOCK_N).
  auto issue = [&](int it) {
    const int stage = it % SLC_STAGES;
    const bool is_value = threadIdx.x >= BLOCK_N;
    const int r = threadIdx.x - (is_value ? BLOCK_N : 0);
    const int i = it * BLOCK_N + r;
    const bool valid = i < total && key_pos(i) <= t;
    const u32 bytes = valid ? (is_value ? DV : DK) * 2 : 0;
    mbarrier_arrive_expect_tx(&stage_bar[stage], bytes);
    if (valid) {
      const i64 token = seq_start + key_pos(i);
      if (is_value) bulk_copy_g2s(vsmem + (stage * BLOCK_N + r) * V_ROW, v + (token * H + h) * DV, bytes, &stage_bar[stage]);
      else bulk_copy_g2s(ksmem + (stage * BLOCK_N + r) * K_ROW, k + (token * H + h) * DK, bytes, &stage_bar[stage]);
    }
  };
  for (int st = 0; st < SLC_STAGES - 1 && st < ntiles; st++) issue(st);
  cp_async_commit();
#else
  auto issue = [&](int it) {
    const int k0 = it * BLOCK_N;
    load_tile_async<DK, THREADS>(ksmem + (it % SLC_STAGES) * BLOCK_N * DK, BLOCK_N, [&](int r) -> const elem_t * {
      const int i = k0 + r;
      if (i >= total || key_pos(i) > t) return nullptr;
      return k + ((i64)(seq_start + key_pos(i)) * H + h) * DK;
    });
    load_tile_async<DV, THREADS>(vsmem + (it % SLC_STAGES) * BLOCK_N * DV, BLOCK_N, [&](int r) -> const elem_t * {
      const int i = k0 + r;
      if (i >= total || key_pos(i) > t) return nullptr;
      return v + ((i64)(seq_start + key_pos(i)) * H + h) * DV;
    });
    cp_async_commit();
  };
  // Prologue: SLC_STAGES - 1 tiles in flight (empty groups keep the wait counts uniform).
  for (int st = 0; st < SLC_STAGES - 1; st++) {
    if (st < ntiles) issue(st);
    else cp_async_commit();
  }
#endif

  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  u32 qfrag[DK / 16][4];
  for (int it = 0; it < ntiles; it++) {
#if SLC_USE_BULK
    if (it + SLC_STAGES - 1 < ntiles) issue(it + SLC_STAGES - 1);
    if (it == 0) {
      cp_async_wait<0>(); // the query rows
      __syncthreads();
    }
    mbarrier_wait(&stage_bar[it % SLC_STAGES], (it / SLC_STAGES) & 1);
#else
    if (it + SLC_STAGES - 1 < ntiles) issue(it + SLC_STAGES - 1);
    else cp_async_commit();
    cp_async_wait<SLC_STAGES - 1>();
    __syncthreads();
#endif
    if (it == 0) load_a_fragments<DK>(qfrag, qsmem, 0, lane);
    const int k0 = it * BLOCK_N + warp * 16; // this warp's 16 keys
    float s[2][4];
    zero_frags<2>(s);
    qk_mma<DK, 1, SlcKTile>(s, qfrag, ksmem + (it % SLC_STAGES) * BLOCK_N * SLC_K_ROW, warp * 16, lane);
    // Blocks are ascending, so only the warp's keys reaching past t (the tail of t's own block) need a mask: one
    // warp-uniform branch a tile, the common side with no per-key work (the scale goes into the exponent's FMA).
    // Padding rows (G < 16) are never written, so they need none.
    if (!(k0 + 15 < total && key_pos(k0 + 15) <= t)) {
#pragma unroll
      for (int n = 0; n < 2; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int i = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
          if (!(i < total && key_pos(i) <= t)) s[n][e] = NSA_NEG_INF;
        }
      }
    }
    softmax_update_settled<2, DV>(st, s, o, scale_log2);
    pv_mma<DV, 1, SlcVTile>(o, s, vsmem + (it % SLC_STAGES) * BLOCK_N * SLC_V_ROW, warp * 16, lane);
    __syncthreads();
  }

  // Merge the warps' partial softmax states: stage each warp's (m, l, o) in shared memory.
  cp_async_wait<0>();
  __syncthreads();
  float *merge_o = reinterpret_cast<float *>(ksmem); // SLC_WARPS x ROWS x DV floats, reusing the key stages
  stage_warp_state<DV, SLC_WARPS>(st, o, merge_m, merge_l, merge_o, warp, lane);
  __syncthreads();
  // Each thread's pairs of columns: their rows of `out` (the other branches' sum, written by an earlier launch) and
  // gates all loaded first, in flight together. One element at a time, each load waited out a round trip before
  // the next was issued (19% of the stall samples on its FFMA, H100, 16k, G = 16, fla; batched, the selected stage
  // took 4.0 instead of 4.4 ms at 16k and 17.0 instead of 18.0 at 64k).
  constexpr int PAIRS = ROWS * DV / (2 * THREADS);
  constexpr int BATCH = PAIRS > 8 ? 8 : PAIRS; // pairs in flight at once (16 spilled at the 128-register cap)
  static_assert(ROWS * DV % (2 * THREADS) == 0 && PAIRS % BATCH == 0, "whole pairs of columns a thread");
#pragma unroll 1
  for (int k0 = 0; k0 < PAIRS; k0 += BATCH) {
    float2 prev[BATCH];
    float g[BATCH];
#pragma unroll
    for (int k = 0; k < BATCH; k++) {
      const int idx = 2 * (threadIdx.x + (k0 + k) * THREADS);
      const i64 orow = row * Hq + h * G + head0 + idx / DV;
      if (idx / DV < rows) {
        prev[k] = *reinterpret_cast<const float2 *>(out + orow * DV + idx % DV);
        g[k] = gate[orow * 3 + 1];
      }
    }
#pragma unroll
    for (int k = 0; k < BATCH; k++) {
      const int idx = 2 * (threadIdx.x + (k0 + k) * THREADS);
      const int r = idx / DV;
      const int col = idx % DV;
      if (r >= rows) continue;
      float m, l, acc[2];
      merge_warp_states<DV, SLC_WARPS, 2>(merge_m, merge_l, merge_o, r, col, &m, &l, acc);
      const float x0 = l > 0.f ? acc[0] / l : 0.f;
      const float x1 = l > 0.f ? acc[1] / l : 0.f;
      const i64 orow = row * Hq + h * G + head0 + r;
      if (col == 0) lse_out[orow] = l > 0.f ? (m + log2f(l)) * NSA_LN2 : NSA_NEG_INF;
      if (branch_out != nullptr) store_branch2(branch_out, orow * DV + col, x0, x1, branch_half != 0);
      const float y0 = prev[k].x + g[k] * x0;
      const float y1 = prev[k].y + g[k] * x1;
      if (out_final != nullptr) *reinterpret_cast<u32 *>(out_final + orow * DV + col) = pack_elem2(y0, y1);
      else *reinterpret_cast<float2 *>(out + orow * DV + col) = make_float2(y0, y1);
    }
  }
}
