// On-disk cache of NVRTC output. The key is the sha256 of everything that decides the cubin: the source, the
// full NVRTC option list, the NVRTC version and the target arch. Options stay in the order given: a later -D
// overrides an earlier one, so sorting them could map two different programs to one key (a reordered list only
// costs a cache miss). Entries are written atomically (temp file + rename) and carry a sha256 of their payload,
// so a torn, truncated or corrupted entry is detected, ignored and replaced by a fresh compile.
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface CubinKeyInput {
  readonly source: string;
  readonly options: readonly string[];
  /** `major.minor` of the NVRTC that compiles. */
  readonly nvrtcVersion: string;
  /** e.g. `sm_90a`. */
  readonly arch: string;
}

export function cubinCacheKey(input: CubinKeyInput): string {
  const fields = ['nsa-cubin-v1', input.source, input.options, input.nvrtcVersion, input.arch];
  return createHash('sha256').update(JSON.stringify(fields)).digest('hex');
}

/** NSA_CACHE_DIR (`off` turns the cache off), else $XDG_CACHE_HOME or ~/.cache, + native-sparse-attention/cubin. */
export function cubinCacheDir(env: Readonly<Record<string, string | undefined>>, homedir: string): string | undefined {
  const explicit = env['NSA_CACHE_DIR']?.trim();
  if (explicit !== undefined && explicit !== '') return explicit === 'off' ? undefined : explicit;
  const base = env['XDG_CACHE_HOME']?.trim() || join(homedir, '.cache');
  return join(base, 'native-sparse-attention', 'cubin');
}

const MAGIC = Buffer.from('NSACUBIN1\n', 'latin1');
const HASH_BYTES = 32;

/** A cubin cache in one folder; `undefined` makes a cache that never hits and never writes. */
export class CubinCache {
  constructor(readonly dir: string | undefined) {}

  pathFor(name: string, key: string): string | undefined {
    return this.dir === undefined ? undefined : join(this.dir, `${name.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64)}-${key}.cubin`);
  }

  /** The cached cubin, or undefined when absent, unreadable or failing its checksum. */
  read(name: string, key: string): Buffer | undefined {
    const path = this.pathFor(name, key);
    if (path === undefined) return undefined;
    let entry: Buffer;
    try {
      entry = readFileSync(path);
    } catch {
      return undefined;
    }
    return decodeEntry(entry);
  }

  /** Stores a cubin; returns false (and leaves no partial file) when the folder is not writable. */
  write(name: string, key: string, cubin: Uint8Array): boolean {
    const path = this.pathFor(name, key);
    if (path === undefined || this.dir === undefined) return false;
    const temp = `${path}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
    try {
      mkdirSync(this.dir, { recursive: true });
      writeFileSync(temp, encodeEntry(cubin));
      renameSync(temp, path);
      return true;
    } catch {
      try {
        rmSync(temp, { force: true });
      } catch {
        // the folder itself is unusable: nothing was written
      }
      return false;
    }
  }
}

export function encodeEntry(cubin: Uint8Array): Buffer {
  return Buffer.concat([MAGIC, sha256(cubin), cubin]);
}

export function decodeEntry(entry: Buffer): Buffer | undefined {
  const header = MAGIC.length + HASH_BYTES;
  if (entry.length <= header || !entry.subarray(0, MAGIC.length).equals(MAGIC)) return undefined;
  const payload = entry.subarray(header);
  return sha256(payload).equals(entry.subarray(MAGIC.length, header)) ? payload : undefined;
}

function sha256(data: Uint8Array): Buffer {
  return createHash('sha256').update(data).digest();
}
