//! The fused operations as cubecl kernels (WebGPU in the browser, wgpu natively), one dispatch
//! each where burn's primitives take several: RMSNorm and its backward (7 and 12 kernels
//! composed), the rotary embedding (its own backward: ~6), the head's cross-entropy with its
//! gradient (~12), SwiGLU and its backward (3 and 8), attention's masked softmax (the mask add and
//! softmax's max, subtract, exp, sum and divide) and its backward (4). A row of RMSNorm, of a
//! softmax or of the cross-entropy is one thread's loop: the rows are short (hidden size, keys)
//! or few (the head's positions, a few at a time). Other dtypes than f32 go the composed way.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Cube, DType, TensorMetadata};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::CubeDim;

use super::{FusedOps, composed};

mod kernels {
    use cubecl::prelude::*;
    use cubecl::terminate;

    #[cube]
    fn sigmoid(x: f32) -> f32 {
        1.0f32 / (1.0f32 + f32::exp(-x))
    }

    #[cube(launch)]
    pub fn swiglu_kernel(gate: &Tensor<f32>, up: &Tensor<f32>, out: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let g = gate[i];
        out[i] = g * sigmoid(g) * up[i];
    }

    #[cube(launch)]
    pub fn swiglu_backward_kernel(
        gate: &Tensor<f32>,
        up: &Tensor<f32>,
        grad: &Tensor<f32>,
        d_gate: &mut Tensor<f32>,
        d_up: &mut Tensor<f32>,
    ) {
        let i = ABSOLUTE_POS;
        if i >= d_up.len() {
            terminate!();
        }
        let (g, dy) = (gate[i], grad[i]);
        let s = sigmoid(g);
        let silu = g * s;
        d_up[i] = dy * silu;
        d_gate[i] = dy * up[i] * s * (1.0f32 + g - silu);
    }

    /// 1 / sqrt(mean(x^2) + eps) of the row starting at `at`, `d` long.
    #[cube]
    fn inv_rms(x: &Tensor<f32>, at: usize, d: usize, eps: f32) -> f32 {
        let mut sum = 0.0f32;
        for k in 0..d {
            let v = x[at + k];
            sum += v * v;
        }
        1.0f32 / f32::sqrt(sum / f32::cast_from(d) + eps)
    }

    /// Row `ABSOLUTE_POS` of x * inv_rms(x) * weight.
    #[cube(launch)]
    pub fn rms_norm_kernel(x: &Tensor<f32>, weight: &Tensor<f32>, out: &mut Tensor<f32>, eps: f32) {
        let (d, at) = (weight.len(), ABSOLUTE_POS * weight.len());
        if at >= out.len() {
            terminate!();
        }
        let r = inv_rms(x, at, d, eps);
        for k in 0..d {
            out[at + k] = x[at + k] * r * weight[k];
        }
    }

    /// Row `ABSOLUTE_POS` of r g - x r^3 mean(g x), g = grad * weight.
    #[cube(launch)]
    pub fn rms_norm_backward_kernel(x: &Tensor<f32>, weight: &Tensor<f32>, grad: &Tensor<f32>, out: &mut Tensor<f32>, eps: f32) {
        let (d, at) = (weight.len(), ABSOLUTE_POS * weight.len());
        if at >= out.len() {
            terminate!();
        }
        let r = inv_rms(x, at, d, eps);
        let mut gx = 0.0f32;
        for k in 0..d {
            gx += grad[at + k] * weight[k] * x[at + k];
        }
        let c = r * r * r * gx / f32::cast_from(d);
        for k in 0..d {
            out[at + k] = r * grad[at + k] * weight[k] - x[at + k] * c;
        }
    }

    /// x * cos + sign * rotate_half(x) * sin, one element a thread; the tables [seq, d] repeat
    /// every seq * d elements of x.
    #[cube(launch)]
    pub fn rotary_kernel(x: &Tensor<f32>, cos: &Tensor<f32>, sin: &Tensor<f32>, out: &mut Tensor<f32>, sign: f32) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let half = out.shape(out.rank() - 1) / 2;
        let t = i % cos.len();
        let rotated = if i % (2 * half) < half { -x[i + half] } else { x[i - half] };
        out[i] = x[i] * cos[t] + sign * rotated * sin[t];
    }

    /// Row `ABSOLUTE_POS` of the cross-entropy against `targets`: loss = log-sum-exp - the
    /// target's logit, grad = softmax - onehot(target).
    #[cube(launch)]
    pub fn cross_entropy_kernel(logits: &Tensor<f32>, targets: &Tensor<i32>, loss: &mut Tensor<f32>, grad: &mut Tensor<f32>) {
        let row = ABSOLUTE_POS;
        if row >= loss.len() {
            terminate!();
        }
        let vocab = logits.shape(1);
        let at = row * vocab;
        let mut max = f32::new(-3.0e38);
        for k in 0..vocab {
            max = f32::max(max, logits[at + k]);
        }
        let mut sum = 0.0f32;
        for k in 0..vocab {
            sum += f32::exp(logits[at + k] - max);
        }
        let lse = max + f32::ln(sum);
        let target = usize::cast_from(targets[row]);
        loss[row] = lse - logits[at + target];
        for k in 0..vocab {
            grad[at + k] = f32::exp(logits[at + k] - lse);
        }
        grad[at + target] -= 1.0f32;
    }

    /// Row `ABSOLUTE_POS` of softmax(scores + mask) over the keys; the mask's rows repeat every
    /// `queries` rows. A mask entry of -inf (below -1e30) gives 0 without inf arithmetic.
    #[cube(launch)]
    pub fn masked_softmax_kernel(scores: &Tensor<f32>, mask: &Tensor<f32>, out: &mut Tensor<f32>) {
        let keys = out.shape(out.rank() - 1);
        let queries = mask.shape(mask.rank() - 2);
        let row = ABSOLUTE_POS;
        if row * keys >= out.len() {
            terminate!();
        }
        let (at, mask_at) = (row * keys, (row % queries) * keys);
        let mut max = f32::new(-3.0e38);
        for k in 0..keys {
            let m = mask[mask_at + k];
            if m > -1.0e30f32 {
                max = f32::max(max, scores[at + k] + m);
            }
        }
        let mut sum = 0.0f32;
        for k in 0..keys {
            let m = mask[mask_at + k];
            let mut e = 0.0f32;
            if m > -1.0e30f32 {
                e = f32::exp(scores[at + k] + m - max);
            }
            out[at + k] = e;
            sum += e;
        }
        for k in 0..keys {
            out[at + k] = out[at + k] / sum;
        }
    }

    /// Row `ABSOLUTE_POS` of probs * (grad - sum(grad * probs)).
    #[cube(launch)]
    pub fn softmax_backward_kernel(probs: &Tensor<f32>, grad: &Tensor<f32>, out: &mut Tensor<f32>) {
        let keys = out.shape(out.rank() - 1);
        let row = ABSOLUTE_POS;
        if row * keys >= out.len() {
            terminate!();
        }
        let at = row * keys;
        let mut dot = 0.0f32;
        for k in 0..keys {
            dot += grad[at + k] * probs[at + k];
        }
        for k in 0..keys {
            out[at + k] = probs[at + k] * (grad[at + k] - dot);
        }
    }
}

/// The inputs contiguous, and an f32 output shaped like the first.
fn prepare<const N: usize>(inputs: [CubeTensor; N]) -> ([CubeTensor; N], CubeTensor) {
    let inputs = inputs.map(burn_cubecl::kernel::into_contiguous);
    let first = &inputs[0];
    let out = empty_device_dtype(first.client.clone(), first.device.clone(), first.shape(), DType::F32);
    (inputs, out)
}

/// Launches `kernel` with `count` threads on `out`'s device: the tensors, then `out`, then scalars.
macro_rules! launch {
    ($kernel:ident, $count:expr, [$($tensor:expr),+], $out:expr $(, $scalar:expr)*) => {{
        let count = ($count).max(1);
        let dim = CubeDim::new(&$out.client, count);
        let cubes = calculate_cube_count_elemwise(&$out.client, count, dim);
        kernels::$kernel::launch(&$out.client, cubes, dim, $($tensor.into_tensor_arg()),+, $out.clone().into_tensor_arg() $(, $scalar)*);
    }};
}

fn all_f32(tensors: &[&CubeTensor]) -> bool {
    tensors.iter().all(|t| t.dtype == DType::F32)
}

/// Rows of the last axis.
fn rows(t: &CubeTensor) -> usize {
    let shape = t.shape();
    shape.num_elements() / shape[shape.num_dims() - 1].max(1)
}

impl FusedOps for Cube {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if !all_f32(&[&x, &weight]) {
            return composed::rms_norm::<Self>(x, weight, eps);
        }
        let ([x, weight], out) = prepare([x, weight]);
        launch!(rms_norm_kernel, rows(&out), [x, weight], out, eps as f32);
        out
    }

    fn rms_norm_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if !all_f32(&[&x, &weight, &grad]) {
            return composed::rms_norm_backward::<Self>(x, weight, grad, eps);
        }
        let ([x, grad, weight], out) = prepare([x, grad, weight]);
        launch!(rms_norm_backward_kernel, rows(&out), [x, weight, grad], out, eps as f32);
        out
    }

    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, inverse: bool) -> FloatTensor<Self> {
        if !all_f32(&[&x, &cos, &sin]) {
            return composed::rotary::<Self>(x, cos, sin, inverse);
        }
        let ([x, cos, sin], out) = prepare([x, cos, sin]);
        launch!(rotary_kernel, out.shape().num_elements(), [x, cos, sin], out, if inverse { -1.0f32 } else { 1.0 });
        out
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&gate, &up]) {
            return composed::swiglu::<Self>(gate, up);
        }
        let ([gate, up], out) = prepare([gate, up]);
        launch!(swiglu_kernel, out.shape().num_elements(), [gate, up], out);
        out
    }

    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&gate, &up, &grad]) {
            return composed::swiglu_backward::<Self>(gate, up, grad);
        }
        let ([gate, up, grad], d_gate) = prepare([gate, up, grad]);
        let d_up = empty_device_dtype(d_gate.client.clone(), d_gate.device.clone(), d_gate.shape(), DType::F32);
        launch!(swiglu_backward_kernel, d_up.shape().num_elements(), [gate, up, grad, d_gate.clone()], d_up);
        (d_gate, d_up)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&logits]) || targets.dtype != DType::I32 {
            return composed::cross_entropy::<Self>(logits, targets);
        }
        let ([logits, targets], grad) = prepare([logits, targets]);
        let rows = logits.shape()[0];
        let loss = empty_device_dtype(grad.client.clone(), grad.device.clone(), [rows].into(), DType::F32);
        launch!(cross_entropy_kernel, rows, [logits, targets, loss.clone()], grad);
        (loss, grad)
    }

    fn masked_softmax(scores: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&scores, &mask]) {
            return composed::masked_softmax::<Self>(scores, mask);
        }
        let ([scores, mask], out) = prepare([scores, mask]);
        launch!(masked_softmax_kernel, rows(&out), [scores, mask], out);
        out
    }

    fn softmax_backward(probs: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&probs, &grad]) {
            return composed::softmax_backward::<Self>(probs, grad);
        }
        let ([probs, grad], out) = prepare([probs, grad]);
        launch!(softmax_backward_kernel, rows(&out), [probs, grad], out);
        out
    }
}
