// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=0
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=3 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DNSA_FP16
// nvcc-check: -DDK=192 -DDV=128 -DNSA_MODE=3 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=0 -DFA_WGMMA
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=3 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DNSA_FP16 -DFA_WGMMA
// nvcc-check: -DDK=192 -DDV=128 -DNSA_MODE=3 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DFA_WGMMA -DFA_WARPS=4
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=3 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DFA_WGMMA -DCMP_STASH
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=3 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DFA_WGMMA -DCMP_STASH -DFA_PINGPONG
// nvcc-check: -DDK=128 -DDV=64 -DNSA_MODE=1 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DFA_WGMMA -DFA_WARPS=4
// nvcc-check: -DDK=64 -DDV=64 -DNSA_MODE=3 -DCMP_L=32 -DCMP_D=16 -DWINDOW=512 -DCMP_STASH
// nvcc-check: -DDK=128 -DDV=128 -DNSA_MODE=4 -DCMP_L=64 -DCMP_D=64 -DWINDOW=512 -DFA_WGMMA -DCMP_STASH -DFA_PINGPONG
// nvcc-check: -DDK=64 -DDV=128 -DNSA_MODE=4 -DCMP_L=32 -DCMP_D=16 -DWINDOW=96 -DCMP_STASH -DNSA_FP16
//
// FlashAttention-2 style tiles: a CTA takes 16 * FA_WARPS query rows of one query head (a warp per 16 rows; 128
// rows by default, so each key tile fetched into shared memory serves twice the rows of 64) and streams key
// tiles of 64 through shared memory (cp.async, double buffered), with tensor-core MMA and an online softmax.
// One kernel body serves the dense causal baseline and the NSA branches that read contiguous key ranges:
//   NSA_MODE 0  dense causal: keys [0, t]. Without a gate, the benchmark's baseline (out = o, lse to lse_cmp); with
//               one, the selected branch of a batch whose every visible block is selected (no sequence longer
//               than n l'): out += g_slc * o, the branch's o and lse through out_cmp and lse_cmp, and out_final
//               (when given) the gated sum rounded once, as this launch adds the last branch
//   NSA_MODE 1  compressed (cmp): compressed keys i with i*d + l - 1 <= t
//   NSA_MODE 2  sliding window (win): keys (t - w, t]
//   NSA_MODE 3  cmp then win in one CTA (the query tile stays on chip; the gated sum of both goes to `out`)
//   NSA_MODE 4  all three branches of a batch whose every visible block is selected, where the window reads the
//               selected branch's K/V: keys [0, t - w] (a PHASE_BAND, its state parked in the stash), then the
//               window's (t - w, t] (o_win; o_slc is the two phases' states merged, so the keys of the window are
//               multiplied once for both branches), then the compressed keys; `out` is written once (needs CMP_STASH)
// Each phase writes its lse (natural log) and, when asked, its ungated output, and adds gate * o into `out`
// (fp32, [N, Hq, DV]); phase 0 of a launch overwrites `out` unless `accumulate` is set. With CMP_STASH (mode 3,
// set by the host where shared memory allows) the cmp phase's gate * o waits in shared memory for the win phase,
// which writes the sum once: `out` is written once per launch instead of written, read back and written again.
// Sequences are packed: cu_seqlens gives token offsets, cu_cmp the compressed-token offsets; `tiles` lists
// (sequence, first local row) per CTA, heaviest first.
//
// FA_WGMMA (set by the host on sm_90a): each warpgroup of 4 warps takes 64 query rows and multiplies with Hopper's
// wgmma straight from shared memory (Q and K K-major, V transposed, all in 128-byte-swizzled column blocks), over key
// tiles of 128; P stays in registers as the A operand of P V. The softmax, masks and epilogue are the same code as
// the mma.sync path, because wgmma's accumulator layout per warp is mma.sync's C fragment layout (nsa_wgmma.cuh).
//
// nsa_flash_attention_tma (sm_90 with wgmma, the host's default there) is the same kernel with Q, K and V loaded by
// TMA through K and V rings of mbarrier stages (no __syncthreads per tile), and the two warpgroups taking turns at
// the tensor cores (FA_PINGPONG).
#include "nsa_common.cuh"
#include "nsa_wgmma.cuh"
#if defined(FA_WGMMA) && defined(NSA_HAS_WGMMA)
#define FA_USE_WGMMA 1
#else
#define FA_USE_WGMMA 0
#endif

#ifndef NSA_MODE
#define NSA_MODE 0
#endif
#ifndef CMP_L
#define CMP_L 1
#define CMP_D 1
#endif
#ifndef WINDOW
#define WINDOW 1
#endif

#ifndef FA_WARPS
#define FA_WARPS 8
#endif
#define BLOCK_M (16 * FA_WARPS) // query rows per CTA: one warp per 16 rows
#if FA_USE_WGMMA
#define BLOCK_N 128
typedef WgmmaTile<BLOCK_M, DK> QTile;
typedef WgmmaTile<BLOCK_N, DK> KTile;
typedef WgmmaTile<BLOCK_N, DV> VTile;
#else
#define BLOCK_N 64
typedef SwizzledTile<DK> QTile;
typedef SwizzledTile<DK> KTile;
typedef SwizzledTile<DV> VTile;
#endif
#define THREADS (32 * FA_WARPS)

// PHASE_BAND: row t sees the raw keys [t + lo, t + hi] (the tile's Band). PHASE_ANY: whichever kind the tile holds
// (PhaseTile::kind), decided at run time, so that the phases of one launch share one body of code: each copy of
// a phase's unrolled loop and epilogue is ~3000 instructions, and three copies (mode 4) cost the launch a fifth of
// its time in instruction-cache misses (Nsight Compute: "no instruction" 20.6% of the stall samples).
enum Phase { PHASE_DENSE = 0, PHASE_CMP = 1, PHASE_WIN = 2, PHASE_BAND = 3, PHASE_ANY = 4 };

/** Keys [first, end) a query tile with local rows [q0, q1) may see in a phase, and the per-row visibility rule. */
struct KeyRange {
  int first;
  int end;
};

__device__ __forceinline__ int cmp_visible(int t, int tc) {
  // Compressed block i is visible to t iff i*d + l - 1 <= t.
  return t < CMP_L - 1 ? 0 : min(tc, (t - CMP_L + 1) / CMP_D + 1);
}

/** Row offsets of a PHASE_BAND tile's keys: row t sees [t + lo, t + hi]. */
struct Band {
  int lo;
  int hi;
};
constexpr Band NO_BAND{0, 0};
constexpr int BAND_FROM_START = -(1 << 30); // a band's lo that reaches key 0 from any row
[[maybe_unused]] constexpr Band BEFORE_WINDOW{BAND_FROM_START, -WINDOW}; // mode 4's first phase: keys [0, t - w]
[[maybe_unused]] constexpr Band THE_WINDOW{1 - WINDOW, 0};               // and its second: (t - w, t], as PHASE_WIN

template <int PHASE> __device__ __forceinline__ KeyRange phase_keys(int q0, int q1, int tc, Band b) {
  if (PHASE == PHASE_CMP) return {0, cmp_visible(q1 - 1, tc)};
  if (PHASE == PHASE_WIN) return {max(0, q0 - WINDOW + 1), q1};
  if (PHASE == PHASE_BAND) return {max(0, q0 + b.lo), max(0, q1 + b.hi)};
  return {0, q1};
}

template <int PHASE> __device__ __forceinline__ bool key_visible(int t, int key, int tc, Band b) {
  if (PHASE == PHASE_CMP) return key < cmp_visible(t, tc);
  if (PHASE == PHASE_WIN) return key <= t && key > t - WINDOW;
  if (PHASE == PHASE_BAND) return key >= t + b.lo && key <= t + b.hi;
  return key <= t;
}

/** True when every row of the tile [q0, q1) sees every key of [k0, k0 + BLOCK_N): the tile needs no mask. */
template <int PHASE> __device__ __forceinline__ bool tile_unmasked(int q0, int q1, int k0, int tc, Band b) {
  if (PHASE == PHASE_CMP) return k0 + BLOCK_N <= cmp_visible(q0, tc);
  if (PHASE == PHASE_WIN) return k0 + BLOCK_N - 1 <= q0 && k0 >= q1 - WINDOW;
  if (PHASE == PHASE_BAND) return k0 + BLOCK_N - 1 <= q0 + b.hi && k0 >= q1 - 1 + b.lo;
  return k0 + BLOCK_N - 1 <= q0;
}

/** The query tile as the MMAs read it: per-warp A fragments (mma.sync), or the shared tile itself (wgmma). */
struct QOperand {
#if FA_USE_WGMMA
  const elem_t *tile;
#else
  u32 frag[DK / 16][4];
#endif
};

struct Pointers {
  const elem_t *q;
  const elem_t *k;
  const elem_t *v;
  const float *gate;   // [N, Hq, 3] fp32 or null (no gate: weight 1)
  float *out;          // [N, Hq, DV] gated accumulation
  void *branch_out;    // [N, Hq, DV] ungated (fp32, or elem_t with branch_half), or null
  float *lse;          // [N, Hq]
  bool branch_half;
  void *out_final;     // [N, Hq, DV] elem_t: `out` rounded once, written by the launch that adds the last branch; or null
  void *slc_out;       // mode 4's window phase: the selected branch's ungated output (as branch_out), or null
  float *slc_lse;      // and its lse
};

/** What one phase of one CTA works on: its query rows, its keys, and where they live. */
struct PhaseTile {
  int q0;        // first local query row of the tile
  int seq_start; // the sequence's first token (rows of q and out)
  int key_base;  // the sequence's first key row in k/v (tokens, or compressed tokens)
  int seq_len;
  int tc;        // compressed tokens of the sequence
  int kvh;
  int row_lo;    // local positions of the two rows this thread holds (row_lo + 8 is the other)
  KeyRange keys;
  int ntiles;    // key tiles of BLOCK_N
  Band band;     // PHASE_BAND's row offsets
  int kind;      // the Phase it was made for (what PHASE_ANY dispatches on)
};

template <int PHASE>
__device__ __forceinline__ PhaseTile phase_tile(int q0, int seq_start, int key_base, int seq_len, int tc, int kvh, Band band = NO_BAND) {
  const int q1 = min(q0 + BLOCK_M, seq_len);
  const KeyRange keys = phase_keys<PHASE>(q0, q1, tc, band);
  const int ntiles = keys.end > keys.first ? (keys.end - keys.first + BLOCK_N - 1) / BLOCK_N : 0;
  return {q0, seq_start, key_base, seq_len, tc, kvh, q0 + (int)(threadIdx.x / 32) * 16 + (int)(threadIdx.x % 32) / 4, keys, ntiles, band, PHASE};
}

/** Row width and shared layout of key tiles (IS_V false) and value tiles (NVRTC has no <type_traits>). */
template <bool IS_V> struct KeyTileOf {
  typedef KTile Layout;
  static constexpr int D = DK;
};
template <> struct KeyTileOf<true> {
  typedef VTile Layout;
  static constexpr int D = DV;
};

/** Starts the asynchronous copy of key tile `it` (K, or V with IS_V) of the phase into `tile`; rows past the end are zeros. */
template <bool IS_V> __device__ __forceinline__ void load_key_tile(const Pointers &p, const PhaseTile &t, int it, elem_t *tile, int H) {
  const int k0 = t.keys.first + it * BLOCK_N;
  constexpr int D = KeyTileOf<IS_V>::D;
  const elem_t *first = (IS_V ? p.v : p.k) + ((i64)(t.key_base + k0) * H + t.kvh) * D;
  copy_rows<BLOCK_N, D, typename KeyTileOf<IS_V>::Layout, THREADS>(tile, first, (i64)H * D, min(BLOCK_N, t.keys.end - k0));
}

/** The keys [lo, hi] row t of a tile sees, whatever its kind (for PHASE_ANY's masks). */
__device__ __forceinline__ void visible_keys(const PhaseTile &t, int row, int &lo, int &hi) {
  lo = 0;
  hi = row;
  if (t.kind == PHASE_CMP) hi = cmp_visible(row, t.tc) - 1;
  else if (t.kind == PHASE_WIN) lo = row - WINDOW + 1;
  else if (t.kind == PHASE_BAND) {
    lo = row + t.band.lo;
    hi = row + t.band.hi;
  }
  hi = min(hi, t.keys.end - 1);
  if (row >= t.seq_len) hi = lo - 1; // rows past the sequence see nothing
}

__device__ __forceinline__ bool any_tile_unmasked(const PhaseTile &t, int k0) {
  const int q0 = t.q0, q1 = t.q0 + BLOCK_M;
  if (t.kind == PHASE_CMP) return tile_unmasked<PHASE_CMP>(q0, q1, k0, t.tc, t.band);
  if (t.kind == PHASE_WIN) return tile_unmasked<PHASE_WIN>(q0, q1, k0, t.tc, t.band);
  if (t.kind == PHASE_BAND) return tile_unmasked<PHASE_BAND>(q0, q1, k0, t.tc, t.band);
  return tile_unmasked<PHASE_DENSE>(q0, q1, k0, t.tc, t.band);
}

/** Sets the scores of key tile `it` that a row may not see (or past the end) to -inf; the scale comes in the softmax. */
template <int PHASE> __device__ __forceinline__ void mask_scores(float s[BLOCK_N / 8][4], const PhaseTile &t, int it) {
  const int k0 = t.keys.first + it * BLOCK_N;
  const int lane = threadIdx.x % 32;
  if (PHASE == PHASE_ANY) {
    if (k0 + BLOCK_N <= t.keys.end && any_tile_unmasked(t, k0)) return;
    int lo[2], hi[2];
    visible_keys(t, t.row_lo, lo[0], hi[0]);
    visible_keys(t, t.row_lo + 8, lo[1], hi[1]);
#pragma unroll
    for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
        if (key < lo[e / 2] || key > hi[e / 2]) s[n][e] = NSA_NEG_INF;
      }
    }
    return;
  }
  // Interior tiles need nothing (rows past the sequence end compute garbage that is never written).
  if (k0 + BLOCK_N <= t.keys.end && tile_unmasked<PHASE>(t.q0, t.q0 + BLOCK_M, k0, t.tc, t.band)) return;
#pragma unroll
  for (int n = 0; n < BLOCK_N / 8; n++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int key = k0 + n * 8 + (lane % 4) * 2 + (e & 1);
      const int row = e < 2 ? t.row_lo : t.row_lo + 8;
      const bool ok = key < t.keys.end && row < t.seq_len && key_visible<PHASE>(row, key, t.tc, t.band);
      if (!ok) s[n][e] = NSA_NEG_INF;
    }
  }
}

/**
 * Where a phase's gated output goes besides `out`: with CMP_STASH the cmp phase puts gate * o into `stash` (fp32,
 * BLOCK_M rows of DV, XOR-swizzled so that a warp's float2 stores hit distinct banks) instead of adding it to `out`,
 * and the win phase adds it back before its one write. A thread reads back only what it wrote itself (both phases
 * give a thread the same rows and columns), so no barrier is needed.
 */
enum StashUse { STASH_NONE = 0, STASH_PUT = 1, STASH_TAKE = 2, STASH_PARK = 3, STASH_MERGE = 4 };
// Mode 4's first two phases: PARK puts the ungated o of the keys before the window in the stash and its lse in
// `park` (the thread's two rows, in registers); MERGE (the window phase) merges that state with its own into o_slc,
// writes both branches, and puts g_slc * o_slc + g_win * o_win in the stash for the cmp phase's TAKE.

__device__ __forceinline__ int stash_index(int row_in_tile, int col) {
  return row_in_tile * DV + (col ^ ((row_in_tile & 3) << 3));
}

/** Epilogue: normalises this thread's two rows, writes their lse and (ungated) branch output, adds gate * o to out. */
__device__ __forceinline__ void write_phase_output(const Pointers &p, const PhaseTile &t, const SoftmaxRows &st,
                                                   const float o[DV / 8][4], int gate_index, bool overwrite, int hq, int Hq,
                                                   float *stash = nullptr, StashUse stash_use = STASH_NONE, float *park = nullptr) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float lse;
    const float l = softmax_finish_row(st, h, &lse);
    const int row_local = t.row_lo + 8 * h;
    if (row_local >= t.seq_len) continue;
    const i64 row = (i64)(t.seq_start + row_local) * Hq + hq;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (stash_use == STASH_PARK) {
      park[h] = lse;
#pragma unroll
      for (int n = 0; n < DV / 8; n++) {
        const int col = n * 8 + (lane % 4) * 2;
        *reinterpret_cast<float2 *>(stash + stash_index(row_local - t.q0, col)) = make_float2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
      }
      continue;
    }
    if (lane % 4 == 0) p.lse[row] = lse;
    const float gate = gate_index < 0 ? 1.f : p.gate[row * 3 + gate_index];
    // MERGE: o_slc = a * o_before + b * o_win over lse_slc = log(e^lse_before + e^lse_win); the window always holds
    // key t, so lse_win is finite, and a row with no keys before the window gets a = 0, b = 1 (o_slc = o_win).
    float a = 0.f, b = 1.f, slc_gate = 0.f;
    if (stash_use == STASH_MERGE) {
      const float mx = fmaxf(park[h], lse);
      const float lse_slc = mx + logf(expf(park[h] - mx) + expf(lse - mx));
      a = expf(park[h] - lse_slc);
      b = expf(lse - lse_slc);
      if (lane % 4 == 0) p.slc_lse[row] = lse_slc;
      slc_gate = gate_index < 0 ? 1.f : p.gate[row * 3 + 1];
    }
    // The row's earlier sum, loaded before any store: interleaved with the stores (which may alias `out` as far as
    // the compiler knows) each load's latency would be paid in turn, DV / 8 times a row.
    float2 prev[DV / 8];
    const bool accumulates = !overwrite && stash_use != STASH_PUT && stash_use != STASH_MERGE;
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      prev[n] = accumulates ? *reinterpret_cast<const float2 *>(p.out + row * DV + col) : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      const int col = n * 8 + (lane % 4) * 2;
      const float x0 = o[n][2 * h] * inv;
      const float x1 = o[n][2 * h + 1] * inv;
      if (p.branch_out != nullptr) store_branch2(p.branch_out, row * DV + col, x0, x1, p.branch_half);
      float2 *kept = stash_use == STASH_NONE ? nullptr : reinterpret_cast<float2 *>(stash + stash_index(row_local - t.q0, col));
      if (stash_use == STASH_PUT) {
        *kept = make_float2(gate * x0, gate * x1); // the same value 0 + gate * x the write to out would hold
        continue;
      }
      if (stash_use == STASH_MERGE) {
        const float2 before = *kept;
        const float s0 = a * before.x + b * x0;
        const float s1 = a * before.y + b * x1;
        if (p.slc_out != nullptr) store_branch2(p.slc_out, row * DV + col, s0, s1, p.branch_half);
        *kept = make_float2(slc_gate * s0 + gate * x0, slc_gate * s1 + gate * x1);
        continue;
      }
      float2 *dst = reinterpret_cast<float2 *>(p.out + row * DV + col);
      float2 acc = prev[n];
      if (stash_use == STASH_TAKE) {
        const float2 c = *kept;
        acc.x += c.x;
        acc.y += c.y;
      }
      acc.x += gate * x0;
      acc.y += gate * x1;
      // The last branch's launch writes the sum rounded once where asked (as the selected attention does), else fp32.
      if (p.out_final != nullptr) store_branch2(p.out_final, row * DV + col, acc.x, acc.y, true);
      else *dst = acc;
    }
  }
}

#if FA_USE_WGMMA
/**
 * One phase for this CTA's query tile (wgmma): each warpgroup's 64 rows over the phase's keys, then the epilogue.
 * Software pipelined like FlashAttention-3 within a warpgroup: while P_j V_j runs on the tensor cores, the softmax
 * of the next tile's scores (Q K_{j+1}^T, issued just before) runs on the ALUs; the output's rescale for tile j+1 is
 * applied once P_j V_j has landed. K and V have two stages each: K_{j+2} and V_{j+1} load during iteration j.
 */
template <int PHASE>
__device__ __forceinline__ void run_phase(const Pointers p, int gate_index, bool overwrite, const QOperand &qop, elem_t *ksmem,
                                          elem_t *vsmem, const PhaseTile t, int hq, int Hq, int H, float scale_log2,
                                          float *stash = nullptr, StashUse stash_use = STASH_NONE, float *park = nullptr) {
  const elem_t *qrows = qop.tile;
  const int wg_row0 = (threadIdx.x / 128) * 64;
  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  auto ktile = [&](int it) { return ksmem + (it & 1) * BLOCK_N * DK; };
  auto vtile = [&](int it) { return vsmem + (it & 1) * BLOCK_N * DV; };
  auto issue_qk = [&](float s[BLOCK_N / 8][4], int it) {
    const u64 qd = wgmma_desc_kmajor<BLOCK_M>(qrows, wg_row0, 0), kd = wgmma_desc_kmajor<BLOCK_N>(ktile(it), 0, 0);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++) {
      wgmma_ss<BLOCK_N>(s, wgmma_kmajor_at<BLOCK_M>(qd, ks), wgmma_kmajor_at<BLOCK_N>(kd, ks), ks > 0);
    }
    wgmma_commit();
  };

  if (t.ntiles > 0) {
    float s[BLOCK_N / 8][4];
    float rescale[2];
    load_key_tile<false>(p, t, 0, ktile(0), H);
    cp_async_commit();
    load_key_tile<true>(p, t, 0, vtile(0), H);
    if (t.ntiles > 1) load_key_tile<false>(p, t, 1, ktile(1), H);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async_shared(); // cp.async writes, before wgmma reads them through the async proxy
    __syncthreads();
    issue_qk(s, 0);
    wgmma_wait<0>();
    wgmma_fence_operands<BLOCK_N / 8>(s);
    mask_scores<PHASE>(s, t, 0);
    softmax_scores<BLOCK_N / 8>(st, s, rescale, scale_log2); // o is still zero: nothing to rescale

    // Iteration it: V_it and K_{it+1} have landed, and every warpgroup is done with K_it and V_{it-1}, whose
    // stages now refill. The last tile is peeled off so that every wgmma of the loop is unconditional (with a
    // conditional one ptxas serialises them all).
    u32 pa[BLOCK_N / 16][4]; // P_it as the A operand of P V; s is free for the next scores once it is packed
    auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; kk++) {
        pa[kk][0] = pack_elem2(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = pack_elem2(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = pack_elem2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = pack_elem2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
    };
    auto issue_pv = [&](int it) {
      const u64 vd = wgmma_desc_mnmajor<BLOCK_N>(vtile(it), 0);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; kk++) wgmma_rs<DV, 1>(o, pa[kk], wgmma_mnmajor_at(vd, kk), 1);
      wgmma_commit();
    };
    auto stage_landed = [&]() {
      cp_async_wait<0>();
      fence_proxy_async_shared();
      __syncthreads();
    };
    for (int it = 0; it + 1 < t.ntiles; it++) {
      stage_landed();
      if (it + 2 < t.ntiles) load_key_tile<false>(p, t, it + 2, ktile(it), H);
      load_key_tile<true>(p, t, it + 1, vtile(it + 1), H);
      cp_async_commit();
      pack_p();
      issue_qk(s, it + 1);
      issue_pv(it);
      wgmma_wait<1>(); // the scores of tile it + 1; P V may still run
      wgmma_fence_operands<BLOCK_N / 8>(s);
      mask_scores<PHASE>(s, t, it + 1);
      softmax_scores<BLOCK_N / 8>(st, s, rescale, scale_log2);
      wgmma_wait<0>();
      wgmma_fence_operands<DV / 8>(o);
      rescale_rows<DV>(o, rescale);
    }
    stage_landed();
    pack_p();
    issue_pv(t.ntiles - 1);
    wgmma_wait<0>();
    wgmma_fence_operands<DV / 8>(o);
    __syncthreads(); // the last stages are read; the next phase may refill them
  }
  write_phase_output(p, t, st, o, gate_index, overwrite, hq, Hq, stash, stash_use, park);
}
#else
/**
 * One phase for this CTA's query tile (mma.sync): each warp's 16 rows over the phase's keys, then the epilogue. Key
 * tiles are double buffered: tile it + 1 loads while tile it is multiplied.
 */
template <int PHASE>
__device__ __forceinline__ void run_phase(const Pointers p, int gate_index, bool overwrite, const QOperand &qop, elem_t *ksmem,
                                          elem_t *vsmem, const PhaseTile t, int hq, int Hq, int H, float scale_log2,
                                          float *stash = nullptr, StashUse stash_use = STASH_NONE, float *park = nullptr) {
  const int lane = threadIdx.x % 32;
  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  auto issue = [&](int it) {
    load_key_tile<false>(p, t, it, ksmem + (it & 1) * BLOCK_N * DK, H);
    load_key_tile<true>(p, t, it, vsmem + (it & 1) * BLOCK_N * DV, H);
    cp_async_commit();
  };

  if (t.ntiles > 0) issue(0);
  for (int it = 0; it < t.ntiles; it++) {
    if (it + 1 < t.ntiles) issue(it + 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const elem_t *ks = ksmem + (it & 1) * BLOCK_N * DK;
    const elem_t *vs = vsmem + (it & 1) * BLOCK_N * DV;
    float s[BLOCK_N / 8][4];
    zero_frags<BLOCK_N / 8>(s);
    qk_mma<DK, BLOCK_N / 16>(s, qop.frag, ks, 0, lane);
    mask_scores<PHASE>(s, t, it);
    float rescale[2];
    softmax_scores<BLOCK_N / 8>(st, s, rescale, scale_log2);
    rescale_rows<DV>(o, rescale);
    pv_mma<DV, BLOCK_N / 16>(o, s, vs, 0, lane);
    __syncthreads();
  }
  write_phase_output(p, t, st, o, gate_index, overwrite, hq, Hq, stash, stash_use, park);
}
#endif

// How mode 3 uses the stash (CMP_STASH): the cmp phase puts its gate * o there and the win phase adds it to its one
// write of `out`; without it the cmp phase writes `out` and the win phase adds to it.
#if NSA_MODE == 3 && defined(CMP_STASH)
[[maybe_unused]] constexpr StashUse CMP_USE = STASH_PUT, WIN_USE = STASH_TAKE;
[[maybe_unused]] constexpr bool WIN_WRITES_FIRST = true; // out was not touched by the cmp phase
#else
[[maybe_unused]] constexpr StashUse CMP_USE = STASH_NONE, WIN_USE = STASH_NONE;
[[maybe_unused]] constexpr bool WIN_WRITES_FIRST = NSA_MODE == 2;
#endif

#if NSA_MODE == 4 && !defined(CMP_STASH)
#error "NSA_MODE 4 parks a phase's output in the stash: it needs CMP_STASH"
#endif

/** The stash (BLOCK_M x DV fp32: the cmp phase's gate * o) after the value stages, or null without CMP_STASH. */
__device__ __forceinline__ float *cmp_stash(elem_t *vsmem) {
#if (NSA_MODE == 3 || NSA_MODE == 4) && defined(CMP_STASH)
  return reinterpret_cast<float *>(vsmem + 2 * BLOCK_N * DV);
#else
  return nullptr;
#endif
}

#if FA_USE_WGMMA && defined(NSA_HAS_BULK_COPY)
/**
 * The pipelined forward's (nsa_flash_attention_tma) rings of key and value tiles: tile j of the launch (the first
 * phase's tiles, then the second's) in stage j & 1 of each ring, loaded by TMA from the phase's tensor maps
 * ([rows][H][cols], boxes 64 x 1 x 64); a stage is refilled with tile j + 2 by the last warp done with tile j.
 * K_j is done once Q K_j^T has landed, V_j once P_j V_j has.
 */
struct FaRing {
  elem_t *k; // 2 x BLOCK_N x DK
  elem_t *v; // 2 x BLOCK_N x DV
  unsigned long long *kfull;
  unsigned long long *vfull;
  int *kdone;
  int *vdone;
  RingWalks w; // tiles of BLOCK_N keys
};

/** Starts tile j's TMA copies into its stage of the K ring (or the V ring with IS_V); one thread. */
template <bool IS_V> __device__ __forceinline__ void fa_ring_fill(const FaRing &g, int j) {
  constexpr int D = IS_V ? DV : DK;
  unsigned long long *bar = (IS_V ? g.vfull : g.kfull) + (j & 1);
  mbarrier_arrive_expect_tx(bar, BLOCK_N * D * (u32)sizeof(elem_t));
  tma_load_tile<BLOCK_N, D>((IS_V ? g.v : g.k) + (j & 1) * BLOCK_N * D, IS_V ? g.w.v_map(j) : g.w.k_map(j), g.w.h, g.w.row(j), bar);
}

/** This warp is done with tile j of the K (or V) ring; the last of the CTA's warps refills the stage with tile j + 2. */
template <bool IS_V> __device__ __forceinline__ void fa_ring_release(const FaRing &g, int j) {
  if (ring_stage_release((IS_V ? g.vdone : g.kdone) + (j & 1), FA_WARPS) && threadIdx.x % 32 == 0 && j + 2 < g.w.total) {
    fa_ring_fill<IS_V>(g, j + 2);
  }
}

__device__ __forceinline__ void fa_ring_wait(unsigned long long *full, int j) { mbarrier_wait(full + (j & 1), (j >> 1) & 1); }

#if FA_WARPS == 8 && defined(FA_PINGPONG)
// The two warpgroups take turns issuing their products (named barriers 1 and 2; warpgroup 0 first, its last
// turn's opening consumed at the end of the kernel), so one's softmax runs while the other's products hold the
// tensor cores.
__device__ __forceinline__ void fa_turn_begin() { named_barrier_sync(1 + threadIdx.x / 128, 256); }
__device__ __forceinline__ void fa_turn_end() { named_barrier_arrive(2 - threadIdx.x / 128, 256); }
#else
__device__ __forceinline__ void fa_turn_begin() {}
__device__ __forceinline__ void fa_turn_end() {}
#endif

/**
 * run_phase (wgmma) over the rings: the phase's tiles are ring tiles [j0, j0 + t.ntiles). The same software
 * pipeline within a warpgroup (Q K_{j+1}^T issued before P_j V_j), without a __syncthreads per tile.
 */
template <int PHASE>
__device__ __forceinline__ void run_phase_tma(const Pointers p, int gate_index, bool overwrite, const elem_t *qrows, const FaRing &g,
                                              int j0, const PhaseTile t, int hq, int Hq, float scale_log2, float *stash = nullptr,
                                              StashUse stash_use = STASH_NONE, float *park = nullptr) {
  const int wg_row0 = (threadIdx.x / 128) * 64;
  float o[DV / 8][4];
  zero_frags<DV / 8>(o);
  SoftmaxRows st;
  st.init();
  auto issue_qk = [&](float s[BLOCK_N / 8][4], int j) {
    const u64 qd = wgmma_desc_kmajor<BLOCK_M>(qrows, wg_row0, 0), kd = wgmma_desc_kmajor<BLOCK_N>(g.k + (j & 1) * BLOCK_N * DK, 0, 0);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++) {
      wgmma_ss<BLOCK_N>(s, wgmma_kmajor_at<BLOCK_M>(qd, ks), wgmma_kmajor_at<BLOCK_N>(kd, ks), ks > 0);
    }
    wgmma_commit();
  };
  const int n = t.ntiles;
  if (n > 0) {
    float s[BLOCK_N / 8][4];
    float rescale[2];
    u32 pa[BLOCK_N / 16][4];
    auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; kk++) {
        pa[kk][0] = pack_elem2(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = pack_elem2(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = pack_elem2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = pack_elem2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
    };
    auto issue_pv = [&](int j) {
      const u64 vd = wgmma_desc_mnmajor<BLOCK_N>(g.v + (j & 1) * BLOCK_N * DV, 0);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; kk++) wgmma_rs<DV, 1>(o, pa[kk], wgmma_mnmajor_at(vd, kk), 1);
      wgmma_commit();
    };
    fa_ring_wait(g.kfull, j0);
    fa_turn_begin();
    issue_qk(s, j0);
    fa_turn_end();
    wgmma_wait<0>();
    wgmma_fence_operands<BLOCK_N / 8>(s);
    fa_ring_release<false>(g, j0);
    mask_scores<PHASE>(s, t, 0);
    softmax_scores<BLOCK_N / 8>(st, s, rescale, scale_log2); // o is still zero: nothing to rescale
    // As in run_phase, the last tile is peeled off so that every wgmma of the loop is unconditional.
    for (int i = 0; i + 1 < n; i++) {
      const int j = j0 + i;
      fa_ring_wait(g.kfull, j + 1);
      fa_ring_wait(g.vfull, j);
      pack_p();
      fa_turn_begin();
      issue_qk(s, j + 1);
      issue_pv(j);
      fa_turn_end();
      wgmma_wait<1>(); // the scores of tile j + 1; P V may still run
      wgmma_fence_operands<BLOCK_N / 8>(s);
      fa_ring_release<false>(g, j + 1);
      mask_scores<PHASE>(s, t, i + 1);
      softmax_scores<BLOCK_N / 8>(st, s, rescale, scale_log2);
      wgmma_wait<0>();
      wgmma_fence_operands<DV / 8>(o);
      fa_ring_release<true>(g, j);
      rescale_rows<DV>(o, rescale);
    }
    fa_ring_wait(g.vfull, j0 + n - 1);
    pack_p();
    fa_turn_begin();
    issue_pv(j0 + n - 1);
    fa_turn_end();
    wgmma_wait<0>();
    wgmma_fence_operands<DV / 8>(o);
    fa_ring_release<true>(g, j0 + n - 1);
  }
  write_phase_output(p, t, st, o, gate_index, overwrite, hq, Hq, stash, stash_use, park);
}
#endif

/**
 * nsa_flash_attention on sm_90 with the TMA rings (run_phase_tma; the host's NSA_FA_TMA, FA_PINGPONG unless
 * NSA_FA_PINGPONG=0): the same arguments, then
 * the tensor maps of q ([N][Hq][DK]) and of the keys and values it walks (k/v: [N][H][D] raw rows, kc/vc:
 * [Nc][H][D] compressed rows; a mode's unused maps may be any valid map), boxes 64 x 1 x 64, 128-byte swizzle.
 */
extern "C" __global__ void __launch_bounds__(THREADS, FA_WARPS == 4 ? 2 : 1)
    nsa_flash_attention_tma(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                            const elem_t *__restrict__ kc, const elem_t *__restrict__ vc, const float *__restrict__ gate,
                            float *__restrict__ out, void *__restrict__ out_cmp, void *__restrict__ out_win,
                            int branch_half, float *__restrict__ lse_cmp, float *__restrict__ lse_win, const int *__restrict__ cu_seqlens,
                            const int *__restrict__ cu_cmp, const int2 *__restrict__ tiles, int Hq, int H, float scale_log2,
                            int accumulate, void *__restrict__ out_final, void *__restrict__ out_slc, float *__restrict__ lse_slc,
                            const __grid_constant__ TensorMapBytes q_map, const __grid_constant__ TensorMapBytes k_map,
                            const __grid_constant__ TensorMapBytes v_map, const __grid_constant__ TensorMapBytes kc_map,
                            const __grid_constant__ TensorMapBytes vc_map) {
#if FA_USE_WGMMA && defined(NSA_HAS_BULK_COPY)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t *qsmem = reinterpret_cast<elem_t *>(wgmma_aligned(smem_raw));
  elem_t *ksmem = qsmem + BLOCK_M * DK;
  elem_t *vsmem = ksmem + 2 * BLOCK_N * DK;
  float *stash = cmp_stash(vsmem);
  __shared__ __align__(8) unsigned long long q_full, k_full[2], v_full[2];
  __shared__ int k_done[2], v_done[2];

  const int2 tile = tiles[blockIdx.x];
  const int seq = tile.x;
  const int q0 = tile.y;
  const int hq = blockIdx.y;
  const int seq_start = cu_seqlens[seq];
  const int seq_len = cu_seqlens[seq + 1] - seq_start;
  const int kvh = hq / (Hq / H);
  // The ring's key sets: t0's keys through maps0, then t1's (the window's raw keys), then t2's (mode 4: compressed).
#if NSA_MODE == 0
  const PhaseTile t0 = phase_tile<PHASE_DENSE>(q0, seq_start, seq_start, seq_len, 0, kvh);
  const PhaseTile t1 = t0;
  const TensorMapBytes *maps0[2] = {&k_map, &v_map};
#else
  const int c_start = cu_cmp[seq];
  const int tc = cu_cmp[seq + 1] - c_start;
#if NSA_MODE == 1 || NSA_MODE == 3
  const PhaseTile t0 = phase_tile<PHASE_CMP>(q0, seq_start, c_start, seq_len, tc, kvh);
  const TensorMapBytes *maps0[2] = {&kc_map, &vc_map};
#elif NSA_MODE == 4
  const PhaseTile t0 = phase_tile<PHASE_BAND>(q0, seq_start, seq_start, seq_len, tc, kvh, BEFORE_WINDOW);
  const TensorMapBytes *maps0[2] = {&k_map, &v_map};
#else
  const PhaseTile t0 = phase_tile<PHASE_WIN>(q0, seq_start, seq_start, seq_len, tc, kvh);
  const TensorMapBytes *maps0[2] = {&k_map, &v_map};
#endif
#if NSA_MODE == 4
  const PhaseTile t1 = phase_tile<PHASE_BAND>(q0, seq_start, seq_start, seq_len, tc, kvh, THE_WINDOW);
#else
  const PhaseTile t1 = phase_tile<PHASE_WIN>(q0, seq_start, seq_start, seq_len, tc, kvh);
#endif
#endif
#if NSA_MODE == 4
  const PhaseTile t2 = phase_tile<PHASE_CMP>(q0, seq_start, c_start, seq_len, tc, kvh);
#else
  const PhaseTile t2 = t1; // no third key set
#endif
  const int n1 = t0.ntiles + (NSA_MODE >= 3 ? t1.ntiles : 0);
  const int total = n1 + (NSA_MODE == 4 ? t2.ntiles : 0);
  const FaRing g{ksmem, vsmem, k_full, v_full, k_done, v_done,
                 {t0.ntiles, n1, total, BLOCK_N, t0.key_base + t0.keys.first, t1.key_base + t1.keys.first, t2.key_base + t2.keys.first, kvh,
                  maps0[0], maps0[1], &k_map, &v_map, &kc_map, &vc_map}};
  if (threadIdx.x == 0) {
    mbarrier_init(&q_full, 1);
    for (int st = 0; st < 2; st++) {
      mbarrier_init(&k_full[st], 1);
      mbarrier_init(&v_full[st], 1);
      k_done[st] = 0;
      v_done[st] = 0;
    }
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Q: 64-row boxes into the [BLOCK_M][64] column blocks (rows past the sequence are computed, never written).
    mbarrier_arrive_expect_tx(&q_full, BLOCK_M * DK * (u32)sizeof(elem_t));
    tma_load_tile<BLOCK_M, DK>(qsmem, &q_map, hq, seq_start + q0, &q_full);
    for (int j = 0; j < min(2, total); j++) {
      fa_ring_fill<false>(g, j);
      fa_ring_fill<true>(g, j);
    }
  }
#if FA_WARPS == 8 && defined(FA_PINGPONG)
  if (threadIdx.x >= 128) named_barrier_arrive(1, 256); // warpgroup 0 takes the first turn
#endif
  mbarrier_wait(&q_full, 0);

#if NSA_MODE == 0
  Pointers p{q, k, v, gate, out, out_cmp, lse_cmp, branch_half != 0, out_final};
  run_phase_tma<PHASE_DENSE>(p, gate != nullptr ? 1 : -1, !accumulate, qsmem, g, 0, t0, hq, Hq, scale_log2);
#elif NSA_MODE == 4
  float park[2]; // this thread's rows' lse over the keys before the window
  // The keys before the window, the window's, the compressed keys: one body of code run three times (PHASE_ANY).
#pragma unroll 1
  for (int r = 0; r < 3; r++) {
    const bool win = r == 1, cmp = r == 2;
    const Pointers pr{q, k, v, gate, out, win ? out_win : cmp ? out_cmp : nullptr, win ? lse_win : cmp ? lse_cmp : nullptr,
                      branch_half != 0, cmp ? out_final : nullptr, win ? out_slc : nullptr, win ? lse_slc : nullptr};
    run_phase_tma<PHASE_ANY>(pr, win ? 2 : cmp ? 0 : 1, cmp && !accumulate, qsmem, g, win ? t0.ntiles : cmp ? n1 : 0, win ? t1 : cmp ? t2 : t0,
                             hq, Hq, scale_log2, stash, win ? STASH_MERGE : cmp ? STASH_TAKE : STASH_PARK, park);
  }
#elif NSA_MODE == 1
  Pointers pc{q, kc, vc, gate, out, out_cmp, lse_cmp, branch_half != 0};
  run_phase_tma<PHASE_CMP>(pc, 0, !accumulate, qsmem, g, 0, t0, hq, Hq, scale_log2);
#elif NSA_MODE == 2
  Pointers pw{q, k, v, gate, out, out_win, lse_win, branch_half != 0};
  run_phase_tma<PHASE_WIN>(pw, 2, WIN_WRITES_FIRST && !accumulate, qsmem, g, 0, t0, hq, Hq, scale_log2);
#else
  // The compressed keys, then the window's: one body of code run twice (PHASE_ANY). The ring's maps say where each
  // phase's keys are; a phase's Pointers serve only its epilogue, so they name the raw k and v throughout.
#pragma unroll 1
  for (int r = 0; r < 2; r++) {
    const bool win = r == 1;
    const Pointers pr{q, k, v, gate, out, win ? out_win : out_cmp, win ? lse_win : lse_cmp, branch_half != 0};
    run_phase_tma<PHASE_ANY>(pr, win ? 2 : 0, win ? WIN_WRITES_FIRST && !accumulate : !accumulate, qsmem, g, win ? t0.ntiles : 0, win ? t1 : t0,
                             hq, Hq, scale_log2, stash, win ? WIN_USE : CMP_USE);
  }
#endif
#if FA_WARPS == 8 && defined(FA_PINGPONG)
  if (threadIdx.x < 128) named_barrier_sync(1, 256); // warpgroup 1's last opening
#endif
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS, FA_WARPS == 4 ? 2 : 1)
    nsa_flash_attention(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                        const elem_t *__restrict__ kc, const elem_t *__restrict__ vc, const float *__restrict__ gate,
                        float *__restrict__ out, void *__restrict__ out_cmp, void *__restrict__ out_win,
                        int branch_half, float *__restrict__ lse_cmp, float *__restrict__ lse_win, const int *__restrict__ cu_seqlens,
                        const int *__restrict__ cu_cmp, const int2 *__restrict__ tiles, int Hq, int H, float scale_log2,
                        int accumulate, void *__restrict__ out_final, void *__restrict__ out_slc, float *__restrict__ lse_slc) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
#if FA_USE_WGMMA
  elem_t *qsmem = reinterpret_cast<elem_t *>(wgmma_aligned(smem_raw));
#else
  elem_t *qsmem = reinterpret_cast<elem_t *>(smem_raw);
#endif
  elem_t *ksmem = qsmem + BLOCK_M * DK;
  elem_t *vsmem = ksmem + 2 * BLOCK_N * DK;
  float *stash = cmp_stash(vsmem);

  const int2 tile = tiles[blockIdx.x];
  const int seq = tile.x;
  const int q0 = tile.y;
  const int hq = blockIdx.y;
  const int seq_start = cu_seqlens[seq];
  const int seq_len = cu_seqlens[seq + 1] - seq_start;

  copy_rows<BLOCK_M, DK, QTile, THREADS>(qsmem, q + ((i64)(seq_start + q0) * Hq + hq) * DK, (i64)Hq * DK, min(BLOCK_M, seq_len - q0));
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  QOperand qfrag;
#if FA_USE_WGMMA
  qfrag.tile = qsmem; // read by wgmma after each key tile's fence and barrier
#else
  load_a_fragments<DK>(qfrag.frag, qsmem, (threadIdx.x / 32) * 16, threadIdx.x % 32);
#endif

  const int kvh = hq / (Hq / H);
#if NSA_MODE == 0
  Pointers p{q, k, v, gate, out, out_cmp, lse_cmp, branch_half != 0, out_final};
  run_phase<PHASE_DENSE>(p, gate != nullptr ? 1 : -1, !accumulate, qfrag, ksmem, vsmem, phase_tile<PHASE_DENSE>(q0, seq_start, seq_start, seq_len, 0, kvh),
                         hq, Hq, H, scale_log2);
#else
  const int c_start = cu_cmp[seq];
  const int tc = cu_cmp[seq + 1] - c_start;
#if NSA_MODE == 1 || NSA_MODE == 3
  Pointers pc{q, kc, vc, gate, out, out_cmp, lse_cmp, branch_half != 0};
  run_phase<PHASE_CMP>(pc, 0, !accumulate, qfrag, ksmem, vsmem, phase_tile<PHASE_CMP>(q0, seq_start, c_start, seq_len, tc, kvh), hq,
                       Hq, H, scale_log2, stash, CMP_USE);
#endif
#if NSA_MODE == 2 || NSA_MODE == 3
  Pointers pw{q, k, v, gate, out, out_win, lse_win, branch_half != 0};
  run_phase<PHASE_WIN>(pw, 2, WIN_WRITES_FIRST && !accumulate, qfrag, ksmem, vsmem,
                       phase_tile<PHASE_WIN>(q0, seq_start, seq_start, seq_len, tc, kvh), hq, Hq, H, scale_log2, stash, WIN_USE);
#endif
#if NSA_MODE == 4
  float park[2]; // this thread's rows' lse over the keys before the window
  Pointers po{q, k, v, gate, out, nullptr, nullptr, branch_half != 0};
  run_phase<PHASE_BAND>(po, 1, false, qfrag, ksmem, vsmem, phase_tile<PHASE_BAND>(q0, seq_start, seq_start, seq_len, tc, kvh, BEFORE_WINDOW),
                        hq, Hq, H, scale_log2, stash, STASH_PARK, park);
  Pointers pw{q, k, v, gate, out, out_win, lse_win, branch_half != 0, nullptr, out_slc, lse_slc};
  run_phase<PHASE_BAND>(pw, 2, false, qfrag, ksmem, vsmem, phase_tile<PHASE_BAND>(q0, seq_start, seq_start, seq_len, tc, kvh, THE_WINDOW),
                        hq, Hq, H, scale_log2, stash, STASH_MERGE, park);
  Pointers pc{q, kc, vc, gate, out, out_cmp, lse_cmp, branch_half != 0, out_final};
  run_phase<PHASE_CMP>(pc, 0, !accumulate, qfrag, ksmem, vsmem, phase_tile<PHASE_CMP>(q0, seq_start, c_start, seq_len, tc, kvh), hq, Hq,
                       H, scale_log2, stash, STASH_TAKE);
#endif
#endif
}
