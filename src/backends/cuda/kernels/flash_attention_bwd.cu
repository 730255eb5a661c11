// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=0
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=1 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DNSA_FP16
// nvcc-check: -DDK=192 -DDV=128 -DNSA_MODE=2 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512
//
// Backward of the flash-attention branches (FlashAttention-2's algorithm, split in two kernels so that no
// gradient is summed with atomics and every run gives the same bits):
//   nsa_bwd_preprocess     per (row, query head): dot_b = dO . o_b for each branch b; dg_b = dot_b and
//                          delta_b = g_b * dot_b (the softmax backward's row term of dO_b = g_b * dO)
//   nsa_flash_bwd_dkdv     a CTA owns 64 keys of one KV head and walks every query tile (all G heads) that sees
//                          them: dV += P^T dO_b, dK += dS^T Q * scale, kept in registers, written once
//   nsa_flash_bwd_dq       a CTA owns 64 query rows of one head and walks their keys: dQ += dS K * scale
// with P = exp(s - lse) from the forward's lse and dS = P * (g_b * dO V^T - delta_b). NSA_MODE picks the key
// set as in flash_attention.cu: 0 dense causal (the baseline, gate 1), 1 compressed (cmp), 2 sliding window (win).
// Outputs are fp32 and added (+=) into the gradient buffers when `accumulate` is set; each row is owned by one
// CTA, so the sums are race-free and ordered.
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

#define TILE 64
#define THREADS 128

__device__ __forceinline__ int cmp_visible(int t, int tc) {
  return t < CMP_L - 1 ? 0 : min(tc, (t - CMP_L + 1) / CMP_D + 1);
}

/** Whether query row t (local) sees key `key` (a local token, or a compressed index in mode 1). */
__device__ __forceinline__ bool visible(int t, int key, int tc) {
#if NSA_MODE == 1
  return key < cmp_visible(t, tc);
#elif NSA_MODE == 2
  return key <= t && key > t - WINDOW;
#else
  return key <= t;
#endif
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

extern "C" __global__ void nsa_bwd_preprocess(const elem_t *__restrict__ dout, const float *__restrict__ o0,
                                              const float *__restrict__ o1, const float *__restrict__ o2,
                                              const float *__restrict__ gate, float *__restrict__ dg,
                                              float *__restrict__ delta, i64 rows) {
  const i64 r = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; // token * Hq + hq
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const float *o[3] = {o0, o1, o2};
  for (int b = 0; b < 3; b++) {
    if (o[b] == nullptr) continue;
    float dot = 0.f;
    for (int c = lane; c < DV; c += 32) dot += elem_to_float(dout[r * DV + c]) * o[b][r * DV + c];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, off);
    if (lane == 0) {
      if (dg != nullptr) dg[r * 3 + b] = dot;
      delta[r * 3 + b] = (gate == nullptr ? 1.f : gate[r * 3 + b]) * dot;
    }
  }
}

/**
 * dK, dV of 64 keys (4 warps x 16) of KV head blockIdx.y. q [N, Hq, DK], dout [N, Hq, DV], lse/gate/delta per
 * (row, head); keys k/v are [rows, H, D] with local key i at row key_base + i (compressed rows in mode 1).
 */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_flash_bwd_dkdv(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                       const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                       const float *__restrict__ delta, float *__restrict__ dk, float *__restrict__ dv,
                       const int *__restrict__ cu_seqlens, const int *__restrict__ cu_keys, const int2 *__restrict__ tiles,
                       int Hq, int H, int branch, float scale_log2, float scale, int accumulate,
                       float *__restrict__ partial_k, float *__restrict__ partial_v, i64 key_rows) {
  // Split over gridDim.z: split z walks its share of the (head, query tile) iterations and, when there are
  // several splits, writes its partial dK, dV to partial_*[z] for nsa_bwd_reduce_splits to sum in split order.
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *ksmem = reinterpret_cast<elem_t *>(smem_raw); // TILE x DK
  elem_t *vsmem = ksmem + TILE * DK;                    // TILE x DV
  elem_t *qbuf = vsmem + TILE * DV;                     // 2 stages of TILE x DK
  elem_t *dobuf = qbuf + 2 * TILE * DK;                 // 2 stages of TILE x DV
  __shared__ float row_lse[2][TILE], row_gate[2][TILE], row_delta[2][TILE];

  const int2 tile = tiles[blockIdx.x];
  const int seq = tile.x;
  const int k0 = tile.y;
  const int h = blockIdx.y;
  const int G = Hq / H;
  const int seq_start = cu_seqlens[seq];
  const int seq_len = cu_seqlens[seq + 1] - seq_start;
  const int key_base = cu_keys[seq];
  const int nkeys = cu_keys[seq + 1] - key_base;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  load_tile_async<DK, THREADS>(ksmem, TILE, [&](int r) -> const elem_t * {
    return k0 + r < nkeys ? k + ((i64)(key_base + k0 + r) * H + h) * DK : nullptr;
  });
  load_tile_async<DV, THREADS>(vsmem, TILE, [&](int r) -> const elem_t * {
    return k0 + r < nkeys ? v + ((i64)(key_base + k0 + r) * H + h) * DV : nullptr;
  });
  cp_async_commit();

  float dk_acc[DK / 8][4];
  float dv_acc[DV / 8][4];
  zero_frags<DK / 8>(dk_acc);
  zero_frags<DV / 8>(dv_acc);
  int first, unused, last_end;
  rows_seeing(k0, seq_len, &first, &unused);
  rows_seeing(min(k0 + TILE, nkeys) - 1, seq_len, &unused, &last_end);
  const int key_lo = k0 + warp * 16 + lane / 4; // the two keys this thread's C fragments hold
  const int key_hi = key_lo + 8;

  const int qstart = (first / TILE) * TILE;
  const int nq = last_end > qstart ? (last_end - qstart + TILE - 1) / TILE : 0;
  const int iters = G * nq;
  const int per_split = (iters + gridDim.z - 1) / gridDim.z;
  const int it_end = min(iters, (int)(blockIdx.z + 1) * per_split);
  const int it_begin = blockIdx.z * per_split;
  // Stage the query rows, dO rows and row terms of iteration `it` (head, query tile) into buffer `st`; the next
  // iteration's copies run while this one computes.
  auto issue = [&](int it, int st) {
    const int hq = h * G + it / nq;
    const int q0 = qstart + (it % nq) * TILE;
    load_tile_async<DK, THREADS>(qbuf + st * TILE * DK, TILE, [&](int r) -> const elem_t * {
      return q0 + r < seq_len ? q + ((i64)(seq_start + q0 + r) * Hq + hq) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(dobuf + st * TILE * DV, TILE, [&](int r) -> const elem_t * {
      return q0 + r < seq_len ? dout + ((i64)(seq_start + q0 + r) * Hq + hq) * DV : nullptr;
    });
    cp_async_commit();
    if (threadIdx.x < TILE) {
      const int t = q0 + threadIdx.x;
      const i64 row = (i64)(seq_start + t) * Hq + hq;
      const bool in = t < seq_len;
      row_lse[st][threadIdx.x] = in ? lse[row] * NSA_LOG2E : 0.f;
      row_gate[st][threadIdx.x] = in ? (gate == nullptr ? 1.f : gate[row * 3 + branch]) : 0.f;
      row_delta[st][threadIdx.x] = in ? delta[row * 3 + branch] : 0.f;
    }
  };
  if (it_begin < it_end) issue(it_begin, 0);
  for (int it = it_begin; it < it_end; it++) {
    const int st = (it - it_begin) & 1;
    const int q0 = qstart + (it % nq) * TILE;
    const elem_t *qsmem = qbuf + st * TILE * DK;
    const elem_t *dosmem = dobuf + st * TILE * DV;
    {
      if (it + 1 < it_end) issue(it + 1, st ^ 1);
      else cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      // S^T (this warp's 16 keys x 64 rows), then P^T.
      float pt[TILE / 8][4];
      zero_frags<TILE / 8>(pt);
      qk_mma_smem<DK, TILE / 16>(pt, ksmem, warp * 16, qsmem, 0, lane);
#pragma unroll
      for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int rl = n * 8 + (lane % 4) * 2 + (e & 1); // local query row
          const int t = q0 + rl;
          const int key = e < 2 ? key_lo : key_hi;
          const bool ok = t < seq_len && key < nkeys && visible(t, key, nkeys);
          pt[n][e] = ok ? exp2f(pt[n][e] * scale_log2 - row_lse[st][rl]) : 0.f;
        }
      }
      // dP^T = V dO^T (16 keys x 64 rows).
      float dpt[TILE / 8][4];
      zero_frags<TILE / 8>(dpt);
      qk_mma_smem<DV, TILE / 16>(dpt, vsmem, warp * 16, dosmem, 0, lane);
      // dS^T = P^T * (g dP^T - delta) into dpt, then P^T * g in place for dV += (P^T g) dO.
#pragma unroll
      for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int rl = n * 8 + (lane % 4) * 2 + (e & 1);
          dpt[n][e] = pt[n][e] * (row_gate[st][rl] * dpt[n][e] - row_delta[st][rl]);
          pt[n][e] *= row_gate[st][rl];
        }
      }
      pv_mma<DV, TILE / 16>(dv_acc, pt, dosmem, 0, lane);
      pv_mma<DK, TILE / 16>(dk_acc, dpt, qsmem, 0, lane);
      __syncthreads(); // stage st is refilled by the iteration after next
    }
  }

  cp_async_wait<0>(); // (no query tile: the K/V copies are still pending)

  // Write this warp's 16 keys (to this split's partial when the work is split).
  float *dk_dst = dk;
  float *dv_dst = dv;
  bool add = accumulate;
  if (gridDim.z > 1) {
    dk_dst = partial_k + blockIdx.z * key_rows * DK;
    dv_dst = partial_v + blockIdx.z * key_rows * DV;
    add = false;
  }
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int key = hh == 0 ? key_lo : key_hi;
    if (key >= nkeys) continue;
    const i64 krow = (i64)(key_base + key) * H + h;
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      float2 *dst = reinterpret_cast<float2 *>(dk_dst + krow * DK + col);
      float2 acc = add ? *dst : make_float2(0.f, 0.f);
      acc.x += dk_acc[n][2 * hh] * scale;
      acc.y += dk_acc[n][2 * hh + 1] * scale;
      *dst = acc;
    }
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      float2 *dst = reinterpret_cast<float2 *>(dv_dst + krow * DV + col);
      float2 acc = add ? *dst : make_float2(0.f, 0.f);
      acc.x += dv_acc[n][2 * hh];
      acc.y += dv_acc[n][2 * hh + 1];
      *dst = acc;
    }
  }
}

/** target[i] += sum over splits s (in order) of partial[s * n + i]. */
extern "C" __global__ void nsa_bwd_reduce_splits(const float *__restrict__ partial, float *__restrict__ target, i64 n, int splits) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < splits; s++) sum += partial[s * n + i];
    target[i] += sum;
  }
}

/** dQ of 64 query rows (4 warps x 16) of query head blockIdx.y over the branch's keys; adds into dq (fp32). */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_flash_bwd_dq(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                     const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                     const float *__restrict__ delta, float *__restrict__ dq, const int *__restrict__ cu_seqlens,
                     const int *__restrict__ cu_keys, const int2 *__restrict__ tiles, int Hq, int H, int branch,
                     float scale_log2, float scale, int accumulate) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw); // TILE x DK
  elem_t *dosmem = qsmem + TILE * DK;                   // TILE x DV
  elem_t *ksmem = dosmem + TILE * DV;                   // 2 x TILE x DK
  elem_t *vsmem = ksmem + 2 * TILE * DK;                // 2 x TILE x DV

  const int2 tile = tiles[blockIdx.x];
  const int seq = tile.x;
  const int q0 = tile.y;
  const int hq = blockIdx.y;
  const int G = Hq / H;
  const int h = hq / G;
  const int seq_start = cu_seqlens[seq];
  const int seq_len = cu_seqlens[seq + 1] - seq_start;
  const int key_base = cu_keys[seq];
  const int nkeys = cu_keys[seq + 1] - key_base;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int q1 = min(q0 + TILE, seq_len);

  load_tile_async<DK, THREADS>(qsmem, TILE, [&](int r) -> const elem_t * {
    return q0 + r < seq_len ? q + ((i64)(seq_start + q0 + r) * Hq + hq) * DK : nullptr;
  });
  load_tile_async<DV, THREADS>(dosmem, TILE, [&](int r) -> const elem_t * {
    return q0 + r < seq_len ? dout + ((i64)(seq_start + q0 + r) * Hq + hq) * DV : nullptr;
  });
  cp_async_commit();

  // Keys the tile's rows may see.
#if NSA_MODE == 1
  const int kfirst = 0;
  const int kend = cmp_visible(q1 - 1, nkeys);
#elif NSA_MODE == 2
  const int kfirst = max(0, q0 - WINDOW + 1);
  const int kend = q1;
#else
  const int kfirst = 0;
  const int kend = q1;
#endif
  const int ntiles = kend > kfirst ? (kend - kfirst + TILE - 1) / TILE : 0;
  auto issue = [&](int it) {
    const int kt = kfirst + it * TILE;
    load_tile_async<DK, THREADS>(ksmem + (it & 1) * TILE * DK, TILE, [&](int r) -> const elem_t * {
      return kt + r < kend ? k + ((i64)(key_base + kt + r) * H + h) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(vsmem + (it & 1) * TILE * DV, TILE, [&](int r) -> const elem_t * {
      return kt + r < kend ? v + ((i64)(key_base + kt + r) * H + h) * DV : nullptr;
    });
    cp_async_commit();
  };
  if (ntiles > 0) issue(0);

  const int t_lo = q0 + warp * 16 + lane / 4;
  const int t_hi = t_lo + 8;
  auto row_of = [&](int t) { return (i64)(seq_start + t) * Hq + hq; };
  const float lse_lo = t_lo < seq_len ? lse[row_of(t_lo)] * NSA_LOG2E : NSA_NEG_INF;
  const float lse_hi = t_hi < seq_len ? lse[row_of(t_hi)] * NSA_LOG2E : NSA_NEG_INF;
  const float g_lo = t_lo < seq_len ? (gate == nullptr ? 1.f : gate[row_of(t_lo) * 3 + branch]) : 0.f;
  const float g_hi = t_hi < seq_len ? (gate == nullptr ? 1.f : gate[row_of(t_hi) * 3 + branch]) : 0.f;
  const float d_lo = t_lo < seq_len ? delta[row_of(t_lo) * 3 + branch] : 0.f;
  const float d_hi = t_hi < seq_len ? delta[row_of(t_hi) * 3 + branch] : 0.f;

  float dq_acc[DK / 8][4];
  zero_frags<DK / 8>(dq_acc);
  u32 qfrag[DK / 16][4];
  for (int it = 0; it < ntiles; it++) {
    if (it + 1 < ntiles) issue(it + 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (it == 0) load_a_fragments<DK>(qfrag, qsmem, warp * 16, lane);
    const int kt = kfirst + it * TILE;
    const elem_t *ks = ksmem + (it & 1) * TILE * DK;
    const elem_t *vs = vsmem + (it & 1) * TILE * DV;
    float s[TILE / 8][4];
    zero_frags<TILE / 8>(s);
    qk_mma<DK, TILE / 16>(s, qfrag, ks, 0, lane);
    float dp[TILE / 8][4];
    zero_frags<TILE / 8>(dp);
    qk_mma_smem<DV, TILE / 16>(dp, dosmem, warp * 16, vs, 0, lane);
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = kt + n * 8 + (lane % 4) * 2 + (e & 1);
        const bool hi = e >= 2;
        const int t = hi ? t_hi : t_lo;
        const float l2 = hi ? lse_hi : lse_lo;
        const bool ok = t < seq_len && key < kend && l2 != NSA_NEG_INF && visible(t, key, nkeys);
        const float p = ok ? exp2f(s[n][e] * scale_log2 - l2) : 0.f;
        s[n][e] = p * ((hi ? g_hi : g_lo) * dp[n][e] - (hi ? d_hi : d_lo)); // dS
      }
    }
    pv_mma<DK, TILE / 16>(dq_acc, s, ks, 0, lane);
    __syncthreads();
  }

#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int t = hh == 0 ? t_lo : t_hi;
    if (t >= seq_len) continue;
    const i64 row = row_of(t);
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      float2 *dst = reinterpret_cast<float2 *>(dq + row * DK + col);
      float2 acc = accumulate ? *dst : make_float2(0.f, 0.f);
      acc.x += dq_acc[n][2 * hh] * scale;
      acc.y += dq_acc[n][2 * hh + 1] * scale;
      *dst = acc;
    }
  }
}
