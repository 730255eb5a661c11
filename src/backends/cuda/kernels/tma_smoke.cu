// A TMA round trip for the GPU runtime test (test/gpu/cuda-runtime.test.ts): one CTA copies a 64 x 64 box of a
// bf16 matrix into shared memory through a tensor map (tensor-map.ts) with the 128-byte swizzle, which lays it out
// as a WgmmaTile<64, 64> (nsa_wgmma.cuh), then writes it back row-major, un-swizzling through the same offsets the
// wgmma kernels use. The test checks the map's encoding, the swizzle and the zero fill past the tensor's end.
// Nothing on the NSA path uses it yet. Before sm_90 (no TMA) it does nothing.
#include "nsa_common.cuh"

extern "C" __global__ void tma_smoke_box(const __grid_constant__ TensorMapBytes map, elem_t *__restrict__ out, int x0, int y0) {
#if defined(NSA_HAS_BULK_COPY)
  __shared__ __align__(1024) elem_t tile[64 * 64];
  __shared__ __align__(8) unsigned long long bar;
  if (threadIdx.x == 0) {
    mbarrier_init(&bar, 1);
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(&bar, 64 * 64 * sizeof(elem_t));
    tma_load_2d(tile, &map, x0, y0, &bar);
  }
  mbarrier_wait(&bar, 0);
  for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) {
    const int row = i / 64;
    const int col = i % 64;
    // WgmmaTile<64, 64>::offset(row, col): 128-byte rows, 16-byte chunks XOR-permuted by row % 8.
    out[i] = tile[row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7)];
  }
#endif
}
