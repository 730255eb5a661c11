// The NSA kernel programs: each names its source, its compile-time defines (the config baked in, which is also
// its cache key) and the shared memory its launch needs. Runtime sizes go in kernel arguments, never in defines,
// so one compiled module serves every sequence length.

import type { NSAConfig } from '../../../config/nsa-config.js';
import { UnsupportedConfigError } from '../../../errors.js';
import type { CudaContext, CudaModule } from '../context.js';
import type { Kernel } from '../launch.js';
import { kernelSource } from './kernel-source.js';

export type HalfDType = 'bf16' | 'f16';

/** Head dims with kernels: dk = dv in {64, 128}, and dk = 192 with dv = 128 (the paper's). */
export const SUPPORTED_HEAD_DIMS: readonly (readonly [number, number])[] = [
  [64, 64],
  [128, 128],
  [192, 128],
  [128, 64],
  [64, 128],
];

export const MAX_SELECT_COUNT = 32;
export const MAX_GROUP_FOR_SCORING = 64;

/** Throws UnsupportedConfigError for a config the CUDA kernels do not cover, saying what they do cover. */
export function checkCudaSupport(config: NSAConfig): void {
  const dims = SUPPORTED_HEAD_DIMS.some(([dk, dv]) => dk === config.headDim && dv === config.valueDim);
  if (!dims) {
    const list = SUPPORTED_HEAD_DIMS.map(([dk, dv]) => `${dk}/${dv}`).join(', ');
    throw new UnsupportedConfigError(
      `cuda backend: no kernel for headDim ${config.headDim} / valueDim ${config.valueDim} (have ${list}); use the cpu backend`,
    );
  }
  if (config.selectCount > MAX_SELECT_COUNT) {
    throw new UnsupportedConfigError(`cuda backend: selectCount ${config.selectCount} > ${MAX_SELECT_COUNT} is not supported`);
  }
  if (config.groupSize > MAX_GROUP_FOR_SCORING) {
    throw new UnsupportedConfigError(
      `cuda backend: a GQA group of ${config.groupSize} query heads per KV head is above the ${MAX_GROUP_FOR_SCORING} the scoring kernel takes`,
    );
  }
}

/** The compiled kernels of one (config, dtype), created lazily and memoised by the context. */
export class NsaPrograms {
  constructor(
    private readonly ctx: CudaContext,
    readonly config: NSAConfig,
    readonly dtype: HalfDType,
  ) {
    checkCudaSupport(config);
  }

  get compressMean(): Kernel {
    return this.kernel('compress_mean.cu', 'nsa_compress_mean', this.cmpDefines());
  }

  /** mode 0 dense causal, 1 cmp, 2 win, 3 cmp then win. */
  flash(mode: 0 | 1 | 2 | 3): Kernel {
    return this.kernel('flash_attention.cu', 'nsa_flash_attention', [
      `-DNSA_MODE=${mode}`,
      ...(mode === 0 ? [] : [...this.cmpDefines(), `-DWINDOW=${this.config.window}`]),
    ]);
  }

  get selectBlocks(): Kernel {
    return this.kernel('select_blocks.cu', 'nsa_select_blocks', [...this.cmpDefines(), ...this.selDefines()]);
  }

  get selectedAttention(): Kernel {
    return this.kernel('selected_attention.cu', 'nsa_selected_attention', this.selDefines());
  }

  fsa(fn: 'count' | 'scan' | 'fill' | 'attend' | 'reduce'): Kernel {
    return this.kernel('selected_attention_fsa.cu', `nsa_fsa_${fn}`, this.selDefines());
  }

  /** Dynamic shared memory of each kernel (bytes). */
  flashSharedBytes(): number {
    const { headDim: dk, valueDim: dv } = this.config;
    return 2 * (64 * dk + 2 * 64 * dk + 2 * 64 * dv);
  }

  selectSharedBytes(positionsPerTile: number, scoreStride: number): number {
    return 2 * (64 * this.config.headDim + 2 * 64 * this.config.headDim) + 4 * 64 * 64 + 4 * positionsPerTile * scoreStride;
  }

  selectedSharedBytes(): number {
    const { headDim: dk, valueDim: dv } = this.config;
    return 2 * (16 * dk + 2 * 64 * dk + 2 * 64 * dv);
  }

  fsaSharedBytes(): number {
    const { headDim: dk, valueDim: dv } = this.config;
    return 2 * (64 * dk + 64 * dk + 64 * dv);
  }

  /** Positions per block-selection tile: as many as the G heads and the score rows allow (at least 1). */
  positionsPerSelectTile(scoreStride: number): number {
    const byRows = Math.max(1, Math.floor(64 / this.config.groupSize));
    const fixed = this.selectSharedBytes(0, scoreStride);
    const byShared = Math.floor((this.ctx.maxSharedBytesOptin - fixed) / (4 * scoreStride));
    if (byShared < 1) {
      throw new UnsupportedConfigError(
        `cuda backend: a sequence of ${scoreStride} selection blocks needs ${fixed + 4 * scoreStride} bytes of shared ` +
          `memory for block scores; this GPU has ${this.ctx.maxSharedBytesOptin} (use a larger selectBlock)`,
      );
    }
    return Math.min(byRows, byShared);
  }

  private cmpDefines(): string[] {
    return [`-DCMP_L=${this.config.compressBlock}`, `-DCMP_D=${this.config.compressStride}`];
  }

  private selDefines(): string[] {
    return [`-DSEL_L=${this.config.selectBlock}`, `-DSEL_N=${this.config.selectCount}`];
  }

  private kernel(file: string, fn: string, defines: readonly string[]): Kernel {
    const options = [
      `-DDK=${this.config.headDim}`,
      `-DDV=${this.config.valueDim}`,
      ...(this.dtype === 'f16' ? ['-DNSA_FP16'] : []),
      ...defines,
    ];
    const module: CudaModule = this.ctx.module(file.replace('.cu', ''), kernelSource(file), { options });
    return this.ctx.kernel(module, fn);
  }
}
