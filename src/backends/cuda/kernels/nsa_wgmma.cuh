// Hopper warpgroup MMA (wgmma, sm_90a): a warpgroup of 4 warps multiplies a 64-row A tile by a B tile read straight
// from shared memory, asynchronously, with fp32 accumulators in registers.
//
// Register layouts (PTX ISA, wgmma .m64nNk16): warp w of the warpgroup holds rows 16w .. 16w + 15, and within a
// warp every 8 columns of the accumulator (and every 16 of a register A operand) are laid out exactly like the
// mma.sync m16n8k16 C (and A) fragments of nsa_common.cuh. So d[N/8][4] below is the same array of C fragments the
// mma.sync kernels use, and the online softmax works on it unchanged.
//
// Shared-memory operands use the 128-byte swizzle: a tile of ROWS x COLS elements is stored as COLS/64 column
// blocks of [ROWS][64] (128-byte rows), each row's eight 16-byte chunks XOR-permuted by (row % 8), every block
// 1024-byte aligned (WgmmaTile). A descriptor names the start of a k-slice of such a tile:
//   K-major (the reduction dim is contiguous: Q and K for Q K^T): 8-row groups 1024 bytes apart (SBO); a k-step
//   of 16 moves the start 32 bytes inside the 128-byte row, or to the next column block.
//   MN-major (V for P V, transposed): 8-key groups 1024 bytes apart (SBO), 64-column blocks LBO bytes apart.
#pragma once
#include "nsa_common.cuh"

/**
 * The first 1024-byte aligned address of dynamic shared memory: wgmma's 128-byte swizzle is a function of address
 * bits 4-9, so its tiles start there (the host adds the slack).
 */
__device__ __forceinline__ unsigned char *wgmma_aligned(unsigned char *raw) { return raw + ((1024 - (smem_addr(raw) & 1023)) & 1023); }

#if defined(NSA_HAS_BULK_COPY)
/**
 * TMA-loads rows [row, row + ROWS) of head h from a [rows][heads][COLS] tensor map with boxes of 64 columns x 1 head
 * x 64 rows (tensor-map.ts) into a WgmmaTile<ROWS, COLS> at dst, completing on bar: one box per 64 x 64 block, which
 * the 128-byte swizzle lays out exactly as the tile's. One thread issues it.
 */
template <int ROWS, int COLS>
__device__ __forceinline__ void tma_load_tile(elem_t *dst, const void *map, int h, int row, unsigned long long *bar) {
#pragma unroll
  for (int c = 0; c < COLS / 64; c++) {
#pragma unroll
    for (int rb = 0; rb < ROWS / 64; rb++) tma_load_3d(dst + c * ROWS * 64 + rb * 64 * 64, map, c * 64, h, row + rb * 64, bar);
  }
}

/**
 * Where tile j of a ring of key/value tiles comes from: tiles [0, n0) walk the first key set, [n0, n1) the second,
 * [n1, total) the third (mode 3: the cmp keys, then the window's; mode 4: the keys before the window, the window's,
 * the cmp keys), `rows` key rows a tile from row0 / row1 / row2 on, of KV head h, through that set's tensor maps.
 * Plain fields, so that no key set is picked by a runtime index (which would put the struct in local memory).
 */
struct RingWalks {
  int n0;
  int n1;
  int total;
  int rows;
  int row0;
  int row1;
  int row2;
  int h;
  const TensorMapBytes *k_map0;
  const TensorMapBytes *v_map0;
  const TensorMapBytes *k_map1;
  const TensorMapBytes *v_map1;
  const TensorMapBytes *k_map2;
  const TensorMapBytes *v_map2;
  __device__ __forceinline__ int row(int j) const {
    return j >= n1 ? row2 + (j - n1) * rows : j >= n0 ? row1 + (j - n0) * rows : row0 + j * rows;
  }
  __device__ __forceinline__ const TensorMapBytes *k_map(int j) const { return j >= n1 ? k_map2 : j >= n0 ? k_map1 : k_map0; }
  __device__ __forceinline__ const TensorMapBytes *v_map(int j) const { return j >= n1 ? v_map2 : j >= n0 ? v_map1 : v_map0; }
};
#endif

/**
 * Element (row, col) of a ROWS x COLS tile in the 128-byte-swizzled column-block layout wgmma reads and TMA's
 * 128-byte swizzle writes (plain C++: kernels built for sm_90 without wgmma take it too).
 */
template <int ROWS, int COLS> struct WgmmaTile {
  static_assert(COLS % 64 == 0 && ROWS % 8 == 0, "wgmma tiles are whole 8 x 64 swizzle atoms");
  static constexpr int BLOCK_BYTES = ROWS * 128; // one [ROWS][64] column block
  __device__ static __forceinline__ int offset(int row, int col) {
    return (col >> 6) * ROWS * 64 + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
  }
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_HAS_WGMMA 1

typedef unsigned long long u64;

/** Shared-memory matrix descriptor, 128-byte swizzle; byte offsets are encoded in 16-byte units. */
__device__ __forceinline__ u64 wgmma_desc(u32 smem_byte_addr, u32 lbo_bytes, u32 sbo_bytes) {
  return (u64)((smem_byte_addr & 0x3FFFF) >> 4) | ((u64)((lbo_bytes >> 4) & 0x3FFF) << 16) |
         ((u64)((sbo_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

/** The byte offset of k-step ks of a K-major operand (row0 = 0): 64 columns a column block, 16 a step. */
template <int ROWS> __device__ __forceinline__ constexpr u32 wgmma_kmajor_step(int ks) { return (ks >> 2) * ROWS * 128 + (ks & 3) * 32; }
/** The byte offset of k-step ks of an MN-major operand: 16 rows of 128 bytes a step. */
__device__ __forceinline__ constexpr u32 wgmma_mnmajor_step(int ks) { return ks * 16 * 128; }

/** K-major operand: rows [row0, row0 + 8k) of a WgmmaTile<ROWS, *> at `tile`, reduction columns [16 ks, 16 ks + 16). */
template <int ROWS> __device__ __forceinline__ u64 wgmma_desc_kmajor(const elem_t *tile, int row0, int ks) {
  return wgmma_desc(smem_addr(tile) + wgmma_kmajor_step<ROWS>(ks) + row0 * 128, 16, 1024);
}

/**
 * A descriptor `bytes` further on in shared memory (a multiple of 16, the result inside the address field's 256 KB):
 * stepping one base descriptor through a product's k-steps costs an add each, where building every step's descriptor
 * from its address costs several integer and uniform-register instructions.
 */
__device__ __forceinline__ u64 wgmma_desc_advance(u64 desc, u32 bytes) { return desc + (bytes >> 4); }
/** k-step ks of a K-major operand of ROWS rows whose k-step 0 descriptor is `base`. */
template <int ROWS> __device__ __forceinline__ u64 wgmma_kmajor_at(u64 base, int ks) { return wgmma_desc_advance(base, wgmma_kmajor_step<ROWS>(ks)); }
/** k-step ks of an MN-major operand whose k-step 0 descriptor is `base`. */
__device__ __forceinline__ u64 wgmma_mnmajor_at(u64 base, int ks) { return wgmma_desc_advance(base, wgmma_mnmajor_step(ks)); }

/** MN-major operand (transposed B): rows (the reduction dim) [16 ks, 16 ks + 16) of a WgmmaTile<ROWS, *>, all columns. */
template <int ROWS> __device__ __forceinline__ u64 wgmma_desc_mnmajor(const elem_t *tile, int ks) {
  return wgmma_desc(smem_addr(tile) + wgmma_mnmajor_step(ks), ROWS * 128, 1024);
}

/**
 * Warpgroup register budgets (warp specialisation): a producer warpgroup gives registers back, consumers take them
 * (every warp of the warpgroup executes it; N a multiple of 8 in [24, 256]).
 */
template <int N> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

/** Orders earlier register and shared-memory accesses before the wgmma operations that follow. */
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/** Keeps the compiler from moving accesses of accumulators across the asynchronous wgmma that writes them. */
template <int N> __device__ __forceinline__ void wgmma_fence_operands(float d[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++) {
#pragma unroll
    for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[i][e])::"memory");
  }
}

// d (+)= A * B, m64 x N x k16. ss: A and B from shared memory. rs: A from registers (the mma.sync A fragment layout);
// TRANS_B = 1 reads B MN-major. `accumulate` 0 overwrites d.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n64(float d[8][4], u64 desc_a, u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." NSA_MMA_TYPE "." NSA_MMA_TYPE " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, %35;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)
      : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n128(float d[16][4], u64 desc_a, u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." NSA_MMA_TYPE "." NSA_MMA_TYPE " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, %67;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)
      : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n64(float d[8][4], const u32 a[4], u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." NSA_MMA_TYPE "." NSA_MMA_TYPE " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)
      : "memory");
}

template <int TRANS_B>
__device__ __forceinline__ void wgmma_rs_n128(float d[16][4], const u32 a[4], u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." NSA_MMA_TYPE "." NSA_MMA_TYPE " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)
      : "memory");
}

/** N = 64 or 128 dispatch of the forms above. */
template <int N, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_ss(float d[N / 8][4], u64 desc_a, u64 desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
  if constexpr (N == 64) wgmma_ss_n64<TRANS_B>(d, desc_a, desc_b, accumulate);
  else wgmma_ss_n128<TRANS_B>(d, desc_a, desc_b, accumulate);
}
/** stmatrix of four 8 x 8 b16 matrices, transposed: the inverse of ldmatrix_x4_trans (row addresses from lanes 8i .. 8i + 7). */
__device__ __forceinline__ void stmatrix_x4_trans(void *p, const u32 r[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(p)), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
}
template <int N, int TRANS_B>
__device__ __forceinline__ void wgmma_rs(float d[N / 8][4], const u32 a[4], u64 desc_b, int accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
  if constexpr (N == 64) wgmma_rs_n64<TRANS_B>(d, a, desc_b, accumulate);
  else wgmma_rs_n128<TRANS_B>(d, a, desc_b, accumulate);
}
#endif
