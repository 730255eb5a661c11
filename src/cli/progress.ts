// One progress bar over all of a command's runs, drawn on a TTY stream only; a no-op otherwise.

import { Presets, SingleBar } from 'cli-progress';

export interface Progress {
  advance(steps: number): void;
  label(text: string): void;
  stop(): void;
}

export function createProgress(stream: NodeJS.WritableStream | undefined, total: number): Progress {
  if (stream === undefined || total <= 0) return { advance: () => undefined, label: () => undefined, stop: () => undefined };
  const bar = new SingleBar(
    { stream, format: 'bench |{bar}| {value}/{total} runs | {label}', hideCursor: true, clearOnComplete: true },
    Presets.shades_classic,
  );
  bar.start(total, 0, { label: '' });
  return {
    advance: (steps) => bar.increment(steps),
    label: (text) => bar.update({ label: text }),
    stop: () => bar.stop(),
  };
}
