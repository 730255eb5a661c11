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

/**
 * Adds amplitude * sin(2 pi (t / P_d + u_d)) to element (t, ., d) of a [tokens, rows, D] tensor, t the packed token:
 * a slowly varying component of each position, the same for every row (head), with periods P_d = 256 * 2^(8 d / D)
 * tokens and phases u_d from the seed. Added to q and k, each with its own seed, it makes scores depend smoothly on
 * both positions, so neighbouring queries choose alike (benchmark inputs `smooth`, src/nsa/random-inputs.ts).
 */
extern "C" __global__ void nsa_add_wave(elem_t *__restrict__ x, i64 n, int row_elems, int D, unsigned long long seed, float amplitude) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const i64 t = i / row_elems;
    const int d = (int)(i % D);
    const double period = 256.0 * exp2(8.0 * d / D);
    const double turns = fmod((double)t, period) / period + (double)uniform01(seed, d);
    x[i] = float_to_elem(elem_to_float(x[i]) + amplitude * (float)sin(6.283185307179586 * turns));
  }
}
