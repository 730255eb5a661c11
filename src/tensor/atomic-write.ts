// Atomic file writes: the bytes go to a temporary file in the same directory, which is synced and renamed over
// the target, so a reader sees the old file or the whole new one, never a partial one. On any error the temporary
// file is removed and the error rethrown. Used for safetensors outputs and the CLI's own files.

import { randomBytes } from 'node:crypto';
import { open, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

export async function writeFileAtomic(path: string, bytes: Uint8Array | string): Promise<void> {
  const temp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  let created = false;
  try {
    const handle = await open(temp, 'wx');
    created = true;
    try {
      await handle.writeFile(bytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, path);
  } catch (err) {
    if (created) await unlink(temp).catch(() => undefined); // best effort: the original error matters more
    throw err;
  }
}
