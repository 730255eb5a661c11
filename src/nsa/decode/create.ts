// createKvCache: a KV cache for decoding on a backend (the best present unless one is named).

import { NSAConfig, type NSAConfigOptions } from '../../config/nsa-config.js';
import { UnsupportedConfigError } from '../../errors.js';
import type { Backend, BackendName } from '../../backends/backend.js';
import { getBackend } from '../../backends/registry.js';
import { resolveBackend } from '../operator.js';
import type { KvCache, KvCacheOptions } from './types.js';

export interface CreateKvCacheOptions extends KvCacheOptions {
  readonly backend?: Backend | BackendName;
}

/**
 * An empty KV cache (add sequences with addSequence(), fill them with append(), decode with decode()). The config
 * fixes the head layout and dims (an NSAConfig, or options with heads, kvHeads, headDim, valueDim).
 */
export async function createKvCache(config: NSAConfig | NSAConfigOptions, options: CreateKvCacheOptions = {}): Promise<KvCache> {
  const resolved = config instanceof NSAConfig ? config : new NSAConfig(config);
  let backend = await resolveBackend(options.backend);
  // Unasked, take the best backend that has a cache.
  if (options.backend === undefined && backend.createKvCache === undefined) backend = await getBackend('cpu');
  if (backend.createKvCache === undefined) {
    throw new UnsupportedConfigError(`${backend.name} backend: no KV cache for decoding yet; create it with { backend: 'cpu' }`);
  }
  return backend.createKvCache(resolved, options);
}
