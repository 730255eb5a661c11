// Builds fixtures/fake-cuda.c (a stand-in for libcuda + libnvrtc) with the system C compiler, and binds the
// helpers it exports for tests. Returns undefined where there is no C compiler; a compile error throws.
import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import koffi from 'koffi';

export interface FakeCuda {
  readonly path: string;
  /** Bytes the fake device has allocated and not freed. */
  bytesInUse(): number;
  /** Primary-context references not yet released. */
  ctxRefs(): number;
  /** NVRTC programs created and not destroyed. */
  livePrograms(): number;
  /** grid xyz, block xyz and shared bytes of the last launch that passed validation. */
  lastLaunch(): number[];
  maxDynamicShared(kernel: string): number;
}

export function buildFakeCuda(): FakeCuda | undefined {
  const source = fileURLToPath(new URL('./fixtures/fake-cuda.c', import.meta.url));
  const path = join(mkdtempSync(join(tmpdir(), 'nsa-fake-cuda-')), 'libfakecuda.so');
  const compilers = [process.env['CC'], 'cc', 'gcc', 'clang'].filter((c): c is string => c !== undefined && c !== '');
  for (const cc of compilers) {
    const result = spawnSync(cc, ['-shared', '-fPIC', '-O1', '-Wall', '-o', path, source], { encoding: 'utf8' });
    if (result.error !== undefined) continue; // this compiler is not installed
    if (result.status !== 0) throw new Error(`${cc} could not build ${source}:\n${result.stderr}`);
    return bind(path);
  }
  return undefined;
}

function bind(path: string): FakeCuda {
  const lib = koffi.load(path);
  const bytesInUse: () => number = lib.func('size_t fake_bytes_in_use(void)');
  const ctxRefs: () => number = lib.func('int fake_ctx_refs(void)');
  const livePrograms: () => number = lib.func('int fake_live_programs(void)');
  const lastLaunch: (out: Uint32Array) => void = lib.func('void fake_last_launch(void *out)');
  const maxDynamicShared: (name: string) => number = lib.func('int fake_max_dynamic_shared(const char *name)');
  return {
    path,
    bytesInUse,
    ctxRefs,
    livePrograms,
    lastLaunch: () => {
      const out = new Uint32Array(8);
      lastLaunch(out);
      return [...out.subarray(0, 7)];
    },
    maxDynamicShared,
  };
}
