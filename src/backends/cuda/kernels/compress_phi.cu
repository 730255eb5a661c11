// nvcc-check: -DDK=128 -DDV=128 -DCMP_L=32 -DCMP_D=16
// nvcc-check: -DDK=64 -DDV=64 -DCMP_L=64 -DCMP_D=64 -DNSA_FP16
//
// Learned phi (linear, mlp) forward and backward: every step is a matrix product per KV head (blockIdx.z),
//   linear: Kc = U W + b                    mlp: A = U W1 + b1, Z = gelu(A), Kc = Z W2 + b2
// where U [Nc, l*D] is the flattened block of l keys (values) of each compressed token plus pe, gathered from the
// raw rows on the fly (never stored). The backward's products: dW = U^T dY, dU = dY W^T (and the mlp's chain),
// then dK gains dU gathered back onto the raw rows, dpe and the biases are column sums.
//
// One SIMT fp32 kernel serves every product (docs/decisions.md: at the paper's sizes these products are ~1-3% of
// the NSA forward+backward, so a tensor-core or cuBLAS path would not pay for its dependency). Each output
// element is summed by one thread in a fixed order, so the results are deterministic without atomics.
#include "nsa_common.cuh"

#define BM 64
#define BN 64
#define BK 16
#define THREADS 256

// Operand A of the product: a strided fp32 matrix, or U gathered from the raw rows (U[m][k], or U^T).
#define A_STRIDED 0
#define A_GATHER 1
#define A_GATHER_T 2
// Epilogue: store, store pre-activation and gelu (mlp forward), or multiply by gelu'(aux) (mlp backward).
#define EPI_STORE 0
#define EPI_GELU 1
#define EPI_DGELU 2

struct Gather {
  const elem_t *x;         // [N, H, dim] raw keys or values
  const float *pe;         // [H, l, dim]
  const int *cmp_row_seq;  // [Nc]
  const int *cu_seqlens;   // [S + 1]
  const int *cu_cmp;       // [S + 1]
};

__device__ __forceinline__ float gelu_tanh(float a) {
  const float c = 0.7978845608028654f;
  return 0.5f * a * (1.f + tanhf(c * (a + 0.044715f * a * a * a)));
}

__device__ __forceinline__ float gelu_tanh_derivative(float a) {
  const float c = 0.7978845608028654f;
  const float th = tanhf(c * (a + 0.044715f * a * a * a));
  return 0.5f * (1.f + th) + 0.5f * a * (1.f - th * th) * c * (1.f + 3.f * 0.044715f * a * a);
}

/** U[c][i] of head h: raw row (first of block c) + i / dim, channel i % dim, plus pe[h][i]. */
__device__ __forceinline__ float gather_u(const Gather &g, i64 c, int i, int h, int H, int dim) {
  const int seq = g.cmp_row_seq[c];
  const i64 first = g.cu_seqlens[seq] + (i64)(c - g.cu_cmp[seq]) * CMP_D;
  const int r = i / dim;
  const int col = i - r * dim;
  return elem_to_float(g.x[((first + r) * H + h) * dim + col]) + g.pe[(i64)h * CMP_L * dim + i];
}

/**
 * C[h][m][n] = epilogue(sum_k A[h][m][k] B[h][k][n] + bias[h][n]) for m < M, n < N; 64 x 64 outputs per CTA,
 * 4 x 4 per thread. Strides are in elements; the output goes to c (fp32) and/or c_half (the element type), both
 * at the c strides; EPI_GELU also writes gelu(...) to c2; EPI_DGELU multiplies by gelu'(aux) (aux at c strides).
 */
extern "C" __global__ void __launch_bounds__(THREADS)
    nsa_phi_gemm(int a_mode, const float *__restrict__ a, i64 a_sh, i64 a_sm, i64 a_sk, const elem_t *__restrict__ x,
                 const float *__restrict__ pe, const int *__restrict__ cmp_row_seq, const int *__restrict__ cu_seqlens,
                 const int *__restrict__ cu_cmp, int H, int dim, const float *__restrict__ b, i64 b_sh, i64 b_sk,
                 i64 b_sn, int M, int N, int K, const float *__restrict__ bias, int epi, const float *__restrict__ aux,
                 float *__restrict__ c, float *__restrict__ c2, elem_t *__restrict__ c_half, i64 c_sh, i64 c_sm,
                 i64 c_sn) {
  __shared__ float as[BK][BM + 4];
  __shared__ float bs[BK][BN + 4];
  const int h = blockIdx.z;
  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  const int tid = threadIdx.x;
  const int ty = tid / 16;
  const int tx = tid % 16;
  const Gather g{x, pe, cmp_row_seq, cu_seqlens, cu_cmp};
  // Consecutive threads walk the operand's contiguous dimension, so the loads coalesce.
  const bool a_k_fast = a_mode == A_GATHER || (a_mode == A_STRIDED && a_sk == 1);
  const bool b_n_fast = b_sn == 1;
  const float *a_h = a + (a_mode == A_STRIDED ? h * a_sh : 0);
  const float *b_h = b + h * b_sh;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int e0 = 0; e0 < BM * BK; e0 += THREADS) {
      const int e = e0 + tid;
      const int mm = a_k_fast ? e / BK : e % BM;
      const int kk = a_k_fast ? e % BK : e / BM;
      const int m = m0 + mm;
      const int k = k0 + kk;
      float value = 0.f;
      if (m < M && k < K) {
        if (a_mode == A_STRIDED) value = a_h[m * a_sm + k * a_sk];
        else if (a_mode == A_GATHER) value = gather_u(g, m, k, h, H, dim);
        else value = gather_u(g, k, m, h, H, dim);
      }
      as[kk][mm] = value;
    }
#pragma unroll
    for (int e0 = 0; e0 < BN * BK; e0 += THREADS) {
      const int e = e0 + tid;
      const int nn = b_n_fast ? e % BN : e / BK;
      const int kk = b_n_fast ? e / BN : e % BK;
      const int n = n0 + nn;
      const int k = k0 + kk;
      bs[kk][nn] = n < N && k < K ? b_h[k * b_sk + n * b_sn] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk++) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int n = n0 + tx + 16 * j;
      if (n >= N) continue;
      const i64 at = h * c_sh + m * c_sm + n * c_sn;
      float value = acc[i][j] + (bias != nullptr ? bias[(i64)h * N + n] : 0.f);
      if (epi == EPI_GELU) c2[at] = gelu_tanh(value);
      if (epi == EPI_DGELU) value *= gelu_tanh_derivative(aux[at]);
      if (c != nullptr) c[at] = value;
      if (c_half != nullptr) c_half[at] = float_to_elem(value);
    }
  }
}

/** out[h][j] = sum over rows m (in order) of src[h * s_h + m * s_m + j], j < cols: the biases' and pe's gradients. */
extern "C" __global__ void nsa_phi_column_sums(const float *__restrict__ src, float *__restrict__ out, int rows,
                                               int cols, i64 s_h, i64 s_m) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int h = blockIdx.y;
  if (j >= cols) return;
  const float *p = src + h * s_h + j;
  float acc = 0.f;
  for (int m = 0; m < rows; m++) acc += p[m * s_m];
  out[(i64)h * cols + j] = acc;
}

/**
 * dx[tau][h][:] += sum over the compressed tokens i whose block covers tau of dU[i][h][(tau - first_i) * dim + :]
 * (dU [Nc, H, l * dim]). One CTA per raw row and KV head, blocks summed in order.
 */
extern "C" __global__ void nsa_phi_scatter_rows(const float *__restrict__ du, float *__restrict__ dx,
                                                const int *__restrict__ row_seq, const int *__restrict__ cu_seqlens,
                                                const int *__restrict__ cu_cmp, int H, int dim) {
  const i64 row = blockIdx.x;
  const int h = blockIdx.y;
  const int seq = row_seq[row];
  const int tau = (int)(row - cu_seqlens[seq]);
  const int c_start = cu_cmp[seq];
  const int tc = cu_cmp[seq + 1] - c_start;
  int i_lo, i_hi;
  blocks_covering(tau, tc, &i_lo, &i_hi);
  const i64 width = (i64)CMP_L * dim;
  for (int col = threadIdx.x; col < dim; col += blockDim.x) {
    float acc = 0.f;
    for (int i = i_lo; i <= i_hi; i++) {
      const int r = tau - i * CMP_D;
      acc += du[((i64)(c_start + i) * H + h) * width + (i64)r * dim + col];
    }
    dx[(row * H + h) * dim + col] += acc;
  }
}
