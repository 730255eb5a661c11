// Learned phi (linear, mlp) on the GPU (kernels/compress_phi.cu): the compressed keys and values of the forward,
// and the backward through phi into the raw K/V and phi's parameters. Each side (keys, values) runs the same
// products with its own width D and parameters. What the mlp's backward needs from its forward (the hidden
// pre-activations and activations, fp32) is kept here between the two.
//   linear: Kc = U W + b             U [Nc, l*D] gathered from the raw rows (+ pe), never stored
//   mlp:    A = U W1 + b1, Z = gelu(A), Kc = Z W2 + b2

import type { CudaContext } from '../context.js';
import type { KernelArg } from '../kernel-args.js';
import type { DeviceBuffer } from '../memory.js';
import type { LayoutPlan } from './layout-plan.js';
import type { NsaPrograms } from './programs.js';

/** A learned phi's parameters on the device (fp32), by the names of reference/compress.ts. */
export interface DevicePhiParams {
  readonly kind: 'linear' | 'mlp';
  /** M, the mlp's hidden width (0 for linear). */
  readonly hidden: number;
  readonly buffers: Readonly<Record<string, DeviceBuffer>>;
}

export type PhiSide = 'k' | 'v';

const NULL: KernelArg = { ptr: 0n };
const ptr = (b: DeviceBuffer | undefined): KernelArg => (b === undefined ? NULL : { ptr: b.ptr });
const TILE = 64;

/** Operand A of nsa_phi_gemm: a strided fp32 matrix [h*sh + m*sm + k*sk], U, or U transposed. */
type OperandA = { readonly strided: DeviceBuffer; readonly sh: number; readonly sm: number; readonly sk: number } | 'U' | 'U^T';

interface Product {
  readonly a: OperandA;
  readonly b: DeviceBuffer;
  /** Strides of B [h*sh + k*sk + n*sn]. */
  readonly bs: readonly [number, number, number];
  readonly M: number;
  readonly N: number;
  readonly K: number;
  readonly bias?: DeviceBuffer | undefined;
  readonly epilogue?: 'store' | 'gelu' | 'dgelu';
  readonly aux?: DeviceBuffer | undefined;
  readonly c?: DeviceBuffer | undefined;
  readonly c2?: DeviceBuffer | undefined;
  readonly cHalf?: DeviceBuffer | undefined;
  /** Strides of C [h*sh + m*sm + n*sn]. */
  readonly cs: readonly [number, number, number];
}

const EPILOGUE = { store: 0, gelu: 1, dgelu: 2 } as const;

export class PhiRunner {
  /** The mlp's pre-activations A and activations Z [Nc, H, M] per side, from the last forward. */
  private readonly hiddenState = new Map<PhiSide, { a: DeviceBuffer; z: DeviceBuffer }>();
  private readonly scratch: DeviceBuffer[] = [];
  /** The backward's scratch (dU, the mlp's d(hidden)): held from a backward until freeBackwardScratch. */
  private du: DeviceBuffer | undefined;
  private dHidden: DeviceBuffer | undefined;

  constructor(
    private readonly ctx: CudaContext,
    private readonly programs: NsaPrograms,
    private readonly plan: LayoutPlan,
    private readonly tables: Readonly<Record<'cuSeqlens' | 'cuCmp' | 'cmpRowSeq' | 'rowSeq', DeviceBuffer>>,
  ) {}

  /** out [Nc, H, D] (half) = phi(x) for one side. */
  forward(side: PhiSide, x: DeviceBuffer, params: DevicePhiParams, out: DeviceBuffer): void {
    const { H, D, Nc, lD } = this.sizes(side);
    if (Nc === 0) return;
    const p = params.buffers;
    const kc: [number, number, number] = [D, H * D, 1];
    if (params.kind === 'linear') {
      this.gemm(side, x, p, { a: 'U', b: p['w']!, bs: [lD * D, D, 1], M: Nc, N: D, K: lD, bias: p['b'], cHalf: out, cs: kc });
      return;
    }
    const M = params.hidden;
    const state = this.hiddenFor(side, M);
    const hs: [number, number, number] = [M, H * M, 1];
    this.gemm(side, x, p, { a: 'U', b: p['w1']!, bs: [lD * M, M, 1], M: Nc, N: M, K: lD, bias: p['b1'], epilogue: 'gelu', c: state.a, c2: state.z, cs: hs });
    const z = { strided: state.z, sh: M, sm: H * M, sk: 1 };
    this.gemm(side, x, p, { a: z, b: p['w2']!, bs: [M * D, D, 1], M: Nc, N: D, K: M, bias: p['b2'], cHalf: out, cs: kc });
  }

  /**
   * From dY = d(loss)/d(compressed side) [Nc, H, D] (fp32): dx [N, H, D] += d(loss)/dx through phi, and the
   * parameter gradients (written, not added) into `grads`. Reads the hidden state the last forward kept.
   */
  backward(side: PhiSide, x: DeviceBuffer, params: DevicePhiParams, dY: DeviceBuffer, dx: DeviceBuffer, grads: Readonly<Record<string, DeviceBuffer>>): void {
    const { H, D, Nc, lD } = this.sizes(side);
    if (Nc === 0) return;
    const p = params.buffers;
    const dy = { strided: dY, sh: D, sm: H * D, sk: 1 };
    const dyAsB: [number, number, number] = [D, H * D, 1];
    const du = this.duBuffer();
    const duStrides: [number, number, number] = [lD, H * lD, 1];
    let toU: { strided: DeviceBuffer; sh: number; sm: number; sk: number } = dy;
    let toUWidth = D;
    let wToU = p['w']!;
    if (params.kind === 'linear') {
      this.gemm(side, x, p, { a: 'U^T', b: dY, bs: dyAsB, M: lD, N: D, K: Nc, c: grads['w'], cs: [lD * D, D, 1] });
      this.columnSums(dY, grads['b']!, Nc, D, D, H * D);
    } else {
      const M = params.hidden;
      const state = this.hiddenState.get(side);
      if (state === undefined) throw new Error(`phi backward (${side}): no forward state; run the forward first`);
      const dA = this.dHiddenBuffer(M);
      const hs: [number, number, number] = [M, H * M, 1];
      const zT = { strided: state.z, sh: M, sm: 1, sk: H * M };
      this.gemm(side, x, p, { a: zT, b: dY, bs: dyAsB, M, N: D, K: Nc, c: grads['w2'], cs: [M * D, D, 1] });
      this.columnSums(dY, grads['b2']!, Nc, D, D, H * D);
      // dA = (dY W2^T) * gelu'(A)
      this.gemm(side, x, p, { a: dy, b: p['w2']!, bs: [M * D, 1, D], M: Nc, N: M, K: D, epilogue: 'dgelu', aux: state.a, c: dA, cs: hs });
      this.gemm(side, x, p, { a: 'U^T', b: dA, bs: [M, H * M, 1], M: lD, N: M, K: Nc, c: grads['w1'], cs: [lD * M, M, 1] });
      this.columnSums(dA, grads['b1']!, Nc, M, M, H * M);
      toU = { strided: dA, sh: M, sm: H * M, sk: 1 };
      toUWidth = M;
      wToU = p['w1']!;
    }
    // dU = (dY or dA) W^T, then pe's gradient (a column sum) and dx (dU gathered back onto the raw rows).
    this.gemm(side, x, p, { a: toU, b: wToU, bs: [lD * toUWidth, 1, toUWidth], M: Nc, N: lD, K: toUWidth, c: du, cs: duStrides });
    this.columnSums(du, grads['pe']!, Nc, lD, lD, H * lD);
    this.programs.phi('scatter_rows').launch({
      grid: [this.plan.totalTokens, H, 1],
      block: [Math.min(128, D), 1, 1],
      args: [ptr(du), ptr(dx), ptr(this.tables.rowSeq), ptr(this.tables.cuSeqlens), ptr(this.tables.cuCmp), { i32: H }, { i32: D }],
    });
  }

  /** Device bytes held: the mlp's hidden state kept for the backward (and the backward's scratch, until freed). */
  get bytes(): number {
    return this.scratch.reduce((sum, b) => sum + b.bytes, 0) + (this.du?.bytes ?? 0) + (this.dHidden?.bytes ?? 0);
  }

  /** Frees the backward's scratch (the next backward allocates it again); the forward's hidden state stays. */
  freeBackwardScratch(): void {
    this.du?.dispose();
    this.dHidden?.dispose();
    this.du = undefined;
    this.dHidden = undefined;
  }

  dispose(): void {
    this.freeBackwardScratch();
    for (const b of this.scratch) b.dispose();
    this.scratch.length = 0;
    this.hiddenState.clear();
  }

  // -------------------------------------------------------------------------------------------------------------

  private sizes(side: PhiSide): { H: number; D: number; Nc: number; lD: number } {
    const { kvHeads: H, headDim, valueDim, compressBlock: l } = this.programs.config;
    const D = side === 'k' ? headDim : valueDim;
    return { H, D, Nc: this.plan.totalCompressed, lD: l * D };
  }

  private gemm(side: PhiSide, x: DeviceBuffer, params: Readonly<Record<string, DeviceBuffer>>, p: Product): void {
    const { H, D } = this.sizes(side);
    const strided = typeof p.a === 'object' ? p.a : undefined;
    const mode = strided !== undefined ? 0 : p.a === 'U' ? 1 : 2;
    this.programs.phi('gemm').launch({
      grid: [Math.ceil(p.M / TILE), Math.ceil(p.N / TILE), H],
      block: [256, 1, 1],
      args: [
        { i32: mode },
        ptr(strided?.strided),
        { i64: strided?.sh ?? 0 },
        { i64: strided?.sm ?? 0 },
        { i64: strided?.sk ?? 0 },
        ptr(x),
        ptr(params['pe']),
        ptr(this.tables.cmpRowSeq),
        ptr(this.tables.cuSeqlens),
        ptr(this.tables.cuCmp),
        { i32: H },
        { i32: D },
        ptr(p.b),
        { i64: p.bs[0] },
        { i64: p.bs[1] },
        { i64: p.bs[2] },
        { i32: p.M },
        { i32: p.N },
        { i32: p.K },
        ptr(p.bias),
        { i32: EPILOGUE[p.epilogue ?? 'store'] },
        ptr(p.aux),
        ptr(p.c),
        ptr(p.c2),
        ptr(p.cHalf),
        { i64: p.cs[0] },
        { i64: p.cs[1] },
        { i64: p.cs[2] },
      ],
    });
  }

  private columnSums(src: DeviceBuffer, out: DeviceBuffer, rows: number, cols: number, sh: number, sm: number): void {
    this.programs.phi('column_sums').launch({
      grid: [Math.ceil(cols / 128), this.programs.config.kvHeads, 1],
      block: [128, 1, 1],
      args: [ptr(src), ptr(out), { i32: rows }, { i32: cols }, { i64: sh }, { i64: sm }],
    });
  }

  private hiddenFor(side: PhiSide, M: number): { a: DeviceBuffer; z: DeviceBuffer } {
    let state = this.hiddenState.get(side);
    if (state === undefined) {
      const bytes = this.plan.totalCompressed * this.programs.config.kvHeads * M * 4;
      state = { a: this.keep(this.ctx.alloc(bytes, `phi ${side} hidden pre-activations`)), z: this.keep(this.ctx.alloc(bytes, `phi ${side} hidden activations`)) };
      this.hiddenState.set(side, state);
    }
    return state;
  }

  /** dU [Nc, H, l * max(Dk, Dv)] fp32, shared by both sides (they run one after the other on the stream). */
  private duBuffer(): DeviceBuffer {
    const { kvHeads: H, headDim, valueDim, compressBlock: l } = this.programs.config;
    this.du ??= this.ctx.alloc(this.plan.totalCompressed * H * l * Math.max(headDim, valueDim) * 4, 'phi dU');
    return this.du;
  }

  private dHiddenBuffer(M: number): DeviceBuffer {
    this.dHidden ??= this.ctx.alloc(this.plan.totalCompressed * this.programs.config.kvHeads * M * 4, 'phi d(hidden)');
    return this.dHidden;
  }

  private keep(b: DeviceBuffer): DeviceBuffer {
    this.scratch.push(b);
    return b;
  }
}
