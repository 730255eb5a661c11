// The operator on the CPU backend against the independent implementation's expected outputs.

import { describe, expect, it } from 'vitest';
import { CpuBackend } from '../../src/backends/cpu/cpu-backend.js';
import { tensorsFromOutputs } from '../../src/nsa/interchange.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { conformanceCaseNames, loadConformanceCase } from '../helpers/conformance.js';

const backend = new CpuBackend({ threads: 1 });

describe('conformance cases on the cpu backend', () => {
  const names = conformanceCaseNames();
  it('finds the six cases', () => expect(names.length).toBe(6));
  for (const name of names) {
    it(name, async () => {
      const c = await loadConformanceCase(name);
      const result = await nsaForward(c.inputs, c.options, { backend });
      const actual = tensorsFromOutputs(result);
      for (const [key, expected] of c.expected) {
        const got = actual.get(key);
        expect(got, key).toBeDefined();
        expect(got!.shape, key).toEqual(expected.shape);
        if (key === 'block_indices') {
          expect(Array.from(got!.data as Int32Array), key).toEqual(Array.from(expected.data as Int32Array));
        } else {
          expectRelativeRms(got!.toFloat64(), expected.toFloat64(), key, { rtol: 2e-6 });
        }
      }
    });
  }
});
