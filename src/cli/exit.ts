// Errors to exit codes and messages: usage and input errors exit 2, failures of a command that ran exit 1.
// Every message is one line `nsa <cmd>: <message>` (a config error lists each broken rule on its own line);
// a stack trace is printed only for unexpected errors, and only when NSA_DEBUG is set.

import { CommanderError } from 'commander';
import { BackendUnavailableError, formatConfigIssue, NsaConfigError, NsaError, type NsaErrorCode } from '../errors.js';
import { EXIT_FAILED, EXIT_OK, EXIT_USAGE, FileError, UsageError, type CliIo } from './io.js';
import { FLAG_OF_FIELD } from './options.js';

/** Error codes that mean the input (flags, files, tensors) was wrong rather than the run failing. */
const INPUT_ERROR_CODES: ReadonlySet<NsaErrorCode> = new Set(['config', 'shape', 'dtype', 'value', 'safetensors']);

export function exitCodeFor(e: unknown): number {
  if (e instanceof CommanderError) {
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return EXIT_OK;
    if (e.code === 'commander.help') return e.exitCode === 0 ? EXIT_OK : EXIT_USAGE;
    return EXIT_USAGE;
  }
  if (e instanceof UsageError || e instanceof FileError) return EXIT_USAGE;
  if (e instanceof NsaError) return INPUT_ERROR_CODES.has(e.code) ? EXIT_USAGE : EXIT_FAILED;
  return EXIT_FAILED;
}

/** Prints the error (commander prints its own) and returns the exit code. */
export function reportError(e: unknown, command: string, io: CliIo): number {
  const code = exitCodeFor(e);
  if (!(e instanceof CommanderError)) io.stderr(`${command === 'nsa' ? 'nsa' : `nsa ${command}`}: ${errorMessage(e)}\n`);
  return code;
}

export function errorMessage(e: unknown): string {
  if (e instanceof NsaConfigError) {
    const lines = e.issues.map((issue) => {
      const flag = FLAG_OF_FIELD[issue.path];
      return `  - ${formatConfigIssue(flag === undefined ? issue : { ...issue, path: `${issue.path} (${flag})` })}`;
    });
    return ['invalid NSA config:', ...lines].join('\n');
  }
  // The backend's own diagnosis can span lines (where it looked, what to do): kept whole.
  if (e instanceof BackendUnavailableError) return `${e.backend} backend unavailable: ${e.message}`;
  if (e instanceof NsaError || e instanceof UsageError || e instanceof FileError) return e.message;
  const message = e instanceof Error ? e.message : String(e);
  if (process.env['NSA_DEBUG'] && e instanceof Error && e.stack !== undefined) return e.stack;
  return `${message} (unexpected error; set NSA_DEBUG=1 to see the stack)`;
}
