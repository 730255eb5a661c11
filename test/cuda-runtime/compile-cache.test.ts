// The cubin cache (key, folder, atomic checked entries) and compileCuda over a fake compiler: hits, corrupted
// entries, NSA_PRINT_KERNEL and the missing-header hint. No NVRTC needed.
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { KernelCompileError } from '../../src/errors.js';
import { CubinCache, cubinCacheDir, cubinCacheKey, decodeEntry, encodeEntry } from '../../src/backends/cuda/cubin-cache.js';
import { compileCuda, nvrtcOptions, printRequested, type CudaCompiler } from '../../src/backends/cuda/nvrtc.js';

const base = { source: '__global__ void k() {}', options: ['-DA=1', '-DB=2'], nvrtcVersion: '13.0', arch: 'sm_90a' };

describe('cubinCacheKey', () => {
  it('is a stable sha256 that changes with the source, each option, option order, NVRTC version and arch', () => {
    const key = cubinCacheKey(base);
    expect(key).toMatch(/^[0-9a-f]{64}$/);
    expect(cubinCacheKey({ ...base })).toBe(key);
    const variants = [
      { ...base, source: `${base.source} ` },
      { ...base, options: ['-DA=1', '-DB=3'] },
      { ...base, options: ['-DB=2', '-DA=1'] },
      { ...base, options: ['-DA=1 -DB=2'] },
      { ...base, nvrtcVersion: '12.8' },
      { ...base, arch: 'sm_90' },
    ];
    expect(new Set([key, ...variants.map(cubinCacheKey)]).size).toBe(variants.length + 1);
  });
});

describe('cubinCacheDir', () => {
  it('honours NSA_CACHE_DIR (and `off`), then XDG_CACHE_HOME, then ~/.cache', () => {
    expect(cubinCacheDir({ NSA_CACHE_DIR: '/c' }, '/home/u')).toBe('/c');
    expect(cubinCacheDir({ NSA_CACHE_DIR: 'off' }, '/home/u')).toBeUndefined();
    expect(cubinCacheDir({ XDG_CACHE_HOME: '/x' }, '/home/u')).toBe('/x/native-sparse-attention/cubin');
    expect(cubinCacheDir({}, '/home/u')).toBe('/home/u/.cache/native-sparse-attention/cubin');
  });
});

describe('CubinCache', () => {
  it('round-trips an entry and leaves no temporary file', () => {
    const dir = join(mkdtempSync(join(tmpdir(), 'nsa-cache-')), 'nested', 'cubin');
    const cache = new CubinCache(dir);
    const cubin = Buffer.from('\x7fELF fake cubin bytes');
    expect(cache.read('k', 'a'.repeat(64))).toBeUndefined();
    expect(cache.write('k', 'a'.repeat(64), cubin)).toBe(true);
    expect(cache.read('k', 'a'.repeat(64))).toEqual(cubin);
    expect(readdirSync(dir)).toEqual([`k-${'a'.repeat(64)}.cubin`]);
  });

  it('ignores a truncated, corrupted or foreign entry', () => {
    const entry = encodeEntry(Buffer.from('payload'));
    expect(decodeEntry(entry)?.toString()).toBe('payload');
    expect(decodeEntry(entry.subarray(0, entry.length - 1))).toBeUndefined();
    const flipped = Buffer.from(entry);
    flipped.writeUInt8(flipped.readUInt8(flipped.length - 1) ^ 1, flipped.length - 1);
    expect(decodeEntry(flipped)).toBeUndefined();
    expect(decodeEntry(Buffer.from('\x7fELF....................................................'))).toBeUndefined();
    expect(decodeEntry(Buffer.alloc(0))).toBeUndefined();
  });

  it('turns a failed write into `false` and a disabled cache into misses', () => {
    const file = join(mkdtempSync(join(tmpdir(), 'nsa-cache-')), 'not-a-folder');
    writeFileSync(file, 'x');
    expect(new CubinCache(join(file, 'sub')).write('k', 'b', Buffer.from('x'))).toBe(false);
    const off = new CubinCache(undefined);
    expect(off.write('k', 'b', Buffer.from('x'))).toBe(false);
    expect(off.read('k', 'b')).toBeUndefined();
  });
});

describe('compileCuda', () => {
  function fakeCompiler(): CudaCompiler & { calls: string[][] } {
    const calls: string[][] = [];
    return {
      major: 13,
      minor: 0,
      calls,
      compile(name, source, options) {
        calls.push([...options]);
        if (source.includes('#include <missing.h>')) throw new KernelCompileError(name, 'x.cu(1): catastrophic error: cannot open source file "missing.h"');
        return Buffer.from(`cubin of ${name}: ${source}`);
      },
    };
  }
  const req = { name: 'smoke', source: 'extern "C" __global__ void k() {}', arch: 'sm_80', options: ['-DX=1'], includeDirs: ['/cuda/include'] };

  it('passes arch, C++17, -default-device, -I and the caller options to the compiler', () => {
    expect(nvrtcOptions(req)).toEqual(['--gpu-architecture=sm_80', '-std=c++17', '-default-device', '-I/cuda/include', '-DX=1']);
  });

  it('compiles once, then serves the same bytes from the cache; a corrupted entry is recompiled', () => {
    const dir = mkdtempSync(join(tmpdir(), 'nsa-cache-'));
    const compiler = fakeCompiler();
    const first = compileCuda(compiler, req, new CubinCache(dir), {});
    const second = compileCuda(compiler, req, new CubinCache(dir), {});
    expect([first.cacheHit, second.cacheHit]).toEqual([false, true]);
    expect(second.cubin).toEqual(first.cubin);
    expect(compiler.calls).toHaveLength(1);
    const [file] = readdirSync(dir);
    writeFileSync(join(dir, file ?? ''), readFileSync(join(dir, file ?? '')).subarray(0, 20));
    const third = compileCuda(compiler, req, new CubinCache(dir), {});
    expect(third.cacheHit).toBe(false);
    expect(third.cubin).toEqual(first.cubin);
    expect(compileCuda(compiler, req, new CubinCache(dir), {}).cacheHit).toBe(true);
  });

  it('prints the source of kernels named in NSA_PRINT_KERNEL', () => {
    const spy = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    try {
      compileCuda(fakeCompiler(), req, new CubinCache(undefined), { NSA_PRINT_KERNEL: 'other, smoke' });
      expect(spy).toHaveBeenCalledWith(expect.stringContaining(req.source));
      spy.mockClear();
      compileCuda(fakeCompiler(), req, new CubinCache(undefined), { NSA_PRINT_KERNEL: 'other' });
      expect(spy).not.toHaveBeenCalled();
    } finally {
      spy.mockRestore();
    }
    expect(printRequested('anything', 'all')).toBe(true);
    expect(printRequested('smoke', undefined)).toBe(false);
  });

  it('adds where the headers were looked for when one is missing', () => {
    const bad = { ...req, source: '#include <missing.h>', missingHeaderHint: 'hint: set NSA_CUDA_INCLUDE' };
    expect(() => compileCuda(fakeCompiler(), bad, new CubinCache(undefined), {})).toThrow(/cannot open source file[\s\S]*hint: set NSA_CUDA_INCLUDE/);
  });
});
