// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK
// nvcc-check: -DDK=128 -DDV=128 -DSEL_L=64 -DSEL_N=16 -DSLC_BULK -DUNION_POSITIONS=4 -DUNION_MIN_BLOCKS=2
// nvcc-check: -DDK=192 -DDV=128 -DSEL_L=32 -DSEL_N=32 -DSLC_BULK -DUNION_POSITIONS=2 -DUNION_MIN_BLOCKS=3 -DNSA_FP16
// nvcc-check: -DDK=64 -DDV=128 -DSEL_L=128 -DSEL_N=8 -DSLC_BULK -DUNION_POSITIONS=8 -DUNION_STAGES=2 -DUNION_MIN_BLOCKS=1
//
// Selected attention, group-centric, over the union of consecutive positions' blocks (sm_90: TMA tiles): a CTA
// takes UNION_POSITIONS consecutive packed rows (query positions) and up to 16 query heads of one KV head, a warp a
// position. The blocks any of its positions chose are streamed once, ascending, as tiles of 32 tokens (TMA boxes
// through a ring of UNION_STAGES stages, refilled by a warp of its own as soon as every position's warp has let a
// stage go, so that the warps run apart by up to the ring's depth), and each warp multiplies the tiles of the
// blocks its own position chose: no position does more work than alone, and a block that several chose is read
// once for all of them. On random
// inputs only the forced blocks are shared (the union is ~3 + 13 P of 16 P blocks); where neighbouring positions
// choose alike (a trained model's locality) the union, and the bytes, shrink towards one position's.
// Each warp owns its 16 rows' whole softmax state, so nothing is merged across warps; the epilogue adds
// g_slc * o_slc to `out` as the one-position kernel's does (selected_attention.cu).
#include "nsa_common.cuh"
#include "nsa_gather_tiles.cuh"
#include "nsa_wgmma.cuh"

// The host's defaults (programs.ts): 3 positions, as many stages, 3 CTAs an SM at dk = dv = 128 (several small CTAs
// an SM beat larger unions, which take more instructions a useful tile with fewer warps a scheduler: H100,
// docs/performance.md).
#ifndef UNION_POSITIONS
#define UNION_POSITIONS 3
#endif
#ifndef UNION_STAGES
#define UNION_STAGES UNION_POSITIONS
#endif
#ifndef UNION_MIN_BLOCKS
#define UNION_MIN_BLOCKS 3 // CTAs per SM the registers must allow
#endif
#define POSITIONS UNION_POSITIONS
#define TILE 32 // keys a tile: one TMA box row count (tensor-map.ts, the tile of selectedTensorMaps)
#define THREADS (32 * POSITIONS + 32) // a warp a position, and one that issues the tiles
#define ROWS 16
#define MAX_UNION (POSITIONS * SEL_N)
#define MASK_WORDS ((MAX_UNION + 31) / 32)

#if SLC_USE_BULK
static_assert(SEL_L % TILE == 0 && DK % 64 == 0 && DV % 64 == 0, "TMA tiles: whole tiles of a block, 64-column boxes");
static_assert(SEL_N <= 32, "a warp holds a position's blocks a lane");
typedef WgmmaTile<TILE, DK> UnionKTile; // the boxes' 128-byte swizzle
typedef WgmmaTile<TILE, DV> UnionVTile;

extern "C" __global__ void __launch_bounds__(THREADS, UNION_MIN_BLOCKS)
    nsa_selected_union(const elem_t *__restrict__ q, const float *__restrict__ gate, const int *__restrict__ block_indices,
                       const int *__restrict__ row_seq, const int *__restrict__ cu_seqlens, float *__restrict__ out,
                       elem_t *__restrict__ out_final, void *__restrict__ branch_out, int branch_half, float *__restrict__ lse_out,
                       int Hq, int H, float scale_log2, int nrows, const __grid_constant__ TensorMapBytes k_map,
                       const __grid_constant__ TensorMapBytes v_map) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *ksmem = reinterpret_cast<elem_t *>(wgmma_aligned(smem_raw)); // UNION_STAGES x TILE x DK (1024-byte aligned)
  elem_t *vsmem = ksmem + UNION_STAGES * TILE * DK;                     // UNION_STAGES x TILE x DV
  elem_t *qsmem = vsmem + UNION_STAGES * TILE * DV;                     // POSITIONS x ROWS x DK
  __shared__ int first_token[MAX_UNION];   // each position's blocks by first packed token; -1 where none
  __shared__ unsigned char is_first[MAX_UNION];
  __shared__ int union_first[MAX_UNION];   // the union, ascending
  __shared__ unsigned chosen[POSITIONS][MASK_WORDS]; // bit u: this position chose union block u
  __shared__ int union_size;
  __shared__ __align__(8) unsigned long long full_bar[UNION_STAGES];  // a tile has landed (TMA's bytes)
  __shared__ __align__(8) unsigned long long empty_bar[UNION_STAGES]; // every position's warp is done with it

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const i64 row0 = (i64)blockIdx.x * POSITIONS;
  const i64 row = row0 + warp; // this warp's position (packed token); the producer warp has none
  const bool live = warp < POSITIONS && row < nrows;
  const int h = blockIdx.y;
  const int G = Hq / H;
  const int head0 = blockIdx.z * ROWS;
  const int rows = min(ROWS, G - head0);
  const i64 last_row = min(row0 + POSITIONS, (i64)nrows) - 1; // tiles wholly past it are not loaded

  if (warp < POSITIONS && lane < SEL_N) {
    const int b = live ? block_indices[(row * H + h) * SEL_N + lane] : -1;
    first_token[warp * SEL_N + lane] = b >= 0 ? cu_seqlens[row_seq[row]] + b * SEL_L : -1;
  }
  if (warp < POSITIONS && lane < MASK_WORDS) chosen[warp][lane] = 0u;
  if (threadIdx.x == 0) union_size = 0;
  if (threadIdx.x < UNION_STAGES) {
    mbarrier_init(&full_bar[threadIdx.x], 1); // TMA fills every row of a loaded tile
    mbarrier_init(&empty_bar[threadIdx.x], POSITIONS);
  }
  mbarrier_init_fence();
  load_tile_async<DK, THREADS>(qsmem, POSITIONS * ROWS, [&](int r) -> const elem_t * {
    const i64 qrow = row0 + r / ROWS;
    return qrow < nrows && r % ROWS < rows ? q + (qrow * Hq + h * G + head0 + r % ROWS) * DK : nullptr;
  });
  cp_async_commit();
  __syncthreads();

  // The union: an entry counts once, where it first appears; its rank among the distinct values is its place.
  const int j = threadIdx.x; // THREADS >= MAX_UNION since SEL_N <= 32
  const int mine = j < MAX_UNION ? first_token[j] : -1;
  if (j < MAX_UNION) {
    bool first = mine >= 0;
    for (int i = 0; i < (j / SEL_N) * SEL_N && first; i++) first = first_token[i] != mine; // earlier positions' lists
    is_first[j] = first;
    if (first) atomicAdd(&union_size, 1);
  }
  __syncthreads();
  if (mine >= 0) {
    int rank = 0;
    for (int i = 0; i < MAX_UNION; i++) rank += is_first[i] && first_token[i] >= 0 && first_token[i] < mine;
    if (is_first[j]) union_first[rank] = mine;
    atomicOr(&chosen[j / SEL_N][rank / 32], 1u << (rank % 32));
  }
  __syncthreads();
  const int ntiles = union_size * (SEL_L / TILE);
  auto tile_token = [&](int it) { return union_first[it / (SEL_L / TILE)] + (it % (SEL_L / TILE)) * TILE; };

  auto issue = [&](int it) {
    const int stage = it % UNION_STAGES;
    const int token = tile_token(it);
    if (token > last_row) {
      mbarrier_arrive(&full_bar[stage]);
      return;
    }
    mbarrier_arrive_expect_tx(&full_bar[stage], TILE * (DK + DV) * 2);
#pragma unroll
    for (int c = 0; c < DK / 64; c++) tma_load_3d(ksmem + (stage * DK + c * 64) * TILE, &k_map, c * 64, h, token, &full_bar[stage]);
#pragma unroll
    for (int c = 0; c < DV / 64; c++) tma_load_3d(vsmem + (stage * DV + c * 64) * TILE, &v_map, c * 64, h, token, &full_bar[stage]);
  };

  cp_async_wait<0>();
  __syncthreads();
  if (warp == POSITIONS) {
    // The producer: refills a stage once every position's warp has let it go.
    if (lane == 0) {
      for (int it = 0; it < ntiles; it++) {
        if (it >= UNION_STAGES) mbarrier_wait(&empty_bar[it % UNION_STAGES], (it / UNION_STAGES - 1) & 1);
        issue(it);
      }
    }
    return;
  }

  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  u32 qfrag[DK / 16][4];
  load_a_fragments<DK>(qfrag, qsmem, warp * ROWS, lane);
  for (int it = 0; it < ntiles; it++) {
    // Every warp waits for every tile (a warp that skipped phases could mistake a later one's parity), multiplies it
    // if its position chose the block, then releases the stage.
    const int stage = it % UNION_STAGES;
    mbarrier_wait(&full_bar[stage], (it / UNION_STAGES) & 1);
    const int u = it / (SEL_L / TILE);
    const int token = tile_token(it);
    if (((chosen[warp][u / 32] >> (u % 32)) & 1u) && token <= row) { // warp-uniform: this position's block, keys <= t
      float s[4][4];
      zero_frags<4>(s);
      qk_mma<DK, 2, UnionKTile>(s, qfrag, ksmem + stage * TILE * DK, 0, lane);
      if (token + TILE - 1 > row) { // the tail of the position's own block
#pragma unroll
        for (int n = 0; n < 4; n++) {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            if (token + n * 8 + (lane % 4) * 2 + (e & 1) > row) s[n][e] = NSA_NEG_INF;
          }
        }
      }
      softmax_update_settled<4, DV>(st, s, o, scale_log2);
      pv_mma<DV, 2, UnionVTile>(o, s, vsmem + stage * TILE * DV, 0, lane);
    }
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&empty_bar[stage]);
  }

  // Epilogue: this warp's 16 rows, two a thread (lane / 4 and + 8), a pair of columns per 8-column fragment.
  if (!live) return;
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    float lse;
    const float l = softmax_finish_row(st, hh, &lse);
    const int r = lane / 4 + hh * 8;
    if (r >= rows) continue;
    const i64 orow = row * Hq + h * G + head0 + r;
    if (lane % 4 == 0) lse_out[orow] = lse;
    const float g = gate[orow * 3 + 1];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float2 prev[DV / 8];
#pragma unroll
    for (int n = 0; n < DV / 8; n++) prev[n] = *reinterpret_cast<const float2 *>(out + orow * DV + n * 8 + (lane % 4) * 2);
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      const float x0 = o[n][2 * hh] * inv;
      const float x1 = o[n][2 * hh + 1] * inv;
      if (branch_out != nullptr) store_branch2(branch_out, orow * DV + col, x0, x1, branch_half != 0);
      const float y0 = prev[n].x + g * x0;
      const float y1 = prev[n].y + g * x1;
      if (out_final != nullptr) *reinterpret_cast<u32 *>(out_final + orow * DV + col) = pack_elem2(y0, y1);
      else *reinterpret_cast<float2 *>(out + orow * DV + col) = make_float2(y0, y1);
    }
  }
}
#endif
