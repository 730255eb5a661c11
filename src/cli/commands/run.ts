// `nsa run --in inputs.safetensors --out outputs.safetensors`: the PyTorch interchange of NSA-SPEC.md. Reads the
// inputs and their nsa_config, applies flag overrides, runs the forward (and the backward when `do` is given) and
// writes every output atomically with the resolved config in the file's metadata.

import { Option, type Command } from 'commander';
import { configFromMetadata, inputsFromTensors, metadataFromConfig, tensorsFromOutputs } from '../../nsa/interchange.js';
import { nsaForward } from '../../nsa/operator.js';
import { readSafetensorsFile, writeSafetensorsFile } from '../../tensor/safetensors.js';
import { formatShape, type Tensor } from '../../tensor/tensor.js';
import { chooseBackend } from '../backend-choice.js';
import { newCommand, type CommandContext } from '../command.js';
import { formatMs } from '../format.js';
import { EXIT_OK, println, withFile, type CliIo } from '../io.js';
import { addBackendOption, addConfigOptions, configOverrides, INPUT_DTYPES, type BackendFlags, type ConfigFlags, type InputDType } from '../options.js';

interface RunFlags extends BackendFlags, ConfigFlags {
  readonly in: string;
  readonly out: string;
  readonly outDtype?: InputDType;
}

export function runCommand(ctx: CommandContext): Command {
  const cmd = newCommand('run', 'run NSA on the tensors of a safetensors file and write the outputs (and gradients) to another', ctx.io);
  cmd
    .addOption(new Option('--in <file>', 'inputs: q, k, v, g, optional cu_seqlens, k_cmp/v_cmp, k_slc/.../v_win, phi_k.*/phi_v.*, do').makeOptionMandatory())
    .addOption(new Option('--out <file>', 'where to write the outputs (written atomically: never a partial file)').makeOptionMandatory());
  addBackendOption(cmd, 'backend to run on (default: the best present, cuda before cpu)');
  addConfigOptions(cmd, { presetNote: "applied over the file's nsa_config, under the other flags" });
  cmd.addOption(new Option('--out-dtype <dtype>', 'dtype of the written outputs and gradients (default f32)').choices(INPUT_DTYPES));
  cmd.addHelpText(
    'after',
    `
The config comes from the inputs file's __metadata__ key nsa_config (JSON with compress_block, compress_stride,
select_block, select_count, window, phi, scale; missing keys take the paper's values), then --preset, then the
other flags. Outputs: o, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win, block_indices, and with a \`do\` input the
gradients dq, dk, dv, dg (and those of the optional inputs given). The outputs' nsa_config is the resolved one.
Exit code 2 for a missing, malformed or inconsistent inputs file; nothing is written then.

Example:
  nsa run --in case.inputs.safetensors --out case.outputs.safetensors --window 256`,
  );
  return cmd.action(async () => {
    ctx.exitCode = await runRun(cmd.opts<RunFlags>(), ctx.io);
  });
}

async function runRun(flags: RunFlags, io: CliIo): Promise<number> {
  const file = await withFile('read', flags.in, () => readSafetensorsFile(flags.in));
  const { inputs, dOut } = inputsFromTensors(file.tensors);
  const options = { ...configFromMetadata(file.metadata), ...configOverrides(flags) };
  const backend = await chooseBackend(flags.backend, io);

  let start = performance.now();
  const result = await nsaForward(inputs, options, { backend, outputDType: flags.outDtype ?? 'f32' });
  const forwardMs = performance.now() - start;
  start = performance.now();
  const grads = dOut === undefined ? undefined : await result.backward(dOut);
  const backwardMs = performance.now() - start;
  result.release();

  const { config } = result.request;
  const tensors = tensorsFromOutputs(result, grads);
  const metadata = metadataFromConfig({ ...config.toOptions(), scale: config.scale });
  await withFile('write', flags.out, () => writeSafetensorsFile(flags.out, tensors, metadata));
  const times = `forward ${formatMs(forwardMs)} ms${grads === undefined ? '' : `, backward ${formatMs(backwardMs)} ms`}`;
  println(io.stdout, `nsa run: wrote ${tensors.size} tensors to ${flags.out} (${describeTensors(tensors)}); ${times} on ${backend.name}`);
  return EXIT_OK;
}

/** Tensors grouped by shape and dtype, in order: "o, o_cmp [1, 37, 2, 4] f32; lse_cmp [1, 37, 2] f32". */
function describeTensors(tensors: ReadonlyMap<string, Tensor>): string {
  const groups = new Map<string, string[]>();
  for (const [name, t] of tensors) {
    const key = `${formatShape(t.shape)} ${t.dtype}`;
    groups.set(key, [...(groups.get(key) ?? []), name]);
  }
  return [...groups].map(([key, names]) => `${names.join(', ')} ${key}`).join('; ');
}
