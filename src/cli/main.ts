#!/usr/bin/env node
// The `nsa` executable: runs the CLI on the process's arguments and streams, then releases the backends.

import { disposeBackends } from '../backends/index.js';
import { runCli } from './cli.js';

// A closed pipe (`nsa bench | head`) ends the output quietly instead of crashing with EPIPE.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code !== 'EPIPE') throw e;
    process.exit(process.exitCode ?? 0);
  });
}

const code = await runCli(process.argv.slice(2), {
  stdout: (s) => process.stdout.write(s),
  stderr: (s) => process.stderr.write(s),
  progress: process.stderr.isTTY ? process.stderr : undefined,
});
await disposeBackends();
process.exitCode = code;
