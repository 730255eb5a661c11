// The CUDA kernels' launch shapes and shared-memory sizes, without a GPU: the tuning switches parse as documented,
// and each kernel's dynamic shared memory holds everything its source puts there (the selected attention's warps
// merge their fp32 outputs in the memory of the key/value stages, which is smaller than that merge when dv > dk).

import { describe, expect, it } from 'vitest';
import { NSAConfig } from '../../src/config/nsa-config.js';
import type { CudaContext } from '../../src/backends/cuda/context.js';
import { kernelTuning, NsaPrograms, SUPPORTED_HEAD_DIMS, type KernelTuning } from '../../src/backends/cuda/nsa/programs.js';

/** The context fields the size arithmetic reads; no kernel is compiled. */
const fakeContext = { device: { computeCapability: [9, 0] }, maxSharedBytesOptin: 227 * 1024 } as unknown as CudaContext;

function config(dk: number, dv: number): NSAConfig {
  return new NSAConfig({ heads: 16, kvHeads: 1, headDim: dk, valueDim: dv });
}

describe('kernelTuning', () => {
  it('defaults to 8 flash warps with wgmma and 2 x 1 selected-attention warps x stages at 8 CTAs per SM, bulk copies on sm_90', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0])).toEqual({
      faWarps: 8,
      faWgmma: true,
      slcWarps: 2,
      slcStages: 1,
      slcMinBlocks: 8,
      slcBulk: true,
    });
  });

  it('keeps bulk copies off before sm_90 and when NSA_SLC_BULK=0', () => {
    expect(kernelTuning(config(128, 128), {}, [8, 0]).slcBulk).toBe(false);
    expect(kernelTuning(config(128, 128), { NSA_SLC_BULK: '0' }, [9, 0]).slcBulk).toBe(false);
  });

  it('reads NSA_FA_WARPS and NSA_SLC_PIPELINE (WxS or WxSxB), ignoring malformed values', () => {
    const t = kernelTuning(config(128, 128), { NSA_FA_WARPS: '4', NSA_SLC_PIPELINE: '4x3x2' }, [9, 0]);
    expect([t.faWarps, t.slcWarps, t.slcStages, t.slcMinBlocks]).toEqual([4, 4, 3, 2]);
    const bad = kernelTuning(config(192, 128), { NSA_SLC_PIPELINE: '3x9' }, [9, 0]);
    expect([bad.slcWarps, bad.slcStages, bad.slcMinBlocks]).toEqual([2, 1, 4]);
  });
});

describe('the wgmma flash-attention switch', () => {
  it('is on for Hopper (sm_90) alone: Ampere and Blackwell have no wgmma; NSA_FA_WGMMA=0 turns it off', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).faWgmma).toBe(true);
    expect(kernelTuning(config(128, 128), { NSA_FA_WGMMA: '0' }, [9, 0]).faWgmma).toBe(false);
    expect(kernelTuning(config(128, 128), {}, [8, 0]).faWgmma).toBe(false);
    expect(kernelTuning(config(128, 128), {}, [10, 0]).faWgmma).toBe(false);
  });

  for (const [dk, dv] of SUPPORTED_HEAD_DIMS) {
    it(`sizes the flash tiles at dk = ${dk}, dv = ${dv} (query tile, two stages of 128 keys, 1 KB alignment) within 227 KB`, () => {
      for (const faWarps of [4, 8] as const) {
        const tuning: KernelTuning = { ...kernelTuning(config(dk, dv), {}, [9, 0]), faWarps, faWgmma: true };
        const bytes = new NsaPrograms(fakeContext, config(dk, dv), 'bf16', tuning).flashSharedBytes();
        expect(bytes).toBe(2 * (16 * faWarps * dk + 2 * 128 * (dk + dv)) + 1024);
        expect(bytes).toBeLessThanOrEqual(227 * 1024);
      }
    });
  }
});

describe('shared memory of the selected-attention kernels', () => {
  const tunings: KernelTuning[] = [];
  for (const slcWarps of [2, 4] as const) {
    for (const slcStages of [1, 2, 4]) {
      for (const slcBulk of [false, true]) tunings.push({ faWarps: 8, faWgmma: false, slcWarps, slcStages, slcMinBlocks: 4, slcBulk });
    }
  }

  for (const [dk, dv] of SUPPORTED_HEAD_DIMS) {
    it(`holds the query rows, the stages and the warps' merge at dk = ${dk}, dv = ${dv}`, () => {
      for (const tuning of tunings) {
        const programs = new NsaPrograms(fakeContext, config(dk, dv), 'bf16', tuning);
        const pad = tuning.slcBulk ? 8 : 0;
        const rows = 16 * tuning.slcWarps; // keys per stage
        const query = 2 * 16 * dk;
        const stages = 2 * tuning.slcStages * rows * (dk + pad + dv + pad);
        const merge = 4 * tuning.slcWarps * 16 * dv;
        const what = `${tuning.slcWarps} warps x ${tuning.slcStages} stages, bulk ${tuning.slcBulk}`;
        expect(programs.selectedSharedBytes(), `forward, ${what}`).toBeGreaterThanOrEqual(query + Math.max(stages, merge));

        // Backward dQ: Q and dO rows, a 64-key tile, then 4 warps' fp32 dQ parts over the tile.
        const dq = 2 * 16 * (dk + dv) + Math.max(2 * 64 * (dk + pad + dv + pad), 4 * 4 * 16 * dk);
        expect(programs.selectedBackwardSharedBytes('dq'), `dq, ${what}`).toBeGreaterThanOrEqual(dq);
        // Backward dK/dV: the key/value tile, and 64 gathered query and dO rows.
        expect(programs.selectedBackwardSharedBytes('dkdv'), `dkdv, ${what}`).toBeGreaterThanOrEqual(2 * 64 * (dk + dv) + 2 * 64 * (dk + pad + dv + pad));
      }
    });
  }

  it('the merge, not the stages, sets the size when dv > dk at one stage (the case that overflowed)', () => {
    const tuning: KernelTuning = { faWarps: 8, faWgmma: false, slcWarps: 2, slcStages: 1, slcMinBlocks: 8, slcBulk: false };
    const programs = new NsaPrograms(fakeContext, config(64, 128), 'bf16', tuning);
    expect(programs.selectedSharedBytes()).toBe(2 * 16 * 64 + 4 * 2 * 16 * 128);
  });
});
