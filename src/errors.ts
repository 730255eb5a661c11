// Typed errors. Every message names what was wrong (the argument, the rule, the value that came) and, where
// there is one, what to do. Catch by class; read `code` for a stable machine-readable tag.

export type NsaErrorCode =
  | 'config'
  | 'shape'
  | 'dtype'
  | 'value'
  | 'safetensors'
  | 'backend-unavailable'
  | 'unsupported'
  | 'cuda'
  | 'kernel-compile'
  | 'out-of-memory'
  | 'cache-full'
  | 'disposed';

export class NsaError extends Error {
  readonly code: NsaErrorCode;
  constructor(code: NsaErrorCode, message: string) {
    super(message);
    this.code = code;
    this.name = new.target.name;
  }
}

/** One broken rule of a configuration: the field, the rule, and the value given. */
export interface ConfigIssue {
  readonly path: string;
  readonly rule: string;
  readonly received: unknown;
}

export function formatConfigIssue(issue: ConfigIssue): string {
  return `${issue.path}: ${issue.rule} (got ${formatValue(issue.received)})`;
}

/** A value as a user would write it: NaN and Infinity as such, bigints with their n, anything else as JSON. */
export function formatValue(value: unknown): string {
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value);
  if (typeof value === 'bigint') return `${value}n`;
  if (value === undefined) return 'undefined';
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

/** A configuration that breaks one or more rules; `issues` lists each broken rule. */
export class NsaConfigError extends NsaError {
  readonly issues: readonly ConfigIssue[];
  constructor(issues: readonly ConfigIssue[]) {
    const lines = issues.map((i) => `  - ${formatConfigIssue(i)}`).join('\n');
    super('config', `invalid NSA config:\n${lines}`);
    this.issues = issues;
  }
}

/** A tensor of the wrong rank or shape, or shapes that disagree with each other or the config. */
export class ShapeError extends NsaError {
  constructor(message: string) {
    super('shape', message);
  }
}

/** A tensor of a dtype the operation does not take. */
export class DTypeError extends NsaError {
  constructor(message: string) {
    super('dtype', message);
  }
}

/** Values the operation refuses: NaN/Inf inputs, gates outside [0, 1], bad sequence offsets. */
export class InputValueError extends NsaError {
  constructor(message: string) {
    super('value', message);
  }
}

/** A safetensors file that does not follow the format (truncated, bad header, offsets out of range). */
export class SafetensorsError extends NsaError {
  constructor(message: string) {
    super('safetensors', message);
  }
}

/** A backend that cannot run here: the message says which library was looked for, where, and what to do. */
export class BackendUnavailableError extends NsaError {
  readonly backend: string;
  constructor(backend: string, message: string) {
    super('backend-unavailable', message);
    this.backend = backend;
  }
}

/** A valid config that this backend does not implement (for example a head dim without a kernel). */
export class UnsupportedConfigError extends NsaError {
  constructor(message: string) {
    super('unsupported', message);
  }
}

/** A CUDA driver or NVRTC call that failed: the call, its result code and name, and the kernel if any. */
export class CudaError extends NsaError {
  readonly call: string;
  readonly result: number;
  readonly resultName: string;
  readonly kernel: string | undefined;
  constructor(call: string, result: number, resultName: string, kernel?: string) {
    super('cuda', `${call} failed with ${resultName} (${result})${kernel === undefined ? '' : ` in kernel ${kernel}`}`);
    this.call = call;
    this.result = result;
    this.resultName = resultName;
    this.kernel = kernel;
  }
}

/** NVRTC refused a kernel source; `log` holds the compiler's own words. */
export class KernelCompileError extends NsaError {
  readonly kernel: string;
  readonly log: string;
  constructor(kernel: string, log: string) {
    super('kernel-compile', `NVRTC could not compile kernel ${kernel}:\n${log}`);
    this.kernel = kernel;
    this.log = log;
  }
}

/** A device allocation that did not fit; the process stays usable. */
export class DeviceOutOfMemoryError extends NsaError {
  readonly requestedBytes: number;
  readonly freeBytes: number;
  constructor(requestedBytes: number, freeBytes: number, what: string) {
    super(
      'out-of-memory',
      `out of device memory allocating ${formatBytes(requestedBytes)} for ${what}: ${formatBytes(freeBytes)} free. ` +
        'Use a shorter sequence or a smaller batch, or dispose() tensors you no longer need.',
    );
    this.requestedBytes = requestedBytes;
    this.freeBytes = freeBytes;
  }
}

/** An append that would take a sequence of a KV cache past its capacity; the cache is left unchanged. */
export class CacheFullError extends NsaError {
  constructor(message: string) {
    super('cache-full', message);
  }
}

/** A tensor or backend used after dispose(). */
export class DisposedError extends NsaError {
  constructor(what: string) {
    super('disposed', `${what} was used after dispose()`);
  }
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value.toFixed(0) : value.toFixed(2)} ${units[unit]}`;
}

/** Asserts an internal invariant; a failure here is a bug in this library, not in the caller's input. */
export function invariant(condition: unknown, message: () => string): asserts condition {
  if (!condition) throw new Error(`native-sparse-attention internal error: ${message()}`);
}
