#!/usr/bin/env node
// Builds another commit of this repository into .base/ (its dist/ and bench/), so that a benchmark can time the
// previous code and the current code in one device session: same machine, same clocks, ratios that hold.
//   node scripts/build-base.mjs [rev]          (default HEAD: the last commit, without uncommitted changes)
//   node .base/bench/cuda-decode.mjs ...       then node bench/cuda-decode.mjs ... beside it
// .base/ is ignored by git and lint; carry it to the GPU machine beside dist. It resolves packages from this
// checkout's node_modules, so the two builds must share their dependencies.
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const rev = process.argv[2] ?? 'HEAD';
const run = (cmd, args, cwd) => execFileSync(cmd, args, { cwd, stdio: ['ignore', 'inherit', 'inherit'] });

const tree = join(mkdtempSync(join(tmpdir(), 'nsa-base-')), 'tree');
run('git', ['worktree', 'add', '--detach', tree, rev], root);
try {
  symlinkSync(join(root, 'node_modules'), join(tree, 'node_modules'), 'dir');
  run('npx', ['tsc', '-p', 'tsconfig.build.json'], tree);
  run('node', ['scripts/copy-assets.mjs'], tree);
  const base = join(root, '.base');
  rmSync(base, { recursive: true, force: true });
  for (const dir of ['dist', 'bench']) if (existsSync(join(tree, dir))) cpSync(join(tree, dir), join(base, dir), { recursive: true });
  console.log(`build-base: ${rev} built into .base/ (dist, bench)`);
} finally {
  run('git', ['worktree', 'remove', '--force', tree], root);
}
