// What every command writes to, and the two errors the CLI itself raises. Commands never touch process.stdout
// or process.exit: runCli receives an io and returns the exit code, so tests drive the CLI in-process.

/** Where the CLI writes. Each call is one or more whole lines (the text carries its own newlines). */
export interface CliIo {
  readonly stdout: (s: string) => void;
  readonly stderr: (s: string) => void;
  /** A TTY stream for progress bars; absent when progress should not be drawn (tests, pipes, CI logs). */
  readonly progress?: NodeJS.WritableStream | undefined;
}

/** Exit codes: success, the command ran but failed, the command line or its input was wrong. */
export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;

/** A bad flag combination or value the option parsers could not catch alone: exit code 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** A file named on the command line that cannot be read or written (missing, no permission): exit code 2. */
export class FileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FileError';
  }
}

/** Runs a file operation, turning Node's system errors (ENOENT, EACCES, ...) into a FileError naming the path. */
export async function withFile<T>(verb: 'read' | 'write', path: string, op: () => Promise<T>): Promise<T> {
  try {
    return await op();
  } catch (e) {
    if (isSystemError(e)) throw new FileError(`cannot ${verb} ${path}: ${describeSystemError(e)}`);
    throw e;
  }
}

interface SystemError extends Error {
  readonly code: string;
  readonly syscall?: string;
}

export function isSystemError(e: unknown): e is SystemError {
  return e instanceof Error && typeof (e as { code?: unknown }).code === 'string' && /^E[A-Z]+$/.test((e as SystemError).code);
}

const SYSTEM_ERRORS: Readonly<Record<string, string>> = {
  ENOENT: 'no such file or directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EISDIR: 'it is a directory',
  ENOTDIR: 'a parent is not a directory',
  ENOSPC: 'no space left on the device',
  EROFS: 'read-only file system',
};

function describeSystemError(e: SystemError): string {
  return SYSTEM_ERRORS[e.code] ?? e.message;
}

/** Writes each line with a trailing newline. */
export function println(write: (s: string) => void, ...lines: string[]): void {
  for (const line of lines) write(`${line}\n`);
}
