//! Steps of the forward pass that run as one operation each, with their backward passes written
//! out: SwiGLU, attention's masked softmax, and the head's cross-entropy (loss and dLoss/dlogits).
//!
//! Composed from burn's primitives, autodiff would keep four [tokens, intermediate] tensors for
//! `silu(gate) * up` and three [.., queries, keys] tensors for a softmax, and compute each exp
//! twice; as operations of their own they keep the inputs (SwiGLU) or the output (softmax) and
//! nothing else. They are a burn backend extension ([`FusedOps`]): the CPU backend runs them as
//! single vectorised, multi-threaded passes (`cpu`: burn's CPU kernels compute exp one element at
//! a time and run elementwise work on one thread); every other backend (WebGPU, wgpu) runs the
//! trait's default bodies, the same math from burn's primitives; the autodiff backend records
//! each as one node whose backward is the matching `*_backward` operation.

#[cfg(not(target_arch = "wasm32"))] // burn's CPU backend is built for native targets only (Cargo.toml)
mod cpu;
pub mod quant;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, FloatDType, TensorMetadata, backend_extension};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

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

    /// softmax(scores + mask) over the last axis; `mask` is additive (0 or -inf) and its shape is
    /// the last two axes of `scores`, with leading ones ([1, 1, queries, keys]).
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

impl FusedOps for Cube {}

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

    fn masked_softmax(scores: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        let probs = B::masked_softmax(scores.primitive().clone(), mask.into_primitive());
        match SoftmaxBackward.prepare::<C>([scores.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(probs.clone(), probs),
            OpsKind::UnTracked(prep) => prep.finish(probs),
        }
    }
}

/// silu(gate) * up (SwiGLU).
pub fn swiglu(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::swiglu(gate.into_dispatch(), up.into_dispatch()))
}

/// softmax(scores + mask) v over the last axis (keys); `mask` is additive (0 or -inf), constant,
/// [1, 1, queries, keys]; none where every query sees every key (one new token after a cache).
pub fn attend(scores: Tensor<4>, mask: Option<Tensor<4>>, v: Tensor<4>) -> Tensor<4> {
    let probs = match mask {
        Some(mask) => {
            Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::masked_softmax(scores.into_dispatch(), mask.into_dispatch()))
        }
        None => burn::tensor::activation::softmax(scores, 3),
    };
    probs.matmul(v)
}

/// Each row's cross-entropy of `logits` [rows, vocab] against `targets` [rows, 1], [rows], and
/// softmax(logits) - onehot(targets) (no autodiff).
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<2, Int>) -> (Tensor<1>, Tensor<2>) {
    let (loss, grad) = <burn::backend::Dispatch as FusedOps>::cross_entropy(logits.into_dispatch(), targets.into_dispatch());
    (Tensor::from_dispatch(loss), Tensor::from_dispatch(grad))
}
