// The conformance cases of ../shared/conformance, copied into test/fixtures/conformance: inputs, config and
// expected outputs computed by an independent float64 implementation of the spec.

import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { configFromMetadata, inputsFromTensors } from '../../src/nsa/interchange.js';
import type { NSAConfigOptions } from '../../src/config/nsa-config.js';
import type { NsaInputs } from '../../src/nsa/types.js';
import { readSafetensorsFile } from '../../src/tensor/safetensors.js';
import type { Tensor } from '../../src/tensor/tensor.js';

export const CONFORMANCE_DIR = fileURLToPath(new URL('../fixtures/conformance/', import.meta.url));

export function conformanceCaseNames(): string[] {
  return readdirSync(CONFORMANCE_DIR)
    .filter((f) => f.endsWith('.inputs.safetensors'))
    .map((f) => f.replace('.inputs.safetensors', ''))
    .sort();
}

export interface ConformanceCase {
  readonly name: string;
  readonly options: NSAConfigOptions;
  readonly inputs: NsaInputs;
  readonly expected: ReadonlyMap<string, Tensor>;
}

export async function loadConformanceCase(name: string): Promise<ConformanceCase> {
  const inputsFile = await readSafetensorsFile(`${CONFORMANCE_DIR}${name}.inputs.safetensors`);
  const expectedFile = await readSafetensorsFile(`${CONFORMANCE_DIR}${name}.expected.safetensors`);
  return {
    name,
    options: configFromMetadata(inputsFile.metadata),
    inputs: inputsFromTensors(inputsFile.tensors).inputs,
    expected: expectedFile.tensors,
  };
}
