//! Steps of the forward pass that run as one operation each, with their backward passes written
//! out: RMSNorm, the rotary embedding, SwiGLU, attention's masked softmax, and the head's
//! cross-entropy (loss and dLoss/dlogits).
//!
//! Composed from burn's primitives, autodiff would keep four [tokens, intermediate] tensors for
//! `silu(gate) * up` and three [.., queries, keys] tensors for a softmax, and compute each exp
//! twice; as operations of their own they keep the inputs (SwiGLU) or the output (softmax) and
//! nothing else. They are a burn backend extension ([`FusedOps`]): the CPU backend runs them as
//! single vectorised, multi-threaded passes (`cpu`: burn's CPU kernels compute exp one element at
//! a time and run elementwise work on one thread; the rotary embedding takes the trait's default
//! body, the same math from burn's primitives); burn's cubecl backend (WebGPU, wgpu) runs each as
//! one kernel (`cube`); the autodiff backend records each as one node whose backward is the
//! matching `*_backward` operation.

#[cfg(not(target_arch = "wasm32"))] // burn's CPU backend is built for native targets only (Cargo.toml)
mod cpu;
mod cube;
pub mod quant;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, FloatDType, TensorMetadata, backend_extension};
use burn::tensor::{IndexingUpdateOp, Int, Slice, Tensor};

#[backend_extension(Flex: cfg(not(target_arch = "wasm32")), Cube, Autodiff)]
pub trait FusedOps: Backend {
    /// silu(gate) * up, elementwise.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::swiglu::<Self>(gate, up)
    }

    /// (dL/dgate, dL/dup) of [`swiglu`](Self::swiglu) from dL/dout: with s = sigmoid(gate),
    /// dL/dup = grad * silu(gate) and dL/dgate = grad * up * s * (1 + gate - silu(gate)).
    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::swiglu_backward::<Self>(gate, up, grad)
    }

    /// x / sqrt(mean(x^2) + eps) * weight over the last axis (RMSNorm); `weight` [d] is a
    /// constant (a base weight).
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

    /// Each row's cross-entropy of `logits` [rows, vocab] against `targets` [rows, 1] (i.e.
    /// log-sum-exp minus the target's logit), [rows], and its gradient with respect to the
    /// logits, softmax(logits) - onehot(target), [rows, vocab].
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::cross_entropy::<Self>(logits, targets)
    }
}

/// The operations composed from burn's primitives: the trait's default bodies, and what the CPU
/// kernels fall back to for inputs they do not take.
mod composed {
    use super::*;

    pub fn swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
        let s = B::sigmoid(gate.clone());
        B::float_mul(B::float_mul(gate, s), up)
    }

    pub fn swiglu_backward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>, grad: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
        let s = B::sigmoid(gate.clone());
        let silu = B::float_mul(gate.clone(), s.clone());
        let d_up = B::float_mul(grad.clone(), silu.clone());
        let slope = B::float_mul(s, B::float_add_scalar(B::float_sub(gate, silu), 1.0f32.into()));
        (B::float_mul(B::float_mul(grad, up), slope), d_up)
    }

    /// 1 / sqrt(mean(x^2) + eps) over the last axis, kept as a size-1 axis; and `weight` shaped to
    /// broadcast against x.
    fn inv_rms<B: Backend>(x: &FloatTensor<B>, weight: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
        let shape = x.shape();
        let last = shape.num_dims() - 1;
        let mean_square = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), last);
        let r = B::float_recip(B::float_sqrt(B::float_add_scalar(mean_square, (eps as f32).into())));
        let mut weight_shape = vec![1; last];
        weight_shape.push(shape[last]);
        (r, B::float_reshape(weight, weight_shape.into()))
    }

    pub fn rms_norm<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
        let (r, weight) = inv_rms::<B>(&x, weight, eps);
        B::float_mul(B::float_mul(x, r), weight)
    }

    pub fn rms_norm_backward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
        let last = x.shape().num_dims() - 1;
        let (r, weight) = inv_rms::<B>(&x, weight, eps);
        let g = B::float_mul(grad, weight);
        let mean_gx = B::float_mean_dim(B::float_mul(g.clone(), x.clone()), last);
        let r3 = B::float_mul(B::float_mul(r.clone(), r.clone()), r.clone());
        B::float_sub(B::float_mul(g, r), B::float_mul(x, B::float_mul(r3, mean_gx)))
    }

    pub fn rotary<B: Backend>(x: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>, inverse: bool) -> FloatTensor<B> {
        let shape = x.shape();
        let (n, half) = (shape.num_dims(), shape[shape.num_dims() - 1] / 2);
        let part = |from: usize| {
            let mut slices = vec![Slice::full(); n];
            slices[n - 1] = Slice::new(from as isize, Some((from + half) as isize), 1);
            B::float_slice(x.clone(), &slices)
        };
        let rotated = B::float_cat(vec![B::float_neg(part(half)), part(0)], n - 1);
        let sin = if inverse { B::float_neg(sin) } else { sin };
        B::float_add(B::float_mul(x.clone(), cos), B::float_mul(rotated, sin))
    }

    pub fn masked_softmax<B: Backend>(scores: FloatTensor<B>, mask: FloatTensor<B>) -> FloatTensor<B> {
        let last = scores.shape().num_dims() - 1;
        B::softmax(B::float_add(scores, mask), last)
    }

    pub fn softmax_backward<B: Backend>(probs: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        let last = probs.shape().num_dims() - 1;
        let dot = B::float_sum_dim(B::float_mul(grad.clone(), probs.clone()), last);
        B::float_mul(probs, B::float_sub(grad, dot))
    }

    pub fn cross_entropy<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
        let [rows, _] = logits.shape().dims::<2>();
        let probs = B::softmax(logits.clone(), 1);
        // log-sum-exp read off the softmax at each row's maximum, where p = exp(z_max - lse) >=
        // 1 / vocab cannot underflow: lse = z_max - ln p_max
        let lse = B::float_sub(B::float_max_dim(logits.clone(), 1), B::float_log(B::float_max_dim(probs.clone(), 1)));
        let loss = B::float_reshape(B::float_sub(lse, B::float_gather(1, logits, targets.clone())), [rows].into());
        let minus_one = B::float_neg(B::float_ones([rows, 1].into(), &probs.device(), FloatDType::F32));
        (loss, B::float_scatter(1, probs, targets, minus_one, IndexingUpdateOp::Add))
    }
}

/// SwiGLU's autodiff node: keeps gate and up, and runs [`FusedOps::swiglu_backward`].
#[derive(Debug)]
struct SwigluBackward;

impl<B: FusedOps> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [gate_node, up_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (d_gate, d_up) = B::swiglu_backward(gate, up, grad);
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, d_gate);
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, d_up);
        }
    }
}

/// RMSNorm's autodiff node: keeps x, the weight (a constant) and eps, and runs
/// [`FusedOps::rms_norm_backward`].
#[derive(Debug)]
struct RmsNormBackward;

impl<B: FusedOps> Backward<B, 1> for RmsNormBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, eps) = ops.state;
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rms_norm_backward(x, weight, grad, eps));
        }
    }
}

/// The rotary embedding's autodiff node: keeps cos and sin (constants); the backward is the
/// rotation back.
#[derive(Debug)]
struct RotaryBackward;

impl<B: FusedOps> Backward<B, 1> for RotaryBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin, inverse) = ops.state;
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rotary(grad, cos, sin, !inverse));
        }
    }
}

/// The masked softmax's autodiff node: keeps the probabilities, and runs
/// [`FusedOps::softmax_backward`]. The mask is a constant.
#[derive(Debug)]
struct SoftmaxBackward;

impl<B: FusedOps> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [scores_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = scores_node {
            grads.register::<B>(node.id, B::softmax_backward(ops.state, grad));
        }
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (gate, up) = (gate.into_primitive(), up.into_primitive());
                let out = B::swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.into_primitive(), up.into_primitive())),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let weight = weight.into_primitive();
        match RmsNormBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = x.into_primitive();
                let out = B::rms_norm(x.clone(), weight.clone(), eps);
                prep.finish((x, weight, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.into_primitive(), weight, eps)),
        }
    }

    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, inverse: bool) -> FloatTensor<Self> {
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RotaryBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::rotary(x.into_primitive(), cos.clone(), sin.clone(), inverse);
                prep.finish((cos, sin, inverse), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary(x.into_primitive(), cos, sin, inverse)),
        }
    }

    fn masked_softmax(scores: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        let probs = B::masked_softmax(scores.primitive().clone(), mask.into_primitive());
        match SoftmaxBackward.prepare::<C>([scores.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(probs.clone(), probs),
            OpsKind::UnTracked(prep) => prep.finish(probs),
        }
    }
}

/// x / sqrt(mean(x^2) + eps) * weight over the last axis (RMSNorm); the weight is a constant.
pub fn rms_norm(x: Tensor<3>, weight: Tensor<1>, eps: f64) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps))
}

/// x * cos + rotate_half(x) * sin over the last axis (the rotary embedding; see
/// [`FusedOps::rotary`]); cos and sin are constants.
pub fn rotary(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rotary(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch(), false))
}

/// silu(gate) * up (SwiGLU).
pub fn swiglu(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::swiglu(gate.into_dispatch(), up.into_dispatch()))
}

/// softmax(scores + mask) v over the last axis (keys); `mask` is additive (0 or -inf), constant,
/// [1, 1, queries, keys] (its rows repeat over the scores' rows: one row of zeros where every
/// query sees every key).
pub fn attend(scores: Tensor<4>, mask: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let probs =
        Tensor::<4>::from_dispatch(<burn::backend::Dispatch as FusedOps>::masked_softmax(scores.into_dispatch(), mask.into_dispatch()));
    probs.matmul(v)
}

/// Each row's cross-entropy of `logits` [rows, vocab] against `targets` [rows, 1], [rows], and
/// softmax(logits) - onehot(targets) (no autodiff).
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<2, Int>) -> (Tensor<1>, Tensor<2>) {
    let (loss, grad) = <burn::backend::Dispatch as FusedOps>::cross_entropy(logits.into_dispatch(), targets.into_dispatch());
    (Tensor::from_dispatch(loss), Tensor::from_dispatch(grad))
}
