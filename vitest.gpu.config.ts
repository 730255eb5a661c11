import { defineConfig } from 'vitest/config';

// GPU tests: each file skips, saying why, where no GPU (or no CUDA driver/NVRTC) is present.
export default defineConfig({
  test: {
    include: ['test/gpu/**/*.test.ts'],
    setupFiles: ['test/gpu/yield-between-tests.ts'],
    testTimeout: 600_000,
    hookTimeout: 600_000,
    fileParallelism: false,
    reporters: ['default'],
  },
});
