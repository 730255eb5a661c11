import { defineConfig } from 'vitest/config';

// GPU tests: each file skips, saying why, where no GPU (or no CUDA driver/NVRTC) is present. The 1.1M-token tests
// (test/gpu/nsa-long.test.ts, ~6 minutes on an H100, 66 GB of device and 80 GB of host memory) run apart, through
// `npm run test:gpu:long` (NSA_TEST_LONG=1), so that the kernels' suite stays a few minutes. The kernels' files run
// side by side, each in its own process (pool 'forks': one CUDA context each, which the GPU holds together easily):
// most of their time is NVRTC compiles and float64 references on the CPU, so the suite takes about as long as its
// longest file rather than the sum (14 minutes one after another, past a device command's 10-minute limit). Keep each
// file's share a few minutes: the forward's grew past 9 minutes on its own and is now four files (nsa-forward,
// nsa-forward-variants, nsa-select, nsa-select-direct; the selection tests alone took 323 s on an H100, the split suite
// 184 s, its longest file the backward's at 181 s).
const long = process.env['NSA_TEST_LONG'] === '1';
export default defineConfig({
  test: {
    include: long ? ['test/gpu/nsa-long.test.ts'] : ['test/gpu/**/*.test.ts'],
    exclude: long ? [] : ['test/gpu/nsa-long.test.ts', 'node_modules/**'],
    setupFiles: ['test/gpu/yield-between-tests.ts'],
    testTimeout: 600_000,
    hookTimeout: 600_000,
    pool: 'forks',
    fileParallelism: !long,
    reporters: ['default'],
  },
});
