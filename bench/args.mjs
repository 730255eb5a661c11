// The bench scripts' command line: `--name value` options and bare `--name` switches.
const args = process.argv.slice(2);

/** The value after `--name`, or `fallback` when the option is absent. */
export function flag(name, fallback) {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
}

/** Whether the bare switch `--name` was given. */
export function hasFlag(name) {
  return args.includes(`--${name}`);
}
