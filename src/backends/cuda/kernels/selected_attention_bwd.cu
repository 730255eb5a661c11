// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=16 -DNSA_FP16
// nvcc-check: -DDK=64 -DDV=64 -DSEL_L=128 -DSEL_N=4
//
// Backward of the selected branch, with no atomics:
//   nsa_slc_bwd_dq    group-centric like the forward: a CTA per (query position, KV head, 16 heads) streams the
//                     selected blocks; each warp takes 16 keys of a tile, and the warps' dQ parts are summed in
//                     a fixed order at the end
//   nsa_slc_bwd_dkdv  key-centric through the inverse index (inverse_index.cu): a CTA per (KV head, block, 64
//                     keys) walks the (token, slot) pairs that chose the block, G heads each, in token order, and
//                     keeps dK, dV in registers
// P = exp(s - lse_slc), dS = P * (g_slc * dO V^T - delta_slc). Gradients are fp32 and added into their buffers.
#include "nsa_common.cuh"

#define WARPS 4
#define THREADS (32 * WARPS)
#define ROWS 16
#define TILE 64

extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_slc_bwd_dq(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                   const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                   const float *__restrict__ delta, const int *__restrict__ block_indices, const int *__restrict__ row_seq,
                   const int *__restrict__ cu_seqlens, float *__restrict__ dq, int Hq, int H, float scale_log2, float scale) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw); // ROWS x DK
  elem_t *dosmem = qsmem + ROWS * DK;                   // ROWS x DV
  elem_t *ksmem = dosmem + ROWS * DV;                   // TILE x DK
  elem_t *vsmem = ksmem + TILE * DK;                    // TILE x DV
  __shared__ int sel[SEL_N];

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
    if (k0 == 0) load_a_fragments<DK>(qfrag, qsmem, 0, lane);
    float s[2][4];
    zero_frags<2>(s);
    qk_mma<DK, 1>(s, qfrag, ksmem, warp * 16, lane);
    float dp[2][4];
    zero_frags<2>(dp);
    qk_mma_smem<DV, 1>(dp, dosmem, 0, vsmem, warp * 16, lane);
#pragma unroll
    for (int n = 0; n < 2; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = k0 + warp * 16 + n * 8 + (lane % 4) * 2 + (e & 1);
        const int hh = e >> 1;
        const bool ok = i < total && key_pos(i) <= t;
        const float p = ok ? exp2f(s[n][e] * scale_log2 - lse2[hh]) : 0.f;
        s[n][e] = p * (g[hh] * dp[n][e] - d[hh]);
      }
    }
    pv_mma<DK, 1>(dq_acc, s, ksmem, warp * 16, lane);
  }

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

/**
 * Partial dK, dV of keys [sub * 64, sub * 64 + 64) (sub = blockIdx.y) of one selection block, over one work item:
 * up to `item_entries` consecutive (token, slot) pairs of the pairs [offsets[key], offsets[key + 1]) that chose
 * the block (key = h * total_blocks + global block). Items of a key are numbered from item_offsets[key]; the grid
 * is an upper bound on the items. Each item writes its own partial rows; nsa_slc_bwd_reduce sums them in order.
 * (Block 0 is chosen by every token: one CTA per block would serialise all of them.)
 */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_slc_bwd_dkdv(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                     const elem_t *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ gate,
                     const float *__restrict__ delta, const int *__restrict__ offsets, const int *__restrict__ item_offsets,
                     const int2 *__restrict__ entries, const int *__restrict__ block_seq, const int *__restrict__ cu_blocks,
                     const int *__restrict__ cu_seqlens, float *__restrict__ partial_k, float *__restrict__ partial_v, int Hq,
                     int H, int total_blocks, int item_entries, float scale_log2, float scale) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *ksmem = reinterpret_cast<elem_t *>(smem_raw); // TILE x DK
  elem_t *vsmem = ksmem + TILE * DK;                    // TILE x DV
  elem_t *qsmem = vsmem + TILE * DV;                    // TILE x DK (gathered rows)
  elem_t *dosmem = qsmem + TILE * DK;                   // TILE x DV
  __shared__ float row_lse[TILE], row_gate[TILE], row_delta[TILE];
  __shared__ int row_t[TILE];

  const int nkeys_total = H * total_blocks;
  const int b = blockIdx.x;
  if (b >= item_offsets[nkeys_total]) return;
  int lo = 0;
  int hi = nkeys_total - 1;
  while (lo < hi) { // the key whose item range holds b
    const int mid = (lo + hi + 1) / 2;
    if (item_offsets[mid] <= b) lo = mid;
    else hi = mid - 1;
  }
  const int key = lo;
  const int h = key / total_blocks;
  const int gblock = key % total_blocks;
  const int seq = block_seq[gblock];
  const int j = gblock - cu_blocks[seq];
  const int seq_start = cu_seqlens[seq];
  const int seq_len = cu_seqlens[seq + 1] - seq_start;
  const int key0 = j * SEL_L + blockIdx.y * TILE; // first local token of this CTA's keys
  if (key0 >= min((j + 1) * SEL_L, seq_len)) return;
  const int nk = min(TILE, min((j + 1) * SEL_L, seq_len) - key0);
  const int G = Hq / H;
  const int per_tile = max(1, TILE / G);
  const int e_begin = offsets[key] + (b - item_offsets[key]) * item_entries;
  const int e_end = min(offsets[key + 1], e_begin + item_entries);
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
    load_tile_async<DK, THREADS>(qsmem, TILE, [&](int r) -> const elem_t * {
      return r < rows ? q + ((i64)entries[e0 + r / G].x * Hq + h * G + r % G) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(dosmem, TILE, [&](int r) -> const elem_t * {
      return r < rows ? dout + ((i64)entries[e0 + r / G].x * Hq + h * G + r % G) * DV : nullptr;
    });
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
    __syncthreads();
    float pt[TILE / 8][4];
    zero_frags<TILE / 8>(pt);
    qk_mma_smem<DK, TILE / 16>(pt, ksmem, warp * 16, qsmem, 0, lane);
    float dpt[TILE / 8][4];
    zero_frags<TILE / 8>(dpt);
    qk_mma_smem<DV, TILE / 16>(dpt, vsmem, warp * 16, dosmem, 0, lane);
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int rl = n * 8 + (lane % 4) * 2 + (e & 1);
        const int kk = e < 2 ? key_lo : key_hi;
        const bool ok = row_t[rl] >= 0 && kk - key0 < nk && kk <= row_t[rl];
        const float p = ok ? exp2f(pt[n][e] * scale_log2 - row_lse[rl]) : 0.f;
        dpt[n][e] = p * (row_gate[rl] * dpt[n][e] - row_delta[rl]);
        pt[n][e] = p * row_gate[rl];
      }
    }
    pv_mma<DV, TILE / 16>(dv_acc, pt, dosmem, 0, lane);
    pv_mma<DK, TILE / 16>(dk_acc, dpt, qsmem, 0, lane);
  }
  cp_async_wait<0>();

  // This item's partial rows: [item][sub][64 keys][D].
  const i64 prow0 = ((i64)b * gridDim.y + blockIdx.y) * TILE;
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    const int r = warp * 16 + lane / 4 + hh * 8;
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      *reinterpret_cast<float2 *>(partial_k + (prow0 + r) * DK + col) =
          make_float2(dk_acc[n][2 * hh] * scale, dk_acc[n][2 * hh + 1] * scale);
    }
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      *reinterpret_cast<float2 *>(partial_v + (prow0 + r) * DV + col) = make_float2(dv_acc[n][2 * hh], dv_acc[n][2 * hh + 1]);
    }
  }
}

/**
 * dK, dV of the selected branch: for each key row (token of KV head h), the sum in item order of its block's
 * items' partial rows, added into dk, dv. One thread per (key row, channel): grid.x over tokens * H.
 */
extern "C" __global__ void nsa_slc_bwd_reduce(const float *__restrict__ partial_k, const float *__restrict__ partial_v,
                                              const int *__restrict__ item_offsets, const int *__restrict__ row_seq,
                                              const int *__restrict__ cu_seqlens, const int *__restrict__ cu_blocks,
                                              float *__restrict__ dk, float *__restrict__ dv, int H, int total_blocks,
                                              int subs) {
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
    float *dst = is_key ? dk : dv;
    dst[krow * dim + col] += sum;
  }
}
