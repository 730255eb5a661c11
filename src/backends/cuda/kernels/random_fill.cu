// nvcc-check: -DDK=64 -DDV=64
// nvcc-check: -DDK=64 -DDV=64 -DNSA_FP16
//
// Seeded random tensors made on the device, for benchmarks at lengths whose inputs would take seconds to build
// and upload from the host. A counter-based hash (splitmix64) of (seed, index) gives the same values for the same
// seed on any launch shape; Box-Muller turns pairs of uniforms into normals.
#include "nsa_common.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ float uniform01(unsigned long long seed, i64 i) {
  // 24 random bits -> (0, 1]: never 0, so log() below stays finite.
  return ((float)(splitmix64(seed * 0x100000001b3ull + (unsigned long long)i) >> 40) + 1.f) * (1.f / 16777216.f);
}

/** out[i] ~ N(0, std^2) in the element type. */
extern "C" __global__ void nsa_fill_normal(elem_t *__restrict__ out, i64 n, unsigned long long seed, float std) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const float u1 = uniform01(seed, 2 * i);
    const float u2 = uniform01(seed, 2 * i + 1);
    out[i] = float_to_elem(std * sqrtf(-2.f * __logf(u1)) * __cosf(6.2831853f * u2));
  }
}

/** out[i] ~ U(0, 1] in fp32 (gates). */
extern "C" __global__ void nsa_fill_uniform(float *__restrict__ out, i64 n, unsigned long long seed) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = uniform01(seed, i);
}
