// `nsa check --backend NAME`: one backend against the float64 reference on the same seeded inputs, tensor by
// tensor (outputs, and gradients with --backward), at the backend's tolerance. Exit code 1 names what failed.

import type { Command } from 'commander';
import { tensorsFromOutputs } from '../../nsa/interchange.js';
import { nsaForward } from '../../nsa/operator.js';
import type { NsaRequest } from '../../nsa/validate.js';
import { nsaReferenceBackward } from '../../reference/nsa-backward.js';
import {
  blockScoresAt,
  nsaReferenceForward,
  prepareNsaProblem,
  type NsaReferenceInputs,
  type NsaReferenceOutputs,
} from '../../reference/nsa-forward.js';
import { formatShape } from '../../tensor/tensor.js';
import { chooseBackend, isGpuBackend } from '../backend-choice.js';
import { newCommand, type CommandContext } from '../command.js';
import { compareArrays, type ArrayError } from '../compare.js';
import { formatCount, formatError, renderTable } from '../format.js';
import { EXIT_FAILED, EXIT_OK, println, type CliIo } from '../io.js';
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
import { problemInputs, randomDOut } from '../random-inputs.js';
import { referenceInputsOf, referenceTensorsByName } from '../reference.js';

interface CheckFlags extends BackendFlags, ProblemFlags {
  readonly backward?: boolean;
}

/** The reference runs over every row, so the default problem is small (T not a multiple of any block). */
const DEFAULTS: ProblemDefaults = { seqlen: 1000, batch: 1, heads: 8, kvHeads: 2, headDim: 64, valueDim: 64, dtype: 'f32', preset: 'paper' };
/** Relative RMS error allowed: the cpu runs the reference's own arithmetic; GPUs take the spec's 0.5%. */
const TOLERANCE = { cpu: 1e-5, gpu: 5e-3 };

export function checkCommand(ctx: CommandContext): Command {
  const cmd = newCommand('check', 'compare a backend with the float64 reference on seeded random inputs, tensor by tensor', ctx.io);
  addBackendOption(cmd, 'backend to check', { required: true });
  addConfigOptions(cmd);
  addHeadOptions(cmd);
  addSequenceOptions(cmd);
  addInputOptions(cmd);
  cmd.option('--backward', 'also check the gradients dq, dk, dv, dg (for a random dO)');
  cmd.addHelpText(
    'after',
    `
Defaults: T = ${DEFAULTS.seqlen}, Hq = ${DEFAULTS.heads}, H = ${DEFAULTS.kvHeads}, Dk = Dv = ${DEFAULTS.headDim}, the paper's preset;
f32 inputs on cpu, bf16 on a GPU. Tolerance (relative RMS): ${TOLERANCE.cpu} on cpu, ${TOLERANCE.gpu} on a GPU.
lse positions of -inf (a branch that sees no key) must match exactly. block_indices: rows that differ fail on
cpu; on a GPU they pass when the chosen blocks' reference scores sum to within tolerance of the reference's.
Exit code 1 when any tensor is out of tolerance.

Examples:
  nsa check --backend cpu --seqlen 300 --backward
  nsa check --backend cuda --seqlens 100,1000,3000 --preset fla`,
  );
  return cmd.action(async () => {
    ctx.exitCode = await runCheck(cmd.opts<CheckFlags>(), ctx.io);
  });
}

interface Row {
  readonly name: string;
  readonly shape: string;
  readonly error: ArrayError;
}

async function runCheck(flags: CheckFlags, io: CliIo): Promise<number> {
  const backend = await chooseBackend(flags.backend, io);
  const gpu = isGpuBackend(backend);
  const spec = resolveProblem(flags, { ...DEFAULTS, dtype: gpu ? 'bf16' : 'f32' });
  const tolerance = gpu ? TOLERANCE.gpu : TOLERANCE.cpu;
  const inputs = problemInputs(spec);
  const out = (...lines: string[]): void => println(io.stdout, ...lines);
  out(
    `backend    ${backend.description}`,
    `config     ${spec.config.toString()}`,
    `inputs     q ${formatShape(inputs.q.shape)}; ${describeSequences(spec.seqlens)}, ${spec.dtype}, seed ${spec.seed}`,
    `tolerance  ${formatError(tolerance)} relative RMS`,
    '',
  );

  const result = await nsaForward(inputs, spec.config, { backend });
  const dOut = flags.backward ? randomDOut(spec) : undefined;
  const grads = dOut === undefined ? undefined : await result.backward(dOut);
  const actual = tensorsFromOutputs(result, grads);
  result.release();

  // The reference's own top-n judges the selection; on a GPU the outputs are compared with the reference run on
  // the backend's selection, so that a near tie flipped in lower precision is judged once, by its scores.
  const refInputs = referenceInputsOf(result.request);
  const free = nsaReferenceForward(spec.config, refInputs);
  const chosen = actual.get('block_indices')!.data as Int32Array;
  const blocks = checkBlockIndices(result.request, chosen, free, refInputs, gpu, tolerance);
  const refOut = gpu && blocks.differing > 0 ? nsaReferenceForward(spec.config, refInputs, chosen) : free;
  const refGrads = dOut === undefined ? undefined : nsaReferenceBackward(spec.config, refInputs, refOut, dOut.toFloat64());
  const expected = referenceTensorsByName(refOut, refGrads);

  const rows: Row[] = [];
  for (const [name, tensor] of actual) {
    if (name === 'block_indices') continue;
    const reference = expected.get(name);
    if (reference === undefined) throw new Error(`the reference has no ${name} to compare with`);
    rows.push({ name, shape: formatShape(tensor.shape), error: compareArrays(tensor.toFloat64(), reference) });
  }
  const failures = rows.filter((r) => !(r.error.relRms <= tolerance) || r.error.mismatched > 0);
  out(
    ...renderTable(
      ['tensor', 'shape', 'rel RMS', 'max abs', '-inf (ref / mismatched)', 'status'],
      rows.map((r) => [
        r.name,
        r.shape,
        formatError(r.error.relRms),
        formatError(r.error.maxAbs),
        r.name.startsWith('lse') ? `${r.error.nonFinite} / ${r.error.mismatched}` : '-',
        failures.includes(r) ? 'FAILED' : 'ok',
      ]),
    ),
  );

  out('', blocks.line);
  if (refOut !== free) out("(outputs and gradients above are compared with the reference run on the backend's selection)");

  const failed = [...failures.map((r) => `${r.name} (${describeFailure(r.error, tolerance)})`), ...(blocks.ok ? [] : ['block_indices'])];
  if (failed.length > 0) {
    io.stderr(`nsa check: FAILED on ${backend.name}: ${failed.join(', ')}\n`);
    return EXIT_FAILED;
  }
  out('', `all ${rows.length + 1} tensors match the float64 reference on ${backend.name}`);
  return EXIT_OK;
}

function describeFailure(error: ArrayError, tolerance: number): string {
  if (error.mismatched > 0) return `${error.mismatched} positions where only one side is -inf or NaN`;
  return `relative RMS ${formatError(error.relRms)} > ${formatError(tolerance)}`;
}

/** Row by row (query, KV head); differing rows are judged by their reference score sums on a GPU. */
function checkBlockIndices(
  request: NsaRequest,
  got: Int32Array,
  reference: NsaReferenceOutputs,
  refInputs: NsaReferenceInputs,
  gpu: boolean,
  tolerance: number,
): { ok: boolean; differing: number; line: string } {
  const n = request.config.selectCount;
  const H = request.config.kvHeads;
  const want = reference.blockIndices;
  const total = got.length / n;
  const differing: number[] = [];
  for (let r = 0; r < total; r++) {
    for (let i = 0; i < n; i++) {
      if (got[r * n + i] !== want[r * n + i]) {
        differing.push(r);
        break;
      }
    }
  }
  const same = `block_indices: ${formatCount(total - differing.length)} of ${formatCount(total)} (query, KV head) rows identical`;
  if (differing.length === 0) return { ok: true, differing: 0, line: `${same}: ok` };
  if (!gpu) return { ok: false, differing: differing.length, line: `${same}; ${differing.length} differ: FAILED (the cpu must match exactly)` };
  const problem = prepareNsaProblem(request.config, refInputs);
  let worst = 0;
  for (const r of differing) {
    const scores = blockScoresAt(problem, Math.floor(r / H), r % H);
    const mine = scoreSum(scores, got.subarray(r * n, (r + 1) * n));
    const theirs = scoreSum(scores, want.subarray(r * n, (r + 1) * n));
    worst = Math.max(worst, (theirs - mine) / Math.max(theirs, Number.MIN_VALUE));
  }
  const ok = worst <= tolerance;
  return {
    ok,
    differing: differing.length,
    line:
      `${same}; ${differing.length} differ, their chosen blocks' reference scores sum to within ${formatError(worst)} ` +
      `(relative) of the reference's choice (tolerance ${formatError(tolerance)}): ${ok ? 'ok' : 'FAILED'}`,
  };
}

function scoreSum(scores: Float64Array, blocks: Int32Array): number {
  let sum = 0;
  for (const j of blocks) if (j >= 0 && j < scores.length) sum += scores[j]!;
  return sum;
}
