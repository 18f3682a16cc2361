//! [`FusedOps`] on burn's CPU backend: each operation one pass over its rows, split across
//! rayon's pool, with exp written as a polynomial the compiler vectorises (pulp picks AVX-512,
//! AVX2 or plain code at run time). Inputs that are not f32 take the trait's composed path.

use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{DType, Flex, TensorMetadata};
use burn::tensor::{Shape, TensorData};
use rayon::prelude::*;

use super::quant::{QuantOps, ROW_BY_ROW, layout};
use super::{Activation, AdamWStep, FusedOps, GELU_C, GELU_K, InnerOps, composed};
use crate::io::quant::{QuantType, RowLayout};

/// Elements one parallel task takes at least: below this, handing work out costs more than it saves.
const GRAIN: usize = 1 << 14;

/// Runs `kernel` compiled for the best vector instruction set this CPU has: pulp calls its
/// `with_simd` from a function built for that set, and everything `with_simd` does is inlined
/// there (the kernels' bodies and the `#[inline(always)]` helpers), so the loops vectorise.
fn vectorised<K: pulp::WithSimd>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(kernel)
}

/// Declares a kernel: a struct of the slices it works on whose `with_simd` is `$body`.
macro_rules! kernel {
    ($name:ident { $($field:ident: $ty:ty),* } -> $out:ty, |$this:ident| $body:block) => {
        struct $name<'a> { $($field: $ty),* }
        impl pulp::WithSimd for $name<'_> {
            type Output = $out;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) -> $out {
                let $this = self;
                $body
            }
        }
    };
}

/// exp(x) in f32 to within 2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
/// polynomial for exp(r), times 2^n built in the exponent bits); branch-free so that loops over
/// it vectorise. exp(x) = 0 below -87 (e^-87 is about f32's smallest normal), inf above ln(f32::MAX), NaN
/// stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.75);
    let n = (xc * std::f32::consts::LOG2_E).round_ties_even();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    // 2^n for n <= 127 in the exponent bits, times 2 for n = 128 (e^x up to f32::MAX)
    let e = (p * r * r + r + 1.0) * f32::from_bits(((n.min(127.0) as i32 + 127) as u32) << 23) * if n > 127.0 { 2.0 } else { 1.0 };
    if x < -87.0 {
        0.0
    } else if x > 88.722_84 {
        f32::INFINITY
    } else {
        e
    }
}

/// 1 / (1 + exp(-x)), from exp(-|x|) <= 1 so that neither side overflows.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let q = 1.0 / (1.0 + e);
    if x >= 0.0 { q } else { e * q }
}

/// Lanes of the running max and sum: written as 16 independent accumulators, the reductions
/// vectorise (one AVX-512 register) without reordering what the compiler may not reorder.
const LANES: usize = 16;

#[inline(always)]
fn row_max(row: &[f32], mask: Option<&[f32]>) -> f32 {
    let at = |i: usize| row[i] + mask.map_or(0.0, |m| m[i]);
    let mut acc = [f32::NEG_INFINITY; LANES];
    let body = row.len() / LANES * LANES;
    for start in (0..body).step_by(LANES) {
        for (lane, a) in acc.iter_mut().enumerate() {
            *a = a.max(at(start + lane));
        }
    }
    (body..row.len()).map(at).chain(acc).fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

/// out = softmax(row + mask); returns the row's max and the sum of exp(row + mask - max) (for
/// the log-sum-exp).
#[inline(always)]
fn softmax_row(row: &[f32], mask: Option<&[f32]>, out: &mut [f32]) -> (f32, f32) {
    let max = row_max(row, mask);
    match mask {
        Some(mask) => out.iter_mut().zip(row).zip(mask).for_each(|((o, &x), &m)| *o = exp(x + m - max)),
        None => out.iter_mut().zip(row).for_each(|(o, &x)| *o = exp(x - max)),
    }
    let total = sum(out);
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
    (max, total)
}

/// tanh(x) = 1 - 2 / (exp(2x) + 1): exact at the limits (exp overflowing to inf gives 1, to 0
/// gives -1) and, through [`exp`], vectorised.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// silu(x) and its slope (see [`Activation`]).
#[inline(always)]
fn silu(x: f32) -> (f32, f32) {
    let s = sigmoid(x);
    let a = x * s;
    (a, s * (1.0 + x - a))
}

/// gelu_tanh(x) and its slope (see [`Activation`]).
#[inline(always)]
fn gelu_tanh(x: f32) -> (f32, f32) {
    let x2 = x * x;
    let t = tanh(GELU_C * x * (1.0 + GELU_K * x2));
    (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_K * x2))
}

/// Runs `body` with `f` the (value, slope) function of `act`: chosen once, outside the loop that
/// applies it, and bound as the function itself, so that the loop inlines it and vectorises.
macro_rules! with_activation {
    ($act:expr, |$f:ident| $body:block) => {
        match $act {
            Activation::Silu => {
                let $f = silu;
                $body
            }
            Activation::GeluTanh => {
                let $f = gelu_tanh;
                $body
            }
        }
    };
}

kernel!(GatedKernel { gate: &'a [f32], up: &'a [f32], act: Activation, out: &'a mut [f32] } -> (), |k| {
    with_activation!(k.act, |f| {
        for ((o, &g), &u) in k.out.iter_mut().zip(k.gate).zip(k.up) {
            *o = f(g).0 * u;
        }
    });
});

kernel!(GatedBackwardKernel { gate: &'a [f32], up: &'a [f32], grad: &'a [f32], act: Activation, d_gate: &'a mut [f32], d_up: &'a mut [f32] } -> (), |k| {
    with_activation!(k.act, |f| {
        for ((((dg, du), &g), &u), &dy) in k.d_gate.iter_mut().zip(k.d_up.iter_mut()).zip(k.gate).zip(k.up).zip(k.grad) {
            let (a, slope) = f(g);
            *du = dy * a;
            *dg = dy * u * slope;
        }
    });
});

// Rows of `keys` scores, the first at the mask's first row: out = softmax(scores + mask) row by
// row (`mask` as long as `scores`).
kernel!(MaskedSoftmaxKernel { scores: &'a [f32], mask: &'a [f32], keys: usize, out: &'a mut [f32] } -> (), |k| {
    for ((out, scores), mask) in k.out.chunks_exact_mut(k.keys).zip(k.scores.chunks_exact(k.keys)).zip(k.mask.chunks_exact(k.keys)) {
        softmax_row(scores, Some(mask), out);
    }
});

// Consecutive rows of `keys` values: out = p * (g - sum(g * p)) row by row.
kernel!(SoftmaxBackwardKernel { probs: &'a [f32], grad: &'a [f32], keys: usize, out: &'a mut [f32] } -> (), |k| {
    for ((out, p), dy) in k.out.chunks_exact_mut(k.keys).zip(k.probs.chunks_exact(k.keys)).zip(k.grad.chunks_exact(k.keys)) {
        out.iter_mut().zip(p).zip(dy).for_each(|((o, &p), &g)| *o = g * p);
        let dot = sum(out);
        out.iter_mut().zip(p).zip(dy).for_each(|((o, &p), &g)| *o = p * (g - dot));
    }
});

/// 1 / sqrt(mean(x^2) + eps) of one row.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mut squares = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        squares.iter_mut().zip(chunk).for_each(|(s, &v)| *s += v * v);
    }
    1.0 / ((squares.iter().sum::<f32>() + tail) / x.len() as f32 + eps).sqrt()
}

// Consecutive rows of `weight.len()` values: out = x * inv_rms(x) * weight row by row.
kernel!(RmsNormKernel { x: &'a [f32], weight: &'a [f32], eps: f32, out: &'a mut [f32] } -> (), |k| {
    for (out, x) in k.out.chunks_exact_mut(k.weight.len()).zip(k.x.chunks_exact(k.weight.len())) {
        let r = inv_rms(x, k.eps);
        out.iter_mut().zip(x).zip(k.weight).for_each(|((o, &x), &w)| *o = x * r * w);
    }
});

// Consecutive rows: out = r g - x r^3 mean(g x), g = grad * weight, row by row.
kernel!(RmsNormBackwardKernel { x: &'a [f32], weight: &'a [f32], grad: &'a [f32], eps: f32, out: &'a mut [f32] } -> (), |k| {
    let d = k.weight.len();
    for ((out, x), dy) in k.out.chunks_exact_mut(d).zip(k.x.chunks_exact(d)).zip(k.grad.chunks_exact(d)) {
        let r = inv_rms(x, k.eps);
        out.iter_mut().zip(dy).zip(k.weight).for_each(|((o, &g), &w)| *o = g * w);
        let gx: f32 = out.iter().zip(x).map(|(g, x)| g * x).sum();
        let c = r * r * r * gx / d as f32;
        out.iter_mut().zip(x).for_each(|(o, &x)| *o = r * *o - x * c);
    }
});

// One row: out = softmax(logits); returns its max and sum of exp(logits - max).
kernel!(SoftmaxRowKernel { logits: &'a [f32], out: &'a mut [f32] } -> (f32, f32), |k| {
    softmax_row(k.logits, None, k.out)
});

// One AdamW step over a run of elements: the moments and the parameter in place.
kernel!(AdamWKernel { grad: &'a [f32], param: &'a mut [f32], m: &'a mut [f32], v: &'a mut [f32], s: AdamWStep } -> (), |k| {
    let s = k.s;
    for (((p, m), v), &g) in k.param.iter_mut().zip(k.m.iter_mut()).zip(k.v.iter_mut()).zip(k.grad) {
        let g = g * s.grad_scale;
        *m = s.beta1 * *m + s.one_minus_beta1 * g;
        *v = s.beta2 * *v + s.one_minus_beta2 * g * g;
        *p = *p * s.decay - s.step_size * (*m / ((*v).sqrt() * s.inv_sqrt_bias2 + s.eps));
    }
});

// The sum of squares of a run of elements (16 lanes, as `sum`).
kernel!(SumSquaresKernel { x: &'a [f32] } -> f32, |k| {
    let mut acc = [0.0f32; LANES];
    let mut chunks = k.x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v * v;
        }
    }
    chunks.remainder().iter().map(|v| v * v).sum::<f32>() + acc.iter().sum::<f32>()
});

/// `t` as a tensor whose storage is its values in order from the start (so it can be written
/// as one slice): itself, or a contiguous copy.
fn whole(t: FlexTensor) -> FlexTensor {
    let n = t.layout().num_elements();
    if t.is_contiguous() && t.layout().start_offset() == 0 && t.bytes().len() == 4 * n { t } else { t.to_contiguous() }
}

/// The tensor's values, in order (a copy only where it is a strided view).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => v.into(),
        None => t.to_contiguous().as_slice::<f32>().expect("contiguous f32").to_vec().into(),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn all_f32(tensors: &[&FlexTensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// Whole rows (or mask blocks) of `d` values, about GRAIN elements a task.
fn row_task(d: usize) -> usize {
    d * (GRAIN / d.max(1)).max(1)
}

impl FusedOps for Flex {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let d = weight.shape().num_elements();
        if !all_f32(&[&x, &weight]) || d == 0 || x.shape()[x.shape().num_dims() - 1] != d {
            return composed::rms_norm::<Self>(x, weight, eps);
        }
        let (v, w) = (values(&x), values(&weight));
        let mut out = vec![0.0f32; v.len()];
        out.par_chunks_mut(row_task(d))
            .zip(v.par_chunks(row_task(d)))
            .for_each(|(out, x)| vectorised(RmsNormKernel { x, weight: &w, eps: eps as f32, out }));
        tensor(out, x.shape())
    }

    fn rms_norm_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let d = weight.shape().num_elements();
        if !all_f32(&[&x, &weight, &grad]) || d == 0 || x.shape() != grad.shape() || x.shape()[x.shape().num_dims() - 1] != d {
            return composed::rms_norm_backward::<Self>(x, weight, grad, eps);
        }
        let (v, w, dy) = (values(&x), values(&weight), values(&grad));
        let mut out = vec![0.0f32; v.len()];
        out.par_chunks_mut(row_task(d))
            .zip(v.par_chunks(row_task(d)))
            .zip(dy.par_chunks(row_task(d)))
            .for_each(|((out, x), grad)| vectorised(RmsNormBackwardKernel { x, weight: &w, grad, eps: eps as f32, out }));
        tensor(out, x.shape())
    }

    fn gated(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        if !all_f32(&[&gate, &up]) || gate.shape() != up.shape() {
            return composed::gated::<Self>(gate, up, act);
        }
        let (g, u) = (values(&gate), values(&up));
        let mut out = vec![0.0f32; g.len()];
        out.par_chunks_mut(GRAIN)
            .zip(g.par_chunks(GRAIN))
            .zip(u.par_chunks(GRAIN))
            .for_each(|((out, gate), up)| vectorised(GatedKernel { gate, up, act, out }));
        tensor(out, gate.shape())
    }

    fn gated_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&gate, &up, &grad]) || gate.shape() != up.shape() || gate.shape() != grad.shape() {
            return composed::gated_backward::<Self>(gate, up, grad, act);
        }
        let shape = gate.shape();
        let (g, u, dy) = (values(&gate), values(&up), values(&grad));
        let (mut d_gate, mut d_up) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
        d_gate
            .par_chunks_mut(GRAIN)
            .zip(d_up.par_chunks_mut(GRAIN))
            .zip(g.par_chunks(GRAIN))
            .zip(u.par_chunks(GRAIN))
            .zip(dy.par_chunks(GRAIN))
            .for_each(|((((d_gate, d_up), gate), up), grad)| vectorised(GatedBackwardKernel { gate, up, grad, act, d_gate, d_up }));
        (tensor(d_gate, shape.clone()), tensor(d_up, shape))
    }

    fn masked_softmax(scores: FloatTensor<Self>, mask: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = scores.shape();
        let keys = shape[shape.num_dims() - 1];
        let mask_len = mask.shape().num_elements();
        if !all_f32(&[&scores, &mask]) || keys == 0 || mask_len % keys != 0 || mask_len == 0 {
            return composed::masked_softmax::<Self>(scores, mask);
        }
        let (x, m) = (values(&scores), values(&mask));
        let mut out = vec![0.0f32; x.len()];
        // tasks of whole mask blocks, so that each starts at the mask's first row
        let task = row_task(mask_len);
        out.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(out, scores)| {
            for (out, scores) in out.chunks_mut(mask_len).zip(scores.chunks(mask_len)) {
                vectorised(MaskedSoftmaxKernel { scores, mask: &m[..scores.len()], keys, out });
            }
        });
        tensor(out, shape)
    }

    fn softmax_backward(probs: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = probs.shape();
        let keys = shape[shape.num_dims() - 1];
        if !all_f32(&[&probs, &grad]) || probs.shape() != grad.shape() || keys == 0 {
            return composed::softmax_backward::<Self>(probs, grad);
        }
        let (p, dy) = (values(&probs), values(&grad));
        let mut out = vec![0.0f32; p.len()];
        let task = row_task(keys);
        out.par_chunks_mut(task)
            .zip(p.par_chunks(task))
            .zip(dy.par_chunks(task))
            .for_each(|((out, probs), grad)| vectorised(SoftmaxBackwardKernel { probs, grad, keys, out }));
        tensor(out, shape)
    }

    /// In place where the trainer gave the tensors up (the moments always; the parameter where
    /// nothing else holds it), a copy first otherwise; no temporaries.
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let shape = param.shape();
        if !all_f32(&[&param, &grad, &m, &v]) || [grad.shape(), m.shape(), v.shape()].iter().any(|d| *d != shape) {
            return composed::adamw::<Self>(param, grad, m, v, s);
        }
        let g = values(&grad);
        let [mut param, mut m, mut v] = [param, m, v].map(whole);
        let (p_all, m_all, v_all) = (param.storage_mut::<f32>(), m.storage_mut::<f32>(), v.storage_mut::<f32>());
        p_all
            .par_chunks_mut(GRAIN)
            .zip(m_all.par_chunks_mut(GRAIN))
            .zip(v_all.par_chunks_mut(GRAIN))
            .zip(g.par_chunks(GRAIN))
            .for_each(|(((param, m), v), grad)| vectorised(AdamWKernel { grad, param, m, v, s }));
        (param, m, v)
    }

    /// One pass over x, no squared copy of it (a gradient can be the size of the embedding).
    fn sum_squares_into(sums: FloatTensor<Self>, x: FloatTensor<Self>, slot: usize) -> FloatTensor<Self> {
        if !all_f32(&[&sums, &x]) {
            return composed::sum_squares_into::<Self>(sums, x, slot);
        }
        let total: f32 = values(&x).par_chunks(GRAIN).map(|x| vectorised(SumSquaresKernel { x })).sum();
        let mut sums = whole(sums);
        sums.storage_mut::<f32>()[slot] = total;
        sums
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = logits.shape();
        let [rows, vocab] = shape.dims::<2>();
        let ids = targets.to_contiguous();
        let ids: Option<Vec<i64>> = match ids.dtype() {
            DType::I64 => ids.as_slice::<i64>().map(<[i64]>::to_vec),
            DType::I32 => ids.as_slice::<i32>().map(|ids| ids.iter().map(|&t| i64::from(t)).collect()),
            _ => None,
        };
        let Some(targets) = ids.filter(|ids| ids.len() == rows && vocab > 0 && all_f32(&[&logits])) else {
            return composed::cross_entropy::<Self>(logits, targets);
        };
        let z = values(&logits);
        let mut grad = vec![0.0f32; rows * vocab];
        let loss: Vec<f32> = grad
            .par_chunks_mut(vocab)
            .zip(z.par_chunks(vocab))
            .zip(&targets)
            .map(|((out, logits), &target)| {
                let (max, total) = vectorised(SoftmaxRowKernel { logits, out });
                match usize::try_from(target).ok().filter(|&t| t < vocab) {
                    Some(t) => {
                        out[t] -= 1.0;
                        max + total.ln() - logits[t]
                    }
                    None => f32::NAN, // not a token of this vocabulary: no loss to give
                }
            })
            .collect();
        (tensor(loss, [rows].into()), tensor(grad, shape))
    }
}

/// The words of a quantized matrix as u32 (a copy only where it is a strided view).
fn words(t: &FlexTensor) -> std::borrow::Cow<'_, [u32]> {
    match t.as_slice::<i32>() {
        Some(w) => bytemuck::cast_slice(w).into(),
        None => {
            let t = t.to_contiguous();
            match t.dtype() {
                DType::I32 => t.as_slice::<i32>().expect("contiguous").iter().map(|&w| w as u32).collect(),
                DType::I64 => t.as_slice::<i64>().expect("contiguous").iter().map(|&w| w as u32).collect(),
                other => panic!("quantized words must be an Int tensor, not {other:?}"),
            }
        }
    }
}

/// The composed LoRA steps, and no attention kernels: autodiff records the composed steps,
/// whose matmuls and softmax are this backend's own vectorised passes.
impl InnerOps for Flex {}

impl QuantOps for Flex {
    fn dequantize_rows(words_t: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        let l = layout(kind, cols);
        let w = words(&words_t);
        let rows = w.len() / l.words;
        let mut out = vec![0.0f32; rows * cols];
        let task = QUANT_ROWS_PER_TASK;
        out.par_chunks_mut(task * cols)
            .zip(w.par_chunks(task * l.words))
            .for_each(|(out, words)| vectorised(DequantizeRowsKernel { layout: &l, words, out }));
        tensor(out, [rows, cols].into())
    }

    /// Few rows of x (decoding): each weight row's dot products taken group by group straight
    /// from its codes, `Σ scale · (Σ q x) + Σ offset · (Σ x)` (x's sums per group computed once),
    /// split across rayon's pool by runs of weight rows: nothing is dequantized into memory.
    fn quant_matmul(x: FloatTensor<Self>, words_t: IntTensor<Self>, kind: QuantType, cols: usize) -> FloatTensor<Self> {
        let [m, k] = x.shape().dims::<2>();
        if m > ROW_BY_ROW || k != cols || !all_f32(&[&x]) {
            let w = Self::dequantize_rows(words_t, kind, cols);
            return Self::float_matmul(x, Self::float_transpose(w));
        }
        let layout = layout(kind, cols);
        let (x, w) = (values(&x), words(&words_t));
        let x_sums: Vec<f32> = x.chunks_exact(layout.group).map(|g| g.iter().sum()).collect();
        let rows = w.len() / layout.words;
        let mut out_t = vec![0.0f32; rows * m]; // [rows, m], transposed at the end
        let task = QUANT_ROWS_PER_TASK;
        out_t.par_chunks_mut(task * m).zip(w.par_chunks(task * layout.words)).for_each_init(
            || vec![0.0f32; 2 * (cols / layout.group)],
            |scratch, (out, words)| vectorised(QuantRowsKernel { layout: &layout, words, x: &x, x_sums: &x_sums, scratch, out }),
        );
        let out = (0..m).flat_map(|i| out_t.iter().skip(i).step_by(m).copied()).collect();
        tensor(out, [m, rows].into())
    }
}

/// Weight rows one parallel task takes (a few kB of words).
const QUANT_ROWS_PER_TASK: usize = 32;

// Consecutive quantized rows `words` into their values `out`.
kernel!(DequantizeRowsKernel { layout: &'a RowLayout, words: &'a [u32], out: &'a mut [f32] } -> (), |k| {
    for (row, out) in k.words.chunks_exact(k.layout.words).zip(k.out.chunks_exact_mut(k.layout.cols)) {
        k.layout.dequantize_row(row, out);
    }
});

// Consecutive quantized weight rows `words`: out[r, i] = row r · x[i] for every row i of x.
kernel!(QuantRowsKernel { layout: &'a RowLayout, words: &'a [u32], x: &'a [f32], x_sums: &'a [f32], scratch: &'a mut [f32], out: &'a mut [f32] } -> (), |k| {
    // one instance per code layout, each inlined here (a function pointer would not be vectorised)
    match (k.layout.group, k.layout.low_bits, k.layout.high_bits) {
        (32, 8, 0) => rows_dot::<32, 8, 0>(k),
        (32, 4, 0) => rows_dot::<32, 4, 0>(k),
        (32, 4, 1) => rows_dot::<32, 4, 1>(k),
        (16, 4, 2) => rows_dot::<16, 4, 2>(k),
        other => unreachable!("no quantized type has the codes {other:?}"),
    }
});

#[inline(always)]
fn rows_dot<const G: usize, const L: u32, const H: u32>(k: QuantRowsKernel) {
    let l = k.layout;
    let m = k.x.len() / l.cols;
    let groups = l.cols / l.group;
    let (scales, offsets) = k.scratch.split_at_mut(groups);
    for (row, out) in k.words.chunks_exact(l.words).zip(k.out.chunks_exact_mut(m)) {
        l.scales_into(row, 0, scales);
        l.offsets_into(row, 0, scales, offsets);
        for (i, o) in out.iter_mut().enumerate() {
            let (x, x_sums) = (&k.x[i * l.cols..(i + 1) * l.cols], &k.x_sums[i * groups..(i + 1) * groups]);
            *o = row_dot::<G, L, H>(l, row, x, scales) + dot(offsets, x_sums);
        }
    }
}

/// One quantized row · x without its offsets: per group of `G` codes of `L` low bits (and `H`
/// high bits above the fourth), `scale · Σ q x`, kept in 8 lanes across groups and summed once.
#[inline(always)]
fn row_dot<const G: usize, const L: u32, const H: u32>(l: &RowLayout, row: &[u32], x: &[f32], scales: &[f32]) -> f32 {
    let low_words = G * L as usize / 32;
    let high_words = G * H as usize / 32;
    let mut lanes = [0.0f32; 8];
    for (g, (x, &scale)) in x.chunks_exact(G).zip(scales).enumerate() {
        let low = &row[g * low_words..(g + 1) * low_words];
        let high = &row[l.high_at + g * high_words..l.high_at + (g + 1) * high_words];
        let qx = group_dot::<G, L, H>(low, high, x);
        lanes.iter_mut().zip(qx).for_each(|(lane, qx)| *lane += scale * qx);
    }
    lanes.iter().sum()
}

/// Σ a b in 8 lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (a, b) in a8.zip(b8) {
        lanes.iter_mut().zip(a).zip(b).for_each(|((lane, x), y)| *lane += x * y);
    }
    tail + lanes.iter().sum::<f32>()
}

/// Σ q x over one group of `G` codes, in 8 lanes.
#[inline(always)]
fn group_dot<const G: usize, const L: u32, const H: u32>(low: &[u32], high: &[u32], x: &[f32]) -> [f32; 8] {
    let mut q = [0u32; G];
    if L == 8 {
        // a code per byte (little-endian words): read as bytes, which vectorises where shifting does not
        let bytes: &[u8] = bytemuck::cast_slice(low);
        q.iter_mut().zip(bytes).for_each(|(q, &b)| *q = u32::from(b));
    } else {
        let per_low = 32 / L as usize;
        for (j, q) in q.iter_mut().enumerate() {
            *q = (low[j / per_low] >> (L * (j % per_low) as u32)) & ((1 << L) - 1);
        }
    }
    if H > 0 {
        let per_high = 32 / H as usize;
        for (j, q) in q.iter_mut().enumerate() {
            *q |= ((high[j / per_high] >> (H * (j % per_high) as u32)) & ((1 << H) - 1)) << 4;
        }
    }
    let mut acc = [0.0f32; 8];
    for (q, x) in q.chunks_exact(8).zip(x.chunks_exact(8)) {
        for ((acc, &q), &x) in acc.iter_mut().zip(q).zip(x) {
            *acc += q as f32 * x;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our exp against f64's over f32's whole finite range of results, every 1/1000, through the
    /// vectorised path: within 2 ulp (a relative 2.4e-7); the edges exact.
    #[test]
    fn exp_is_within_two_ulp() {
        kernel!(ExpKernel { x: &'a [f32], out: &'a mut [f32] } -> (), |k| {
            k.out.iter_mut().zip(k.x).for_each(|(o, &x)| *o = exp(x));
        });
        let x: Vec<f32> = (-87_000..=88_722).map(|i| i as f32 / 1000.0).collect();
        let mut out = vec![0.0; x.len()];
        vectorised(ExpKernel { x: &x, out: &mut out });
        let worst = x.iter().zip(&out).map(|(&x, &e)| ((e as f64 - (x as f64).exp()) / (x as f64).exp()).abs()).fold(0.0, f64::max);
        assert!(worst < 2.0 * f32::EPSILON as f64, "max relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert!(sigmoid(f32::NAN).is_nan());
    }
}
