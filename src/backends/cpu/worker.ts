// A CPU worker thread: runs row tasks posted by the pool and answers with their private results.

import { parentPort } from 'node:worker_threads';
import { runBackwardTask, runForwardTask, type RowTask } from './row-tasks.js';

parentPort?.on('message', (task: RowTask) => {
  try {
    if (task.kind === 'forward') {
      runForwardTask(task);
      parentPort!.postMessage({ ok: true });
    } else {
      const kv = runBackwardTask(task);
      parentPort!.postMessage({ ok: true, kv }, Object.values(kv).map((a: Float64Array) => a.buffer as ArrayBuffer));
    }
  } catch (e) {
    parentPort!.postMessage({ ok: false, error: e instanceof Error ? (e.stack ?? e.message) : String(e) });
  }
});
