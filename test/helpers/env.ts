// Tests that read the kernels' tuning from the environment (read when a backend builds a config's kernels) set it
// for one call and put it back after, whatever the call does.

/** Runs `run` with `env`'s variables set (an undefined value leaves its variable as it is), restoring them after. */
export async function withEnvironment<T>(env: Readonly<Record<string, string | undefined>>, run: () => Promise<T>): Promise<T> {
  const names = Object.keys(env).filter((name) => env[name] !== undefined);
  const saved = names.map((name) => [name, process.env[name]] as const);
  for (const name of names) process.env[name] = env[name];
  try {
    return await run();
  } finally {
    for (const [name, value] of saved) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  }
}
