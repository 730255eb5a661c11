// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=0
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=3 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DNSA_FP16
// nvcc-check: -DDK=192 -DDV=128 -DNSA_MODE=3 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512
//
// FlashAttention-2 style tiles: a CTA takes 16 * FA_WARPS query rows of one query head (a warp per 16 rows; 128
// rows by default, so each key tile fetched into shared memory serves twice the rows of 64) and streams key
// tiles of 64 through shared memory (cp.async, double buffered), with tensor-core MMA and an online softmax.
// One kernel body serves the dense causal baseline and the NSA branches that read contiguous key ranges:
//   NSA_MODE 0  dense causal: keys [0, t]
//   NSA_MODE 1  compressed (cmp): compressed keys i with i*d + l - 1 <= t
//   NSA_MODE 2  sliding window (win): keys (t - w, t]
//   NSA_MODE 3  cmp then win in one CTA (the query tile stays on chip; the gated sum of both goes to `out`)
// Each phase writes its lse (natural log) and, when asked, its ungated output, and adds gate * o into `out`
// (fp32, [N, Hq, DV]); phase 0 of a launch overwrites `out` unless `accumulate` is set.
// Sequences are packed: cu_seqlens gives token offsets, cu_cmp the compressed-token offsets; `tiles` lists
// (sequence, first local row) per CTA, heaviest first.
#include "nsa_common.cuh"

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

#ifndef FA_WARPS
#define FA_WARPS 8
#endif
#define BLOCK_M (16 * FA_WARPS) // query rows per CTA: one warp per 16 rows
#define BLOCK_N 64
#define THREADS (32 * FA_WARPS)

enum Phase { PHASE_DENSE = 0, PHASE_CMP = 1, PHASE_WIN = 2 };

/** Keys [first, end) a query tile with local rows [q0, q1) may see in a phase, and the per-row visibility rule. */
struct KeyRange {
  int first;
  int end;
};

__device__ __forceinline__ int cmp_visible(int t, int tc) {
  // Compressed block i is visible to t iff i*d + l - 1 <= t.
  return t < CMP_L - 1 ? 0 : min(tc, (t - CMP_L + 1) / CMP_D + 1);
}

template <int PHASE> __device__ __forceinline__ KeyRange phase_keys(int q0, int q1, int tc) {
  if (PHASE == PHASE_CMP) return {0, cmp_visible(q1 - 1, tc)};
  if (PHASE == PHASE_WIN) return {max(0, q0 - WINDOW + 1), q1};
  return {0, q1};
}

template <int PHASE> __device__ __forceinline__ bool key_visible(int t, int key, int tc) {
  if (PHASE == PHASE_CMP) return key < cmp_visible(t, tc);
  if (PHASE == PHASE_WIN) return key <= t && key > t - WINDOW;
  return key <= t;
}

/** True when every row of the tile [q0, q1) sees every key of [k0, k0 + BLOCK_N): the tile needs no mask. */
template <int PHASE> __device__ __forceinline__ bool tile_unmasked(int q0, int q1, int k0, int tc) {
  if (PHASE == PHASE_CMP) return k0 + BLOCK_N <= cmp_visible(q0, tc);
  if (PHASE == PHASE_WIN) return k0 + BLOCK_N - 1 <= q0 && k0 >= q1 - WINDOW;
  return k0 + BLOCK_N - 1 <= q0;
}

struct Pointers {
  const elem_t *q;
  const elem_t *k;
  const elem_t *v;
  const float *gate;   // [N, Hq, 3] fp32 or null (no gate: weight 1)
  float *out;          // [N, Hq, DV] gated accumulation
  float *branch_out;   // [N, Hq, DV] ungated, or null
  float *lse;          // [N, Hq]
};

/**
 * One phase for this CTA's query tile: attention of the tile's 64 rows over the phase's keys, then the epilogue.
 * `qfrag` holds this warp's 16 query rows as A fragments.
 */
template <int PHASE>
__device__ __forceinline__ void run_phase(const Pointers p, int gate_index, bool overwrite, const u32 qfrag[DK / 16][4],
                                          elem_t *ksmem, elem_t *vsmem, int seq_start, int key_base, int seq_len, int tc,
                                          int q0, int hq, int Hq, int H, int G, float scale_log2) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int kvh = hq / G;
  const int q1 = min(q0 + BLOCK_M, seq_len);
  const KeyRange keys = phase_keys<PHASE>(q0, q1, tc);
  const int ntiles = keys.end > keys.first ? (keys.end - keys.first + BLOCK_N - 1) / BLOCK_N : 0;

  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  const int row_lo = q0 + warp * 16 + lane / 4; // local positions of the two rows this thread holds
  const int row_hi = row_lo + 8;

  auto issue = [&](int it) {
    const int k0 = keys.first + it * BLOCK_N;
    elem_t *ks = ksmem + (it & 1) * BLOCK_N * DK;
    elem_t *vs = vsmem + (it & 1) * BLOCK_N * DV;
    load_tile_async<DK, THREADS>(ks, BLOCK_N, [&](int r) -> const elem_t * {
      const int key = k0 + r;
      return key < keys.end ? p.k + ((i64)(key_base + key) * H + kvh) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(vs, BLOCK_N, [&](int r) -> const elem_t * {
      const int key = k0 + r;
      return key < keys.end ? p.v + ((i64)(key_base + key) * H + kvh) * DV : nullptr;
    });
    cp_async_commit();
  };

  if (ntiles > 0) issue(0);
  for (int it = 0; it < ntiles; it++) {
    if (it + 1 < ntiles) issue(it + 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int k0 = keys.first + it * BLOCK_N;
    const elem_t *ks = ksmem + (it & 1) * BLOCK_N * DK;
    const elem_t *vs = vsmem + (it & 1) * BLOCK_N * DV;
    float s[BLOCK_N / 8][4];
    zero_frags<BLOCK_N / 8>(s);
    qk_mma<DK, BLOCK_N / 16>(s, qfrag, ks, 0, lane);
    if (k0 + BLOCK_N <= keys.end && tile_unmasked<PHASE>(q0, q0 + BLOCK_M, k0, tc)) {
      // Interior tile (rows past the sequence end compute garbage that is never written).
#pragma unroll
      for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) s[n][e] *= scale_log2;
      }
    } else {
#pragma unroll
      for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int key = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
          const int t = e < 2 ? row_lo : row_hi;
          const bool ok = key < keys.end && t < seq_len && key_visible<PHASE>(t, key, tc);
          s[n][e] = ok ? s[n][e] * scale_log2 : NSA_NEG_INF;
        }
      }
    }
    softmax_update<BLOCK_N / 8, DV>(st, s, o);
    pv_mma<DV, BLOCK_N / 16>(o, s, vs, 0, lane);
    __syncthreads();
  }

  // Epilogue: normalise, write lse and the (gated) output rows.
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float lse;
    const float l = softmax_finish_row(st, h, &lse);
    const int t = h == 0 ? row_lo : row_hi;
    if (t >= seq_len) continue;
    const i64 row = (i64)(seq_start + t) * Hq + hq;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (lane % 4 == 0) p.lse[row] = lse;
    const float gate = gate_index < 0 ? 1.f : p.gate[row * 3 + gate_index];
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      const float x0 = o[n][2 * h] * inv;
      const float x1 = o[n][2 * h + 1] * inv;
      if (p.branch_out != nullptr) *reinterpret_cast<float2 *>(p.branch_out + row * DV + col) = make_float2(x0, x1);
      float2 *dst = reinterpret_cast<float2 *>(p.out + row * DV + col);
      float2 acc = overwrite ? make_float2(0.f, 0.f) : *dst;
      acc.x += gate * x0;
      acc.y += gate * x1;
      *dst = acc;
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, FA_WARPS == 4 ? 2 : 1)
    nsa_flash_attention(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                        const elem_t *__restrict__ kc, const elem_t *__restrict__ vc, const float *__restrict__ gate,
                        float *__restrict__ out, float *__restrict__ out_cmp, float *__restrict__ out_win,
                        float *__restrict__ lse_cmp, float *__restrict__ lse_win, const int *__restrict__ cu_seqlens,
                        const int *__restrict__ cu_cmp, const int2 *__restrict__ tiles, int Hq, int H, float scale_log2,
                        int accumulate) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw);
  elem_t *ksmem = qsmem + BLOCK_M * DK;
  elem_t *vsmem = ksmem + 2 * BLOCK_N * DK;

  const int2 tile = tiles[blockIdx.x];
  const int seq = tile.x;
  const int q0 = tile.y;
  const int hq = blockIdx.y;
  const int G = Hq / H;
  const int seq_start = cu_seqlens[seq];
  const int seq_len = cu_seqlens[seq + 1] - seq_start;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  load_tile_async<DK, THREADS>(qsmem, BLOCK_M, [&](int r) -> const elem_t * {
    return q0 + r < seq_len ? q + ((i64)(seq_start + q0 + r) * Hq + hq) * DK : nullptr;
  });
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  u32 qfrag[DK / 16][4];
  load_a_fragments<DK>(qfrag, qsmem, warp * 16, lane);

#if NSA_MODE == 0
  Pointers p{q, k, v, nullptr, out, nullptr, lse_cmp};
  run_phase<PHASE_DENSE>(p, -1, !accumulate, qfrag, ksmem, vsmem, seq_start, seq_start, seq_len, 0, q0, hq, Hq, H, G,
                         scale_log2);
#else
  const int c_start = cu_cmp[seq];
  const int tc = cu_cmp[seq + 1] - c_start;
#if NSA_MODE == 1 || NSA_MODE == 3
  Pointers pc{q, kc, vc, gate, out, out_cmp, lse_cmp};
  run_phase<PHASE_CMP>(pc, 0, !accumulate, qfrag, ksmem, vsmem, seq_start, c_start, seq_len, tc, q0, hq, Hq, H, G,
                       scale_log2);
#endif
#if NSA_MODE == 2 || NSA_MODE == 3
  Pointers pw{q, k, v, gate, out, out_win, lse_win};
  run_phase<PHASE_WIN>(pw, 2, NSA_MODE == 2 && !accumulate, qfrag, ksmem, vsmem, seq_start, seq_start, seq_len, tc, q0,
                       hq, Hq, H, G, scale_log2);
#endif
#endif
}
