// What every subcommand shares: its commander set-up (output through the CliIo, errors as `nsa <cmd>: ...`,
// no process.exit) and the context its action reports its exit code to.

import { Command } from 'commander';
import type { CliIo } from './io.js';

export interface CommandContext {
  readonly io: CliIo;
  /** The arguments runCli was given (bench records them). */
  readonly argv: readonly string[];
  /** Set by the action that ran: 0 success, 1 failed. Errors thrown by actions are classified by runCli. */
  exitCode: number;
}

/** A subcommand that writes through `io` and throws CommanderError instead of exiting. */
export function newCommand(name: string, description: string, io: CliIo): Command {
  return configureCommand(new Command(name), io).description(description);
}

export function configureCommand(cmd: Command, io: CliIo): Command {
  return cmd
    .configureOutput({
      writeOut: (s) => io.stdout(s),
      writeErr: (s) => io.stderr(s),
      outputError: (s, write) => write(`${cmd.name() === 'nsa' ? 'nsa' : `nsa ${cmd.name()}`}: ${s.replace(/^error: /, '')}`),
    })
    .exitOverride()
    .showSuggestionAfterError(true);
}
