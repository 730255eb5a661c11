// nvcc-check: -DDK=128 -DDV=128 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DWINDOW=512
// nvcc-check: -DDK=64 -DDV=64 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=4 -DWINDOW=100 -DNSA_FP16
//
// Decoding against a KV cache, flash-decoding style: every branch's keys are cut into chunks (a multiple of 64
// keys, chosen by the host so the GPU fills), one CTA per (query, KV head, 16 query heads, chunk), so a single
// sequence at long context still fills the GPU, and each K/V tile is loaded once for the G heads of a group.
//   nsa_decode_partial (branch 0 cmp)   partial softmax over a chunk of visible compressed keys; keeps the raw
//                                       scores (log2 units) for the block scores
//   nsa_decode_cmp_topk                 merges the cmp chunks (o_cmp, lse_cmp), turns the raw scores into the
//                                       probabilities, sums them into selection-block scores (GQA sum, overlap
//                                       weights) and takes top-n with the forced blocks
//   nsa_decode_partial (1 slc, 2 win)   partial softmax over chunks of the selected blocks' keys / the window
//   nsa_decode_combine                  merges the slc and win chunks and writes the gated sum
//   nsa_decode_partial (3 dense) + nsa_decode_combine_dense: dense attention over the whole cache (the baseline)
// The cache is one buffer per sequence: k [cap, H, DK], v [cap, H, DV], kc/vc [capc, H, D]; seq_ptrs holds
// their addresses (k, v, kc, vc per sequence), seq_len the tokens held. Query r attends at position q_pos[r]
// of sequence q_seq[r]; its K/V are already in the cache.
#include "nsa_common.cuh"
#include "nsa_topk.cuh"

#define THREADS 128
#define ROWS 16
#define TILE 64

__device__ __forceinline__ int cmp_visible(int t, int tc) {
  return t < CMP_L - 1 ? 0 : min(tc, (t - CMP_L + 1) / CMP_D + 1);
}

struct DecodeArgs {
  const elem_t *q;                     // [Q, Hq, DK]
  const unsigned long long *seq_ptrs;  // [S][4]: k, v, kc, vc
  const int *seq_len;                  // [S]
  const int *q_seq;                    // [Q]
  const int *q_pos;                    // [Q]
  const int *block_indices;            // [Q, H, SEL_N]
};

/**
 * Partial attention of query r's G heads (16 at a time) over chunk blockIdx.z of a branch's keys. partial_m/l/o
 * [Q, Hq, slots] (+ DV for o): m in log2 units, o unnormalised; slot = slot0 + chunk. Branch 0 also stores the
 * raw scores (log2 units) in scores [Q, Hq, score_stride].
 */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_decode_partial(const elem_t *__restrict__ q, const unsigned long long *__restrict__ seq_ptrs,
                       const int *__restrict__ seq_len, const int *__restrict__ q_seq, const int *__restrict__ q_pos,
                       const int *__restrict__ block_indices, float *__restrict__ partial_m, float *__restrict__ partial_l,
                       float *__restrict__ partial_o, float *__restrict__ scores, int score_stride, int Hq, int H,
                       int branch, int slot0, int slots, float scale_log2, int chunk) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw); // ROWS x DK
  elem_t *ksmem = qsmem + ROWS * DK;                    // 2 x TILE x DK
  elem_t *vsmem = ksmem + 2 * TILE * DK;                // 2 x TILE x DV
  __shared__ int sel[SEL_N];
  __shared__ float merge_m[4][ROWS], merge_l[4][ROWS];

  const int r = blockIdx.x;
  const int G = Hq / H;
  const int gchunks = (G + ROWS - 1) / ROWS;
  const int h = blockIdx.y / gchunks;
  const int head0 = (blockIdx.y % gchunks) * ROWS;
  const int rows = min(ROWS, G - head0);
  const int seq = q_seq[r];
  const int t = q_pos[r];
  const int len = seq_len[seq];
  const int tc = len < CMP_L ? 0 : (len - CMP_L) / CMP_D + 1;
  const elem_t *kbase = reinterpret_cast<const elem_t *>(seq_ptrs[seq * 4 + (branch == 0 ? 2 : 0)]);
  const elem_t *vbase = reinterpret_cast<const elem_t *>(seq_ptrs[seq * 4 + (branch == 0 ? 3 : 1)]);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // The branch's keys as indices 0 .. nkeys and where index i lives (a cache row; -1 when hidden from t).
  int nkeys;
  int first = 0;
  if (branch == 1) {
    if (threadIdx.x < SEL_N) sel[threadIdx.x] = block_indices[((i64)r * H + h) * SEL_N + threadIdx.x];
    __syncthreads();
    int nsel = 0;
    while (nsel < SEL_N && sel[nsel] >= 0) nsel++;
    nkeys = nsel * SEL_L;
  } else if (branch == 0) {
    nkeys = cmp_visible(t, tc);
  } else if (branch == 2) {
    first = max(0, t - WINDOW + 1);
    nkeys = t - first + 1;
  } else {
    nkeys = t + 1;
  }
  auto key_row = [&](int i) -> int {
    if (branch == 1) {
      const int pos = sel[i / SEL_L] * SEL_L + i % SEL_L;
      return pos <= t ? pos : -1;
    }
    return first + i;
  };
  const int c0 = blockIdx.z * chunk;
  const int c1 = min(nkeys, c0 + chunk);
  const i64 prow = (i64)r * Hq + h * G + head0; // first output row (query r, head head0)
  if (c0 >= c1) {
    for (int i = threadIdx.x; i < rows; i += THREADS) {
      partial_m[(prow + i) * slots + slot0 + blockIdx.z] = NSA_NEG_INF;
      partial_l[(prow + i) * slots + slot0 + blockIdx.z] = 0.f;
    }
    return;
  }

  load_tile_async<DK, THREADS>(qsmem, ROWS, [&](int i) -> const elem_t * { return i < rows ? q + (prow + i) * DK : nullptr; });
  const int ntiles = (c1 - c0 + TILE - 1) / TILE;
  auto issue = [&](int it) {
    const int k0 = c0 + it * TILE;
    load_tile_async<DK, THREADS>(ksmem + (it & 1) * TILE * DK, TILE, [&](int i) -> const elem_t * {
      const int row = k0 + i < c1 ? key_row(k0 + i) : -1;
      return row >= 0 ? kbase + ((i64)row * H + h) * DK : nullptr;
    });
    load_tile_async<DV, THREADS>(vsmem + (it & 1) * TILE * DV, TILE, [&](int i) -> const elem_t * {
      const int row = k0 + i < c1 ? key_row(k0 + i) : -1;
      return row >= 0 ? vbase + ((i64)row * H + h) * DV : nullptr;
    });
    cp_async_commit();
  };
  issue(0);

  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  u32 qfrag[DK / 16][4];
  for (int it = 0; it < ntiles; it++) {
    if (it + 1 < ntiles) issue(it + 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (it == 0) load_a_fragments<DK>(qfrag, qsmem, 0, lane);
    const int k0 = c0 + it * TILE + warp * 16;
    float s[2][4];
    zero_frags<2>(s);
    qk_mma<DK, 1>(s, qfrag, ksmem + (it & 1) * TILE * DK, warp * 16, lane);
#pragma unroll
    for (int n = 0; n < 2; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int i = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
        const int row = lane / 4 + (e >= 2 ? 8 : 0);
        const bool ok = i < c1 && key_row(i) >= 0;
        s[n][e] = ok ? s[n][e] * scale_log2 : NSA_NEG_INF;
        if (branch == 0 && ok && row < rows) scores[(prow + row) * score_stride + i] = s[n][e];
      }
    }
    softmax_update<2, DV>(st, s, o);
    pv_mma<DV, 1>(o, s, vsmem + (it & 1) * TILE * DV, warp * 16, lane);
    __syncthreads();
  }

  // Merge the four warps' states, then write this chunk's partial for each row.
  float *merge_o = reinterpret_cast<float *>(ksmem); // 4 x ROWS x DV floats
  stage_warp_state<DV, 4>(st, o, merge_m, merge_l, merge_o, warp, lane);
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * DV; idx += THREADS) {
    const int row = idx / DV;
    const int col = idx % DV;
    float m, l;
    const float acc = merge_warp_states<DV, 4>(merge_m, merge_l, merge_o, row, col, &m, &l);
    const i64 slot = (prow + row) * slots + slot0 + blockIdx.z;
    partial_o[slot * DV + col] = acc;
    if (col == 0) {
      partial_m[slot] = m;
      partial_l[slot] = l;
    }
  }
}

/** Merges slots [s0, s1) of one row: returns lse (log2 units, -inf if empty) and writes o (normalised) if asked. */
__device__ __forceinline__ float merge_slots(const float *pm, const float *pl, const float *po, i64 row, int slots, int s0,
                                             int s1, float *o_out, int lane) {
  float m = NSA_NEG_INF;
  for (int s = s0; s < s1; s++) m = fmaxf(m, pm[row * slots + s]);
  if (m == NSA_NEG_INF) {
    if (o_out != nullptr)
      for (int c = lane; c < DV; c += 32) o_out[c] = 0.f;
    return NSA_NEG_INF;
  }
  float l = 0.f;
  for (int s = s0; s < s1; s++) l += pm[row * slots + s] == NSA_NEG_INF ? 0.f : exp2f(pm[row * slots + s] - m) * pl[row * slots + s];
  if (o_out != nullptr) {
    for (int c = lane; c < DV; c += 32) {
      float acc = 0.f;
      for (int s = s0; s < s1; s++) {
        const float ms = pm[row * slots + s];
        if (ms != NSA_NEG_INF) acc += exp2f(ms - m) * po[(row * slots + s) * DV + c];
      }
      o_out[c] = acc / l;
    }
  }
  return m + log2f(l);
}

/**
 * Per (query, KV head): the cmp branch's output and lse from its chunks, block scores from the raw scores, top-n.
 * Shared memory: Ns block scores (dynamic) and G lse values.
 */
extern "C" __global__ void __launch_bounds__(256)
    nsa_decode_cmp_topk(const float *__restrict__ partial_m, const float *__restrict__ partial_l,
                        const float *__restrict__ partial_o, const float *__restrict__ scores, int score_stride,
                        const int *__restrict__ seq_len, const int *__restrict__ q_seq, const int *__restrict__ q_pos,
                        float *__restrict__ o_cmp, float *__restrict__ lse_cmp, int *__restrict__ block_indices, int Hq,
                        int H, int slots, int cmp_slots) {
  extern __shared__ __align__(16) float sc[]; // block scores of candidates 0 .. t / SEL_L
  __shared__ float lse2[64];
  const int r = blockIdx.x;
  const int h = blockIdx.y;
  const int G = Hq / H;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int t = q_pos[r];
  const int len = seq_len[q_seq[r]];
  const int tc = len < CMP_L ? 0 : (len - CMP_L) / CMP_D + 1;
  const int visible = cmp_visible(t, tc);
  for (int g = warp; g < G; g += 8) {
    const i64 row = (i64)r * Hq + h * G + g;
    const float l2 = merge_slots(partial_m, partial_l, partial_o, row, slots, 0, cmp_slots, o_cmp + row * DV, lane);
    if (lane == 0) {
      lse2[g] = l2;
      lse_cmp[row] = l2 == NSA_NEG_INF ? NSA_NEG_INF : l2 * NSA_LN2;
    }
  }
  __syncthreads();
  const int current = t / SEL_L;
  // Block scores: one thread per candidate block, summing its overlapping compressed blocks and the G heads in order.
  for (int j = threadIdx.x; j <= current; j += blockDim.x) {
    const int i_lo = max(0, (j * SEL_L - CMP_L + CMP_D) / CMP_D);
    const int i_hi = min(visible, ((j + 1) * SEL_L - 1) / CMP_D + 1);
    float acc = 0.f;
    for (int i = i_lo; i < i_hi; i++) {
      const int start = i * CMP_D;
      const int overlap = min(start + CMP_L, (j + 1) * SEL_L) - max(start, j * SEL_L);
      if (overlap <= 0) continue;
      float p = 0.f;
      for (int g = 0; g < G; g++) p += exp2f(scores[((i64)r * Hq + h * G + g) * score_stride + i] - lse2[g]);
      acc += p * (float)overlap;
    }
    sc[j] = acc * (1.f / CMP_D);
  }
  __syncthreads();
  if (warp == 0) warp_top_n(sc, current, block_indices + ((i64)r * H + h) * SEL_N, lane);
}

/** Per (query, head), one warp: the slc and win outputs from their chunks, and the gated sum with o_cmp. */
extern "C" __global__ void nsa_decode_combine(const float *__restrict__ partial_m, const float *__restrict__ partial_l,
                                              const float *__restrict__ partial_o, const float *__restrict__ gate,
                                              const float *__restrict__ o_cmp, float *__restrict__ o_slc,
                                              float *__restrict__ o_win, float *__restrict__ out, float *__restrict__ lse_slc,
                                              float *__restrict__ lse_win, i64 rows, int slots, int slc_slot0, int win_slot0) {
  const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float ls = merge_slots(partial_m, partial_l, partial_o, row, slots, slc_slot0, win_slot0, o_slc + row * DV, lane);
  const float lw = merge_slots(partial_m, partial_l, partial_o, row, slots, win_slot0, slots, o_win + row * DV, lane);
  if (lane == 0) {
    lse_slc[row] = ls == NSA_NEG_INF ? NSA_NEG_INF : ls * NSA_LN2;
    lse_win[row] = lw == NSA_NEG_INF ? NSA_NEG_INF : lw * NSA_LN2;
  }
  __syncwarp();
  const float g0 = gate[row * 3], g1 = gate[row * 3 + 1], g2 = gate[row * 3 + 2];
  for (int c = lane; c < DV; c += 32) out[row * DV + c] = g0 * o_cmp[row * DV + c] + g1 * o_slc[row * DV + c] + g2 * o_win[row * DV + c];
}

/** Dense baseline: merges each (query, head)'s chunks into its output. */
extern "C" __global__ void nsa_decode_combine_dense(const float *__restrict__ partial_m, const float *__restrict__ partial_l,
                                                    const float *__restrict__ partial_o, float *__restrict__ out, i64 rows,
                                                    int slots) {
  const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  merge_slots(partial_m, partial_l, partial_o, row, slots, 0, slots, out + row * DV, lane);
}
