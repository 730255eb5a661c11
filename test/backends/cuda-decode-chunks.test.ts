// The three-launch decode step's chunks of compressed keys, without a GPU: they shrink at small batches until about
// one CTA per SM has one, within 64 .. 256 keys and at most 32 chunks a row.

import { describe, expect, it } from 'vitest';
import { threeLaunchCmpSmallest } from '../../src/backends/cuda/nsa/cuda-kv-cache.js';

describe('threeLaunchCmpSmallest', () => {
  const SMS = 132;
  it('spreads one sequence over the SMs: 64-key chunks for 1024 or 2048 compressed keys (4 rows)', () => {
    expect(threeLaunchCmpSmallest(1024, 4, SMS)).toBe(64);
    expect(threeLaunchCmpSmallest(2048, 4, SMS)).toBe(64);
    expect(threeLaunchCmpSmallest(512, 4, SMS)).toBe(64);
  });

  it('keeps a row to 32 chunks: 128 keys for 4096, 256 for 8192 and more', () => {
    expect(threeLaunchCmpSmallest(4096, 4, SMS)).toBe(128);
    expect(threeLaunchCmpSmallest(8192, 4, SMS)).toBe(256);
    expect(threeLaunchCmpSmallest(65536, 1, SMS)).toBe(256);
  });

  it('stops shrinking once the rows fill the SMs', () => {
    expect(threeLaunchCmpSmallest(1024, 32, SMS)).toBe(128); // 256 keys would make 128 CTAs, 128 keys 256
    expect(threeLaunchCmpSmallest(2048, 32, SMS)).toBe(256);
    expect(threeLaunchCmpSmallest(4096, 32, SMS)).toBe(256);
    expect(threeLaunchCmpSmallest(100, 200, SMS)).toBe(256);
  });

  it('takes 64 keys for a handful of compressed keys (the step counts at least one)', () => {
    expect(threeLaunchCmpSmallest(1, 4, SMS)).toBe(64);
  });
});
