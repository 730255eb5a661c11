// The cuda backend: NSA kernels compiled at run time by NVRTC for the config and dtype, launched through the
// driver API. Inputs in f16 run the f16 kernels; every other float dtype runs in bf16 (f32 inputs are rounded
// once on upload). Outputs come back in f32 (or the asked dtype) like every backend's.

import type { NSAConfig } from '../../config/nsa-config.js';
import { UnsupportedConfigError } from '../../errors.js';
import type { NsaGradients, NsaOutputs } from '../../nsa/types.js';
import type { NsaRequest } from '../../nsa/validate.js';
import type { FloatDType } from '../../tensor/dtype.js';
import { Tensor } from '../../tensor/tensor.js';
import type { Backend, BackendForwardResult, BenchmarkProblem, SavedForBackward, TimingOptions, TimingResult } from '../backend.js';
import { CudaContext } from './context.js';
import type { DeviceBuffer } from './memory.js';
import {
  FORWARD_STAGES,
  ForwardRunner,
  type DeviceNsaInputs,
  type DeviceNsaOutputs,
  type ForwardStage,
  type SelectedKernelChoice,
} from './nsa/forward-runner.js';
import { DeviceRandom } from './nsa/device-random.js';
import { buildLayoutPlan } from './nsa/layout-plan.js';
import { NsaPrograms, type HalfDType } from './nsa/programs.js';

export interface CudaBackendOptions {
  readonly device?: number;
  /** Selected-attention kernel: group-centric (large G), FSA order (small G), or chosen by G (default). */
  readonly selectedKernel?: SelectedKernelChoice;
}

export function createCudaBackend(options: CudaBackendOptions = {}): Promise<Backend> {
  // CudaContext.create throws BackendUnavailableError when libcuda, NVRTC or a device is missing.
  return Promise.resolve(new CudaBackend(CudaContext.create(options.device ?? 0), options));
}

export class CudaBackend implements Backend {
  readonly name = 'cuda' as const;
  readonly description: string;
  private readonly programs = new Map<string, NsaPrograms>();
  private readonly selectedKernel: SelectedKernelChoice;

  constructor(
    readonly ctx: CudaContext,
    options: CudaBackendOptions = {},
  ) {
    const d = ctx.device;
    this.description =
      `cuda: ${d.name} (sm_${d.computeCapability.join('')}, ${d.smCount} SMs, ` +
      `${(d.totalBytes / 2 ** 30).toFixed(0)} GiB), driver ${ctx.driverVersion}, NVRTC ${ctx.nvrtcVersion}`;
    const env = process.env['NSA_SELECTED_KERNEL'];
    this.selectedKernel = options.selectedKernel ?? (env === 'group' || env === 'fsa' ? env : 'auto');
  }

  async forward(request: NsaRequest, outputDType: FloatDType): Promise<BackendForwardResult> {
    const { config, inputs } = request;
    if (config.phi !== 'mean' && inputs.kCmp === undefined) {
      throw new UnsupportedConfigError(
        `cuda backend: phi = ${config.phi} runs on the GPU only with its compressed K/V given (kCmp, vCmp); ` +
          'compute them with the learned phi, or use the cpu backend',
      );
    }
    const dtype: HalfDType = inputs.q.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const runner = scope.keep(new ForwardRunner(this.ctx, this.programsFor(config, dtype), request.cuSeqlens, this.selectedKernel));
      const device = this.uploadInputs(request, dtype, scope);
      const outputs = this.allocateOutputs(config, runner.plan.totalTokens, scope, { branches: true, final: false });
      runner.run(device, outputs);
      this.ctx.synchronize();
      return { outputs: this.downloadOutputs(request, outputs, outputDType), saved: new NoBackward() };
    } finally {
      scope.dispose();
    }
  }

  backward(): Promise<NsaGradients> {
    return Promise.reject(
      new UnsupportedConfigError('cuda backend: the backward pass is not implemented on the GPU yet; use the cpu backend for gradients'),
    );
  }

  async time(problem: BenchmarkProblem, options: TimingOptions): Promise<TimingResult> {
    if (options.backward) throw new UnsupportedConfigError('cuda backend: backward timing needs the GPU backward (not implemented yet)');
    const { config } = problem;
    const dtype: HalfDType = problem.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const runner = scope.keep(new ForwardRunner(this.ctx, this.programsFor(config, dtype), problem.cuSeqlens, this.selectedKernel));
      const inputs = this.randomInputs(problem, dtype, scope);
      const outputs = this.allocateOutputs(config, runner.plan.totalTokens, scope, { branches: false, final: true });
      return this.timed(() => runner.run(inputs, outputs), options);
    } finally {
      scope.dispose();
    }
  }

  /** Times each forward stage alone (after one full run), to see where the time goes. */
  async profileStages(problem: BenchmarkProblem, options: TimingOptions): Promise<Record<ForwardStage, TimingResult>> {
    const dtype: HalfDType = problem.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const runner = scope.keep(new ForwardRunner(this.ctx, this.programsFor(problem.config, dtype), problem.cuSeqlens, this.selectedKernel));
      const inputs = this.randomInputs(problem, dtype, scope);
      const outputs = this.allocateOutputs(problem.config, runner.plan.totalTokens, scope, { branches: false, final: true });
      runner.run(inputs, outputs);
      const result: Partial<Record<ForwardStage, TimingResult>> = {};
      for (const stage of FORWARD_STAGES) result[stage] = this.timed(() => runner.runStage(stage, inputs, outputs), options);
      return result as Record<ForwardStage, TimingResult>;
    } finally {
      scope.dispose();
    }
  }

  async timeDense(problem: BenchmarkProblem, options: TimingOptions): Promise<TimingResult> {
    const dtype: HalfDType = problem.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const inputs = this.randomInputs(problem, dtype, scope);
      const dense = this.denseLauncher(problem.config, dtype, problem.cuSeqlens, inputs, scope);
      return this.timed(dense.run, options);
    } finally {
      scope.dispose();
    }
  }

  /** Dense causal attention of the request's q, k, v with this backend's flash kernel (the bench baseline). */
  denseAttention(request: NsaRequest): { o: Float32Array; lse: Float32Array } {
    const dtype: HalfDType = request.inputs.q.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const inputs = this.uploadInputs(request, dtype, scope);
      const N = request.cuSeqlens[request.cuSeqlens.length - 1]!;
      const dense = this.denseLauncher(request.config, dtype, request.cuSeqlens, inputs, scope);
      dense.run();
      const o = new Float32Array(N * request.config.heads * request.config.valueDim);
      const lse = new Float32Array(N * request.config.heads);
      this.ctx.download(dense.out, o);
      this.ctx.download(dense.lse, lse);
      return { o, lse };
    } finally {
      scope.dispose();
    }
  }

  dispose(): void {
    this.programs.clear();
    this.ctx.dispose();
  }

  // -------------------------------------------------------------------------------------------------------------

  private timed(run: () => void, options: TimingOptions): TimingResult {
    const result = this.ctx.time(run, { warmup: options.warmup, iterations: options.iterations });
    options.onIteration?.(options.warmup + options.iterations, options.warmup + options.iterations);
    return { ...result, clock: 'CUDA events' };
  }

  private programsFor(config: NSAConfig, dtype: HalfDType): NsaPrograms {
    const key = `${JSON.stringify(config.toOptions())}:${dtype}`;
    let programs = this.programs.get(key);
    if (programs === undefined) {
      programs = new NsaPrograms(this.ctx, config, dtype);
      this.programs.set(key, programs);
    }
    return programs;
  }

  /** A launch of the dense causal kernel over `inputs`, with its output (fp32) and lse buffers. */
  private denseLauncher(
    config: NSAConfig,
    dtype: HalfDType,
    cuSeqlens: readonly number[],
    inputs: DeviceNsaInputs,
    scope: BufferScope,
  ): { run: () => void; out: DeviceBuffer; lse: DeviceBuffer } {
    const programs = this.programsFor(config, dtype);
    const plan = buildLayoutPlan(config, cuSeqlens, programs.queryTile, 1);
    const N = plan.totalTokens;
    const tiles = scope.add(this.ctx.upload(plan.queryTiles, 'query tiles'));
    const cu = scope.add(this.ctx.upload(plan.cuSeqlens, 'cu_seqlens'));
    const out = scope.alloc(this.ctx, N * config.heads * config.valueDim * 4, 'dense output');
    const lse = scope.alloc(this.ctx, N * config.heads * 4, 'dense lse');
    const kernel = programs.flash(0);
    const none = { ptr: 0n };
    const run = (): void =>
      kernel.launch({
        grid: [plan.queryTiles.length / 2, config.heads, 1],
        block: [2 * programs.queryTile, 1, 1],
        sharedBytes: programs.flashSharedBytes(),
        args: [
          { ptr: inputs.q.ptr },
          { ptr: inputs.k.ptr },
          { ptr: inputs.v.ptr },
          none,
          none,
          none,
          { ptr: out.ptr },
          none,
          none,
          { ptr: lse.ptr },
          none,
          { ptr: cu.ptr },
          none,
          { ptr: tiles.ptr },
          { i32: config.heads },
          { i32: config.kvHeads },
          { f32: config.scale * Math.LOG2E },
          { i32: 0 },
        ],
      });
    return { run, out, lse };
  }

  private uploadInputs(request: NsaRequest, dtype: HalfDType, scope: BufferScope): DeviceNsaInputs {
    const half = (t: Tensor | undefined, what: string): DeviceBuffer | undefined =>
      t === undefined ? undefined : scope.add(this.ctx.upload(t.cast(dtype).data, what));
    const { inputs } = request;
    return {
      q: half(inputs.q, 'q')!,
      k: half(inputs.k, 'k')!,
      v: half(inputs.v, 'v')!,
      gate: scope.add(this.ctx.upload(inputs.g.toFloat32(), 'gates')),
      kCmp: half(inputs.kCmp, 'kCmp'),
      vCmp: half(inputs.vCmp, 'vCmp'),
      kSlc: half(inputs.kSlc, 'kSlc'),
      vSlc: half(inputs.vSlc, 'vSlc'),
      kWin: half(inputs.kWin, 'kWin'),
      vWin: half(inputs.vWin, 'vWin'),
    };
  }

  private randomInputs(problem: BenchmarkProblem, dtype: HalfDType, scope: BufferScope): DeviceNsaInputs {
    const { config, cuSeqlens, seed } = problem;
    const N = cuSeqlens[cuSeqlens.length - 1]!;
    const random = new DeviceRandom(this.ctx, dtype);
    const normal = (elements: number, s: number, what: string): DeviceBuffer => {
      const b = scope.alloc(this.ctx, elements * 2, what);
      random.normal(b, elements, s);
      return b;
    };
    const gate = scope.alloc(this.ctx, N * config.heads * 3 * 4, 'gates');
    random.uniform(gate, N * config.heads * 3, seed + 3);
    return {
      q: normal(N * config.heads * config.headDim, seed, 'q'),
      k: normal(N * config.kvHeads * config.headDim, seed + 1, 'k'),
      v: normal(N * config.kvHeads * config.valueDim, seed + 2, 'v'),
      gate,
    };
  }

  private allocateOutputs(
    config: NSAConfig,
    N: number,
    scope: BufferScope,
    want: { branches: boolean; final: boolean },
  ): DeviceNsaOutputs {
    const rows = N * config.heads;
    const f32 = (n: number, what: string): DeviceBuffer => scope.alloc(this.ctx, n * 4, what);
    return {
      out: f32(rows * config.valueDim, 'o'),
      outFinal: want.final ? scope.alloc(this.ctx, rows * config.valueDim * 2, 'o (half)') : undefined,
      oCmp: want.branches ? f32(rows * config.valueDim, 'o_cmp') : undefined,
      oSlc: want.branches ? f32(rows * config.valueDim, 'o_slc') : undefined,
      oWin: want.branches ? f32(rows * config.valueDim, 'o_win') : undefined,
      lseCmp: f32(rows, 'lse_cmp'),
      lseSlc: f32(rows, 'lse_slc'),
      lseWin: f32(rows, 'lse_win'),
      blockIndices: scope.alloc(this.ctx, N * config.kvHeads * config.selectCount * 4, 'block_indices'),
    };
  }

  private downloadOutputs(request: NsaRequest, d: DeviceNsaOutputs, dtype: FloatDType): NsaOutputs {
    const { batch: B, tokens: T, config } = request;
    const o = [B, T, config.heads, config.valueDim];
    const lse = [B, T, config.heads];
    const f32 = (b: DeviceBuffer, shape: number[]): Tensor => {
      const t = new Tensor('f32', shape);
      this.ctx.download(b, t.data);
      return dtype === 'f32' ? t : t.cast(dtype);
    };
    const blocks = new Tensor('i32', [B, T, config.kvHeads, config.selectCount]);
    this.ctx.download(d.blockIndices, blocks.data);
    return {
      o: f32(d.out, o),
      oCmp: f32(d.oCmp!, o),
      oSlc: f32(d.oSlc!, o),
      oWin: f32(d.oWin!, o),
      lseCmp: f32(d.lseCmp, lse),
      lseSlc: f32(d.lseSlc, lse),
      lseWin: f32(d.lseWin, lse),
      blockIndices: blocks,
    };
  }
}

/** What the cuda forward keeps for a backward: nothing yet (the GPU backward is not implemented). */
class NoBackward implements SavedForBackward {
  readonly backend = 'cuda' as const;
  readonly bytes = 0;
  release(): void {}
}

/** Device buffers (and runners) of one call, freed together however the call ends. */
class BufferScope {
  private readonly items: { dispose(): void }[] = [];
  add(b: DeviceBuffer): DeviceBuffer {
    this.items.push(b);
    return b;
  }
  keep<T extends { dispose(): void }>(x: T): T {
    this.items.push(x);
    return x;
  }
  alloc(ctx: CudaContext, bytes: number, what: string): DeviceBuffer {
    return this.add(ctx.alloc(bytes, what));
  }
  dispose(): void {
    for (const item of this.items.reverse()) item.dispose();
    this.items.length = 0;
  }
}
