//! Two steps of the forward pass with their gradients written out, for training.
//!
//! Autodiff of `softmax(scores + mask) v` keeps three [.., queries, keys] tensors per layer for
//! the backward pass and computes exp twice; of `silu(gate) * up` it keeps four
//! [tokens, intermediate] tensors and computes the sigmoid twice. The versions here keep one and
//! two, and compute each exp once (the softmax with the backend's fused kernel), which is most
//! of training's activation memory and a good part of its elementwise time on the CPU.
//!
//! How: with `x` tracked and `c = x.inner()` (same values, a constant to autodiff), `x - c` is
//! exactly zero but carries x's gradient, so `value + (x - c) * J` has the plain value and the
//! gradient `J` (a constant). The values are bit-identical to the plain compositions, which run
//! as they are whenever nothing is tracked (inference).

use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, silu, softmax};

/// softmax(scores + mask) v over the last axis (keys); `mask` is additive (0 or -inf) and constant.
pub fn attend(scores: Tensor<4>, mask: Option<Tensor<4>>, v: Tensor<4>) -> Tensor<4> {
    let probs = |s: Tensor<4>| softmax(match &mask {
        Some(mask) => s + mask.clone(),
        None => s,
    }, 3);
    if !scores.is_tracked() {
        return probs(scores).matmul(v);
    }
    let constant = scores.clone().inner();
    let p = probs(constant.clone());
    // the softmax Jacobian diag(p) - p p^T applied to the zero tangent d = scores - constant (taken
    // before the mask: -inf - -inf would be NaN); it is zero, so (p + f) v = p v + f v
    let d = scores - constant;
    let f = p.clone() * (d.clone() - (d * p.clone()).sum_dim(3));
    p.matmul(v.clone()) + f.matmul(v.inner())
}

/// silu(gate) * up (SwiGLU).
pub fn swiglu(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    if !gate.is_tracked() && !up.is_tracked() {
        return silu(gate) * up;
    }
    let g = gate.clone().inner();
    let s = sigmoid(g.clone());
    let silu = g.clone() * s.clone();
    // d/dgate = up * silu'(gate), silu'(x) = s (1 + x (1 - s)) = s (1 + x - silu(x));
    // d/dup = silu(gate), which up * silu carries by itself
    let d_gate = (g.clone() - silu.clone()).add_scalar(1.0) * s * up.clone().inner();
    up * silu + (gate - g) * d_gate
}
