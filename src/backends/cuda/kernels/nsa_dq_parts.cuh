// The selected branch's fused dQ parts [N, Hq, SEL_N, SUBS, DK]: per (token, query head, slot, 64-key piece of the
// block) the row dS K over those keys, written by nsa_slc_bwd_dkdv (SLC_DQ_FUSED) and summed in (slot, piece)
// order by nsa_slc_bwd_dq_reduce or by the cmp + win dQ launch (flash_attention_bwd.cu). Storage: fp32, or with
// SLC_DQ_PARTS_BF16 bfloat16 bits (the fp32 range whatever the compute type; rounded to nearest even once, half the
// bytes of the pass's largest traffic). Needs DK.
//
// A row's DK parts are kept in MMA fragment order, not column order: writers and the dQ reader alike hold columns
// n * 8 + 2q, + 1 (n = 0 .. DK/8 - 1) in quad lane q = lane % 4, and lane q's pairs n = kP .. kP + P - 1 (P pairs
// in 16 bytes) are 16-byte chunk 4k + q. A writer stores P pairs with one 16-byte store, and a warp loading chunk
// set k of 8 rows reads 64 contiguous bytes of each (one row in DK / 8P loads, not DK / 8 loads of 4 bytes).
#pragma once
#include "nsa_common.cuh"

#define DQ_PART_KEYS 64 // keys a part covers
#ifdef SEL_L
#define DQ_PART_PIECES ((SEL_L + DQ_PART_KEYS - 1) / DQ_PART_KEYS) // a block's 64-key pieces: parts per (token, head, slot)
#endif

#ifdef SLC_DQ_PARTS_BF16
typedef unsigned short part_t;
typedef uint4 part_chunk_t; // 4 pairs
/** lo and hi rounded to bfloat16 (nearest even), lo in the low half: one cvt (sm_80), whatever elem_t is. */
__device__ __forceinline__ u32 bf16_pair(float lo, float hi) {
  u32 w;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
}
__device__ __forceinline__ float2 bf16_pair_value(u32 w) { return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u)); }
/** Pair i of a chunk. */
__device__ __forceinline__ float2 part_chunk_pair(const part_chunk_t &c, int i) {
  return bf16_pair_value(i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w);
}
/** Stores pairs (acc[i][2 hh], acc[i][2 hh + 1]), i < 4, as the chunk at `at`. */
__device__ __forceinline__ void store_part_chunk(part_t *at, const float (*acc)[4], int hh) {
  *reinterpret_cast<uint4 *>(at) = make_uint4(bf16_pair(acc[0][2 * hh], acc[0][2 * hh + 1]), bf16_pair(acc[1][2 * hh], acc[1][2 * hh + 1]),
                                              bf16_pair(acc[2][2 * hh], acc[2][2 * hh + 1]), bf16_pair(acc[3][2 * hh], acc[3][2 * hh + 1]));
}
/** Loads the parts at offsets at .. at + 3 of a row. */
__device__ __forceinline__ float4 load_part4(const part_t *at) {
  const uint2 w = *reinterpret_cast<const uint2 *>(at);
  const float2 a = bf16_pair_value(w.x), b = bf16_pair_value(w.y);
  return make_float4(a.x, a.y, b.x, b.y);
}
#else
typedef float part_t;
typedef float4 part_chunk_t; // 2 pairs
__device__ __forceinline__ float2 part_chunk_pair(const part_chunk_t &c, int i) { return i == 0 ? make_float2(c.x, c.y) : make_float2(c.z, c.w); }
__device__ __forceinline__ void store_part_chunk(part_t *at, const float (*acc)[4], int hh) {
  *reinterpret_cast<float4 *>(at) = make_float4(acc[0][2 * hh], acc[0][2 * hh + 1], acc[1][2 * hh], acc[1][2 * hh + 1]);
}
__device__ __forceinline__ float4 load_part4(const part_t *at) { return *reinterpret_cast<const float4 *>(at); }
#endif

#define DQ_PART_PAIRS (8 / (int)sizeof(part_t))         // pairs per 16-byte chunk
#define DQ_PART_WORDS (DK * (int)sizeof(part_t) / 2)    // 16-bit words per row of parts (SwizzledTile's unit)

/** Offset in a row of parts of pair n (columns n * 8 + 2q, + 1) of quad lane q; a chunk's start where n % P == 0. */
__device__ __forceinline__ int dq_part_offset(int n, int q) {
  return (n / DQ_PART_PAIRS) * (8 * DQ_PART_PAIRS) + q * (2 * DQ_PART_PAIRS) + (n % DQ_PART_PAIRS) * 2;
}
/** The column of the part at `offset` in a row (the inverse of dq_part_offset). */
__device__ __forceinline__ int dq_part_column(int offset) {
  const int k = offset / (8 * DQ_PART_PAIRS);
  const int q = (offset % (8 * DQ_PART_PAIRS)) / (2 * DQ_PART_PAIRS);
  const int i = (offset % (2 * DQ_PART_PAIRS)) / 2;
  return (k * DQ_PART_PAIRS + i) * 8 + 2 * q + (offset & 1);
}
/** Stores a C-fragment row's pairs n0 .. n0 + N - 1 (acc[0 .. N), row hh) of quad lane q; n0, N multiples of P. */
template <int N> __device__ __forceinline__ void store_part_pairs(part_t *row, int n0, int q, const float (*acc)[4], int hh) {
#pragma unroll
  for (int i = 0; i < N; i += DQ_PART_PAIRS) store_part_chunk(row + dq_part_offset(n0 + i, q), acc + i, hh);
}
