// nvcc-check: -DDK=128 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=16
// nvcc-check: -DDK=192 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=4 -DNSA_FP16
// nvcc-check: -DDK=64 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=3
// nvcc-check: -DDK=64 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=32
// nvcc-check: -DDK=128 -DCMP_L=64 -DCMP_D=64 -DSEL_L=64 -DSEL_N=16 -DGROUP=16 -DFA_WGMMA
// nvcc-check: -DDK=192 -DCMP_L=32 -DCMP_D=16 -DSEL_L=64 -DSEL_N=16 -DGROUP=3 -DNSA_FP16 -DFA_WGMMA
//
// Block scores and top-n, without the [T, Hq, Tc] probability matrix ever reaching global memory.
// A CTA takes P consecutive query positions of one sequence and all G query heads of one KV head (rows = P*G
// <= 128, 8 warps of 16 rows, row r = position r / G, head r % G). For each tile of 64 compressed keys it
// recomputes the scores, turns them into the cmp branch's probabilities with the lse of the cmp pass
// (p = exp(s - lse)), sums them over the G heads (in registers with warp shuffles when G is a power of two,
// through shared memory otherwise) and spreads them over the selection blocks they overlap (weight overlap / d):
// scores[P][Ns] live in shared memory. G (GROUP) is compiled in. Then one warp per position takes the forced blocks (0, the block before t's, t's own), then the
// best others (score descending, lower index on ties), sorts them and writes block_indices [N, H, n].
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

#define ROWS 128
#define BLOCK_N 64
#define THREADS 256
#define WARPS (THREADS / 32)
#define POW2_GROUP ((GROUP & (GROUP - 1)) == 0)
// Power-of-two G: a warp's 16 rows hold SEGS whole positions (G <= 16) or a sixteenth-multiple of one (G > 16).
#define SEGS (GROUP >= 16 ? 1 : 16 / GROUP)
#define PSTRIDE (BLOCK_N + 1) // padded rows of the generic path's probability tile (fewer bank conflicts)
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

extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_select_blocks(const elem_t *__restrict__ q, const elem_t *__restrict__ kc, const float *__restrict__ lse_cmp,
                      const int *__restrict__ cu_seqlens, const int *__restrict__ cu_cmp, const int2 *__restrict__ tiles,
                      int *__restrict__ block_indices, int Hq, int H, int P, int ns_stride, float scale_log2) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
#if SEL_USE_WGMMA
  elem_t *qsmem = reinterpret_cast<elem_t *>(wgmma_aligned(smem_raw));
#else
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw);
#endif
  elem_t *ksmem = qsmem + ROWS * DK;                                      // 2 stages of BLOCK_N x DK
  // Per-tile head sums: [WARPS][SEGS][BLOCK_N] (power-of-two G) or the probabilities [ROWS][PSTRIDE].
  float *psmem = reinterpret_cast<float *>(ksmem + 2 * BLOCK_N * DK);
  float *scores = psmem + (POW2_GROUP ? WARPS * SEGS * BLOCK_N : ROWS * PSTRIDE); // P x ns_stride block scores

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

  for (int i = threadIdx.x; i < P * ns_stride; i += THREADS) scores[i] = 0.f;
  load_tile_async<DK, THREADS, QTile>(qsmem, ROWS, [&](int r) -> const elem_t * {
    if (r >= rows) return nullptr;
    return q + ((i64)(seq_start + pos0 + r / G) * Hq + h * G + r % G) * DK;
  });
  cp_async_commit();

  const int last = pos0 + npos - 1;
  const int nkeys = cmp_visible(last, tc);
  const int ntiles = (nkeys + BLOCK_N - 1) / BLOCK_N;
  auto issue = [&](int it) {
    const int k0 = it * BLOCK_N;
    load_tile_async<DK, THREADS, KTile>(ksmem + (it & 1) * BLOCK_N * DK, BLOCK_N, [&](int r) -> const elem_t * {
      return k0 + r < nkeys ? kc + ((i64)(c_start + k0 + r) * H + h) * DK : nullptr;
    });
    cp_async_commit();
  };
  if (ntiles > 0) issue(0);

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
    if (it + 1 < ntiles) issue(it + 1);
    else cp_async_commit();
    cp_async_wait<1>();
#if SEL_USE_WGMMA
    fence_proxy_async_shared(); // the cp.async writes, before wgmma reads them through the async proxy
#endif
    __syncthreads();
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
#pragma unroll
    for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
        const bool hi = e >= 2;
        const bool ok = key < (hi ? vis_hi : vis_lo);
        s[n][e] = ok ? fast_exp2(s[n][e] * scale_log2 - (hi ? lse_hi : lse_lo)) : 0.f;
      }
    }
#if POW2_GROUP
    // Sum over the heads of each position with shuffles across the lanes holding its rows (g = lane / 4).
#pragma unroll
    for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
      for (int e = 0; e < (GROUP >= 16 ? 2 : 4); e++) {
        float v = GROUP >= 16 ? s[n][e] + s[n][e + 2] : s[n][e];
#pragma unroll
        for (int m = 4; m < 4 * (GROUP >= 8 ? 8 : GROUP); m <<= 1) v += __shfl_xor_sync(0xffffffff, v, m);
        const int g = lane / 4;
        if (GROUP >= 16 ? g == 0 : g % GROUP == 0) {
          const int seg = GROUP >= 16 ? 0 : (e < 2 ? g : g + 8) / GROUP;
          psmem[(warp * SEGS + seg) * BLOCK_N + n * 8 + (lane % 4) * 2 + (e & 1)] = v;
        }
      }
    }
#else
#pragma unroll
    for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) psmem[(e >= 2 ? r_hi : r_lo) * PSTRIDE + n * 8 + (lane % 4) * 2 + (e & 1)] = s[n][e];
    }
#endif
    __syncthreads();
    // Fold this tile into the block scores: one thread per (position, selection block) the tile touches.
    const int j_first = (k0 * CMP_D) / SEL_L;
    const int j_last = ((min(k0 + BLOCK_N, nkeys) - 1) * CMP_D + CMP_L - 1) / SEL_L;
    const int nj = j_last - j_first + 1;
    for (int w = threadIdx.x; w < npos * nj; w += THREADS) {
      const int pos = w / nj;
      const int j = j_first + w % nj;
      const int i_lo = max(k0, (j * SEL_L - CMP_L + CMP_D) / CMP_D); // first compressed block ending past j*l'
      const int i_hi = min(min(k0 + BLOCK_N, nkeys), ((j + 1) * SEL_L - 1) / CMP_D + 1);
      float acc = 0.f;
      for (int i = max(i_lo, 0); i < i_hi; i++) {
        const int start = i * CMP_D;
        const int overlap = min(start + CMP_L, (j + 1) * SEL_L) - max(start, j * SEL_L);
        if (overlap <= 0) continue;
        float ps = 0.f;
#if POW2_GROUP
        if (GROUP >= 16) {
          for (int w = 0; w < GROUP / 16; w++) ps += psmem[(pos * (GROUP / 16) + w) * BLOCK_N + (i - k0)];
        } else {
          ps = psmem[pos * BLOCK_N + (i - k0)]; // warp * SEGS + seg == pos
        }
#else
        for (int g = 0; g < G; g++) ps += psmem[(pos * G + g) * PSTRIDE + (i - k0)];
#endif
        acc += ps * (float)overlap;
      }
      scores[pos * ns_stride + j] += acc * (1.f / CMP_D);
    }
    __syncthreads();
  }

  // Top-n: one warp per position.
  for (int pos = warp; pos < npos; pos += THREADS / 32) {
    const int t = pos0 + pos;
    const int current = t / SEL_L;
    warp_top_n(scores + pos * ns_stride, current, block_indices + ((i64)(seq_start + t) * H + h) * SEL_N, lane);
  }
}
