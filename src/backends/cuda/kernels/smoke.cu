// Smoke-test kernels for the CUDA runtime layer (test/gpu/cuda-runtime.test.ts): a bf16 fill and a bf16 axpy
// with fp32 arithmetic, both grid-stride loops. Between them they take pointer, int, long long and float
// arguments. Nothing on the NSA path uses them.
#include <cuda_bf16.h>

extern "C" __global__ void smoke_fill_bf16(__nv_bfloat16* __restrict__ out, float value, int n) {
  const __nv_bfloat16 v = __float2bfloat16(value);
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = v;
}

// y[i] = a * x[i] + y[i], computed in fp32 and rounded to bf16 once.
extern "C" __global__ void smoke_axpy_bf16(__nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ x, float a,
                                           long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = __float2bfloat16(fmaf(a, __bfloat162float(x[i]), __bfloat162float(y[i])));
  }
}
