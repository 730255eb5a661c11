// The `nsa` command line: demo, check, bench and run. runCli parses argv, runs one command with its output
// going to `io`, and returns the exit code (0 success, 1 the command failed, 2 usage or input error).

import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { configureCommand, type CommandContext } from './command.js';
import { benchCommand } from './commands/bench.js';
import { checkCommand } from './commands/check.js';
import { demoCommand } from './commands/demo.js';
import { runCommand } from './commands/run.js';
import { reportError } from './exit.js';
import type { CliIo } from './io.js';

export type { CliIo } from './io.js';

export async function runCli(argv: readonly string[], io: CliIo): Promise<number> {
  const ctx: CommandContext = { io, argv, exitCode: 0 };
  let active = 'nsa';
  const program = configureCommand(new Command('nsa'), io)
    .description('Native Sparse Attention (DeepSeek NSA, arXiv 2502.11089): try it, check a backend, benchmark, run on files')
    .version(packageVersion(), '-V, --version', 'print the version')
    .addCommand(demoCommand(ctx))
    .addCommand(checkCommand(ctx))
    .addCommand(benchCommand(ctx))
    .addCommand(runCommand(ctx))
    .addHelpText('after', '\nRun `nsa <command> --help` for the flags of each command.')
    .hook('preAction', (_program, action) => {
      active = action.name();
    });
  try {
    await program.parseAsync([...argv], { from: 'user' });
    return ctx.exitCode;
  } catch (e) {
    return reportError(e, active, io);
  }
}

function packageVersion(): string {
  try {
    const pkg: unknown = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8'));
    const version = (pkg as { version?: unknown }).version;
    return typeof version === 'string' ? version : 'unknown';
  } catch {
    return 'unknown';
  }
}
