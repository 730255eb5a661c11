// Library and header discovery over a fake file system: the search order, the glob expansion, and the message
// a user gets when nothing is found.
import { describe, expect, it } from 'vitest';
import { BackendUnavailableError } from '../../src/errors.js';
import {
  cudaIncludeSearch,
  expandGlob,
  libcudaSearch,
  newestFirst,
  notFoundMessage,
  nvrtcBuiltinsBeside,
  nvrtcSearch,
  type LocateHost,
} from '../../src/backends/cuda/locate.js';
import { cudaAvailability, loadCudaLibraries } from '../../src/backends/cuda/libraries.js';

/** A file system holding exactly `files` (and their parent folders). */
function fakeHost(files: readonly string[], env: Record<string, string> = {}, homedir = '/home/u'): LocateHost {
  const children = new Map<string, Set<string>>();
  for (const file of files) {
    const parts = file.split('/').filter((p) => p !== '');
    for (let i = 0; i < parts.length; i++) {
      const dir = `/${parts.slice(0, i).join('/')}`;
      const set = children.get(dir) ?? new Set<string>();
      set.add(parts[i] ?? '');
      children.set(dir, set);
    }
  }
  const exists = (path: string) => files.includes(path) || children.has(path.replace(/\/+$/, '') || '/');
  return { env, homedir, exists, readdir: (dir) => [...(children.get(dir.replace(/\/+$/, '') || '/') ?? [])] };
}

describe('libcuda search', () => {
  it('tries the loader default first, then the driver folders that hold the file', () => {
    const host = fakeHost(['/usr/lib64/libcuda.so.1', '/usr/lib/wsl/lib/libcuda.so.1', '/usr/lib/wsl/lib/libcuda.so']);
    const search = libcudaSearch(host);
    expect(search.candidates).toEqual([
      'libcuda.so.1',
      'libcuda.so',
      '/usr/lib64/libcuda.so.1',
      '/usr/lib/wsl/lib/libcuda.so.1',
      '/usr/lib/wsl/lib/libcuda.so',
    ]);
    expect(search.directoriesTried).toContain('/usr/local/nvidia/lib64');
  });

  it('uses NSA_LIBCUDA_PATH alone, as a file or as a folder', () => {
    const host = fakeHost(['/opt/drv/libcuda.so.1', '/usr/lib64/libcuda.so.1'], { NSA_LIBCUDA_PATH: '/opt/drv/libcuda.so.1' });
    expect(libcudaSearch(host).candidates).toEqual(['/opt/drv/libcuda.so.1']);
    const dirHost = fakeHost(['/opt/drv/libcuda.so.1'], { NSA_LIBCUDA_PATH: '/opt/drv' });
    expect(libcudaSearch(dirHost).candidates).toEqual(['/opt/drv/libcuda.so.1']);
    expect(libcudaSearch(dirHost).directoriesTried).toEqual(['NSA_LIBCUDA_PATH=/opt/drv']);
  });
});

describe('NVRTC search', () => {
  it('orders CUDA_HOME, /usr/local/cuda, newest cuda-* , pip wheels, then the loader', () => {
    const host = fakeHost(
      [
        '/toolkit/lib64/libnvrtc.so.12',
        '/usr/local/cuda/lib64/libnvrtc.so',
        '/usr/local/cuda-12.4/lib64/libnvrtc.so.12',
        '/usr/local/cuda-12.10/lib64/libnvrtc.so.12',
        '/usr/local/cuda-13.0/lib64/libnvrtc.so.13',
        '/home/u/.local/lib/python3.10/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12',
        '/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13',
        '/opt/app/.venv/lib/python3.11/site-packages/nvidia/cu12/lib/libnvrtc.so.12',
      ],
      { CUDA_HOME: '/toolkit', VIRTUAL_ENV: '/venv' },
    );
    expect(nvrtcSearch(host).candidates).toEqual([
      '/toolkit/lib64/libnvrtc.so.12',
      '/usr/local/cuda/lib64/libnvrtc.so',
      '/usr/local/cuda-13.0/lib64/libnvrtc.so.13',
      '/usr/local/cuda-12.10/lib64/libnvrtc.so.12',
      '/usr/local/cuda-12.4/lib64/libnvrtc.so.12',
      '/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13',
      '/home/u/.local/lib/python3.10/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12',
      '/opt/app/.venv/lib/python3.11/site-packages/nvidia/cu12/lib/libnvrtc.so.12',
      'libnvrtc.so.13',
      'libnvrtc.so.12',
      'libnvrtc.so',
    ]);
  });

  it('puts NVRTC_PATH first and lets NSA_NVRTC_PATH override everything', () => {
    const files = ['/x/libnvrtc.so.13', '/usr/local/cuda/lib64/libnvrtc.so'];
    expect(nvrtcSearch(fakeHost(files, { NVRTC_PATH: '/x/libnvrtc.so.13' })).candidates.slice(0, 2)).toEqual([
      '/x/libnvrtc.so.13',
      '/usr/local/cuda/lib64/libnvrtc.so',
    ]);
    expect(nvrtcSearch(fakeHost(files, { NSA_NVRTC_PATH: '/x' })).candidates).toEqual(['/x/libnvrtc.so.13']);
  });

  it('says what it looked for, where, why each load failed, and what to do', () => {
    const search = nvrtcSearch(fakeHost([], { CUDA_HOME: '/toolkit' }));
    const message = notFoundMessage(search, ['libnvrtc.so.13: cannot open shared object file']);
    for (const name of ['libnvrtc.so', 'libnvrtc.so.13', 'libnvrtc.so.12']) expect(message).toContain(name);
    expect(message).toContain('  - /toolkit/lib64');
    expect(message).toContain('  - /usr/local/cuda-*/lib64 (no match)');
    expect(message).toContain('/usr/local/lib/python3*/dist-packages/nvidia/cu13/lib (no match)');
    expect(message).toContain("dynamic loader's default search");
    expect(message).toContain('libnvrtc.so.13: cannot open shared object file');
    expect(message).toContain('NSA_NVRTC_PATH');
    expect(message).toContain('libnvrtc-builtins.so must sit beside it');
  });
});

describe('CUDA headers and NVRTC builtins', () => {
  it('prefers NSA_CUDA_INCLUDE, then the include folder beside the chosen NVRTC', () => {
    const files = ['/a/include/cuda_bf16.h', '/tk/include/cuda_bf16.h', '/usr/local/cuda/include/cuda_bf16.h'];
    expect(cudaIncludeSearch(fakeHost(files), '/tk/lib64/libnvrtc.so').dir).toBe('/tk/include');
    expect(cudaIncludeSearch(fakeHost(files, { NSA_CUDA_INCLUDE: '/a/include' }), '/tk/lib64/libnvrtc.so').dir).toBe('/a/include');
    expect(cudaIncludeSearch(fakeHost(files), 'libnvrtc.so.13').dir).toBe('/usr/local/cuda/include');
  });

  it('finds the headers of a pip wheel and reports every folder tried when there are none', () => {
    const wheel = '/usr/local/lib/python3.12/dist-packages/nvidia/cu13/include';
    expect(cudaIncludeSearch(fakeHost([`${wheel}/cuda_bf16.h`])).dir).toBe(wheel);
    const none = cudaIncludeSearch(fakeHost([]));
    expect(none.dir).toBeUndefined();
    expect(none.tried).toContain('/usr/local/cuda/include');
  });

  it('picks the builtins library of the same major.minor beside libnvrtc', () => {
    const dir = '/usr/local/cuda/lib64';
    const host = fakeHost([`${dir}/libnvrtc-builtins.so.12.4`, `${dir}/libnvrtc-builtins.so.13.0`, `${dir}/libnvrtc-builtins.so`]);
    expect(nvrtcBuiltinsBeside(`${dir}/libnvrtc.so`, 13, 0, host)).toBe(`${dir}/libnvrtc-builtins.so.13.0`);
    expect(nvrtcBuiltinsBeside(`${dir}/libnvrtc.so`, 13, 1, host)).toBe(`${dir}/libnvrtc-builtins.so.13.0`);
    expect(nvrtcBuiltinsBeside(`${dir}/libnvrtc.so`, 11, 8, host)).toBe(`${dir}/libnvrtc-builtins.so`);
    expect(nvrtcBuiltinsBeside('libnvrtc.so.13', 13, 0, host)).toBeUndefined();
  });
});

describe('glob expansion', () => {
  it('expands * within segments, newest version first, keeping only what exists', () => {
    const host = fakeHost(['/opt/a/.venv/lib/python3.9/x', '/opt/b/.venv/lib/python3.12/x', '/opt/c/other']);
    expect(expandGlob('/opt/*/.venv/lib/python3*', host)).toEqual(['/opt/b/.venv/lib/python3.12', '/opt/a/.venv/lib/python3.9']);
    expect(['cuda-12.4', 'cuda-13.0', 'cuda-12.10'].sort(newestFirst)).toEqual(['cuda-13.0', 'cuda-12.10', 'cuda-12.4']);
  });
});

describe('cudaAvailability', () => {
  it('never throws: a missing libcuda comes back as a reason naming the path and what to do', () => {
    const saved = process.env['NSA_LIBCUDA_PATH'];
    process.env['NSA_LIBCUDA_PATH'] = '/nonexistent/libcuda.so.1';
    try {
      const result = cudaAvailability();
      expect(result.available).toBe(false);
      if (!result.available) {
        expect(result.reason).toContain('NSA_LIBCUDA_PATH=/nonexistent/libcuda.so.1');
        expect(result.reason).toContain('Install the NVIDIA driver');
      }
      expect(() => loadCudaLibraries()).toThrow(BackendUnavailableError);
    } finally {
      if (saved === undefined) delete process.env['NSA_LIBCUDA_PATH'];
      else process.env['NSA_LIBCUDA_PATH'] = saved;
    }
  });
});
