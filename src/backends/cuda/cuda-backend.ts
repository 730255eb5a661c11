// The cuda backend: NSA kernels compiled at run time by NVRTC for the config and dtype, launched through the
// driver API. Inputs in f16 run the f16 kernels; every other float dtype runs in bf16 (f32 inputs are rounded
// once on upload). Outputs come back in f32 (or the asked dtype) like every backend's.

import type { NSAConfig } from '../../config/nsa-config.js';
import { DisposedError, UnsupportedConfigError } from '../../errors.js';
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
import { BackwardRunner, type BackwardStage, type DeviceNsaGradients } from './nsa/backward-runner.js';
import { CudaKvCache } from './nsa/cuda-kv-cache.js';
import { DeviceRandom } from './nsa/device-random.js';
import type { KvCache, KvCacheOptions } from '../../nsa/decode/types.js';
import { buildLayoutPlan } from './nsa/layout-plan.js';
import type { DevicePhiParams } from './nsa/phi-runner.js';
import { randomPhiParams, smoothWaveSeeds } from '../../nsa/random-inputs.js';
import { PHI_PARAM_NAMES } from '../../reference/compress.js';
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
    const dtype: HalfDType = inputs.q.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const programs = this.programsFor(config, dtype);
      const runner = scope.keep(new ForwardRunner(this.ctx, programs, request.cuSeqlens, this.selectedKernel));
      const device = this.uploadInputs(request, dtype, scope);
      // Branch outputs asked in the compute dtype are kept in it on the device: the same bits once downloaded, and
      // half the bytes for the forward to write and the backward to read.
      const branches = outputDType === dtype ? 'half' : 'f32';
      const outputs = this.allocateOutputs(config, runner.plan.totalTokens, scope, { branches, final: false });
      runner.run(device, outputs);
      this.ctx.synchronize();
      const host = this.downloadOutputs(request, outputs, outputDType);
      return { outputs: host, saved: new CudaSaved(programs, runner, device, outputs, scope) };
    } catch (e) {
      scope.dispose();
      throw e;
    }
  }

  async backward(request: NsaRequest, saved: SavedForBackward, dOut: Tensor, outputDType: FloatDType): Promise<NsaGradients> {
    if (!(saved instanceof CudaSaved)) throw new TypeError('saved: expected what the cuda backend forward returned');
    saved.assertLive();
    const scope = new BufferScope();
    try {
      const dO = scope.add(this.ctx.upload(dOut.cast(saved.programs.dtype).data, 'dO'));
      const grads = this.allocateGradients(request.config, saved.runner, saved.inputs, scope);
      const runner = scope.keep(new BackwardRunner(this.ctx, saved.programs, saved.runner));
      runner.run(saved.inputs, saved.outputs, dO, grads);
      this.ctx.synchronize();
      return this.downloadGradients(request, grads, outputDType);
    } finally {
      scope.dispose();
    }
  }

  async time(problem: BenchmarkProblem, options: TimingOptions): Promise<TimingResult> {
    const { config } = problem;
    const dtype: HalfDType = problem.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const programs = this.programsFor(config, dtype);
      const runner = scope.keep(new ForwardRunner(this.ctx, programs, problem.cuSeqlens, this.selectedKernel));
      const inputs = this.randomInputs(problem, dtype, scope);
      const N = runner.plan.totalTokens;
      if (!options.backward) {
        const outputs = this.allocateOutputs(config, N, scope, { branches: false, final: true });
        return this.timed(() => runner.run(inputs, outputs), options);
      }
      const { outputs, dO, grads, backward } = this.backwardProblem(problem, runner, inputs, scope, true);
      return this.timed(() => {
        runner.run(inputs, outputs);
        backward.run(inputs, outputs, dO, grads);
      }, options);
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

  /** Times each backward stage alone (after one full forward and backward), to see where the time goes. */
  async profileBackwardStages(problem: BenchmarkProblem, options: TimingOptions): Promise<Partial<Record<BackwardStage, TimingResult>>> {
    const dtype: HalfDType = problem.dtype === 'f16' ? 'f16' : 'bf16';
    const { config } = problem;
    const scope = new BufferScope();
    try {
      const runner = scope.keep(new ForwardRunner(this.ctx, this.programsFor(config, dtype), problem.cuSeqlens, this.selectedKernel));
      const inputs = this.randomInputs(problem, dtype, scope);
      const { outputs, dO, grads, backward } = this.backwardProblem(problem, runner, inputs, scope, false);
      runner.run(inputs, outputs);
      backward.run(inputs, outputs, dO, grads);
      const result: Partial<Record<BackwardStage, TimingResult>> = {};
      for (const [name, launch] of backward.stages(inputs, outputs, dO, grads)) result[name] = this.timed(launch, options);
      return result;
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
      if (!options.backward) return this.timed(dense.run, options);
      const N = problem.cuSeqlens[problem.cuSeqlens.length - 1]!;
      const dO = scope.alloc(this.ctx, N * problem.config.heads * problem.config.valueDim * 2, 'dense dO');
      new DeviceRandom(this.ctx, dtype).normal(dO, N * problem.config.heads * problem.config.valueDim, problem.seed + 9);
      const backward = this.denseBackwardLauncher(problem.config, problem.cuSeqlens, dtype, inputs, dense, dO, scope);
      return this.timed(() => {
        dense.run();
        backward.run();
      }, options);
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

  /**
   * The gradients of denseAttention's o for the upstream gradient dOut [N, Hq, Dv] (dq [N, Hq, Dk], dk [N, H, Dk],
   * dv [N, H, Dv], fp32), with this backend's flash backward kernels: the bench baseline's backward, for its tests.
   */
  denseAttentionBackward(request: NsaRequest, dOut: Tensor): { dq: Float32Array; dk: Float32Array; dv: Float32Array } {
    const dtype: HalfDType = request.inputs.q.dtype === 'f16' ? 'f16' : 'bf16';
    const scope = new BufferScope();
    try {
      const inputs = this.uploadInputs(request, dtype, scope);
      const { config, cuSeqlens } = request;
      const N = cuSeqlens[cuSeqlens.length - 1]!;
      const dense = this.denseLauncher(config, dtype, cuSeqlens, inputs, scope);
      const dO = scope.add(this.ctx.upload(dOut.cast(dtype).data, 'dense dO'));
      const backward = this.denseBackwardLauncher(config, cuSeqlens, dtype, inputs, dense, dO, scope);
      dense.run();
      backward.run();
      const grads = {
        dq: new Float32Array(N * config.heads * config.headDim),
        dk: new Float32Array(N * config.kvHeads * config.headDim),
        dv: new Float32Array(N * config.kvHeads * config.valueDim),
      };
      this.ctx.download(backward.dq, grads.dq);
      this.ctx.download(backward.dk, grads.dk);
      this.ctx.download(backward.dv, grads.dv);
      return grads;
    } finally {
      scope.dispose();
    }
  }

  createKvCache(config: NSAConfig, options: KvCacheOptions): KvCache {
    return new CudaKvCache(this.ctx, this.programsFor(config, 'bf16'), config, options);
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

  /**
   * What a timed backward needs beside the forward's runner and inputs: the outputs (every branch's, which the
   * backward's row terms read, and the final half output when asked), a random dO, the gradients, the runner.
   */
  private backwardProblem(problem: BenchmarkProblem, runner: ForwardRunner, inputs: DeviceNsaInputs, scope: BufferScope, final: boolean) {
    const { config } = problem;
    const N = runner.plan.totalTokens;
    // A bf16/f16 training step's outputs are in that dtype: the branch outputs too (see forward()).
    const outputs = this.allocateOutputs(config, N, scope, { branches: 'half', final });
    const dO = scope.alloc(this.ctx, N * config.heads * config.valueDim * 2, 'dO');
    new DeviceRandom(this.ctx, runner.dtype).normal(dO, N * config.heads * config.valueDim, problem.seed + 9);
    const grads = this.allocateGradients(config, runner, inputs, scope);
    const backward = scope.keep(new BackwardRunner(this.ctx, this.programsFor(config, runner.dtype), runner));
    return { outputs, dO, grads, backward };
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
    const maps = programs.flashTensorMaps(inputs.q.ptr, inputs.k.ptr, inputs.v.ptr, N);
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
          { i32: 0 },
          { ptr: lse.ptr },
          none,
          { ptr: cu.ptr },
          none,
          { ptr: tiles.ptr },
          { i32: config.heads },
          { i32: config.kvHeads },
          { f32: config.scale * Math.LOG2E },
          { i32: 0 },
          none,
          none,
          none,
          ...maps,
        ],
      });
    return { run, out, lse };
  }

  /** dO of the dense kernel's output, then its backward (the baseline of fwd+bwd timings). */
  private denseBackwardLauncher(
    config: NSAConfig,
    cuSeqlens: readonly number[],
    dtype: HalfDType,
    inputs: DeviceNsaInputs,
    dense: { out: DeviceBuffer; lse: DeviceBuffer },
    dO: DeviceBuffer,
    scope: BufferScope,
  ): { run: () => void; dq: DeviceBuffer; dk: DeviceBuffer; dv: DeviceBuffer } {
    const programs = this.programsFor(config, dtype);
    const N = cuSeqlens[cuSeqlens.length - 1]!;
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = config;
    const delta = scope.alloc(this.ctx, N * Hq * 3 * 4, 'dense delta');
    const dq = scope.alloc(this.ctx, N * Hq * dk * 4, 'dense dq');
    const dkBuf = scope.alloc(this.ctx, N * H * dk * 4, 'dense dk');
    const dvBuf = scope.alloc(this.ctx, N * H * dv * 4, 'dense dv');
    const queryTiles = denseTiles(cuSeqlens, programs.flashBackwardTile('dq', 0), 'latest first');
    const keyTiles = denseTiles(cuSeqlens, programs.flashBackwardTile('dkdv', 0), 'earliest first');
    const qt = scope.add(this.ctx.upload(queryTiles, 'dense query tiles'));
    const kt = scope.add(this.ctx.upload(keyTiles, 'dense key tiles'));
    const cu = scope.add(this.ctx.upload(Int32Array.from(cuSeqlens), 'cu_seqlens'));
    const none = { ptr: 0n };
    const p = (b: DeviceBuffer): { ptr: bigint } => ({ ptr: b.ptr });
    const tail = [{ i32: Hq }, { i32: H }, { i32: 0 }, { f32: config.scale * Math.LOG2E }, { f32: config.scale }, { i32: 0 }];
    const dqMaps = programs.flashBackwardTensorMaps('dq', 0, inputs.q.ptr, dO.ptr, N, [{ k: inputs.k.ptr, v: inputs.v.ptr, rows: N }]);
    const dkdvMaps = programs.flashBackwardTensorMaps('dkdv', 0, inputs.q.ptr, dO.ptr, N);
    const run = (): void => {
      programs.flashBackward(0, 'preprocess').launch({
        grid: [Math.ceil((N * Hq) / 4), 1, 1],
        block: [128, 1, 1],
        args: [p(dO), p(dense.out), none, none, { i32: 0 }, none, none, p(delta), { i64: N * Hq }],
      });
      programs.flashBackward(0, 'dq').launch({
        grid: [queryTiles.length / 2, Hq, 1],
        block: [programs.flashBackwardThreads('dq', 0), 1, 1],
        sharedBytes: programs.flashBackwardSharedBytes('dq', 0),
        args: [p(inputs.q), p(inputs.k), p(inputs.v), p(dO), p(dense.lse), none, p(delta), p(dq), p(cu), p(cu), p(qt), ...tail, ...dqMaps],
      });
      programs.flashBackward(0, 'dkdv').launch({
        grid: [keyTiles.length / 2, H, 1],
        block: [programs.flashBackwardThreads('dkdv', 0), 1, 1],
        sharedBytes: programs.flashBackwardSharedBytes('dkdv', 0),
        args: [p(inputs.q), p(inputs.k), p(inputs.v), p(dO), p(dense.lse), none, p(delta), p(dkBuf), p(dvBuf), p(cu), p(cu), p(kt), ...tail, none, none, { i64: N * H }, ...dkdvMaps],
      });
    };
    return { run, dq, dk: dkBuf, dv: dvBuf };
  }

  private allocateGradients(config: NSAConfig, runner: ForwardRunner, inputs: DeviceNsaInputs, scope: BufferScope): DeviceNsaGradients {
    if (config.groupSize > 64) {
      throw new UnsupportedConfigError(`cuda backend: the backward takes G <= 64 query heads per KV head, got ${config.groupSize}`);
    }
    const { totalTokens: N, totalCompressed: Nc } = runner.plan;
    const { heads: Hq, kvHeads: H, headDim: dk, valueDim: dv } = config;
    const f32 = (n: number, what: string): DeviceBuffer => scope.alloc(this.ctx, Math.max(1, n) * 4, what);
    const phiGradients = (params: DevicePhiParams | undefined, what: string): Record<string, DeviceBuffer> | undefined =>
      params === undefined || inputs.kCmp !== undefined
        ? undefined
        : Object.fromEntries(Object.entries(params.buffers).map(([name, b]) => [name, scope.alloc(this.ctx, b.bytes, `${what}.${name}`)]));
    return {
      dq: f32(N * Hq * dk, 'dq'),
      dk: f32(N * H * dk, 'dk'),
      dv: f32(N * H * dv, 'dv'),
      dg: f32(N * Hq * 3, 'dg'),
      dkc: f32(Nc * H * dk, 'dkc'),
      dvc: f32(Nc * H * dv, 'dvc'),
      dkSlc: inputs.kSlc === undefined ? undefined : f32(N * H * dk, 'dkSlc'),
      dvSlc: inputs.vSlc === undefined ? undefined : f32(N * H * dv, 'dvSlc'),
      dkWin: inputs.kWin === undefined ? undefined : f32(N * H * dk, 'dkWin'),
      dvWin: inputs.vWin === undefined ? undefined : f32(N * H * dv, 'dvWin'),
      dPhiK: phiGradients(inputs.phiK, 'dPhiK'),
      dPhiV: phiGradients(inputs.phiV, 'dPhiV'),
    };
  }

  private downloadGradients(request: NsaRequest, g: DeviceNsaGradients, dtype: FloatDType): NsaGradients {
    const { inputs } = request;
    const like = (b: DeviceBuffer, t: Tensor): Tensor => {
      const out = new Tensor('f32', t.shape);
      this.ctx.download(b, out.data);
      return dtype === 'f32' ? out : out.cast(dtype);
    };
    const grads: { -readonly [K in keyof NsaGradients]: NsaGradients[K] } = {
      dq: like(g.dq, inputs.q),
      dk: like(g.dk, inputs.k),
      dv: like(g.dv, inputs.v),
      dg: like(g.dg, inputs.g),
    };
    if (inputs.kCmp !== undefined) grads.dkCmp = like(g.dkc, inputs.kCmp);
    if (inputs.vCmp !== undefined) grads.dvCmp = like(g.dvc, inputs.vCmp);
    if (inputs.kSlc !== undefined && g.dkSlc !== undefined) grads.dkSlc = like(g.dkSlc, inputs.kSlc);
    if (inputs.vSlc !== undefined && g.dvSlc !== undefined) grads.dvSlc = like(g.dvSlc, inputs.vSlc);
    if (inputs.kWin !== undefined && g.dkWin !== undefined) grads.dkWin = like(g.dkWin, inputs.kWin);
    if (inputs.vWin !== undefined && g.dvWin !== undefined) grads.dvWin = like(g.dvWin, inputs.vWin);
    const phi = (d: Readonly<Record<string, DeviceBuffer>> | undefined, params: Readonly<Record<string, Tensor>> | undefined) =>
      d === undefined || params === undefined ? undefined : Object.fromEntries(Object.entries(d).map(([name, b]) => [name, like(b, params[name]!)]));
    const dPhiK = phi(g.dPhiK, inputs.phiK);
    const dPhiV = phi(g.dPhiV, inputs.phiV);
    if (dPhiK !== undefined) grads.dPhiK = dPhiK;
    if (dPhiV !== undefined) grads.dPhiV = dPhiV;
    return grads;
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
      phiK: this.uploadPhi(request, inputs.phiK, 'phiK', scope),
      phiV: this.uploadPhi(request, inputs.phiV, 'phiV', scope),
    };
  }

  /** A learned phi's parameters as fp32 device buffers (undefined for mean, or when compressed K/V are given). */
  private uploadPhi(
    request: Pick<NsaRequest, 'config' | 'phiHidden'> & { readonly inputs: Pick<NsaRequest['inputs'], 'kCmp'> },
    params: Readonly<Record<string, Tensor>> | undefined,
    what: string,
    scope: BufferScope,
  ): DevicePhiParams | undefined {
    const { config } = request;
    if (config.phi === 'mean' || params === undefined || request.inputs.kCmp !== undefined) return undefined;
    const buffers = Object.fromEntries(
      PHI_PARAM_NAMES[config.phi].map((name) => [name, scope.add(this.ctx.upload(params[name]!.toFloat32(), `${what}.${name}`))]),
    );
    return { kind: config.phi, hidden: request.phiHidden, buffers };
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
    // A learned phi's parameters are small: made on the host by the library's recipe and uploaded.
    const phi = (D: number, s: number, what: string): DevicePhiParams | undefined =>
      this.uploadPhi({ config, phiHidden: config.headDim, inputs: {} }, randomPhiParams(config, D, 'f32', s), what, scope);
    const q = normal(N * config.heads * config.headDim, seed, 'q');
    const k = normal(N * config.kvHeads * config.headDim, seed + 1, 'k');
    if (problem.inputs === 'smooth') {
      const waves = smoothWaveSeeds(seed);
      random.addSmoothWave(q, N, config.heads, config.headDim, waves.q);
      random.addSmoothWave(k, N, config.kvHeads, config.headDim, waves.k);
    }
    return {
      q,
      k,
      v: normal(N * config.kvHeads * config.valueDim, seed + 2, 'v'),
      gate,
      phiK: phi(config.headDim, seed + 10, 'phiK'),
      phiV: phi(config.valueDim, seed + 20, 'phiV'),
    };
  }

  private allocateOutputs(
    config: NSAConfig,
    N: number,
    scope: BufferScope,
    want: { branches: false | 'f32' | 'half'; final: boolean },
  ): DeviceNsaOutputs {
    const rows = N * config.heads;
    const f32 = (n: number, what: string): DeviceBuffer => scope.alloc(this.ctx, n * 4, what);
    const branch = (what: string): DeviceBuffer | undefined =>
      want.branches === false ? undefined : scope.alloc(this.ctx, rows * config.valueDim * (want.branches === 'half' ? 2 : 4), what);
    return {
      out: f32(rows * config.valueDim, 'o'),
      outFinal: want.final ? scope.alloc(this.ctx, rows * config.valueDim * 2, 'o (half)') : undefined,
      oCmp: branch('o_cmp'),
      oSlc: branch('o_slc'),
      oWin: branch('o_win'),
      branchHalf: want.branches === 'half',
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
    // Half branch outputs are in the asked dtype already (forward()).
    const branch = (b: DeviceBuffer): Tensor => {
      if (d.branchHalf !== true) return f32(b, o);
      const t = new Tensor(dtype, o);
      this.ctx.download(b, t.data);
      return t;
    };
    const blocks = new Tensor('i32', [B, T, config.kvHeads, config.selectCount]);
    this.ctx.download(d.blockIndices, blocks.data);
    return {
      o: f32(d.out, o),
      oCmp: branch(d.oCmp!),
      oSlc: branch(d.oSlc!),
      oWin: branch(d.oWin!),
      lseCmp: f32(d.lseCmp, lse),
      lseSlc: f32(d.lseSlc, lse),
      lseWin: f32(d.lseWin, lse),
      blockIndices: blocks,
    };
  }
}

/**
 * What the cuda forward keeps on the device for the backward: the inputs (in the compute dtype), the compressed
 * K/V, every branch's output (fp32, or the half dtype where the outputs were asked in it) and lse, the selected
 * blocks and the index tables. `bytes` says how much.
 */
class CudaSaved implements SavedForBackward {
  readonly backend = 'cuda' as const;
  readonly bytes: number;
  private released = false;
  constructor(
    readonly programs: NsaPrograms,
    readonly runner: ForwardRunner,
    readonly inputs: DeviceNsaInputs,
    readonly outputs: DeviceNsaOutputs,
    private readonly scope: BufferScope,
  ) {
    this.bytes = scope.bytes();
  }
  assertLive(): void {
    if (this.released) throw new DisposedError('the cuda forward state (release() was called)');
  }
  release(): void {
    if (!this.released) this.scope.dispose();
    this.released = true;
  }
}

/** Tiles of `size` rows of each sequence: (sequence, start) pairs. */
function denseTiles(cu: readonly number[], size: number, order: 'latest first' | 'earliest first'): Int32Array {
  const list: [number, number][] = [];
  for (let s = 0; s + 1 < cu.length; s++) for (let start = 0; start < cu[s + 1]! - cu[s]!; start += size) list.push([s, start]);
  list.sort((a, b) => (order === 'latest first' ? b[1] - a[1] : a[1] - b[1]) || a[0] - b[0]);
  return Int32Array.from(list.flat());
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
  /** Bytes of the device buffers held. */
  bytes(): number {
    return this.items.reduce((sum, item) => sum + ('bytes' in item && typeof item.bytes === 'number' ? item.bytes : 0), 0);
  }
  dispose(): void {
    for (const item of this.items.reverse()) item.dispose();
    this.items.length = 0;
  }
}
