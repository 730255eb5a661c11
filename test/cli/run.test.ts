// `nsa run`: the safetensors interchange, on the conformance cases and on broken inputs.

import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { disposeBackends } from '../../src/backends/index.js';
import { inputsFromTensors } from '../../src/nsa/interchange.js';
import { nsaForward } from '../../src/nsa/operator.js';
import { readSafetensorsFile, writeSafetensorsFile } from '../../src/tensor/safetensors.js';
import { Tensor } from '../../src/tensor/tensor.js';
import { expectRelativeRms } from '../helpers/compare.js';
import { CONFORMANCE_DIR } from '../helpers/conformance.js';
import { cli } from './helpers.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nsa-run-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
  await disposeBackends();
});

const inputsOf = (name: string): string => join(CONFORMANCE_DIR, `${name}.inputs.safetensors`);
const expectedOf = (name: string): string => join(CONFORMANCE_DIR, `${name}.expected.safetensors`);

describe('nsa run', () => {
  for (const name of ['tiny_T37_g2', 'packed_3_64_200', 'bf16_T128_g4']) {
    it(`reproduces the conformance case ${name}`, async () => {
      const out = join(dir, `${name}.out.safetensors`);
      const r = await cli('run', '--in', inputsOf(name), '--out', out, '--backend', 'cpu');
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`^nsa run: wrote 8 tensors to ${out} \\(o, o_cmp, o_slc, o_win \\[.*\\); forward [\\d.]+ ms on cpu\\n$`));
      const actual = await readSafetensorsFile(out);
      const expected = await readSafetensorsFile(expectedOf(name));
      for (const [key, want] of expected.tensors) {
        const got = actual.tensors.get(key)!;
        expect(got.shape, key).toEqual(want.shape);
        if (key === 'block_indices') expect(Array.from(got.data as Int32Array), key).toEqual(Array.from(want.data as Int32Array));
        else expectRelativeRms(got.toFloat64(), want.toFloat64(), key, { rtol: 2e-6 });
      }
      const config = JSON.parse(actual.metadata['nsa_config']!) as Record<string, unknown>;
      const given = JSON.parse((await readSafetensorsFile(inputsOf(name))).metadata['nsa_config']!) as Record<string, unknown>;
      expect(config).toMatchObject(given);
      expect(typeof config['scale']).toBe('number');
    });
  }

  it('lets flags override the file config, and writes the asked dtype', async () => {
    const out = join(dir, 'override.safetensors');
    const r = await cli('run', '--in', inputsOf('tiny_T37_g2'), '--out', out, '--backend', 'cpu', '-w', '3', '--out-dtype', 'bf16');
    expect(r.code, r.stderr).toBe(0);
    const file = await readSafetensorsFile(out);
    expect(JSON.parse(file.metadata['nsa_config']!)).toMatchObject({ window: 3, compress_block: 4 });
    expect(file.tensors.get('o')!.dtype).toBe('bf16');
    expect(file.tensors.get('block_indices')!.dtype).toBe('i32');
  });

  it('writes the gradients when `do` is given', async () => {
    const source = await readSafetensorsFile(inputsOf('tiny_T37_g2'));
    const q = source.tensors.get('q')!;
    const v = source.tensors.get('v')!;
    const dOut = Tensor.randn([q.shape[0]!, q.shape[1]!, q.shape[2]!, v.shape[3]!], 'f32', 7);
    const withDo = join(dir, 'with-do.safetensors');
    await writeSafetensorsFile(withDo, new Map([...source.tensors, ['do', dOut]]), source.metadata);
    const out = join(dir, 'grads.safetensors');
    const r = await cli('run', '--in', withDo, '--out', out, '--backend', 'cpu');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/wrote 12 tensors .*dq.*; forward [\d.]+ ms, backward [\d.]+ ms on cpu/);
    const written = await readSafetensorsFile(out);
    const { inputs } = inputsFromTensors(source.tensors);
    const api = await nsaForward(inputs, { compressBlock: 4, compressStride: 2, selectBlock: 8, selectCount: 3, window: 6 }, { backend: 'cpu' });
    const grads = await api.backward(dOut);
    for (const [name, want] of [
      ['dq', grads.dq],
      ['dk', grads.dk],
      ['dv', grads.dv],
      ['dg', grads.dg],
    ] as const) {
      const got = written.tensors.get(name)!;
      expect(got.shape, name).toEqual(want.shape);
      expect(Array.from(got.toFloat64()), name).toEqual(Array.from(want.toFloat64()));
    }
  });

  it('exits 2 on a truncated inputs file and writes nothing', async () => {
    const bytes = await readFile(inputsOf('tiny_T37_g2'));
    const truncated = join(dir, 'truncated.safetensors');
    await writeFile(truncated, bytes.subarray(0, Math.floor(bytes.length * 0.6)));
    const out = join(dir, 'never.safetensors');
    const before = await readdir(dir);
    const r = await cli('run', '--in', truncated, '--out', out);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa run: .*truncated\.safetensors: /);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(await readdir(dir)).toEqual(before);
  });

  it('exits 2 naming a missing required tensor', async () => {
    const source = await readSafetensorsFile(inputsOf('tiny_T37_g2'));
    const noGates = join(dir, 'no-g.safetensors');
    await writeSafetensorsFile(noGates, new Map([...source.tensors].filter(([n]) => n !== 'g')), source.metadata);
    const out = join(dir, 'no-g.out.safetensors');
    const r = await cli('run', '--in', noGates, '--out', out, '--backend', 'cpu');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^nsa run: g: missing from the inputs/);
    expect((await readdir(dir)).includes('no-g.out.safetensors')).toBe(false);
  });

  it('exits 2 on a missing inputs file, a bad nsa_config and a config the flags break', async () => {
    const missing = await cli('run', '--in', join(dir, 'nope.safetensors'), '--out', join(dir, 'x.safetensors'));
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/^nsa run: cannot read .*nope\.safetensors: no such file or directory$/m);

    const source = await readSafetensorsFile(inputsOf('tiny_T37_g2'));
    const badMeta = join(dir, 'bad-meta.safetensors');
    await writeSafetensorsFile(badMeta, source.tensors, { nsa_config: '{"compress_blok": 4}' });
    const bad = await cli('run', '--in', badMeta, '--out', join(dir, 'y.safetensors'), '--backend', 'cpu');
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('nsa_config.compress_blok: unknown key');

    const broken = await cli('run', '--in', inputsOf('tiny_T37_g2'), '--out', join(dir, 'z.safetensors'), '--backend', 'cpu', '-d', '3');
    expect(broken.code).toBe(2);
    expect(broken.stderr).toContain('compressStride (-d, --compress-stride): must divide compressBlock (l = 4)');
    const names = await readdir(dir);
    for (const name of ['x.safetensors', 'y.safetensors', 'z.safetensors']) expect(names).not.toContain(name);
  });
});
