// Where the CUDA driver library (libcuda), NVRTC and the CUDA headers are. Pure over a `LocateHost` (environment,
// home directory and two file-system queries), so tests pass a fake file system; `nodeLocateHost()` is the real one.
//
// NVRTC needs its builtins library, libnvrtc-builtins.so.<major>.<minor>, which it dlopens by name at compile time:
// it must sit beside libnvrtc (as in every toolkit and pip wheel) or on the loader path. nvrtc.ts preloads the one
// found beside the chosen libnvrtc so that the loader path does not matter.
import { existsSync, readdirSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';

export interface LocateHost {
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly homedir: string;
  exists(path: string): boolean;
  /** Entry names of a directory; empty when it is missing, unreadable or not a directory. */
  readdir(dir: string): readonly string[];
}

/** Where to look for one library, and what to tell the user when it is in none of those places. */
export interface LibrarySearch {
  readonly what: string;
  readonly fileNames: readonly string[];
  /** Paths, or bare file names for the dynamic loader, to dlopen in this order. */
  readonly candidates: readonly string[];
  readonly directoriesTried: readonly string[];
  readonly advice: string;
}

export const LIBCUDA_NAMES = ['libcuda.so.1', 'libcuda.so'] as const;
export const NVRTC_NAMES = ['libnvrtc.so', 'libnvrtc.so.13', 'libnvrtc.so.12'] as const;
const LOADER = "the dynamic loader's default search (LD_LIBRARY_PATH, /etc/ld.so.cache)";
const LIBCUDA_DIRS = ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/local/nvidia/lib64', '/usr/lib64', '/usr/lib/wsl/lib'];

export function nodeLocateHost(): LocateHost {
  return {
    env: process.env,
    homedir: homedir(),
    exists: (path) => existsSync(path),
    readdir: (dir) => {
      try {
        return readdirSync(dir);
      } catch {
        return [];
      }
    },
  };
}

/** libcuda: NSA_LIBCUDA_PATH alone when set; else the loader's default, then the usual driver folders. */
export function libcudaSearch(host: LocateHost): LibrarySearch {
  const what = 'the CUDA driver library (libcuda)';
  const advice = 'Install the NVIDIA driver (it provides libcuda.so.1), or set NSA_LIBCUDA_PATH to the file.';
  const explicit = envValue(host, 'NSA_LIBCUDA_PATH');
  if (explicit !== undefined) return explicitSearch(what, 'NSA_LIBCUDA_PATH', explicit, LIBCUDA_NAMES, host, advice);
  const candidates = [...LIBCUDA_NAMES, ...filesIn(LIBCUDA_DIRS, LIBCUDA_NAMES, host)];
  return { what, fileNames: LIBCUDA_NAMES, candidates, directoriesTried: [LOADER, ...LIBCUDA_DIRS], advice };
}

/**
 * NVRTC: NSA_NVRTC_PATH alone when set; else NVRTC_PATH, $CUDA_HOME/lib64, $CUDA_PATH/lib64, $CONDA_PREFIX/lib,
 * /usr/local/cuda/lib64, /usr/local/cuda-* (newest first), the Debian folder, the pip wheels' nvidia/{cu13,
 * cuda_nvrtc,cu12}/lib under the usual site-packages roots, and last the dynamic loader's default.
 */
export function nvrtcSearch(host: LocateHost): LibrarySearch {
  const what = 'NVRTC, the CUDA run-time compiler (libnvrtc)';
  const advice =
    'Install NVRTC from the CUDA toolkit (or `pip install nvidia-cuda-nvrtc-cu12`, or its cu13 build), or set ' +
    'NSA_NVRTC_PATH to libnvrtc.so, or CUDA_HOME to the toolkit root. libnvrtc-builtins.so must sit beside it.';
  const explicit = envValue(host, 'NSA_NVRTC_PATH');
  if (explicit !== undefined) return explicitSearch(what, 'NSA_NVRTC_PATH', explicit, NVRTC_NAMES, host, advice);
  const conda = envValue(host, 'CONDA_PREFIX');
  const patterns = [
    ...['CUDA_HOME', 'CUDA_PATH'].map((v) => envValue(host, v)).map((root) => root && join(root, 'lib64')),
    conda && join(conda, 'lib'),
    '/usr/local/cuda/lib64',
    '/usr/local/cuda-*/lib64',
    '/usr/lib/x86_64-linux-gnu',
    ...pythonPackageDirs(host, ['cu13/lib', 'cuda_nvrtc/lib', 'cu12/lib']),
  ];
  const { dirs, tried } = searchDirs(patterns.filter(defined), host);
  const fromEnv = envValue(host, 'NVRTC_PATH');
  const candidates = [...(fromEnv ? expandExplicit(fromEnv, NVRTC_NAMES, host) : []), ...filesIn(dirs, NVRTC_NAMES, host)];
  candidates.push(...['libnvrtc.so.13', 'libnvrtc.so.12', 'libnvrtc.so']);
  const directoriesTried = [...(fromEnv ? [`NVRTC_PATH=${fromEnv}`] : []), ...tried, LOADER];
  return { what, fileNames: NVRTC_NAMES, candidates: unique(candidates), directoriesTried, advice };
}

/**
 * The folder holding cuda_bf16.h / cuda_fp16.h for NVRTC's -I: NSA_CUDA_INCLUDE, the include folder beside the
 * chosen libnvrtc, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, /usr/local/cuda-* and the pip wheels.
 */
export function cudaIncludeSearch(host: LocateHost, nvrtcPath?: string): { dir: string | undefined; tried: string[] } {
  const beside = nvrtcPath?.includes('/') ? join(dirname(dirname(nvrtcPath)), 'include') : undefined;
  const roots = ['CUDA_HOME', 'CUDA_PATH'].map((v) => envValue(host, v)).map((r) => r && join(r, 'include'));
  const patterns = [
    envValue(host, 'NSA_CUDA_INCLUDE'),
    beside,
    ...roots,
    '/usr/local/cuda/include',
    '/usr/local/cuda-*/include',
    ...pythonPackageDirs(host, ['cu13/include', 'cuda_runtime/include']),
  ];
  const { dirs, tried } = searchDirs(patterns.filter(defined), host);
  return { dir: dirs.find((d) => host.exists(join(d, 'cuda_bf16.h'))), tried };
}

/** libnvrtc-builtins beside a loaded libnvrtc, preferring the exact `major.minor` build. */
export function nvrtcBuiltinsBeside(nvrtcPath: string, major: number, minor: number, host: LocateHost): string | undefined {
  if (!nvrtcPath.includes('/')) return undefined;
  const dir = dirname(nvrtcPath);
  const names = host.readdir(dir).filter((n) => n.startsWith('libnvrtc-builtins.so'));
  const pick = names.find((n) => n === `libnvrtc-builtins.so.${major}.${minor}`) ??
    names.find((n) => n.startsWith(`libnvrtc-builtins.so.${major}`)) ?? names.find((n) => n === 'libnvrtc-builtins.so');
  return pick === undefined ? undefined : join(dir, pick);
}

/** The BackendUnavailableError text: what was looked for, where, why each load failed, and what to do. */
export function notFoundMessage(search: LibrarySearch, failures: readonly string[]): string {
  // The first line stands alone (the CLI prints only it when it falls back to the CPU).
  const lines = [
    `could not load ${search.what} (${search.fileNames.join(', ')} not found in ${search.directoriesTried.length} places)`,
    'Looked in:',
  ];
  lines.push(...search.directoriesTried.map((d) => `  - ${d}`));
  if (failures.length > 0) lines.push('Load attempts that failed:', ...failures.map((f) => `  - ${f}`));
  lines.push(search.advice);
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

function envValue(host: LocateHost, name: string): string | undefined {
  const v = host.env[name]?.trim();
  return v === undefined || v === '' ? undefined : v;
}

/** A variable naming either the library file itself or a folder holding it. */
function expandExplicit(value: string, names: readonly string[], host: LocateHost): string[] {
  const inDir = host.readdir(value).length > 0 ? filesIn([value], names, host) : [];
  return inDir.length > 0 ? inDir : [value];
}

function explicitSearch(what: string, variable: string, value: string, names: readonly string[], host: LocateHost, advice: string): LibrarySearch {
  return { what, fileNames: names, candidates: expandExplicit(value, names, host), directoriesTried: [`${variable}=${value}`], advice };
}

function filesIn(dirs: readonly string[], names: readonly string[], host: LocateHost): string[] {
  return dirs.flatMap((d) => names.map((n) => join(d, n))).filter((p) => host.exists(p));
}

/** pip wheel folders `<site-packages>/nvidia/<sub>` under the usual roots, as glob patterns. */
function pythonPackageDirs(host: LocateHost, subs: readonly string[]): string[] {
  const venv = envValue(host, 'VIRTUAL_ENV');
  const conda = envValue(host, 'CONDA_PREFIX');
  const roots = [
    venv && `${venv}/lib/python3*/site-packages`,
    conda && `${conda}/lib/python3*/site-packages`,
    `${host.homedir}/.local/lib/python3*/site-packages`,
    '/usr/local/lib/python3*/dist-packages', '/usr/local/lib/python3*/site-packages',
    '/usr/lib/python3*/dist-packages', '/usr/lib/python3*/site-packages',
    '/opt/*/.venv/lib/python3*/site-packages', '/opt/conda/lib/python3*/site-packages',
  ].filter(defined);
  return subs.flatMap((sub) => roots.map((root) => `${root}/nvidia/${sub}`));
}

/** Expands each pattern (`*` within a path segment); a pattern with no match is still reported as tried. */
function searchDirs(patterns: readonly string[], host: LocateHost): { dirs: string[]; tried: string[] } {
  const dirs: string[] = [];
  const tried: string[] = [];
  for (const pattern of unique(patterns)) {
    if (!pattern.includes('*')) {
      dirs.push(pattern);
      tried.push(pattern);
      continue;
    }
    const found = expandGlob(pattern, host);
    dirs.push(...found);
    tried.push(...(found.length > 0 ? found : [`${pattern} (no match)`]));
  }
  return { dirs: unique(dirs), tried: unique(tried) };
}

export function expandGlob(pattern: string, host: LocateHost): string[] {
  let paths = [pattern.startsWith('/') ? '/' : ''];
  for (const segment of pattern.split('/').filter((s) => s !== '')) {
    if (!segment.includes('*')) {
      paths = paths.map((p) => (p === '' ? segment : join(p, segment)));
      continue;
    }
    const re = new RegExp(`^${segment.split('*').map(escapeRegExp).join('.*')}$`);
    paths = paths.flatMap((p) => [...host.readdir(p === '' ? '.' : p)].filter((n) => re.test(n)).sort(newestFirst).map((n) => join(p, n)));
  }
  return paths.filter((p) => host.exists(p));
}

/** Descending natural order, so cuda-13.0 comes before cuda-12.4 and python3.12 before python3.9. */
export function newestFirst(a: string, b: string): number {
  return b.localeCompare(a, 'en', { numeric: true });
}

function escapeRegExp(s: string): string {
  return s.replace(/[.+?^${}()|[\]\\]/g, '\\$&');
}

function defined(s: string | undefined): s is string {
  return s !== undefined && s !== '';
}

function unique<T>(xs: readonly T[]): T[] {
  return [...new Set(xs)];
}
