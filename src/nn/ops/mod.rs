//! Steps of the forward and backward passes that run as one operation each, with their backward
//! passes written out: RMSNorm (alone and after a residual add), the rotary embedding, the gated
//! MLP's activation (SwiGLU, GeGLU),
//! attention (over a key/value cache, and training's self-attention), LoRA's update, the head's
//! cross-entropy (loss and dLoss/dlogits), and the optimizer's AdamW step and gradient norm.
//!
//! Composed from burn's primitives, autodiff would keep four [tokens, intermediate] tensors for
//! `silu(gate) * up` and three [.., queries, keys] tensors for a softmax, and compute each exp
//! twice; as operations of their own they keep the inputs (SwiGLU) or the output (softmax) and
//! nothing else, and on a GPU each is one kernel launch instead of many. They are a burn backend
//! extension ([`FusedOps`]): the CPU backend runs several as single vectorised, multi-threaded
//! passes (`cpu`) and the others as the trait's default bodies (`composed`: the same math from
//! burn's primitives); burn's cubecl backend (WebGPU, wgpu) runs each as one kernel, attention's
//! backward as three (`cube`); the autodiff backend records each as one node (`autodiff`).

mod autodiff;
mod composed;
#[cfg(not(target_arch = "wasm32"))] // burn's CPU backend is built for native targets only (Cargo.toml)
mod cpu;
mod cube;
pub mod quant;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};
use burn::tensor::{Int, Tensor};

pub use crate::config::Activation;

#[backend_extension(Flex: cfg(not(target_arch = "wasm32")), Cube, Autodiff)]
pub trait FusedOps: Backend {
    /// act(gate) * up, elementwise (the gated MLP's middle: SwiGLU, GeGLU).
    fn gated(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        composed::gated::<Self>(gate, up, act)
    }

    /// (dL/dgate, dL/dup) of [`gated`](Self::gated) from dL/dout: dL/dup = grad * act(gate) and
    /// dL/dgate = grad * up * act'(gate) (see [`Activation`] for act').
    fn gated_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::gated_backward::<Self>(gate, up, grad, act)
    }

    /// x / sqrt(mean(x^2) + eps) * weight over the last axis (RMSNorm); `weight` [d] is a base
    /// weight, trained only by full fine-tuning, whose dL/dweight, the sum over rows of
    /// grad * x * r, the autodiff node composes (`composed::rms_norm_weight_grad`).
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composed::rms_norm::<Self>(x, weight, eps)
    }

    /// dL/dx of [`rms_norm`](Self::rms_norm) from dL/dy: with r = 1 / sqrt(mean(x^2) + eps) per
    /// row and g = grad * weight, dL/dx = r g - x r^3 mean(g x).
    fn rms_norm_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composed::rms_norm_backward::<Self>(x, weight, grad, eps)
    }

    /// The rotary embedding over the last axis (HF Llama's halves): x * cos + rotate_half(x) * sin
    /// with rotate_half(x) = [-x2, x1]; `cos`, `sin` [1, 1, seq, d] are constants and repeat over
    /// the leading axes of x [.., seq, d]. With `inverse`, the rotation back (sin negated), which
    /// is also the rotation's backward: both halves of a row turn by the same angles.
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, inverse: bool) -> FloatTensor<Self> {
        composed::rotary::<Self>(x, cos, sin, inverse)
    }

    /// softmax(scores + mask) over the last axis; `mask` is additive (0 or -inf), [1, 1, queries,
    /// keys], its rows repeating over the rows of `scores` (queries divides them).
    fn masked_softmax(scores: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::masked_softmax::<Self>(scores, mask)
    }

    /// dL/dscores of a softmax over the last axis from its output `probs` and dL/dprobs:
    /// probs * (grad - sum(grad * probs)).
    fn softmax_backward(probs: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::softmax_backward::<Self>(probs, grad)
    }

    /// (x + delta, rms_norm(x + delta)): a residual add and the norm after it, one pass.
    fn add_rms_norm(
        x: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::add_rms_norm::<Self>(x, delta, weight, eps)
    }

    /// Writes rope(k) and v, [batch, seq, kv_heads * d] as projected, into the cache `kv`
    /// [2, batch, kv_heads, capacity, d] (keys, then values) at positions start..start + seq, and
    /// returns it (written in place where nothing else holds it). `tables` [2, seq, d] are the
    /// positions' rotary cos and sin. Generation's cache, and the layout training's
    /// self-attention kernels lay a run out in.
    fn kv_append(
        kv: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        composed::kv_append::<Self>(kv, k, v, tables, start)
    }

    /// Causal grouped-query attention: queries `q` [batch, seq, heads * d] as projected, at
    /// positions start..start + seq, turned by their rotary `tables` [2, seq, d] and scaled by
    /// `scale`, over the keys (turned) and values of `kv` [2, batch, kv_heads, capacity, d], whose
    /// slot s holds position `cached_from` + s (a sliding layer's cache drops positions no query
    /// will see again), filled up to start + seq; query i sees keys 0..=start + i (with a sliding
    /// `window` w, only the last w of them: start + i - j < w, all cached), query head h the
    /// key/value head h / (heads / kv_heads). Returns [batch, seq, heads * d].
    fn causal_attention(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        scale: f32,
        start: usize,
        cached_from: usize,
        window: Option<usize>,
    ) -> FloatTensor<Self> {
        composed::causal_attention::<Self>(q, kv, tables, scale, start, cached_from, window)
    }

    /// Causal self-attention of a run without a cache (training, and the gradient's second
    /// pass): queries `q` [batch, seq, heads * d], keys and values `k`, `v` [batch, seq,
    /// kv_heads * d] as projected, all turned by the positions' `tables` [2, seq, d]; `scale` and
    /// `window` as for [`causal_attention`](Self::causal_attention). Returns [batch, seq, heads * d].
    fn self_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        scale: f32,
        window: Option<usize>,
    ) -> FloatTensor<Self> {
        composed::self_attention::<Self>(q, k, v, tables, scale, window)
    }

    /// LoRA's linear layer: base + scaling (x A^T) B^T, with `base` the frozen layer's output
    /// [tokens, out] (x W^T, computed by the base weight's own product), x [tokens, in], `a_t` =
    /// A^T [in, r] and `b_t` = B^T [r, out]. Its autodiff node keeps x, the adapter and x A^T,
    /// and runs [`InnerOps::lora_backward`].
    fn lora(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a_t: FloatTensor<Self>,
        b_t: FloatTensor<Self>,
        scaling: f32,
    ) -> FloatTensor<Self> {
        composed::lora::<Self>(base, x, None, a_t, b_t, scaling)
    }

    /// [`lora`](Self::lora) with LoRA dropout: x * mask * keep_scale goes down the adapter,
    /// `mask` [tokens, in] being the keep-mask (each entry 0 or 1) and `keep_scale` 1 / (1 - p).
    #[allow(clippy::too_many_arguments)]
    fn lora_dropout(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        keep_scale: f32,
        a_t: FloatTensor<Self>,
        b_t: FloatTensor<Self>,
        scaling: f32,
    ) -> FloatTensor<Self> {
        composed::lora::<Self>(base, x, Some(Dropout { mask, keep_scale }), a_t, b_t, scaling)
    }

    /// One AdamW step of `param` (see [`AdamWStep`]): (param, m, v) after it.
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed::adamw::<Self>(param, grad, m, v, step)
    }

    /// sum(x^2) over all of `x`, written into element `slot` of `sums` [n] (in place where
    /// nothing else holds it), which is returned.
    fn sum_squares_into(sums: FloatTensor<Self>, x: FloatTensor<Self>, slot: usize) -> FloatTensor<Self> {
        composed::sum_squares_into::<Self>(sums, x, slot)
    }

    /// Each row's cross-entropy of `logits` [rows, vocab] against `targets` [rows, 1] (i.e.
    /// log-sum-exp minus the target's logit), [rows], and its gradient with respect to the
    /// logits, softmax(logits) - onehot(target), [rows, vocab].
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::cross_entropy::<Self>(logits, targets)
    }
}

/// What autodiff's LoRA and self-attention nodes run on the inner backend, with arguments that
/// do not cross burn's dispatch (an optional mask, saved state): the defaults are composed, or
/// none (self-attention's kernels: autodiff then records the composed steps).
pub trait InnerOps: Backend {
    /// (x * dropout) a_t [tokens, r]: LoRA's input taken down to its rank, dropout applied on the way.
    fn lora_down(x: FloatTensor<Self>, dropout: Option<Dropout<Self>>, a_t: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::lora_down::<Self>(x, dropout, a_t)
    }

    /// base + scaling xa b_t, with xa = (x * dropout) A^T [tokens, r] (the rank-r product added
    /// where the output is written).
    fn lora_epilogue(base: FloatTensor<Self>, xa: FloatTensor<Self>, b_t: FloatTensor<Self>, scaling: f32) -> FloatTensor<Self> {
        composed::lora_epilogue::<Self>(base, xa, b_t, scaling)
    }

    /// (dL/dx unless `skip_x`, dL/da_t, dL/db_t) of LoRA ([`FusedOps::lora_dropout`]) from dL/dout = g
    /// (dL/dbase is g itself): with gb = scaling g b_t^T [tokens, r], dL/dx = (gb a_t^T) *
    /// dropout, dL/da_t = (x * dropout)^T gb and dL/db_t = scaling xa^T g, dropout being the
    /// keep-mask times its scale.
    fn lora_backward(
        x: FloatTensor<Self>,
        dropout: Option<Dropout<Self>>,
        a_t: FloatTensor<Self>,
        b_t: FloatTensor<Self>,
        xa: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scaling: f32,
        skip_x: bool,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        composed::lora_backward::<Self>(x, dropout, a_t, b_t, xa, grad, scaling, skip_x)
    }

    /// [`self_attention`](FusedOps::self_attention) as kernels that keep what their backward
    /// ([`self_attention_backward`](Self::self_attention_backward)) needs, where the backend has
    /// them; `None` lets autodiff record the composed steps instead.
    fn self_attention_kernels(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _tables: FloatTensor<Self>,
        _scale: f32,
        _window: Option<usize>,
    ) -> Option<(FloatTensor<Self>, SavedAttention<Self>)> {
        None
    }

    /// (dL/dq, dL/dk, dL/dv) of [`self_attention`](FusedOps::self_attention), in the
    /// projections' layouts, from dL/dout; called only with what
    /// [`self_attention_kernels`](Self::self_attention_kernels) saved.
    fn self_attention_backward(
        _saved: SavedAttention<Self>,
        _grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("a backend whose self_attention_kernels gives Some implements its backward")
    }
}

/// sqrt(2 / pi) and 0.044715, the tanh approximation of GELU's constants.
pub const GELU_C: f32 = 0.797_884_6;
pub const GELU_K: f32 = 0.044_715;

/// LoRA dropout's keep-mask [tokens, in] (each entry 0 or 1) and the scale of what is kept,
/// 1 / (1 - p).
#[derive(Clone, Debug)]
pub struct Dropout<B: Backend> {
    pub mask: FloatTensor<B>,
    pub keep_scale: f32,
}

/// What self-attention's kernels keep for the backward pass: the queries as projected, the
/// turned keys and the values as a cache of the run ([2, batch, kv_heads, seq, d]), the output,
/// each query row's (log-sum-exp of scores, and a scratch slot the backward writes its
/// grad . out into) [batch, heads, seq, 2], the rotary tables, the queries' scale and the
/// sliding window.
#[derive(Clone, Debug)]
pub struct SavedAttention<B: Backend> {
    pub q: FloatTensor<B>,
    pub kv: FloatTensor<B>,
    pub out: FloatTensor<B>,
    pub stats: FloatTensor<B>,
    pub tables: FloatTensor<B>,
    pub scale: f32,
    pub window: Option<usize>,
}

/// The constants of one AdamW step (PyTorch's `torch.optim.AdamW`), for a gradient g scaled by
/// `grad_scale` (clipping): param = decay * param - step_size * m / (sqrt(v) * inv_sqrt_bias2 +
/// eps), after m = beta1 m + (1 - beta1) g and v = beta2 v + (1 - beta2) g^2; decay = 1 - lr *
/// weight_decay, step_size = lr / (1 - beta1^t), inv_sqrt_bias2 = 1 / sqrt(1 - beta2^t). Each
/// is computed in f64 and rounded once (1 - beta2 for 0.999 is off by 1e-5 in f32 arithmetic).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub grad_scale: f32,
    pub decay: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub step_size: f32,
    pub inv_sqrt_bias2: f32,
    pub eps: f32,
}

/// x / sqrt(mean(x^2) + eps) * weight over the last axis (RMSNorm); the weight trains only in
/// full fine-tuning.
pub fn rms_norm(x: Tensor<3>, weight: Tensor<1>, eps: f64) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps))
}

/// x * cos + rotate_half(x) * sin over the last axis (the rotary embedding; see
/// [`FusedOps::rotary`]); cos and sin are constants.
pub fn rotary(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rotary(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch(), false))
}

/// act(gate) * up (SwiGLU with silu, GeGLU with gelu_tanh).
pub fn gated(gate: Tensor<3>, up: Tensor<3>, act: Activation) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::gated(gate.into_dispatch(), up.into_dispatch(), act))
}

/// (x + delta, rms_norm(x + delta)) in one pass: a residual add and the norm after it.
pub fn add_rms_norm(x: Tensor<3>, delta: Tensor<3>, weight: Tensor<1>, eps: f64) -> (Tensor<3>, Tensor<3>) {
    let (h, normed) =
        <burn::backend::Dispatch as FusedOps>::add_rms_norm(x.into_dispatch(), delta.into_dispatch(), weight.into_dispatch(), eps);
    (Tensor::from_dispatch(h), Tensor::from_dispatch(normed))
}

/// Writes rope(k) and v ([batch, seq, kv_heads * d] as projected) into the cache `kv` [2, batch,
/// kv_heads, capacity, d] at positions start..start + seq (see [`FusedOps::kv_append`]).
pub fn kv_append(kv: Tensor<5>, k: Tensor<3>, v: Tensor<3>, tables: Tensor<3>, start: usize) -> Tensor<5> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::kv_append(
        kv.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        tables.into_dispatch(),
        start,
    ))
}

/// Causal grouped-query attention of queries `q` [batch, seq, heads * d] as projected, at
/// positions from `start` on, over the keys and values of the cache `kv` (its first slot position
/// `cached_from`) up to start + seq; see [`FusedOps::causal_attention`] (and its sliding `window`).
/// Returns [batch, seq, heads * d].
pub fn causal_attention(
    q: Tensor<3>,
    kv: Tensor<5>,
    tables: Tensor<3>,
    scale: f32,
    start: usize,
    cached_from: usize,
    window: Option<usize>,
) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::causal_attention(
        q.into_dispatch(),
        kv.into_dispatch(),
        tables.into_dispatch(),
        scale,
        start,
        cached_from,
        window,
    ))
}

/// Causal self-attention without a cache: queries `q` [batch, seq, heads * d] and keys and
/// values [batch, seq, kv_heads * d] as projected; see [`FusedOps::self_attention`].
pub fn self_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, tables: Tensor<3>, scale: f32, window: Option<usize>) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::self_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        tables.into_dispatch(),
        scale,
        window,
    ))
}

/// base + scaling ((x * mask * keep_scale) A^T) B^T: a LoRA layer's output from its base output
/// [tokens, out], its input x [tokens, in], dropout's keep-mask for x (0 or 1 each) and the
/// scale of what is kept (training), and the adapter's A^T [in, r] and B^T [r, out].
pub fn lora(base: Tensor<2>, x: Tensor<2>, dropout: Option<(Tensor<2>, f32)>, a_t: Tensor<2>, b_t: Tensor<2>, scaling: f32) -> Tensor<2> {
    let [base, x, a_t, b_t] = [base, x, a_t, b_t].map(Tensor::into_dispatch);
    Tensor::from_dispatch(match dropout {
        Some((mask, keep)) => <burn::backend::Dispatch as FusedOps>::lora_dropout(base, x, mask.into_dispatch(), keep, a_t, b_t, scaling),
        None => <burn::backend::Dispatch as FusedOps>::lora(base, x, a_t, b_t, scaling),
    })
}

/// One AdamW step of `param` with gradient `grad` and moments (m, v): (param, m, v) after it.
pub fn adamw(param: Tensor<2>, grad: Tensor<2>, m: Tensor<2>, v: Tensor<2>, step: AdamWStep) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let (param, m, v) = <burn::backend::Dispatch as FusedOps>::adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        step,
    );
    (Tensor::from_dispatch(param), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
}

/// sum(x^2) over all of `x` into element `slot` of `sums`.
pub fn sum_squares_into(sums: Tensor<1>, x: Tensor<2>, slot: usize) -> Tensor<1> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::sum_squares_into(sums.into_dispatch(), x.into_dispatch(), slot))
}

/// softmax(scores + mask) over the last axis (keys); `mask` is additive (0 or -inf), constant,
/// [1, 1, queries, keys] (its rows repeat over the scores' rows).
pub fn masked_softmax(scores: Tensor<4>, mask: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::masked_softmax(scores.into_dispatch(), mask.into_dispatch()))
}

/// Each row's cross-entropy of `logits` [rows, vocab] against `targets` [rows, 1], [rows], and
/// softmax(logits) - onehot(targets) (no autodiff).
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<2, Int>) -> (Tensor<1>, Tensor<2>) {
    let (loss, grad) = <burn::backend::Dispatch as FusedOps>::cross_entropy(logits.into_dispatch(), targets.into_dispatch());
    (Tensor::from_dispatch(loss), Tensor::from_dispatch(grad))
}
