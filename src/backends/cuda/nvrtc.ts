// Koffi bindings to NVRTC, and compileCuda: CUDA C++ source -> cubin for one GPU arch, through the on-disk cache
// of cubin-cache.ts. Debug aid: NSA_PRINT_KERNEL=name1,name2 (or `all`) prints those programs' source to stderr
// before they are compiled or taken from the cache.
import type { LibraryHandle } from 'koffi';
import { BackendUnavailableError, CudaError, KernelCompileError } from '../../errors.js';
import { cubinCacheKey, type CubinCache } from './cubin-cache.js';
import { alias, opaqueHandle, openFirst, outBigInt, outNumber } from './ffi.js';
import { notFoundMessage, nvrtcBuiltinsBeside, type LibrarySearch, type LocateHost } from './locate.js';

/** What compileCuda needs from a compiler; `Nvrtc` is the real one, tests may pass a fake. */
export interface CudaCompiler {
  readonly major: number;
  readonly minor: number;
  compile(name: string, source: string, options: readonly string[]): Buffer;
}

export interface CompileRequest {
  /** Labels errors, the cache entry and NSA_PRINT_KERNEL. */
  readonly name: string;
  readonly source: string;
  /** A real GPU arch such as `sm_80` or `sm_90a` (a `compute_XY` target yields PTX only, not a cubin). */
  readonly arch: string;
  readonly options?: readonly string[];
  /** Folders holding cuda_bf16.h / cuda_fp16.h, passed as -I. */
  readonly includeDirs?: readonly string[];
  /** Appended to the compile log when a header is missing: where the headers were looked for. */
  readonly missingHeaderHint?: string;
}

export interface CompiledCubin {
  readonly cubin: Buffer;
  readonly key: string;
  readonly cacheHit: boolean;
  readonly options: readonly string[];
}

/** The NVRTC option list: arch, C++17, device code by default, include folders, then the caller's options. */
export function nvrtcOptions(req: CompileRequest): string[] {
  const includes = (req.includeDirs ?? []).map((d) => `-I${d}`);
  return [`--gpu-architecture=${req.arch}`, '-std=c++17', '-default-device', ...includes, ...(req.options ?? [])];
}

/** The cache key of a request: what compileCuda would look up (and what the context memoises modules by). */
export function compileKey(compiler: CudaCompiler, req: CompileRequest): string {
  const nvrtcVersion = `${compiler.major}.${compiler.minor}`;
  return cubinCacheKey({ source: req.source, options: nvrtcOptions(req), nvrtcVersion, arch: req.arch });
}

/** Source -> cubin through `cache`; a source NVRTC rejects throws KernelCompileError with NVRTC's log. */
export function compileCuda(compiler: CudaCompiler, req: CompileRequest, cache: CubinCache, env = process.env): CompiledCubin {
  const options = nvrtcOptions(req);
  if (printRequested(req.name, env['NSA_PRINT_KERNEL'])) {
    process.stderr.write(`// ---- NSA_PRINT_KERNEL ${req.name} [${options.join(' ')}] ----\n${req.source}\n// ---- end ${req.name} ----\n`);
  }
  const key = compileKey(compiler, req);
  const cached = cache.read(req.name, key);
  if (cached !== undefined) return { cubin: cached, key, cacheHit: true, options };
  let cubin: Buffer;
  try {
    cubin = compiler.compile(req.name, req.source, options);
  } catch (e) {
    const missingHeader = e instanceof KernelCompileError && /cannot open source file|could not open source file/i.test(e.log);
    if (missingHeader && req.missingHeaderHint !== undefined) throw new KernelCompileError(req.name, `${e.log}\n${req.missingHeaderHint}`);
    throw e;
  }
  cache.write(req.name, key, cubin);
  return { cubin, key, cacheHit: false, options };
}

export function printRequested(name: string, flag: string | undefined): boolean {
  const names = (flag ?? '').split(',').map((s) => s.trim()).filter((s) => s !== '');
  return names.includes(name) || names.includes('all') || names.includes('*');
}

// ---------------------------------------------------------------------------------------------------------------
// Bindings

type Out = unknown[];
type Fn<A extends unknown[]> = (...args: A) => number;
type Program = bigint;
const NVRTC_ERROR_BUILTIN_OPERATION_FAILURE = 7;

interface RawNvrtc {
  nvrtcGetErrorString: (result: number) => string | null;
  nvrtcVersion: Fn<[major: Out, minor: Out]>;
  nvrtcCreateProgram: Fn<[prog: Out, src: string, name: string, numHeaders: number, headers: null, includeNames: null]>;
  nvrtcCompileProgram: Fn<[prog: Program, numOptions: number, options: readonly string[]]>;
  nvrtcGetProgramLogSize: Fn<[prog: Program, size: Out]>;
  nvrtcGetProgramLog: Fn<[prog: Program, log: Uint8Array]>;
  nvrtcGetCUBINSize: Fn<[prog: Program, size: Out]>;
  nvrtcGetCUBIN: Fn<[prog: Program, cubin: Uint8Array]>;
  nvrtcDestroyProgram: Fn<[prog: Out]>;
}

function bind(lib: LibraryHandle): RawNvrtc {
  alias('nvrtcResult', 'int');
  opaqueHandle('nvrtcProgram');
  const f = (prototype: string) => lib.func(prototype);
  return {
    nvrtcGetErrorString: f('const char *nvrtcGetErrorString(nvrtcResult result)'),
    nvrtcVersion: f('nvrtcResult nvrtcVersion(_Out_ int *major, _Out_ int *minor)'),
    nvrtcCreateProgram: f(
      'nvrtcResult nvrtcCreateProgram(_Out_ nvrtcProgram *prog, const char *src, const char *name, int numHeaders, ' +
        'const char **headers, const char **includeNames)',
    ),
    nvrtcCompileProgram: f('nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int numOptions, const char **options)'),
    nvrtcGetProgramLogSize: f('nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, _Out_ size_t *logSizeRet)'),
    nvrtcGetProgramLog: f('nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, void *log)'),
    nvrtcGetCUBINSize: f('nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog, _Out_ size_t *cubinSizeRet)'),
    nvrtcGetCUBIN: f('nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, void *cubin)'),
    nvrtcDestroyProgram: f('nvrtcResult nvrtcDestroyProgram(_Inout_ nvrtcProgram *prog)'),
  };
}

export class Nvrtc implements CudaCompiler {
  private constructor(
    private readonly c: RawNvrtc,
    readonly path: string,
    readonly major: number,
    readonly minor: number,
    /** libnvrtc-builtins preloaded from beside `path`, if one was there. */
    readonly builtinsPath: string | undefined,
  ) {}

  /**
   * The first NVRTC among `search.candidates` that loads and is no newer than the driver (`maxMajor`): a cubin
   * from NVRTC 13 does not load on a CUDA 12 driver. Preloads libnvrtc-builtins from beside it, so NVRTC's own
   * dlopen of it by name succeeds whatever LD_LIBRARY_PATH says.
   */
  static open(search: LibrarySearch, host: LocateHost, maxMajor: number): Nvrtc {
    const failures: string[] = [];
    for (const candidate of search.candidates) {
      const { opened, failures: failed } = openFirst([candidate]);
      failures.push(...failed);
      if (opened === undefined) continue;
      let raw: RawNvrtc;
      try {
        raw = bind(opened.lib);
      } catch (e) {
        failures.push(`${candidate}: ${e instanceof Error ? e.message : String(e)}`);
        continue;
      }
      const major: Out = [0];
      const minor: Out = [0];
      raw.nvrtcVersion(major, minor);
      const [ma, mi] = [outNumber(major), outNumber(minor)];
      if (ma > maxMajor) {
        failures.push(`${candidate}: NVRTC ${ma}.${mi} is newer than the CUDA ${maxMajor} driver can run`);
        continue;
      }
      const builtins = nvrtcBuiltinsBeside(candidate, ma, mi, host);
      if (builtins !== undefined) openFirst([builtins]);
      return new Nvrtc(raw, candidate, ma, mi, builtins);
    }
    throw new BackendUnavailableError('cuda', notFoundMessage(search, failures));
  }

  /** Compiles one program; a rejected source throws KernelCompileError carrying NVRTC's log. */
  compile(name: string, source: string, options: readonly string[]): Buffer {
    const out: Out = [null];
    this.check('nvrtcCreateProgram', this.c.nvrtcCreateProgram(out, source, `${name}.cu`, 0, null, null), name);
    const prog = outBigInt(out);
    try {
      const result = this.c.nvrtcCompileProgram(prog, options.length, options);
      if (result !== 0) throw new KernelCompileError(name, `${this.errorName(result)}\n${this.log(prog)}${this.hint(result)}`);
      const size: Out = [0];
      this.check('nvrtcGetCUBINSize', this.c.nvrtcGetCUBINSize(prog, size), name);
      const cubin = Buffer.alloc(outNumber(size));
      if (cubin.length === 0) throw new KernelCompileError(name, 'NVRTC produced no cubin: the arch must be a real sm_XY target');
      this.check('nvrtcGetCUBIN', this.c.nvrtcGetCUBIN(prog, cubin), name);
      return cubin;
    } finally {
      this.c.nvrtcDestroyProgram([prog]);
    }
  }

  errorName(result: number): string {
    return this.c.nvrtcGetErrorString(result) ?? `nvrtcResult ${result}`;
  }

  private log(prog: Program): string {
    const size: Out = [0];
    if (this.c.nvrtcGetProgramLogSize(prog, size) !== 0 || outNumber(size) <= 1) return '(NVRTC gave no log)';
    const log = Buffer.alloc(outNumber(size));
    if (this.c.nvrtcGetProgramLog(prog, log) !== 0) return '(NVRTC gave no log)';
    const end = log.indexOf(0);
    return log.toString('utf8', 0, end < 0 ? log.length : end).trimEnd();
  }

  private hint(result: number): string {
    if (result !== NVRTC_ERROR_BUILTIN_OPERATION_FAILURE) return '';
    return `\nNVRTC could not load libnvrtc-builtins.so.${this.major}.${this.minor}: put it beside ${this.path} or on LD_LIBRARY_PATH.`;
  }

  private check(call: string, result: number, kernel: string): void {
    if (result !== 0) throw new CudaError(call, result, this.errorName(result), kernel);
  }
}
