// The benchmark's outside baseline: torch's scaled_dot_product_attention (causal, GQA) timed by
// bench/torch_sdpa.py in a python3 process. Detection runs once and says why the baseline is skipped when
// python3, torch or a CUDA device is missing. NSA_PYTHON names another interpreter (a virtualenv's).

import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { firstLine } from './backend-choice.js';

export type TorchProbe =
  | { readonly available: true; readonly python: string; readonly script: string; readonly torch: string; readonly device: string }
  | { readonly available: false; readonly reason: string };

export interface SdpaRequest {
  readonly seqlen: number;
  readonly batch: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly valueDim: number;
  readonly dtype: string;
  readonly backward: boolean;
  readonly warmup: number;
  readonly iters: number;
}

export interface SdpaTiming {
  readonly medianMs: number;
  readonly samplesMs?: readonly number[];
  readonly device: string;
  readonly torch: string;
}

/** bench/torch_sdpa.py of the repository (the same path from src/cli and dist/cli). */
export const SDPA_SCRIPT = fileURLToPath(new URL('../../bench/torch_sdpa.py', import.meta.url));

const PROBE = [
  'import json, torch',
  'ok = torch.cuda.is_available()',
  "print(json.dumps({'torch': torch.__version__, 'cuda': ok, 'device': torch.cuda.get_device_name(0) if ok else None}))",
].join('\n');

export async function detectTorch(python = process.env['NSA_PYTHON'] ?? 'python3'): Promise<TorchProbe> {
  if (!existsSync(SDPA_SCRIPT)) return { available: false, reason: `${SDPA_SCRIPT} is missing (it ships with the repository)` };
  let stdout: string;
  try {
    stdout = (await run(python, ['-c', PROBE], 120_000)).stdout;
  } catch (e) {
    const err = e as RunError;
    if (err.code === 'ENOENT') return { available: false, reason: `${python} was not found on PATH` };
    if (/No module named '?torch'?/.test(err.stderr ?? '')) return { available: false, reason: `torch is not installed for ${python}` };
    return { available: false, reason: `${python} could not import torch: ${firstLine(lastLine(err.stderr ?? err.message))}` };
  }
  const info = parseJsonLine(stdout) as { torch?: unknown; cuda?: unknown; device?: unknown } | undefined;
  if (info === undefined || typeof info.torch !== 'string') return { available: false, reason: `unexpected output from ${python}: ${firstLine(stdout)}` };
  if (info.cuda !== true) return { available: false, reason: `torch ${info.torch} sees no CUDA device` };
  return { available: true, python, script: SDPA_SCRIPT, torch: info.torch, device: String(info.device) };
}

/** Runs the script for one shape; throws with the script's last error line when it fails. */
export async function timeSdpa(probe: TorchProbe & { available: true }, req: SdpaRequest): Promise<SdpaTiming> {
  const args = [
    probe.script,
    `--seqlen=${req.seqlen}`,
    `--batch=${req.batch}`,
    `--heads=${req.heads}`,
    `--kv-heads=${req.kvHeads}`,
    `--head-dim=${req.headDim}`,
    `--value-dim=${req.valueDim}`,
    `--dtype=${req.dtype}`,
    `--warmup=${req.warmup}`,
    `--iters=${req.iters}`,
    ...(req.backward ? ['--backward'] : []),
  ];
  let stdout: string;
  try {
    stdout = (await run(probe.python, args, 600_000)).stdout;
  } catch (e) {
    const err = e as RunError;
    throw new Error(`torch SDPA failed at T = ${req.seqlen}: ${firstLine(lastLine(err.stderr ?? err.message))}`, { cause: e });
  }
  const result = parseJsonLine(stdout) as { median_ms?: unknown; samples_ms?: unknown; device?: unknown; torch?: unknown } | undefined;
  if (result === undefined || typeof result.median_ms !== 'number') {
    throw new Error(`torch SDPA printed no median_ms at T = ${req.seqlen}: ${firstLine(stdout)}`);
  }
  const samples = Array.isArray(result.samples_ms) ? result.samples_ms.filter((x): x is number => typeof x === 'number') : undefined;
  return {
    medianMs: result.median_ms,
    ...(samples === undefined ? {} : { samplesMs: samples }),
    device: String(result.device ?? probe.device),
    torch: String(result.torch ?? probe.torch),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Implementation

interface RunError extends Error {
  code?: string | number;
  stderr?: string;
}

function run(file: string, args: readonly string[], timeout: number): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout, maxBuffer: 16 << 20, encoding: 'utf8' }, (error, stdout, stderr) => {
      if (error) reject(Object.assign(error, { stderr }));
      else resolve({ stdout, stderr });
    });
  });
}

/** The last line of stdout that parses as a JSON object. */
function parseJsonLine(stdout: string): unknown {
  const lines = stdout.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('{'));
  for (let i = lines.length - 1; i >= 0; i--) {
    try {
      return JSON.parse(lines[i]!);
    } catch {
      // not JSON: keep looking
    }
  }
  return undefined;
}

function lastLine(text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  return lines[lines.length - 1] ?? text;
}
