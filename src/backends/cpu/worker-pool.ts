// A fixed set of worker threads that run row tasks, one task per worker per call. Workers are started on first
// use and kept (unreferenced, so they never hold the process open) until dispose().

import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { PrivateKvGradients, RowTask } from './row-tasks.js';

const workerUrl = new URL('./worker.js', import.meta.url);

interface Reply {
  readonly ok: boolean;
  readonly error?: string;
  readonly kv?: PrivateKvGradients;
}

export class WorkerPool {
  private readonly workers: Worker[] = [];
  readonly size: number;

  constructor(size: number) {
    this.size = size;
  }

  /** Worker threads need the compiled worker.js beside this module (true when running from dist/). */
  static supported(): boolean {
    return workerUrl.protocol === 'file:' && existsSync(fileURLToPath(workerUrl));
  }

  /** Runs tasks[i] on worker i (tasks.length <= size) and returns their replies in order. */
  async run(tasks: readonly RowTask[]): Promise<Reply[]> {
    while (this.workers.length < tasks.length) this.workers.push(new Worker(workerUrl));
    return Promise.all(tasks.map((task, i) => this.runOn(this.workers[i]!, task)));
  }

  dispose(): void {
    for (const w of this.workers) void w.terminate();
    this.workers.length = 0;
  }

  private runOn(worker: Worker, task: RowTask): Promise<Reply> {
    worker.ref();
    return new Promise<Reply>((resolve, reject) => {
      const cleanup = (): void => {
        worker.off('message', onMessage);
        worker.off('error', onError);
        worker.unref();
      };
      const onMessage = (reply: Reply): void => {
        cleanup();
        if (reply.ok) resolve(reply);
        else reject(new Error(`CPU worker failed: ${reply.error ?? 'unknown error'}`));
      };
      const onError = (e: Error): void => {
        cleanup();
        this.workers.splice(this.workers.indexOf(worker), 1); // it has exited; a fresh one replaces it next time
        reject(e);
      };
      worker.on('message', onMessage);
      worker.on('error', onError);
      worker.postMessage(task);
    });
  }
}
