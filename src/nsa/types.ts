// The operator's public data: what goes in, what comes out, and the gradients. Shapes follow the legend in
// config/nsa-config.ts; packed batches use B = 1 with cuSeqlens.

import type { FloatDType } from '../tensor/dtype.js';
import type { Tensor } from '../tensor/tensor.js';

export interface NsaInputs {
  /** [B, T, Hq, Dk] */
  readonly q: Tensor;
  /** [B, T, H, Dk] */
  readonly k: Tensor;
  /** [B, T, H, Dv] */
  readonly v: Tensor;
  /** [B, T, Hq, 3]: gates of the cmp, slc and win branches. */
  readonly g: Tensor;
  /** Packed sequence offsets [N + 1] (int32/int64 tensor or numbers): 0, increasing, ending at T; needs B = 1. */
  readonly cuSeqlens?: Tensor | readonly number[] | undefined;
  /** Compressed keys/values given directly, [B, Tc, H, D] (packed: [1, sum Tc, H, D]); replace phi. */
  readonly kCmp?: Tensor | undefined;
  readonly vCmp?: Tensor | undefined;
  /** Independent raw keys/values of the selected and window branches, shaped as k and v. */
  readonly kSlc?: Tensor | undefined;
  readonly vSlc?: Tensor | undefined;
  readonly kWin?: Tensor | undefined;
  readonly vWin?: Tensor | undefined;
  /** Parameters of a learned phi for keys and for values (docs/decisions.md names and shapes them). */
  readonly phiK?: Readonly<Record<string, Tensor>> | undefined;
  readonly phiV?: Readonly<Record<string, Tensor>> | undefined;
}

export interface NsaOutputs {
  /** [B, T, Hq, Dv]: the gated sum. */
  readonly o: Tensor;
  /** [B, T, Hq, Dv]: each branch's ungated output. */
  readonly oCmp: Tensor;
  readonly oSlc: Tensor;
  readonly oWin: Tensor;
  /** [B, T, Hq]: each branch's log-sum-exp (natural log); -Infinity where the branch sees no key. */
  readonly lseCmp: Tensor;
  readonly lseSlc: Tensor;
  readonly lseWin: Tensor;
  /** [B, T, H, n] int32: the selected blocks of each query and KV head, ascending, padded with -1. */
  readonly blockIndices: Tensor<'i32'>;
}

export interface NsaGradients {
  readonly dq: Tensor;
  /** Gradients of the shared k, v: through every branch that reads them (phi included). */
  readonly dk: Tensor;
  readonly dv: Tensor;
  /** [B, T, Hq, 3] */
  readonly dg: Tensor;
  /** Present when the matching input was given. */
  readonly dkCmp?: Tensor;
  readonly dvCmp?: Tensor;
  readonly dkSlc?: Tensor;
  readonly dvSlc?: Tensor;
  readonly dkWin?: Tensor;
  readonly dvWin?: Tensor;
  /** Gradients of a learned phi's parameters, by name. */
  readonly dPhiK?: Readonly<Record<string, Tensor>>;
  readonly dPhiV?: Readonly<Record<string, Tensor>>;
}

export interface NsaRunOptions {
  /** Dtype of the outputs (and gradients); f32 by default whatever the inputs are. */
  readonly outputDType?: FloatDType;
  /** Reject NaN/Inf inputs before running (default true). Turning it off saves a pass over the inputs. */
  readonly checkFinite?: boolean;
}
