// Environment variants for the bench scripts: `--variants A=1+B=2,A=0` runs the script's work once per variant,
// each with only its own settings over the environment the process started with (a variant's settings do not
// leak into the next one's run), on a backend created after they are set (the kernels read them when built).

/** Parses `A=1+B=2,A=0` into [{ A: '1', B: '2' }, { A: '0' }]; '' is one variant with no settings. */
export function parseVariants(list) {
  return list.split(',').map((variant) => {
    if (variant === '') return {};
    return Object.fromEntries(variant.split('+').map((setting) => {
      const at = setting.indexOf('=');
      if (at <= 0) throw new Error(`--variants: expected NAME=value, got '${setting}'`);
      return [setting.slice(0, at), setting.slice(at + 1)];
    }));
  });
}

const startEnvironment = { ...process.env };

/** Sets process.env to the starting environment plus the variant's settings. */
export function applyVariant(variant) {
  for (const name of Object.keys(process.env)) if (!(name in startEnvironment)) delete process.env[name];
  Object.assign(process.env, startEnvironment, variant);
}

/** `A=1 B=2` for a variant's settings (the NSA_ prefix dropped), or `default`. */
export function variantLabel(variant) {
  const entries = Object.entries(variant);
  return entries.length === 0 ? 'default' : entries.map(([k, v]) => `${k.replace(/^NSA_/, '')}=${v}`).join(' ');
}
