// Setup file of the GPU suite. Its tests are long runs of synchronous native calls (NVRTC compiles, CUDA syncs)
// whose awaits only ever resolve microtasks, so the worker never reaches the event loop's poll phase: vitest's
// reply to the worker's "onTaskUpdate" RPC sits unread until its fixed 60 s timeout fires, and a file that runs
// longer than that ends with "Timeout calling onTaskUpdate" and a failing exit code although every test passed.
// One event-loop turn after each test lets the replies in.
import { afterEach } from 'vitest';

afterEach(() => new Promise<void>((resolve) => setImmediate(resolve)));
