// Shared device code for the NSA kernels: element types, tensor-core MMA (m16n8k16, fp32 accumulate),
// ldmatrix/cp.async wrappers, a swizzled shared-memory tile layout, and the per-warp online softmax.
//
// Fragment layouts (PTX ISA, mma.m16n8k16): a thread with lane = 4*g + c (g = lane/4, c = lane%4) holds
//   A (16x16, row-major):  a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   B (16x8,  k x n):      b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
//   C (16x8,  fp32):       c0,c1 = C[g][2c..2c+1], c2,c3 = C[g+8][2c..2c+1]
// Compile-time configuration comes from -D defines set by the host (see the kernels' headers).
#pragma once

typedef long long i64;
typedef unsigned int u32;

/** A compile-time bool as a type (NVRTC has no <type_traits>): a generic lambda taking one compiles each branch apart. */
template <bool B> struct BoolConstant {
  static constexpr bool value = B;
};

#if defined(NSA_FP16)
#include <cuda_fp16.h>
typedef __half elem_t;
typedef __half2 elem2_t;
#define NSA_MMA_TYPE "f16"
__device__ __forceinline__ float elem_to_float(elem_t x) { return __half2float(x); }
__device__ __forceinline__ elem_t float_to_elem(float x) { return __float2half_rn(x); }
__device__ __forceinline__ u32 pack_elem2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<u32 *>(&h);
}
#else
#include <cuda_bf16.h>
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
#define NSA_MMA_TYPE "bf16"
__device__ __forceinline__ float elem_to_float(elem_t x) { return __bfloat162float(x); }
__device__ __forceinline__ elem_t float_to_elem(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ u32 pack_elem2(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32 *>(&h);
}
#endif


// The ungated branch outputs ([N, Hq, DV]) are fp32, or elem_t where the caller keeps them in the half dtype
// (`half`, a launch argument): the backward reads them once, and half the bytes is half the traffic.
// Stores elements i, i + 1 (i even).
__device__ __forceinline__ void store_branch2(void *base, i64 i, float x0, float x1, bool half) {
  if (half) *reinterpret_cast<u32 *>(static_cast<elem_t *>(base) + i) = pack_elem2(x0, x1);
  else *reinterpret_cast<float2 *>(static_cast<float *>(base) + i) = make_float2(x0, x1);
}
__device__ __forceinline__ float load_branch(const void *base, i64 i, bool half) {
  return half ? elem_to_float(static_cast<const elem_t *>(base)[i]) : static_cast<const float *>(base)[i];
}

#define NSA_LOG2E 1.4426950408889634f
#define NSA_LN2 0.6931471805599453f
#define NSA_NEG_INF (-__int_as_float(0x7f800000))

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core and copy primitives

__device__ __forceinline__ void mma_16816(float c[4], const u32 a[4], const u32 b[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." NSA_MMA_TYPE "." NSA_MMA_TYPE ".f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ u32 smem_addr(const void *p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

/** 16-byte global -> shared copy; `valid` false writes zeros (src-size 0) without reading global memory. */
__device__ __forceinline__ void cp_async_16(void *smem, const void *gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
/**
 * An L2 policy for data read once (streamed K/V): its lines go first when L2 needs room, so that what is written
 * and soon read again (partial results, score slices) stays there.
 */
__device__ __forceinline__ unsigned long long l2_evict_first_policy() {
  unsigned long long policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
/** cp_async_16 under an L2 cache policy. */
__device__ __forceinline__ void cp_async_16_hinted(void *smem, const void *gmem, bool valid, unsigned long long policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0), "l"(policy));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory tiles: ROWS x COLS elements, rows of COLS*2 bytes, 16-byte chunks XOR-swizzled by (row % 8) so
// that ldmatrix over 8 rows of one column chunk hits 8 different bank groups.

template <int COLS> struct SwizzledTile {
  static constexpr int CHUNKS = COLS / 8; // 16-byte chunks per row
  static_assert(COLS % 64 == 0, "tile widths are multiples of 64 elements (8 chunks) for the swizzle");
  __device__ static __forceinline__ int offset(int row, int col) {
    const int chunk = col >> 3;
    return row * COLS + (((chunk ^ (row & 7)) << 3) | (col & 7));
  }
};

/**
 * Rows of COLS elements padded by 16 bytes: a row lands in shared memory as one contiguous copy (the bulk copy
 * engine writes rows whole, it cannot swizzle), and the 16-byte shift per row keeps ldmatrix over 8 rows of one
 * column chunk on 8 different bank groups.
 */
template <int COLS> struct PaddedTile {
  static constexpr int STRIDE = COLS + 8;
  __device__ static __forceinline__ int offset(int row, int col) { return row * STRIDE + col; }
};

// ---------------------------------------------------------------------------------------------------------------
// Bulk copies (sm_90): one instruction moves a whole row global -> shared and completes on an mbarrier, so a tile
// of gathered rows costs one instruction per row instead of address arithmetic per 16 bytes.

/** A CUtensorMap's bytes (tensor-map.ts), passed by value as a `const __grid_constant__` kernel parameter. */
struct __align__(64) TensorMapBytes {
  unsigned long long opaque[16];
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define NSA_HAS_BULK_COPY 1
__device__ __forceinline__ void mbarrier_init(unsigned long long *bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
/** Orders the mbarrier inits before their use by the copy engine (then a __syncthreads). */
__device__ __forceinline__ void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::); }
/** Orders this thread's ordinary shared-memory writes before later bulk copies into the same memory. */
__device__ __forceinline__ void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::); }
/** Arrives on the barrier, announcing `bytes` more bytes the current phase must receive before it completes. */
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned long long *bar, u32 bytes) {
  asm volatile("{\n\t.reg .b64 state;\n\tmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n\t}\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
/** Waits until the phase of the given parity has completed. */
__device__ __forceinline__ void mbarrier_wait(unsigned long long *bar, u32 parity) {
  asm volatile(
      "{\n\t.reg .pred done;\n"
      "WAIT_%=:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra WAIT_%=;\n\t}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
/** Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared, completing on `bar`. */
__device__ __forceinline__ void bulk_copy_g2s(void *smem, const void *gmem, u32 bytes, unsigned long long *bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
/**
 * TMA: copies the box at element coordinates (x, y) (x innermost) of the 2-D tensor `map` describes (a
 * `const __grid_constant__` kernel parameter, tensor-map.ts) into `smem`, laid out (and swizzled) as the map says,
 * completing on `bar`; elements past the tensor's end arrive as zeros. One thread issues it.
 */
__device__ __forceinline__ void tma_load_2d(void *smem, const void *map, int x, int y, unsigned long long *bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
                   smem_addr(smem)),
               "l"(map), "r"(x), "r"(y), "r"(smem_addr(bar))
               : "memory");
}
/** tma_load_2d's 3-D form: the box at element coordinates (x, y, z), x innermost. */
__device__ __forceinline__ void tma_load_3d(void *smem, const void *map, int x, int y, int z, unsigned long long *bar) {
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
                   smem_addr(smem)),
               "l"(map), "r"(x), "r"(y), "r"(z), "r"(smem_addr(bar))
               : "memory");
}
/** Copies 4 bytes global -> shared asynchronously (zeros where !valid); completes with cp.async's groups or an mbarrier. */
__device__ __forceinline__ void cp_async_4(void *smem, const void *gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 4 : 0) : "memory");
}
/** An ordinary arrival (release: this thread's earlier shared-memory writes are seen by who waits). */
__device__ __forceinline__ void mbarrier_arrive(unsigned long long *bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
/** One arrival on `bar` once this thread's earlier cp.async copies have landed (the barrier's count includes it). */
__device__ __forceinline__ void cp_async_mbarrier_arrive(unsigned long long *bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
/** Named barriers (ids 1..15; 0 is __syncthreads): wait for `threads` arrivals, or arrive without waiting. */
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
/**
 * A warp's report that it is done with a ring stage, whose `done` counter counts the warps that are: true (on every
 * lane) for the warp that completes the count, which resets it and may then refill the stage. The fences order the
 * warps' earlier reads of the stage before the refill's writes.
 */
__device__ __forceinline__ bool ring_stage_release(int *done, int warps) {
  __syncwarp();
  int last = 0;
  if (threadIdx.x % 32 == 0) {
    __threadfence_block();
    last = atomicAdd(done, 1) == warps - 1;
    if (last) {
      *done = 0;
      __threadfence_block();
      fence_proxy_async_shared(); // then the copy engine writes the stage
    }
  }
  return __shfl_sync(0xffffffff, last, 0) != 0;
}
/** bulk_copy_g2s under an L2 cache policy. */
__device__ __forceinline__ void bulk_copy_g2s_hinted(void *smem, const void *gmem, u32 bytes, unsigned long long *bar,
                                                     unsigned long long policy) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
                   smem_addr(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
               : "memory");
}
#endif

/**
 * Key/value stages of COLS-element rows: bulk-copied padded rows (gathered rows on sm_90), else swizzled rows
 * filled by cp.async. ROW is the elements a row takes in shared memory.
 */
template <bool BULK, int COLS> struct StageTile {
  typedef SwizzledTile<COLS> Layout;
  static constexpr int ROW = COLS;
};
template <int COLS> struct StageTile<true, COLS> {
  typedef PaddedTile<COLS> Layout;
  static constexpr int ROW = COLS + 8;
};

/**
 * Asynchronously copies `rows` rows of COLS elements into a tile (swizzled unless another Layout is given). Row r comes from src(r) (a pointer to
 * COLS contiguous elements) or is zero-filled when src(r) is null. All threads of the block take part.
 */
template <int COLS, int THREADS, class Layout = SwizzledTile<COLS>, typename RowPtr>
__device__ __forceinline__ void load_tile_async(elem_t *tile, int rows, RowPtr src) {
  constexpr int CHUNKS = COLS / 8;
  for (int i = threadIdx.x; i < rows * CHUNKS; i += THREADS) {
    const int r = i / CHUNKS;
    const int c = i % CHUNKS;
    const elem_t *row = src(r);
    cp_async_16(tile + Layout::offset(r, c * 8), row == nullptr ? tile : row + c * 8, row != nullptr);
  }
}

/** load_tile_async under an L2 cache policy (swizzled rows). */
template <int COLS, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_tile_async_hinted(elem_t *tile, int rows, RowPtr src, unsigned long long policy) {
  constexpr int CHUNKS = COLS / 8;
  for (int i = threadIdx.x; i < rows * CHUNKS; i += THREADS) {
    const int r = i / CHUNKS;
    const int c = i % CHUNKS;
    const elem_t *row = src(r);
    cp_async_16_hinted(tile + SwizzledTile<COLS>::offset(r, c * 8), row == nullptr ? tile : row + c * 8, row != nullptr, policy);
  }
}

/** Same, with the copy split over the 32 lanes of one warp (for warp-private tiles). */
template <int COLS, typename RowPtr>
__device__ __forceinline__ void load_tile_async_warp(elem_t *tile, int rows, RowPtr src, int lane) {
  constexpr int CHUNKS = COLS / 8;
  for (int i = lane; i < rows * CHUNKS; i += 32) {
    const int r = i / CHUNKS;
    const int c = i % CHUNKS;
    const elem_t *row = src(r);
    cp_async_16(tile + SwizzledTile<COLS>::offset(r, c * 8), row == nullptr ? tile : row + c * 8, row != nullptr);
  }
}

/**
 * Starts the asynchronous copy of `rows` rows (ROWS at most; the rest are zero-filled) of D elements, `stride`
 * elements apart from `first`, into a tile, with all NT threads of the CTA. When the 16-byte chunks of a row divide
 * the threads evenly, each thread always copies the same chunk of every (NT / chunks)-th row, so the addresses are a
 * fixed stride apart (a few instructions a copy instead of the division and swizzle of the general loop).
 */
template <int ROWS, int D, class Layout, int NT>
__device__ __forceinline__ void copy_rows(elem_t *tile, const elem_t *first, i64 stride, int rows) {
  constexpr int CHUNKS = D / 8;
  if constexpr (NT % CHUNKS == 0 && ROWS % (NT / CHUNKS) == 0) {
    constexpr int STEP = NT / CHUNKS; // rows apart
    const int c = threadIdx.x % CHUNKS;
    const int r0 = threadIdx.x / CHUNKS;
    const elem_t *src = first + r0 * stride + c * 8;
#pragma unroll
    for (int i = 0; i < ROWS / STEP; i++) {
      const int r = r0 + i * STEP;
      elem_t *dst = tile + Layout::offset(r, c * 8);
      cp_async_16(dst, r < rows ? src + i * STEP * stride : dst, r < rows);
    }
  } else {
    load_tile_async<D, NT, Layout>(tile, ROWS, [&](int r) -> const elem_t * { return r < rows ? first + r * stride : nullptr; });
  }
}

/**
 * phi = mean over L rows of 8 consecutive channels: the rows start at `first` and lie `stride` elements apart;
 * accumulated in fp32 and rounded once to the element type, 8 of them packed for one 16-byte store.
 */
template <int L> __device__ __forceinline__ uint4 mean_of_rows8(const elem_t *first, i64 stride) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int r = 0; r < L; r++) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(first + r * stride);
    const elem_t *x = reinterpret_cast<const elem_t *>(&raw);
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] += elem_to_float(x[e]);
  }
  uint4 packed;
  u32 *words = reinterpret_cast<u32 *>(&packed);
#pragma unroll
  for (int e = 0; e < 4; e++) words[e] = pack_elem2(acc[2 * e] / L, acc[2 * e + 1] / L);
  return packed;
}

/** A fragments of a 16-row slice (rows r0..r0+15) of a [*, KDIM] tile (swizzled unless another Layout is given), all KDIM/16 k-steps. */
template <int KDIM, class Layout = SwizzledTile<KDIM>>
__device__ __forceinline__ void load_a_fragments(u32 a[KDIM / 16][4], const elem_t *tile, int r0, int lane) {
  const int row = r0 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < KDIM / 16; ks++) {
    const int col = ks * 16 + (lane >> 4) * 8;
    ldmatrix_x4(a[ks], tile + Layout::offset(row, col));
  }
}

/**
 * S[16 x 16*NP] += Q (A fragments, 16 x KDIM) * K^T for keys k0 .. k0 + 16*NP of a swizzled [*, KDIM] key tile.
 * s[2*p + h] is the C fragment of keys k0 + 16p + 8h .. +8.
 */
template <int KDIM, int NP, class Layout = SwizzledTile<KDIM>>
__device__ __forceinline__ void qk_mma(float s[2 * NP][4], const u32 a[KDIM / 16][4], const elem_t *ktile, int k0, int lane) {
#pragma unroll
  for (int p = 0; p < NP; p++) {
    const int key = k0 + p * 16 + (lane & 7) + (lane >> 4) * 8;
#pragma unroll
    for (int ks = 0; ks < KDIM / 16; ks++) {
      u32 b[4];
      ldmatrix_x4(b, ktile + Layout::offset(key, ks * 16 + ((lane >> 3) & 1) * 8));
      mma_16816(s[2 * p], a[ks], b);
      mma_16816(s[2 * p + 1], a[ks], b + 2);
    }
  }
}

/**
 * O[16 x VDIM] += P (16 x 16*NP, fp32 C fragments packed to elem pairs) * V[keys k0 .. k0 + 16*NP] from a swizzled
 * [*, VDIM] value tile. o[n] is the C fragment of value columns 8n .. 8n+7.
 */
template <int VDIM, int NP, class Layout = SwizzledTile<VDIM>>
__device__ __forceinline__ void pv_mma(float o[VDIM / 8][4], const float s[2 * NP][4], const elem_t *vtile, int k0, int lane) {
#pragma unroll
  for (int p = 0; p < NP; p++) {
    u32 a[4];
    a[0] = pack_elem2(s[2 * p][0], s[2 * p][1]);
    a[1] = pack_elem2(s[2 * p][2], s[2 * p][3]);
    a[2] = pack_elem2(s[2 * p + 1][0], s[2 * p + 1][1]);
    a[3] = pack_elem2(s[2 * p + 1][2], s[2 * p + 1][3]);
    const int key = k0 + p * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int n = 0; n < VDIM / 16; n++) {
      u32 b[4];
      ldmatrix_x4_trans(b, vtile + Layout::offset(key, n * 16 + (lane >> 4) * 8));
      mma_16816(o[2 * n], a, b);
      mma_16816(o[2 * n + 1], a, b + 2);
    }
  }
}

/**
 * Like qk_mma, with the A operand (16 rows x KDIM) read from a swizzled shared tile one k-step at a time instead of
 * held in registers (the backward kernels keep more accumulators and cannot afford both).
 */
template <int KDIM, int NP, class ALayout = SwizzledTile<KDIM>, class BLayout = SwizzledTile<KDIM>>
__device__ __forceinline__ void qk_mma_smem(float s[2 * NP][4], const elem_t *atile, int r0, const elem_t *ktile, int k0, int lane) {
  const int arow = r0 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < KDIM / 16; ks++) {
    u32 a[4];
    ldmatrix_x4(a, atile + ALayout::offset(arow, ks * 16 + (lane >> 4) * 8));
#pragma unroll
    for (int p = 0; p < NP; p++) {
      const int key = k0 + p * 16 + (lane & 7) + (lane >> 4) * 8;
      u32 b[4];
      ldmatrix_x4(b, ktile + BLayout::offset(key, ks * 16 + ((lane >> 3) & 1) * 8));
      mma_16816(s[2 * p], a, b);
      mma_16816(s[2 * p + 1], a, b + 2);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Online softmax for the two rows a thread holds in C fragments (row g and g + 8 of a 16-row slice).
// Scores are in log2 units (already multiplied by scale * log2(e)).

struct SoftmaxRows {
  float m[2];
  float l[2];
  __device__ __forceinline__ void init() {
    m[0] = m[1] = NSA_NEG_INF;
    l[0] = l[1] = 0.f;
  }
};

/** 2^x by the SFU alone (results below 2^-126 flush to 0, which a softmax weight may); exp2f adds denormal fix-ups. */
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/**
 * Folds one tile of scores s (masked entries already -inf) into the running max/sum and turns s into the
 * unnormalised probabilities 2^(scale_log2 * s - m); rescale[h] is what the output accumulated so far must be
 * multiplied by. Scores already in log2 units take scale_log2 = 1; raw ones get the scale folded into the exponent's FMA.
 */
template <int NS>
__device__ __forceinline__ void softmax_scores(SoftmaxRows &st, float s[NS][4], float rescale[2], float scale_log2 = 1.f) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float mx = NSA_NEG_INF;
#pragma unroll
    for (int n = 0; n < NS; n++) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    mx = fmaxf(st.m[h], mx * scale_log2);
    // A row with nothing visible so far keeps m = -inf; use 0 as the exponent base so exp2 gives 0, not NaN.
    const float base = mx == NSA_NEG_INF ? 0.f : mx;
    rescale[h] = fast_exp2(st.m[h] - base);
    st.m[h] = mx;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < NS; n++) {
      s[n][2 * h] = fast_exp2(fmaf(s[n][2 * h], scale_log2, -base));
      s[n][2 * h + 1] = fast_exp2(fmaf(s[n][2 * h + 1], scale_log2, -base));
      sum += s[n][2 * h] + s[n][2 * h + 1];
    }
    st.l[h] = st.l[h] * rescale[h] + sum;
  }
}

/** Multiplies the output rows a thread holds (row g by rescale[0], g + 8 by rescale[1]). */
template <int VDIM> __device__ __forceinline__ void rescale_rows(float o[VDIM / 8][4], const float rescale[2]) {
#pragma unroll
  for (int n = 0; n < VDIM / 8; n++) {
    o[n][0] *= rescale[0];
    o[n][1] *= rescale[0];
    o[n][2] *= rescale[1];
    o[n][3] *= rescale[1];
  }
}

/** softmax_scores, then the rescale of the output accumulators at once. */
template <int NS, int VDIM>
__device__ __forceinline__ void softmax_update(SoftmaxRows &st, float s[NS][4], float o[VDIM / 8][4]) {
  float rescale[2];
  softmax_scores<NS>(st, s, rescale);
  rescale_rows<VDIM>(o, rescale);
}

/**
 * softmax_update for loops over many small tiles: once every row of the warp has its running max, the rescale is
 * 2^0 = 1 exactly, so the multiply is skipped (same bits) by one warp vote instead of 2 * VDIM / 8 multiplies a
 * thread. On random scores a row's max settles within a few tiles. The whole warp must call it.
 */
template <int NS, int VDIM>
__device__ __forceinline__ void softmax_update_settled(SoftmaxRows &st, float s[NS][4], float o[VDIM / 8][4],
                                                       float scale_log2 = 1.f) {
  float rescale[2];
  softmax_scores<NS>(st, s, rescale, scale_log2);
  if (!__all_sync(0xffffffffu, rescale[0] == 1.f && rescale[1] == 1.f)) rescale_rows<VDIM>(o, rescale);
}

/** Row sums across the 4 lanes that share a row; returns the row's total l and its natural-log lse. */
__device__ __forceinline__ float softmax_finish_row(const SoftmaxRows &st, int h, float *lse_out) {
  float l = st.l[h];
  l += __shfl_xor_sync(0xffffffff, l, 1);
  l += __shfl_xor_sync(0xffffffff, l, 2);
  *lse_out = (l == 0.f || st.m[h] == NSA_NEG_INF) ? NSA_NEG_INF : (st.m[h] + log2f(l)) * NSA_LN2;
  return l;
}

// ---------------------------------------------------------------------------------------------------------------
// Warps that each took part of the keys of the same 16 rows (flash-decoding inside a CTA) merge their states
// through shared memory: merge_m/merge_l [NW][16], merge_o [NW][16][VDIM].

/** Stages this warp's row states (l summed over the row's four lanes) and unnormalised outputs. */
template <int VDIM, int NW>
__device__ __forceinline__ void stage_warp_state(const SoftmaxRows &st, const float o[VDIM / 8][4], float (*merge_m)[16],
                                                 float (*merge_l)[16], float *merge_o, int warp, int lane) {
#pragma unroll
  for (int hh = 0; hh < 2; hh++) {
    float l = st.l[hh];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    const int r = lane / 4 + hh * 8;
    if (lane % 4 == 0) {
      merge_m[warp][r] = st.m[hh];
      merge_l[warp][r] = l;
    }
#pragma unroll
    for (int n = 0; n < VDIM / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      merge_o[(warp * 16 + r) * VDIM + col] = o[n][2 * hh];
      merge_o[(warp * 16 + r) * VDIM + col + 1] = o[n][2 * hh + 1];
    }
  }
}

/**
 * The softmax backward's row terms on a tile's C fragments (NT groups of 8 columns; a thread's columns n * 8 +
 * (lane % 4) * 2 and + 1 index the tile's per-row gate and delta): dS^T = P^T (g dP^T - delta) into dpt, and P^T g
 * in place (for dV += (P^T g) dO).
 */
template <int NT>
__device__ __forceinline__ void softmax_grad_terms(float pt[NT][4], float dpt[NT][4], const float *row_gate, const float *row_delta,
                                                   int lane) {
#pragma unroll
  for (int n = 0; n < NT; n++) {
    const int rl = n * 8 + (lane % 4) * 2;
    const float2 g = *reinterpret_cast<const float2 *>(&row_gate[rl]);
    const float2 d = *reinterpret_cast<const float2 *>(&row_delta[rl]);
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const bool odd = e & 1;
      const float gg = odd ? g.y : g.x;
      dpt[n][e] = pt[n][e] * fmaf(gg, dpt[n][e], -(odd ? d.y : d.x));
      pt[n][e] *= gg;
    }
  }
}

/**
 * Row r, columns col .. col + COLS - 1 merged over the NW warps, in warp order: sets m (log2 units) and l once for
 * the row, and acc[c] to the sum of column col + c's o.
 */
template <int VDIM, int NW, int COLS = 1>
__device__ __forceinline__ void merge_warp_states(const float (*merge_m)[16], const float (*merge_l)[16], const float *merge_o,
                                                  int r, int col, float *m_out, float *l_out, float (&acc)[COLS]) {
  float m = NSA_NEG_INF;
  for (int w = 0; w < NW; w++) m = fmaxf(m, merge_m[w][r]);
  float l = 0.f;
#pragma unroll
  for (int c = 0; c < COLS; c++) acc[c] = 0.f;
  for (int w = 0; w < NW; w++) {
    const float f = merge_m[w][r] == NSA_NEG_INF ? 0.f : exp2f(merge_m[w][r] - m);
    l += f * merge_l[w][r];
#pragma unroll
    for (int c = 0; c < COLS; c++) acc[c] += f * merge_o[(w * 16 + r) * VDIM + col + c];
  }
  *m_out = m;
  *l_out = l;
}

/**
 * The last i in [0, n) with offsets[i] <= b (offsets ascending, offsets[0] <= b): whose range of items holds b. By a
 * whole warp, every lane getting the answer: each round its 32 lanes probe evenly spaced offsets and a ballot keeps
 * the span between the last probe at or below b and the next, so 8192 ranges take 3 dependent loads, not 13 (a
 * CTA's first work in the kernels that walk the inverse index's items, one CTA per item).
 */
__device__ __forceinline__ int range_holding(const int *offsets, int n, int b) {
  const int lane = threadIdx.x % 32;
  int lo = 0; // offsets[lo] <= b, and the answer is in [lo, hi]
  int hi = n - 1;
  for (;;) {
    const int step = (hi - lo + 32) / 32; // ceil((hi - lo + 1) / 32)
    const int probe = lo + lane * step;
    const unsigned below = __ballot_sync(0xffffffff, probe <= hi && offsets[probe] <= b); // a prefix of the lanes
    const int last = 31 - __clz(below);                                                     // lane 0 always holds
    if (step == 1) return lo + last;
    hi = min(hi, lo + (last + 1) * step - 1);
    lo += last * step;
  }
}

/** Where the selection block of an inverse-index key (h * total_blocks + global block) lies. */
struct IndexKey {
  int h;         // its KV head
  int j;         // the block's number in its sequence
  int seq_start; // the sequence's first token
  int seq_len;   // the sequence's tokens
};
__device__ __forceinline__ IndexKey index_key(int key, int total_blocks, const int *__restrict__ block_seq,
                                              const int *__restrict__ cu_blocks, const int *__restrict__ cu_seqlens) {
  IndexKey k;
  k.h = key / total_blocks;
  const int gblock = key % total_blocks;
  const int seq = block_seq[gblock];
  k.j = gblock - cu_blocks[seq];
  k.seq_start = cu_seqlens[seq];
  k.seq_len = cu_seqlens[seq + 1] - k.seq_start;
  return k;
}

#if defined(CMP_L) && defined(CMP_D)
/** The compressed blocks [*first, *last] of a sequence of tc that cover local token tau (i*d <= tau < i*d + l). */
__device__ __forceinline__ void blocks_covering(int tau, int tc, int *first, int *last) {
  *first = tau < CMP_L ? 0 : (tau - CMP_L) / CMP_D + 1; // first block with i*d + l > tau
  *last = min(tc - 1, tau / CMP_D);                     // last block with i*d <= tau
}
#endif

/** Packs fp32 C fragments of 16 columns (two n-blocks) into the A fragment of a 16-deep k-step. */
__device__ __forceinline__ void pack_a(u32 a[4], const float lo[4], const float hi[4]) {
  a[0] = pack_elem2(lo[0], lo[1]);
  a[1] = pack_elem2(lo[2], lo[3]);
  a[2] = pack_elem2(hi[0], hi[1]);
  a[3] = pack_elem2(hi[2], hi[3]);
}

template <int N> __device__ __forceinline__ void zero_frags(float f[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++) f[i][0] = f[i][1] = f[i][2] = f[i][3] = 0.f;
}
