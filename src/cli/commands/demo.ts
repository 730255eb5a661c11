// `nsa demo`: the operator on seeded random inputs on the best backend present: its time, a check of some rows
// against the float64 reference, how many keys each branch attends, and a picture of the selection.

import type { Command } from 'commander';
import { nsaForward, type NsaForwardResult } from '../../nsa/operator.js';
import { formatShape } from '../../tensor/tensor.js';
import { chooseBackend, isGpuBackend } from '../backend-choice.js';
import { newCommand, type CommandContext } from '../command.js';
import { compareArrays } from '../compare.js';
import { formatCount, formatError, formatMs, formatRatio, renderTable } from '../format.js';
import { writeFileAtomic } from '../../tensor/atomic-write.js';
import { EXIT_FAILED, EXIT_OK, println, withFile, type CliIo } from '../io.js';
import { keysPerBranch } from '../keys.js';
import {
  addBackendOption,
  addConfigOptions,
  addHeadOptions,
  addInputOptions,
  addSequenceOptions,
  describeSequences,
  resolveProblem,
  type BackendFlags,
  type ProblemDefaults,
  type ProblemFlags,
} from '../options.js';
import { pngPicture, selectionGrid, textPicture, type GridSource } from '../picture.js';
import { offsets, problemInputs } from '../random-inputs.js';
import { referenceRows } from '../reference.js';
import { spreadEvenly } from '../spread.js';

interface DemoFlags extends BackendFlags, ProblemFlags {
  readonly png?: string;
}

/** Sizes that finish in a few seconds on two CPU cores, and the long-context shapes of the peers on a GPU. */
const CPU_DEFAULTS: ProblemDefaults = { seqlen: 4096, batch: 1, heads: 4, kvHeads: 1, headDim: 64, valueDim: 64, dtype: 'f32', preset: 'paper' };
const GPU_DEFAULTS: ProblemDefaults = { seqlen: 32768, batch: 1, heads: 64, kvHeads: 4, headDim: 128, valueDim: 128, dtype: 'bf16', preset: 'paper' };
/** Relative RMS error of o allowed against the float64 reference. */
const TOLERANCE = { cpu: 1e-4, gpu: 2e-2 };
const CHECK_ROWS = 32;
const TEXT_QUERIES = 8;
const TEXT_COLUMNS = 96;
const PNG_QUERIES = 256;
const PNG_COLUMNS = 1024;

export function demoCommand(ctx: CommandContext): Command {
  const cmd = newCommand('demo', 'run NSA on seeded random inputs, check it against the float64 reference and picture the selection', ctx.io);
  addBackendOption(cmd, 'backend to run on (default: the best present, cuda before cpu)');
  addConfigOptions(cmd);
  addHeadOptions(cmd);
  addSequenceOptions(cmd);
  addInputOptions(cmd);
  cmd.option('--png <file>', 'also write a PNG of the selection of many queries');
  cmd.addHelpText(
    'after',
    `
Defaults: on cpu T = ${CPU_DEFAULTS.seqlen}, Hq = ${CPU_DEFAULTS.heads}, H = ${CPU_DEFAULTS.kvHeads}, Dk = Dv = ${CPU_DEFAULTS.headDim}, f32;
on a GPU T = ${GPU_DEFAULTS.seqlen}, Hq = ${GPU_DEFAULTS.heads}, H = ${GPU_DEFAULTS.kvHeads}, Dk = Dv = ${GPU_DEFAULTS.headDim}, bf16; the paper's preset.
Exit code 1 when o differs from the reference by more than ${TOLERANCE.cpu} (cpu) or ${TOLERANCE.gpu} (GPU) relative RMS.

Examples:
  nsa demo
  nsa demo --seqlen 16k --preset fla --png selection.png`,
  );
  return cmd.action(async () => {
    ctx.exitCode = await runDemo(cmd.opts<DemoFlags>(), ctx.io);
  });
}

async function runDemo(flags: DemoFlags, io: CliIo): Promise<number> {
  const backend = await chooseBackend(flags.backend, io);
  const gpu = isGpuBackend(backend);
  const spec = resolveProblem(flags, gpu ? GPU_DEFAULTS : CPU_DEFAULTS);
  const inputs = problemInputs(spec);
  const out = (...lines: string[]): void => println(io.stdout, ...lines);
  out(
    `backend   ${backend.description}`,
    `config    ${spec.config.toString()}`,
    `inputs    q ${formatShape(inputs.q.shape)}, k ${formatShape(inputs.k.shape)}, v ${formatShape(inputs.v.shape)}, ` +
      `g ${formatShape(inputs.g.shape)}; ${describeSequences(spec.seqlens)}, ${spec.dtype}, seed ${spec.seed}`,
  );

  const start = performance.now();
  const result = await nsaForward(inputs, spec.config, { backend });
  try {
    out(`forward   ${formatMs(performance.now() - start)} ms (wall clock, one call${gpu ? ', compilation included' : ''})`);
    if (gpu) {
      // The backend's timer makes the same inputs (the library's recipe) where it computes.
      const problem = { config: spec.config, cuSeqlens: offsets(spec.seqlens), dtype: spec.dtype, seed: spec.seed };
      const timing = await backend.time(problem, { warmup: 2, iterations: 10 });
      out(`          ${formatMs(timing.medianMs)} ms median of 10 after 2 warm-up runs (${timing.clock})`);
    }

    const tolerance = gpu ? TOLERANCE.gpu : TOLERANCE.cpu;
    const check = checkRows(result, gpu, tolerance, out);
    printKeys(result, out);
    const source = gridSource(result);
    const queries = spreadEvenly(source.length, TEXT_QUERIES);
    out('', `selection of KV head 0 in ${describeSequence(result, source)}, ${queries.length} queries:`);
    out(...textPicture(selectionGrid(source, queries, TEXT_COLUMNS), spec.config.selectBlock));
    if (flags.png !== undefined) await writePng(flags.png, source, out);
    if (check.ok) return EXIT_OK;
    io.stderr(`nsa demo: FAILED on ${backend.name}: o differs from the float64 reference (${check.summary})\n`);
    return EXIT_FAILED;
  } finally {
    result.release();
  }
}

/**
 * Compares o and the block indices of a few rows with the float64 reference; ok when o is within tolerance.
 * On a GPU, o is compared with the reference run on the backend's own selection, so that a near tie flipped in
 * lower precision (a legitimate difference, judged by the block indices line) does not count as an error of o.
 */
function checkRows(
  result: NsaForwardResult,
  gpu: boolean,
  tolerance: number,
  out: (...lines: string[]) => void,
): { ok: boolean; summary: string } {
  const { request } = result;
  const { heads: Hq, kvHeads: H, valueDim: Dv, selectCount: n } = request.config;
  const totalRows = request.batch * request.tokens;
  const rows = spreadEvenly(totalRows, CHECK_ROWS);
  const indices = result.blockIndices.data;
  const free = referenceRows(request, rows);
  const reference = gpu ? referenceRows(request, rows, indices) : free;
  const o = result.o.toFloat32(); // the output array itself when f32: no copy of a long sequence's o
  const actual = new Float64Array(reference.o.length);
  let sameRows = 0;
  rows.forEach((row, i) => {
    actual.set(o.subarray(row * Hq * Dv, (row + 1) * Hq * Dv), i * Hq * Dv);
    const a = indices.subarray(row * H * n, (row + 1) * H * n);
    const b = free.blockIndices.subarray(i * H * n, (i + 1) * H * n);
    if (a.every((x, k) => x === b[k])) sameRows++;
  });
  const error = compareArrays(actual, reference.o);
  const ok = error.relRms <= tolerance && error.mismatched === 0;
  out(
    '',
    `check against the float64 reference on ${rows.length} rows spread over all ${formatCount(totalRows)} (first and last included):`,
    `  o: relative RMS error ${formatError(error.relRms)}, max abs ${formatError(error.maxAbs)} ` +
      `(tolerance ${formatError(tolerance)}${gpu ? ", on the backend's selection" : ''}): ${ok ? 'ok' : 'FAILED'}`,
    `  block indices: ${sameRows} of ${rows.length} rows identical${sameRows === rows.length ? '' : ' (near ties may flip in lower precision)'}`,
  );
  const summary = error.mismatched > 0 ? `${error.mismatched} non-finite values disagree` : `relative RMS ${formatError(error.relRms)} > ${formatError(tolerance)}`;
  return { ok, summary };
}

function printKeys(result: NsaForwardResult, out: (...lines: string[]) => void): void {
  const { config, cuSeqlens } = result.request;
  const keys = keysPerBranch(config, cuSeqlens, result.blockIndices.data);
  const row = (name: string, value: number, what: string): string[] => [name, formatCount(value, 1), what];
  const table = renderTable(
    ['branch', 'keys', 'what'],
    [
      row('cmp', keys.cmp, `visible compressed tokens (blocks of l = ${config.compressBlock}, stride d = ${config.compressStride})`),
      row('slc', keys.slc, `selected keys after the causal clip (n = ${config.selectCount} blocks of l' = ${config.selectBlock})`),
      row('win', keys.win, `sliding window (w = ${config.window})`),
      row('total', keys.total, 'all three branches'),
      row('full', keys.full, 'full causal attention'),
    ],
    ['left', 'right', 'left'],
  );
  const breakEven = config.selectCount * config.selectBlock + config.window;
  const verdict =
    keys.total < keys.full
      ? `NSA attends ${((100 * keys.total) / keys.full).toFixed(0)}% of the keys of full causal attention (${formatRatio(keys.full / keys.total)} fewer)`
      : `NSA attends ${formatRatio(keys.total / keys.full)} the keys of full causal attention here: ` +
        `it saves work once sequences are well beyond n*l' + w = ${formatCount(breakEven)} tokens (try --seqlen ${Math.ceil((breakEven * 4) / 1024)}k)`;
  out('', `keys attended per query (mean over ${formatCount(keys.queries)} queries and the KV heads):`, ...table.map((l) => `  ${l}`), `  ${verdict}`);
}

/** The longest sequence, KV head 0. */
function gridSource(result: NsaForwardResult): GridSource {
  const { config, cuSeqlens } = result.request;
  let best = 0;
  for (let s = 1; s + 1 < cuSeqlens.length; s++) {
    if (cuSeqlens[s + 1]! - cuSeqlens[s]! > cuSeqlens[best + 1]! - cuSeqlens[best]!) best = s;
  }
  return {
    blockIndices: result.blockIndices.data,
    kvHeads: config.kvHeads,
    selectCount: config.selectCount,
    selectBlock: config.selectBlock,
    start: cuSeqlens[best]!,
    length: cuSeqlens[best + 1]! - cuSeqlens[best]!,
    head: 0,
  };
}

function describeSequence(result: NsaForwardResult, source: GridSource): string {
  const index = result.request.cuSeqlens.indexOf(source.start);
  const count = result.request.cuSeqlens.length - 1;
  const blocks = Math.ceil(source.length / source.selectBlock);
  return `${count > 1 ? `sequence ${index} of ${count}` : 'the sequence'} (T = ${formatCount(source.length)}, ${blocks} blocks)`;
}

async function writePng(path: string, source: GridSource, out: (...lines: string[]) => void): Promise<void> {
  const queries = spreadEvenly(source.length, PNG_QUERIES);
  const grid = selectionGrid(source, queries, PNG_COLUMNS);
  const bytes = pngPicture(grid);
  await withFile('write', path, () => writeFileAtomic(path, bytes));
  out(
    '',
    `wrote ${path}: ${queries.length} queries (rows, t from 0 to ${source.length - 1}) x ${grid.columns} columns of ` +
      `${grid.blocksPerColumn} block(s); red selected, light blue visible, white future`,
  );
}
