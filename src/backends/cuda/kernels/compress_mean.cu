// nvcc-check: -DDK=128 -DDV=128 -DCMP_L=64 -DCMP_D=64
// nvcc-check: -DDK=192 -DDV=128 -DCMP_L=32 -DCMP_D=16 -DNSA_FP16
//
// phi = mean: compressed token i of a sequence is the average of keys (values) [i*d, i*d + l), accumulated in
// fp32 and rounded once to the element type. One CTA per compressed token and KV head; each thread averages 8
// consecutive channels with 16-byte loads (threads [0, DK/8) for keys, the rest for values). Memory-bound: it
// reads K and V l/d times over and writes Tc rows, a small pass next to the attention kernels.
#include "nsa_common.cuh"

extern "C" __global__ void nsa_compress_mean(const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                                             elem_t *__restrict__ kc, elem_t *__restrict__ vc,
                                             const int *__restrict__ cmp_row_seq, const int *__restrict__ cu_seqlens,
                                             const int *__restrict__ cu_cmp, int H) {
  const i64 crow = blockIdx.x;
  const int h = blockIdx.y;
  const int seq = cmp_row_seq[crow];
  const int i = (int)(crow - cu_cmp[seq]);
  const i64 first = cu_seqlens[seq] + (i64)i * CMP_D;
  const bool is_key = threadIdx.x < DK / 8;
  const int dim = is_key ? DK : DV;
  const int c0 = (is_key ? threadIdx.x : threadIdx.x - DK / 8) * 8;
  const elem_t *src = is_key ? k : v;
  const uint4 packed = mean_of_rows8<CMP_L>(src + (first * H + h) * dim + c0, (i64)H * dim);
  elem_t *dst = is_key ? kc : vc;
  *reinterpret_cast<uint4 *>(dst + (crow * H + h) * dim + c0) = packed;
}

/**
 * Backward of the mean: each token's gradient gains dKc[i] / l from every compressed block i that covers it
 * (i*d <= tau < i*d + l). One CTA per token and KV head; adds into the fp32 dk, dv.
 */
extern "C" __global__ void nsa_compress_mean_bwd(const float *__restrict__ dkc, const float *__restrict__ dvc,
                                                 float *__restrict__ dk, float *__restrict__ dv,
                                                 const int *__restrict__ row_seq, const int *__restrict__ cu_seqlens,
                                                 const int *__restrict__ cu_cmp, int H) {
  const i64 row = blockIdx.x;
  const int h = blockIdx.y;
  const int seq = row_seq[row];
  const int tau = (int)(row - cu_seqlens[seq]);
  const int c_start = cu_cmp[seq];
  const int tc = cu_cmp[seq + 1] - c_start;
  int i_lo, i_hi;
  blocks_covering(tau, tc, &i_lo, &i_hi);
  for (int c = threadIdx.x; c < DK + DV; c += blockDim.x) {
    const bool is_key = c < DK;
    const int col = is_key ? c : c - DK;
    const int dim = is_key ? DK : DV;
    const float *src = is_key ? dkc : dvc;
    float acc = 0.f;
    for (int i = i_lo; i <= i_hi; i++) acc += src[((i64)(c_start + i) * H + h) * dim + col];
    float *dst = is_key ? dk : dv;
    dst[(row * H + h) * dim + col] += acc * (1.f / CMP_L);
  }
}
