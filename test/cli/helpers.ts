// Runs the CLI in-process with captured output.

import { runCli } from '../../src/cli/cli.js';

export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export async function cli(...argv: string[]): Promise<CliResult> {
  let stdout = '';
  let stderr = '';
  const code = await runCli(argv, { stdout: (s) => (stdout += s), stderr: (s) => (stderr += s) });
  return { code, stdout, stderr };
}

/** A tiny problem: T = 100 (not a multiple of any block), G = 2, Dk != Dv, small blocks so every branch matters. */
export const TINY = ['--seqlen', '100', '--heads', '4', '--kv-heads', '2', '--head-dim', '16', '--value-dim', '8'];
export const TINY_CONFIG = ['-l', '8', '-d', '4', '--select-block', '16', '-n', '4', '-w', '16'];
