// The CUDA kernels' launch shapes and shared-memory sizes, without a GPU: the tuning switches parse as documented,
// and each kernel's dynamic shared memory holds everything its source puts there (the selected attention's warps
// merge their fp32 outputs in the memory of the key/value stages, which is smaller than that merge when dv > dk).

import { afterEach, describe, expect, it, vi } from 'vitest';
import { NSAConfig } from '../../src/config/nsa-config.js';
import type { CudaContext } from '../../src/backends/cuda/context.js';
import { kernelTuning, NsaPrograms, SUPPORTED_HEAD_DIMS, type KernelTuning } from '../../src/backends/cuda/nsa/programs.js';
import { selectedDqMode } from '../../src/backends/cuda/nsa/backward-runner.js';

/** The context fields the size arithmetic reads; no kernel is compiled. */
const fakeContext = {
  device: { computeCapability: [9, 0], sharedBytesPerSm: 228 * 1024, reservedSharedBytesPerBlock: 1024 }, // an H100's
  maxSharedBytesOptin: 227 * 1024,
} as unknown as CudaContext;

function config(dk: number, dv: number): NSAConfig {
  return new NSAConfig({ heads: 16, kvHeads: 1, headDim: dk, valueDim: dv });
}

describe('kernelTuning', () => {
  it('defaults to 8 flash warps with wgmma, 2 x 1 selected-attention warps x stages at 8 CTAs per SM, bulk copies on sm_90, persistent FSA CTAs at 3 per SM, selected dK/dV items by token', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0])).toEqual({
      faWarps: 8,
      faWgmma: true,
      slcWarps: 2,
      slcStages: 1,
      slcMinBlocks: 8,
      slcBulk: true,
      slcTma: true,
      slcUnion: 3,
      slcUnionStages: undefined,
      slcUnionMinBlocks: undefined,
      slcDqParts: 'bf16',
      slcBwdWs: true,
      slcBwdTma: true,
      fsaMinBlocks: 3,
      fsaPersistent: true,
      fsaPhases: 'head',
      fsaBulkQ: true,
      indexRanked: true,
      cmpWinDqFused: true,
      faTma: true,
      faPingpong: true,
      faBwdTma: { dq: true, dkdv: true },
      faBwdStages: undefined,
      faBwdDefer: true,
      slcBwdItemTiles: undefined,
      slcBwdOrder: 'token',
      selectRing: undefined,
      selectOfferMin: undefined,
      selectMinBlocks: undefined,
      selectTma: true,
      selectMergeMin: undefined,
      selectDirect: false, // the paper's l = 32, d = 16: a block's score spans tiles
      selectWarpLocal: true,
      selectRegLists: true,
      slcDense: true,
      slcWinMerge: true,
    });
  });

  it("gives the block selection's positions to the warps that sum their heads, their lists in registers at G = 4 to 16, unless NSA_SELECT_WARP_LOCAL=0 / NSA_SELECT_REG_LISTS=0", () => {
    const regLists = (G: number, env: Record<string, string> = {}): boolean => {
      const c = new NSAConfig({ heads: 4 * G, kvHeads: 4, headDim: 128, valueDim: 128 });
      return new NsaPrograms(fakeContext, c, 'bf16', kernelTuning(c, env, [9, 0])).selectRegLists;
    };
    expect([1, 2, 3, 4, 8, 16, 32].map((G) => regLists(G))).toEqual([false, false, false, true, true, true, false]);
    expect(regLists(4, { NSA_SELECT_REG_LISTS: '0' })).toBe(false);
    expect(regLists(4, { NSA_SELECT_WARP_LOCAL: '0' })).toBe(false); // the lists need the warp that owns them
    expect(kernelTuning(config(128, 128), { NSA_SELECT_WARP_LOCAL: '0' }, [9, 0]).selectWarpLocal).toBe(false);
  });

  it('builds the inverse index by ranked warps unless NSA_INDEX_RANKED=0', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).indexRanked).toBe(true);
    expect(kernelTuning(config(128, 128), {}, [8, 0]).indexRanked).toBe(true);
    expect(kernelTuning(config(128, 128), { NSA_INDEX_RANKED: '0' }, [9, 0]).indexRanked).toBe(false);
  });

  it("shares the persistent FSA attention's tiles out a KV head at a time unless NSA_FSA_PHASES=all", () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).fsaPhases).toBe('head');
    expect(kernelTuning(config(128, 128), { NSA_FSA_PHASES: 'all' }, [9, 0]).fsaPhases).toBe('all');
    expect(kernelTuning(config(128, 128), { NSA_FSA_PHASES: 'x' }, [8, 0]).fsaPhases).toBe('head');
  });

  it('computes a batch\'s selected branch as dense attention where every visible block is selected, unless NSA_SLC_DENSE=0', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).slcDense).toBe(true);
    expect(kernelTuning(config(128, 128), { NSA_SLC_DENSE: '0' }, [9, 0]).slcDense).toBe(false);
    expect(kernelTuning(config(64, 64), {}, [8, 0]).slcDense).toBe(true);
  });

  it('takes three positions a CTA over the union of their blocks on sm_90 unless NSA_SLC_UNION says 2 to 8 or off', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).slcUnion).toBe(3);
    expect(kernelTuning(config(128, 128), { NSA_SLC_UNION: '2' }, [9, 0]).slcUnion).toBe(2);
    expect(kernelTuning(config(128, 128), { NSA_SLC_UNION: '8' }, [9, 0]).slcUnion).toBe(8);
    expect(kernelTuning(config(128, 128), { NSA_SLC_UNION: '0' }, [9, 0]).slcUnion).toBeUndefined();
    expect(kernelTuning(config(128, 128), { NSA_SLC_UNION: '1' }, [9, 0]).slcUnion).toBeUndefined();
    expect(kernelTuning(config(128, 128), { NSA_SLC_UNION: '9' }, [9, 0]).slcUnion).toBe(3); // out of range: the default
    expect(kernelTuning(config(128, 128), { NSA_SLC_UNION: 'x' }, [9, 0]).slcUnion).toBe(3);
    expect(kernelTuning(config(128, 128), {}, [8, 0]).slcUnion).toBeUndefined();
    const programs = (env: Record<string, string>): NsaPrograms => new NsaPrograms(fakeContext, config(128, 128), 'bf16', kernelTuning(config(128, 128), env, [9, 0]));
    expect(programs({}).slcUnionPositions).toBe(3);
    expect(programs({}).selectedUnionThreads).toBe(128);
    expect(programs({ NSA_SLC_TMA: '0' }).slcUnionPositions).toBe(0); // the union's tiles come by TMA only
    expect(programs({ NSA_SLC_PIPELINE: '4x1x4' }).slcUnionPositions).toBe(0); // its tensor maps' boxes are 32 keys
  });

  it('gives the union kernel as many ring stages as positions and about nine position warps an SM, unless NSA_SLC_UNION_STAGES / _MIN say', () => {
    const programs = (env: Record<string, string>, dk = 128): NsaPrograms =>
      new NsaPrograms(fakeContext, config(dk, 128), 'bf16', kernelTuning(config(dk, 128), env, [9, 0]));
    // ring: 3 stages x 32 keys x (dk + dv) x 2 bytes; queries: 3 positions x 16 rows x dk x 2 bytes; 1 KB alignment
    expect(programs({}).selectedUnionSharedBytes()).toBe(1024 + 3 * 32 * 256 * 2 + 3 * 16 * 128 * 2);
    expect(programs({ NSA_SLC_UNION: '8' }).selectedUnionSharedBytes()).toBe(1024 + 8 * 32 * 256 * 2 + 8 * 16 * 128 * 2);
    expect(programs({ NSA_SLC_UNION_STAGES: '2' }).selectedUnionSharedBytes()).toBe(1024 + 2 * 32 * 256 * 2 + 3 * 16 * 128 * 2);
    expect(programs({ NSA_SLC_UNION_STAGES: '9' }).selectedUnionSharedBytes()).toBe(1024 + 3 * 32 * 256 * 2 + 3 * 16 * 128 * 2);
    expect([2, 3, 4, 8].map((p) => programs({ NSA_SLC_UNION: String(p) }).unionMinBlocks)).toEqual([4, 3, 2, 1]);
    expect(programs({}, 192).unionMinBlocks).toBe(2);
    expect(programs({ NSA_SLC_UNION_MIN: '1' }).unionMinBlocks).toBe(1);
  });

  it('computes the window and the dense selected branch in one launch unless NSA_SLC_WIN_MERGE=0', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).slcWinMerge).toBe(true);
    expect(kernelTuning(config(128, 128), { NSA_SLC_WIN_MERGE: '0' }, [9, 0]).slcWinMerge).toBe(false);
  });

  it('takes the warp-specialised selected dK/dV on sm_90 at dk, dv <= 128 unless NSA_SLC_BWD=mma', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).slcBwdWs).toBe(true);
    expect(kernelTuning(config(64, 64), {}, [9, 0]).slcBwdWs).toBe(true);
    expect(kernelTuning(config(128, 128), { NSA_SLC_BWD: 'mma' }, [9, 0]).slcBwdWs).toBe(false);
    expect(kernelTuning(config(128, 128), {}, [8, 0]).slcBwdWs).toBe(false);
    expect(kernelTuning(config(192, 128), {}, [9, 0]).slcBwdWs).toBe(false);
  });

  it('takes the TMA flash forward on sm_90 with wgmma unless NSA_FA_TMA=0 (or NSA_FA_WGMMA=0); ping-pong unless NSA_FA_PINGPONG=0', () => {
    expect(kernelTuning(config(128, 128), { NSA_FA_TMA: '0' }, [9, 0]).faTma).toBe(false);
    expect(kernelTuning(config(128, 128), { NSA_FA_WGMMA: '0' }, [9, 0]).faTma).toBe(false);
    expect(kernelTuning(config(128, 128), {}, [8, 0]).faTma).toBe(false);
    expect(kernelTuning(config(128, 128), { NSA_FA_PINGPONG: '0' }, [9, 0]).faPingpong).toBe(false);
    expect(new NsaPrograms(fakeContext, config(128, 128), 'bf16', { ...kernelTuning(config(128, 128), {}, [9, 0]), faWgmma: false }).flashTma).toBe(false);
  });

  it('lets the pipelined flash backward run a tile\'s last product under the next tile\'s scores unless NSA_FA_BWD_DEFER=0', () => {
    expect(kernelTuning(config(128, 128), { NSA_FA_BWD_DEFER: '0' }, [9, 0]).faBwdDefer).toBe(false);
    expect(kernelTuning(config(128, 128), { NSA_FA_BWD_DEFER: '1' }, [9, 0]).faBwdDefer).toBe(true);
  });

  it('takes the pipelined (TMA) flash backward on sm_90 unless NSA_FA_BWD_TMA=0, or for one walk with =dq / =dkdv; reads NSA_FA_BWD_STAGES', () => {
    const tma = (env: Record<string, string>, cc = [9, 0]): KernelTuning['faBwdTma'] => kernelTuning(config(128, 128), env, cc).faBwdTma;
    expect(tma({ NSA_FA_BWD_TMA: '1' })).toEqual({ dq: true, dkdv: true });
    expect(tma({ NSA_FA_BWD_TMA: '0' })).toEqual({ dq: false, dkdv: false });
    expect(tma({ NSA_FA_BWD_TMA: 'dq' })).toEqual({ dq: true, dkdv: false });
    expect(tma({ NSA_FA_BWD_TMA: 'dkdv' })).toEqual({ dq: false, dkdv: true });
    expect(tma({}, [8, 0])).toBeUndefined();
    expect(kernelTuning(config(128, 128), { NSA_FA_BWD_STAGES: '4' }, [9, 0]).faBwdStages).toBe(4);
    expect(kernelTuning(config(128, 128), { NSA_FA_BWD_STAGES: '5' }, [9, 0]).faBwdStages).toBeUndefined();
  });

  it('runs the cmp and win dQ as one launch unless NSA_FA_BWD_DQ_FUSED=0', () => {
    expect(kernelTuning(config(128, 128), { NSA_FA_BWD_DQ_FUSED: '0' }, [9, 0]).cmpWinDqFused).toBe(false);
    expect(kernelTuning(config(192, 128), { NSA_FA_BWD_DQ_FUSED: '1' }, [8, 0]).cmpWinDqFused).toBe(true);
  });

  it('runs the FSA attention as persistent CTAs (3 per SM at dk = dv = 128) for blocks of <= 64 keys unless NSA_FSA_PERSISTENT=0', () => {
    const off = kernelTuning(config(128, 128), { NSA_FSA_PERSISTENT: '0' }, [9, 0]);
    expect([off.fsaPersistent, off.fsaMinBlocks]).toEqual([false, 4]);
    const wide = new NSAConfig({ heads: 16, kvHeads: 4, headDim: 128, valueDim: 128, selectBlock: 128, compressBlock: 64, compressStride: 64 });
    expect([kernelTuning(wide, {}, [9, 0]).fsaPersistent, kernelTuning(wide, {}, [9, 0]).fsaMinBlocks]).toEqual([false, 4]);
  });

  it('caps the FSA attention at 3 or 4 CTAs per SM for dk = dv = 128 only (shared memory allows 3 at dk = 192; dk = 64 needs no cap)', () => {
    expect(kernelTuning(config(192, 128), {}, [9, 0]).fsaMinBlocks).toBeUndefined();
    expect(kernelTuning(config(64, 64), {}, [9, 0]).fsaMinBlocks).toBeUndefined();
    expect(kernelTuning(config(64, 64), { NSA_FSA_MIN_BLOCKS: '2' }, [9, 0]).fsaMinBlocks).toBe(2);
  });

  it('reads the tuning switches NSA_FSA_MIN_BLOCKS (1..8), NSA_SELECT_RING (128, 256, 512), NSA_SELECT_OFFER_MIN (16..256), NSA_SELECT_MIN_BLOCKS (1..4), NSA_SELECT_MERGE_MIN (1..33) and NSA_SLC_BWD_ITEM (16..256, powers of two), ignoring other values', () => {
    const t = kernelTuning(config(128, 128), { NSA_FSA_MIN_BLOCKS: '4', NSA_SELECT_RING: '512', NSA_SELECT_OFFER_MIN: '16', NSA_SELECT_MIN_BLOCKS: '4', NSA_SELECT_MERGE_MIN: '33', NSA_SLC_BWD_ITEM: '128' }, [9, 0]);
    expect([t.fsaMinBlocks, t.selectRing, t.selectOfferMin, t.selectMinBlocks, t.selectMergeMin, t.slcBwdItemTiles]).toEqual([4, 512, 16, 4, 33, 128]);
    const bad = kernelTuning(config(192, 128), { NSA_FSA_MIN_BLOCKS: '9', NSA_SELECT_RING: '300', NSA_SELECT_OFFER_MIN: '8', NSA_SELECT_MIN_BLOCKS: '5', NSA_SELECT_MERGE_MIN: '0', NSA_SLC_BWD_ITEM: '100' }, [9, 0]);
    expect([bad.fsaMinBlocks, bad.selectRing, bad.selectOfferMin, bad.selectMinBlocks, bad.selectMergeMin, bad.slcBwdItemTiles]).toEqual([undefined, undefined, undefined, undefined, undefined, undefined]);
  });

  it('runs the selected dK/dV work items by token unless NSA_SLC_BWD_ORDER=key', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).slcBwdOrder).toBe('token');
    expect(kernelTuning(config(128, 128), { NSA_SLC_BWD_ORDER: 'key' }, [9, 0]).slcBwdOrder).toBe('key');
    expect(kernelTuning(config(128, 128), { NSA_SLC_BWD_ORDER: 'other' }, [8, 0]).slcBwdOrder).toBe('token');
  });

  it('stores the fused selected dQ parts as bf16 unless NSA_SLC_DQ_PARTS=f32', () => {
    expect(kernelTuning(config(128, 128), { NSA_SLC_DQ_PARTS: 'f32' }, [9, 0]).slcDqParts).toBe('f32');
    expect(kernelTuning(config(128, 128), { NSA_SLC_DQ_PARTS: 'bf16' }, [8, 0]).slcDqParts).toBe('bf16');
  });

  it('loads the selected tiles by TMA on sm_90 where l\' is a multiple of the tile and dk, dv of 64, unless NSA_SLC_TMA=0 or bulk copies are off', () => {
    expect(kernelTuning(config(128, 128), {}, [9, 0]).slcTma).toBe(true);
    expect(kernelTuning(config(192, 128), {}, [9, 0]).slcTma).toBe(true);
    expect(kernelTuning(config(128, 128), {}, [8, 0]).slcTma).toBe(false);
    expect(kernelTuning(config(128, 128), { NSA_SLC_TMA: '0' }, [9, 0]).slcTma).toBe(false);
    expect(kernelTuning(config(128, 128), { NSA_SLC_BULK: '0' }, [9, 0]).slcTma).toBe(false);
    const short = new NSAConfig({ heads: 16, kvHeads: 1, headDim: 128, valueDim: 128, compressBlock: 16, compressStride: 16, selectBlock: 16 });
    expect(kernelTuning(short, {}, [9, 0]).slcTma).toBe(false); // 16-key blocks, 32-key tiles
    expect(kernelTuning(config(128, 128), { NSA_SLC_PIPELINE: '4x1' }, [9, 0]).slcTma).toBe(true); // 64-key tiles, l' = 64
  });

  it('gathers the selected dK/dV rows by TMA on sm_90 at G = 8, 16, 32, 64 unless NSA_SLC_BWD_TMA=0', () => {
    const group = (heads: number, kvHeads: number): NSAConfig => new NSAConfig({ heads, kvHeads, headDim: 128, valueDim: 128 });
    expect(kernelTuning(group(16, 1), {}, [9, 0]).slcBwdTma).toBe(true);
    expect(kernelTuning(group(64, 8), {}, [9, 0]).slcBwdTma).toBe(true);
    expect(kernelTuning(group(32, 8), {}, [9, 0]).slcBwdTma).toBe(false); // G = 4: boxes of 4 rows cost more than cp.async
    expect(kernelTuning(group(16, 1), {}, [8, 0]).slcBwdTma).toBe(false);
    expect(kernelTuning(group(16, 1), { NSA_SLC_BWD_TMA: '0' }, [9, 0]).slcBwdTma).toBe(false);
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

describe("the cmp + win launch's stash of the cmp output", () => {
  it('keeps the query tile of fp32 cmp outputs in shared memory where it fits beside the tiles (227 KB on Hopper)', () => {
    for (const [dk, dv] of SUPPORTED_HEAD_DIMS) {
      for (const faWgmma of [true, false]) {
        for (const faWarps of [4, 8] as const) {
          const tuning: KernelTuning = { ...kernelTuning(config(dk, dv), {}, [9, 0]), faWarps, faWgmma };
          const programs = new NsaPrograms(fakeContext, config(dk, dv), 'bf16', tuning);
          const tiles = programs.flashSharedBytes(0);
          const stash = 4 * 16 * faWarps * dv;
          const fits = tiles + stash <= 227 * 1024;
          expect(programs.cmpStash, `dk ${dk} dv ${dv} wgmma ${faWgmma} warps ${faWarps}`).toBe(fits);
          expect(programs.flashSharedBytes(3)).toBe(tiles + (fits ? stash : 0));
          expect(programs.flashSharedBytes(3)).toBeLessThanOrEqual(227 * 1024);
        }
      }
    }
    const hopper128 = new NsaPrograms(fakeContext, config(128, 128), 'bf16', kernelTuning(config(128, 128), {}, [9, 0]));
    expect(hopper128.cmpStash).toBe(true); // the default launch at dk = dv = 128: 225 KB
    const hopper192 = new NsaPrograms(fakeContext, config(192, 128), 'bf16', kernelTuning(config(192, 128), {}, [9, 0]));
    expect(hopper192.cmpStash).toBe(false);
  });
});

describe('shared memory of the selected-attention kernels', () => {
  const tunings: KernelTuning[] = [];
  for (const slcWarps of [2, 4] as const) {
    for (const slcStages of [1, 2, 4]) {
      for (const slcBulk of [false, true]) tunings.push({ faWarps: 8, faWgmma: false, slcWarps, slcStages, slcMinBlocks: 4, slcBulk, slcDqParts: 'f32', slcBwdWs: false });
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

  it('the warp-specialised dK/dV holds K, V, five row stages and two dS tiles, within an H100 CTA, and its threads', () => {
    const tuning: KernelTuning = { faWarps: 8, faWgmma: true, slcWarps: 2, slcStages: 1, slcMinBlocks: 8, slcBulk: true, slcDqParts: 'bf16', slcBwdWs: true };
    for (const [dk, dv] of SUPPORTED_HEAD_DIMS.filter(([a, b]) => a <= 128 && b <= 128)) {
      const programs = new NsaPrograms(fakeContext, config(dk, dv), 'bf16', tuning);
      const bytes = programs.selectedBackwardSharedBytes('dkdv', true);
      expect(bytes, `dk = ${dk}, dv = ${dv}`).toBeGreaterThanOrEqual(2 * 64 * (dk + dv) * 6 + 2 * 2 * 64 * 64);
      expect(bytes).toBeLessThanOrEqual(227 * 1024);
      // The second computing warpgroup's dK, dV pass through the stages at the end: they must fit there.
      expect(4 * 128 * ((dk + dv) / 8) * 4).toBeLessThanOrEqual(3 * 2 * 64 * (dk + dv));
      expect(programs.selectedBackwardThreads('dkdv')).toBe(384);
      expect(programs.selectedBackwardThreads('dq')).toBe(128);
    }
  });

  it('the merge, not the stages, sets the size when dv > dk at one stage (the case that overflowed)', () => {
    const tuning: KernelTuning = { faWarps: 8, faWgmma: false, slcWarps: 2, slcStages: 1, slcMinBlocks: 8, slcBulk: false, slcDqParts: 'f32', slcBwdWs: false };
    const programs = new NsaPrograms(fakeContext, config(64, 128), 'bf16', tuning);
    expect(programs.selectedSharedBytes()).toBe(2 * 16 * 64 + 4 * 2 * 16 * 128);
  });
});

describe('shared memory of the block-selection kernel', () => {
  // select_blocks.cu: Q (128 rows) and two 64-key stages, the per-tile head sums, then per position a ring of
  // block scores (a power of two holding one tile's blocks and offerMin more) and its n best candidates as 8-byte
  // keys.
  const ringOf = (c: NSAConfig, offerMin: number): number => {
    const tileBlocks = Math.floor((63 * c.compressStride + c.compressBlock - 1 + c.selectBlock - 1) / c.selectBlock) + 1;
    return [128, 256, 512].find((r) => tileBlocks + offerMin <= r)!;
  };
  // fla's l = d = l' offers each tile's scores straight to the lists (no ring) unless NSA_SELECT_DIRECT=0.
  for (const [preset, env] of [['fla', {}], ['fla', { NSA_SELECT_DIRECT: '0' }], ['paper', {}]] as const) {
    for (const [G, dk] of [[16, 128], [4, 128], [1, 64], [3, 192]] as const) {
      it(`${preset} preset${env.NSA_SELECT_DIRECT === '0' ? ' (ring)' : ''}, G = ${G}, dk = ${dk}: full 128-row tiles whose size does not depend on the sequence`, () => {
        const c = NSAConfig.preset(preset, { heads: 4 * G, kvHeads: 4, headDim: dk, valueDim: dk === 192 ? 128 : dk });
        const programs = new NsaPrograms(fakeContext, c, 'bf16', { ...kernelTuning(c, env, [9, 0]), faWgmma: true });
        expect(programs.tuning.selectDirect).toBe(preset === 'fla' && env.NSA_SELECT_DIRECT !== '0');
        const P = programs.positionsPerSelectTile();
        const headSums = (G & (G - 1)) === 0 ? 8 * Math.max(1, 16 / G) * 64 : 128 * 65;
        const ring = programs.tuning.selectDirect === true ? 0 : ringOf(c, programs.selectShape.offerMin);
        // each warp owning its rows' positions keeps their lists in registers at G = 4 and 16 (four and one a warp)
        expect(programs.selectRegLists).toBe(G === 4 || G === 16);
        const lists = programs.selectRegLists ? 0 : 8 * c.selectCount;
        const bytes = programs.selectSharedBytes(P);
        expect(bytes).toBe(2 * (128 * dk + 2 * 64 * dk) + 4 * headSums + P * (4 * ring + lists) + 16 + 1024); // 16: two mbarriers (TMA)
        expect(bytes).toBeLessThanOrEqual(227 * 1024);
        expect(P).toBe(Math.floor(128 / G));
      });
    }
  }

  it('takes a larger ring where NSA_SELECT_RING asks, never a smaller one than a tile needs', () => {
    const c = NSAConfig.preset('fla', { heads: 64, kvHeads: 4, headDim: 128, valueDim: 128 }); // 65 blocks a tile
    const bytes = (selectRing?: number): number =>
      new NsaPrograms(fakeContext, c, 'bf16', { ...kernelTuning(c, { NSA_SELECT_DIRECT: '0' }, [9, 0]), faWgmma: true, selectRing }).selectSharedBytes(8);
    expect(bytes(512) - bytes()).toBe(8 * 4 * (512 - 128)); // the default ring is 128 here: selectShape's offerMin 32
    expect(bytes(256) - bytes()).toBe(8 * 4 * (256 - 128));
  });

  it('shapes the block selection by the CTAs an SM its shared memory allows: a smaller ring where it adds one, registers for up to three', () => {
    const shape = (preset: 'fla' | 'paper', hq: number, h: number, dk: number, env: Record<string, string> = {}, wgmma = true) => {
      const c = NSAConfig.preset(preset, { heads: hq, kvHeads: h, headDim: dk, valueDim: 128 });
      const programs = new NsaPrograms(fakeContext, c, 'bf16', { ...kernelTuning(c, env, [9, 0]), faWgmma: wgmma });
      const perSm = Math.floor((228 * 1024) / (programs.selectSharedBytes(programs.positionsPerSelectTile()) + 1024));
      return { ...programs.selectShape, perSm };
    };
    // G = 16, fla with the ring: a tile touches 65 blocks, so 64 more need a ring of 256 (two CTAs an SM), 32 more
    // fit 128 (three).
    const ring = { NSA_SELECT_DIRECT: '0' };
    expect(shape('fla', 64, 4, 128, ring)).toEqual({ offerMin: 32, minBlocks: 3, perSm: 3 });
    expect(shape('paper', 64, 4, 128)).toEqual({ offerMin: 64, minBlocks: 3, perSm: 3 }); // 18 blocks a tile: 128 already
    expect(shape('fla', 32, 8, 128, ring)).toEqual({ offerMin: 64, minBlocks: 2, perSm: 2 }); // G = 4: 32 positions' rings
    expect(shape('fla', 16, 16, 128, ring)).toEqual({ offerMin: 64, minBlocks: undefined, perSm: 1 }); // G = 1: ptxas chooses
    expect(shape('fla', 64, 4, 128, { ...ring, NSA_SELECT_OFFER_MIN: '64', NSA_SELECT_MIN_BLOCKS: '1' })).toEqual({ offerMin: 64, minBlocks: 1, perSm: 2 });
    // Without a ring (fla's default): three CTAs at G = 16 and G = 4 (73 KB a CTA with the lists in registers, 77 KB
    // with them in shared memory: two), one at G = 1 (113 KB; its 16 positions a warp keep their lists in shared memory).
    expect(shape('fla', 64, 4, 128)).toEqual({ offerMin: 64, minBlocks: 3, perSm: 3 });
    expect(shape('fla', 32, 8, 128)).toEqual({ offerMin: 64, minBlocks: 3, perSm: 3 });
    expect(shape('fla', 32, 8, 128, { NSA_SELECT_REG_LISTS: '0' })).toEqual({ offerMin: 64, minBlocks: 2, perSm: 2 });
    expect(shape('fla', 16, 16, 128)).toEqual({ offerMin: 64, minBlocks: undefined, perSm: 1 });
    expect(shape('fla', 64, 4, 128, {}, false)).toMatchObject({ offerMin: 64, minBlocks: undefined }); // mma.sync
  });

  it('stages the FSA partial outputs where the stage costs no CTA an SM (H100 at dk = dv = 128), unless NSA_FSA_STAGE says', () => {
    const staged = (dk: number, dv: number, env: Record<string, string> = {}, device = fakeContext) => {
      const c = new NSAConfig({ heads: 32, kvHeads: 8, headDim: dk, valueDim: dv });
      const programs = new NsaPrograms(device, c, 'bf16', kernelTuning(c, env, [9, 0]));
      return { staged: programs.fsaStaged, bytes: programs.fsaSharedBytes() };
    };
    // Q, K and V tiles of 64 rows (48 KB at dk = dv = 128), with the stage 4 warps x (16 rows of dv + 8, 16 i64), and
    // on sm_90 the bulk-copied query rows' 8 elements of padding and 128 bytes of mbarriers.
    const bulk = 2 * 64 * 8 + 128;
    expect(staged(128, 128)).toEqual({ staged: true, bytes: 2 * 64 * (128 + 128 + 128) + 4 * (16 * 136 * 2 + 16 * 8) + bulk });
    expect(staged(192, 128).staged).toBe(false); // 3 CTAs an SM without it, 2 with it
    expect(staged(64, 64).staged).toBe(false); // shared memory holds 9 without it, 6 with it (registers not capped)
    expect(staged(128, 128, { NSA_FSA_STAGE: '0' })).toEqual({ staged: false, bytes: 2 * 64 * 384 + bulk });
    expect(staged(128, 128, { NSA_FSA_STAGE: '0', NSA_FSA_BULK_Q: '0' })).toEqual({ staged: false, bytes: 2 * 64 * 384 });
    expect(staged(192, 128, { NSA_FSA_STAGE: '1' }).staged).toBe(true);
    const a100 = { ...fakeContext, device: { computeCapability: [8, 0], sharedBytesPerSm: 164 * 1024, reservedSharedBytesPerBlock: 1024 } } as unknown as CudaContext;
    expect(staged(128, 128, {}, a100).staged).toBe(false); // 164 KB an SM: two staged CTAs where the registers allow three
    expect(staged(128, 128, { NSA_FSA_STAGE: '0' }, a100).bytes).toBe(2 * 64 * 384); // no bulk copies before sm_90
  });

  it('gathers the persistent FSA attention\'s query rows by bulk copies on sm_90 unless NSA_FSA_BULK_Q=0', () => {
    const c = new NSAConfig({ heads: 32, kvHeads: 8, headDim: 128, valueDim: 128 });
    const bulkQ = (env: Record<string, string>, device = fakeContext) => new NsaPrograms(device, c, 'bf16', kernelTuning(c, env, [9, 0])).fsaBulkQ;
    expect(bulkQ({})).toBe(true);
    expect(bulkQ({ NSA_FSA_BULK_Q: '0' })).toBe(false);
    expect(bulkQ({ NSA_FSA_BULK_Q: '1' })).toBe(true);
    const a100 = { ...fakeContext, device: { computeCapability: [8, 0], sharedBytesPerSm: 164 * 1024, reservedSharedBytesPerBlock: 1024 } } as unknown as CudaContext;
    expect(bulkQ({}, a100)).toBe(false);
    expect(bulkQ({ NSA_FSA_PERSISTENT: '0' })).toBe(false); // the CTA-per-tile kernel keeps its copies
  });

  it('fits two CTAs an SM at G = 4, dk = 128 with either preset (one, when scores of whole sequences were kept)', () => {
    for (const preset of ['fla', 'paper'] as const) {
      const c = NSAConfig.preset(preset, { heads: 32, kvHeads: 8, headDim: 128, valueDim: 128 });
      const programs = new NsaPrograms(fakeContext, c, 'bf16', { ...kernelTuning(c, {}, [9, 0]), faWgmma: true });
      // 228 KB an SM on sm_90, 1 KB of it reserved per CTA
      expect(2 * (programs.selectSharedBytes(programs.positionsPerSelectTile()) + 1024), preset).toBeLessThanOrEqual(228 * 1024);
    }
  });
});

describe('the flash backward kernels', () => {
  afterEach(() => {
    vi.unstubAllEnvs();
  });

  it('take wgmma where the forward does (2 dK/dV warpgroups, 1 for win; 2 dQ warpgroups dense, 1 for cmp/win), NSA_FA_BWD_WGS=AxB, NSA_FA_BWD_WGMMA=0', () => {
    const hopper = new NsaPrograms(fakeContext, config(128, 128), 'bf16', kernelTuning(config(128, 128), {}, [9, 0]));
    expect(hopper.flashBackwardWarpgroups(0, {})).toEqual({ dq: 2, dkdv: 2 });
    expect(hopper.flashBackwardWarpgroups(1, {})).toEqual({ dq: 1, dkdv: 2 });
    expect(hopper.flashBackwardWarpgroups(2, {})).toEqual({ dq: 1, dkdv: 1 });
    expect(hopper.flashBackwardWarpgroups(3, {})).toEqual({ dq: 1, dkdv: 2 });
    expect(hopper.flashBackwardWarpgroups(0, { NSA_FA_BWD_WGS: '1x1' })).toEqual({ dq: 1, dkdv: 1 });
    expect(hopper.flashBackwardWarpgroups(2, { NSA_FA_BWD_WGS: '2x1' })).toEqual({ dq: 2, dkdv: 1 });
    expect(hopper.flashBackwardWarpgroups(2, { NSA_FA_BWD_WGS: '3x1' })).toEqual({ dq: 1, dkdv: 1 });
    expect(hopper.flashBackwardWarpgroups(2, { NSA_FA_BWD_WGS: '1x2' })).toEqual({ dq: 1, dkdv: 2 });
    expect(hopper.flashBackwardWarpgroups(0, { NSA_FA_BWD_WGMMA: '0', NSA_FA_BWD_WGS: '2x2' })).toBeUndefined();
    const ampere = new NsaPrograms(fakeContext, config(128, 128), 'bf16', kernelTuning(config(128, 128), {}, [8, 0]));
    expect(ampere.flashBackwardWarpgroups(0, { NSA_FA_BWD_WGS: '2x2' })).toBeUndefined();
  });

  for (const [dk, dv] of SUPPORTED_HEAD_DIMS) {
    it(`size their tiles at dk = ${dk}, dv = ${dv}: owned rows or keys, two stages of 64, 1 KB alignment with wgmma, within 227 KB`, () => {
      const mma = new NsaPrograms(fakeContext, config(dk, dv), 'bf16', { ...kernelTuning(config(dk, dv), {}, [9, 0]), faWgmma: false });
      for (const mode of [0, 1, 2] as const) {
        for (const fn of ['dq', 'dkdv'] as const) {
          expect([mma.flashBackwardTile(fn, mode), mma.flashBackwardThreads(fn, mode)]).toEqual([64, 128]);
          expect(mma.flashBackwardSharedBytes(fn, mode)).toBe(2 * 64 * 3 * (dk + dv));
        }
      }
      for (const tma of ['0', '1'] as const) {
        const wgmma = new NsaPrograms(fakeContext, config(dk, dv), 'bf16', kernelTuning(config(dk, dv), { NSA_FA_BWD_TMA: tma }, [9, 0]));
        for (const [dqWg, dkdvWg] of [[1, 1], [2, 2], [2, 1], [1, 2]] as const) {
          vi.stubEnv('NSA_FA_BWD_WGS', `${dqWg}x${dkdvWg}`);
          for (const mode of [0, 1, 2] as const) {
            for (const [fn, wg] of [['dq', dqWg], ['dkdv', dkdvWg]] as const) {
              expect([wgmma.flashBackwardTile(fn, mode), wgmma.flashBackwardThreads(fn, mode)]).toEqual([64 * wg, 128 * wg]);
              // The pipelined kernels' ring: 3 stages with two warpgroups, 2 with one; dk = 192's dK/dV is not pipelined.
              const pipelined = tma === '1' && !(fn === 'dkdv' && dk > 128);
              expect(wgmma.flashBackwardStages(fn, mode)).toBe(pipelined ? (wg === 2 ? 3 : 2) : undefined);
              const stages = pipelined && wg === 2 ? 3 : 2;
              const bytes = wgmma.flashBackwardSharedBytes(fn, mode);
              expect(bytes).toBe(2 * (64 * wg + stages * 64) * (dk + dv) + 1024);
              expect(bytes).toBeLessThanOrEqual(227 * 1024 - 4096);
            }
          }
        }
      }
    });
  }

  it('never takes more pipeline stages than shared memory holds (NSA_FA_BWD_STAGES=4 at dk = 192, two warpgroups: 3)', () => {
    const wide = new NsaPrograms(fakeContext, config(192, 128), 'bf16', kernelTuning(config(192, 128), { NSA_FA_BWD_STAGES: '4' }, [9, 0]));
    vi.stubEnv('NSA_FA_BWD_WGS', '2x2');
    expect(wide.flashBackwardStages('dq', 3)).toBe(3);
    expect(wide.flashBackwardSharedBytes('dq', 3)).toBeLessThanOrEqual(227 * 1024 - 4096);
    vi.stubEnv('NSA_FA_BWD_WGS', '1x1');
    expect(wide.flashBackwardStages('dq', 1)).toBe(4);
    expect(wide.flashBackwardStages('dkdv', 1)).toBeUndefined();
  });
});

describe('the tensor maps of the TMA kernels', () => {
  it('are encoded once per (buffer, shape) and reused by later launches on the same buffers', () => {
    const encode = vi.fn();
    const ctx = { ...fakeContext, driver: { tensorMapEncodeTiled: encode } } as unknown as CudaContext;
    const programs = new NsaPrograms(ctx, config(128, 64), 'bf16', kernelTuning(config(128, 64), {}, [9, 0]));
    const first = programs.flashTensorMaps(0x1000n, 0x2000n, 0x3000n, 500);
    expect(first).toHaveLength(5); // q, k, v, and k, v again where there are no compressed keys
    expect(encode).toHaveBeenCalledTimes(3);
    expect(programs.flashTensorMaps(0x1000n, 0x2000n, 0x3000n, 500)).toEqual(first);
    expect(encode).toHaveBeenCalledTimes(3);
    programs.flashTensorMaps(0x1000n, 0x2000n, 0x3000n, 501); // another length: new maps
    expect(encode).toHaveBeenCalledTimes(6);
    // q [N, Hq, dk] with Hq = 16, and the values' map [N, H, dv] with dv = 64.
    expect(encode.mock.calls[0]!.slice(3, 5)).toEqual([BigUint64Array.from([128n, 16n, 500n]), BigUint64Array.from([256n, 16n * 256n])]);
    expect(encode.mock.calls[2]!.slice(3, 5)).toEqual([BigUint64Array.from([64n, 1n, 500n]), BigUint64Array.from([128n, 128n])]);
  });

  it('are passed only to the pipelined launches: none for the cp.async kernels, q and dO (and, for dQ, each key set) for the _tma ones', () => {
    const encode = vi.fn();
    const ctx = { ...fakeContext, driver: { tensorMapEncodeTiled: encode } } as unknown as CudaContext;
    const off = new NsaPrograms(ctx, config(128, 128), 'bf16', kernelTuning(config(128, 128), { NSA_FA_TMA: '0', NSA_FA_BWD_TMA: '0' }, [9, 0]));
    expect(off.flashTensorMaps(0x1000n, 0x2000n, 0x3000n, 500)).toEqual([]);
    expect(off.flashBackwardTensorMaps('dq', 3, 0x1000n, 0x4000n, 500, [{ k: 0x2000n, v: 0x3000n, rows: 500 }])).toEqual([]);
    expect(encode).not.toHaveBeenCalled();
    const on = new NsaPrograms(ctx, config(128, 128), 'bf16', kernelTuning(config(128, 128), {}, [9, 0]));
    const cmp = { k: 0x5000n, v: 0x6000n, rows: 8 };
    const win = { k: 0x2000n, v: 0x3000n, rows: 500 };
    expect(on.flashBackwardTensorMaps('dq', 3, 0x1000n, 0x4000n, 500, [cmp, win])).toHaveLength(6);
    expect(on.flashBackwardTensorMaps('dkdv', 1, 0x1000n, 0x4000n, 500, [cmp])).toHaveLength(2);
    const wide = new NsaPrograms(ctx, config(192, 128), 'bf16', kernelTuning(config(192, 128), {}, [9, 0]));
    expect(wide.flashBackwardTensorMaps('dkdv', 1, 0x1000n, 0x4000n, 500)).toEqual([]); // dk = 192's dK/dV: cp.async
  });
});

describe('shared memory of every kernel, across shapes', () => {
  // The sizes the host asks of a launch must fit the GPU's opt-in limit for every shape a user may pass: G from 1 to
  // 64 (above 16 the kernels take 16 heads at a time), every supported head-dim pair, four block shapes, the sm_90
  // tuning on an H100 and the sm_80 one on an A100 (163 KB).
  const a100 = { device: { computeCapability: [8, 0], sharedBytesPerSm: 164 * 1024, reservedSharedBytesPerBlock: 1024 }, maxSharedBytesOptin: 163 * 1024 } as unknown as CudaContext;
  const shapes = {
    fla: { compressBlock: 64, compressStride: 64, selectBlock: 64, selectCount: 16, window: 512 },
    paper: { compressBlock: 32, compressStride: 16, selectBlock: 64, selectCount: 16, window: 512 },
    small: { compressBlock: 16, compressStride: 8, selectBlock: 32, selectCount: 8, window: 40 },
    wide: { compressBlock: 64, compressStride: 32, selectBlock: 128, selectCount: 4, window: 200 },
  };
  for (const [gpu, ctx, cc] of [['H100', fakeContext, [9, 0]], ['A100', a100, [8, 0]]] as const) {
    it(`fits ${gpu}'s ${ctx.maxSharedBytesOptin / 1024} KB for G = 1 to 64, dk/dv 64/64, 128/128, 192/128, 128/64, 64/128, four block shapes`, () => {
      const over: string[] = [];
      for (const [name, shape] of Object.entries(shapes)) {
        for (const G of [1, 2, 3, 4, 8, 16, 24, 64]) {
          for (const [dk, dv] of [[64, 64], [128, 128], [192, 128], [128, 64], [64, 128]] as const) {
            const c = new NSAConfig({ ...shape, heads: G, kvHeads: 1, headDim: dk, valueDim: dv });
            const p = new NsaPrograms(ctx, c, 'bf16', kernelTuning(c, {}, cc));
            const sizes: Record<string, number> = {
              select: p.selectSharedBytes(p.positionsPerSelectTile()),
              selected: p.selectedSharedBytes(),
              fsa: p.fsaSharedBytes(),
              ...(p.slcUnionPositions > 0 ? { union: p.selectedUnionSharedBytes() } : {}),
              ...Object.fromEntries((['fused', 'cmp_win', 'slc', 'dense'] as const).map((f) => [`decode ${f}`, p.decodePartialSharedBytes(f)])),
              ...Object.fromEntries(([0, 1, 2, 3] as const).map((m) => [`flash ${m}`, p.flashSharedBytes(m)])),
              ...(p.cmpStash ? { 'flash 4': p.flashSharedBytes(4) } : {}), // all three branches in one launch: only with the stash
              'selected dq': p.selectedBackwardSharedBytes('dq'),
              'selected dkdv': p.selectedBackwardSharedBytes('dkdv'),
              'selected dkdv, fused dq': p.selectedBackwardSharedBytes('dkdv', true),
              ...Object.fromEntries(([0, 1, 2, 3] as const).flatMap((m) => (['dq', 'dkdv'] as const).map((f) => [`flash bwd ${m} ${f}`, p.flashBackwardSharedBytes(f, m)]))),
            };
            for (const [kernel, bytes] of Object.entries(sizes)) {
              if (!(bytes > 0 && bytes <= ctx.maxSharedBytesOptin)) over.push(`${name} G=${G} dk=${dk} dv=${dv} ${kernel}: ${bytes}`);
            }
          }
        }
      }
      expect(over).toEqual([]);
    });
  }
});

describe('selectedDqMode', () => {
  const GiB = 2 ** 30;
  it('fuses dQ into the dK/dV pass where its parts leave a quarter of the free memory', () => {
    expect(selectedDqMode(16 * GiB, 40 * GiB, {})).toBe('fused');
    expect(selectedDqMode(30 * GiB, 40 * GiB, {})).toBe('fused');
    expect(selectedDqMode(30 * GiB + 1, 40 * GiB, {})).toBe('group');
  });

  it('follows NSA_SLC_DQ when it names a form, and ignores other values', () => {
    expect(selectedDqMode(1, 40 * GiB, { NSA_SLC_DQ: 'group' })).toBe('group');
    expect(selectedDqMode(64 * GiB, 40 * GiB, { NSA_SLC_DQ: 'fused' })).toBe('fused');
    expect(selectedDqMode(1, 40 * GiB, { NSA_SLC_DQ: 'yes' })).toBe('fused');
  });
});
