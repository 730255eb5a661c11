import { defineConfig } from 'vitest/config';

// The CPU suite: everything under test/ except the GPU suite, which has its own config.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    exclude: ['test/gpu/**', 'node_modules/**'],
    testTimeout: 60_000,
    reporters: ['default'],
  },
});
