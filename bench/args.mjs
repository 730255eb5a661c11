// The bench scripts' command line: `--name value` options, bare `--name` switches and a leading file argument.
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

/** The first argument when it is not an option; otherwise prints `usage` and exits with status 1. */
export function fileArgument(usage) {
  const file = args[0];
  if (file === undefined || file.startsWith('--')) {
    console.error(`usage: ${usage}`);
    process.exit(1);
  }
  return file;
}
