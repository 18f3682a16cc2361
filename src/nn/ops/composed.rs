//! The operations composed from burn's primitives: the traits' default bodies, what autodiff
//! records step by step where a backend has no kernel of its own, and what the CPU kernels fall
//! back to for inputs they do not take.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, FloatDType, TensorMetadata};
use burn::tensor::{IndexingUpdateOp, Slice, TensorData};

use super::{Activation, AdamWStep, Dropout, FusedOps, GELU_C, GELU_K};

/// (act(x), act'(x)) of [`Activation`] from burn's primitives; the slope only when `slope`.
fn activation<B: Backend>(x: FloatTensor<B>, act: Activation, slope: bool) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let mul = B::float_mul;
    let plus_one = |t| B::float_add_scalar(t, 1.0f32.into());
    match act {
        Activation::Silu => {
            let s = B::sigmoid(x.clone());
            let a = mul(x.clone(), s.clone());
            let slope = slope.then(|| mul(s, plus_one(B::float_sub(x, a.clone()))));
            (a, slope)
        }
        Activation::GeluTanh => {
            let x2 = mul(x.clone(), x.clone());
            let u = B::float_mul_scalar(mul(x.clone(), plus_one(B::float_mul_scalar(x2.clone(), GELU_K.into()))), GELU_C.into());
            let one_plus_t = plus_one(B::float_tanh(u));
            let half_x = B::float_mul_scalar(x, 0.5f32.into());
            let a = mul(half_x.clone(), one_plus_t.clone());
            let slope = slope.then(|| {
                // (1 + t)/2 + x/2 (1 - t^2) c (1 + 3k x^2), with 1 - t^2 = (1 + t)(2 - (1 + t))
                let one_minus_t2 = mul(one_plus_t.clone(), B::float_add_scalar(B::float_neg(one_plus_t.clone()), 2.0f32.into()));
                let du = B::float_mul_scalar(plus_one(B::float_mul_scalar(x2, (3.0 * GELU_K).into())), GELU_C.into());
                B::float_add(B::float_mul_scalar(one_plus_t, 0.5f32.into()), mul(mul(half_x, one_minus_t2), du))
            });
            (a, slope)
        }
    }
}

pub fn gated<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>, act: Activation) -> FloatTensor<B> {
    B::float_mul(activation::<B>(gate, act, false).0, up)
}

pub fn gated_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
    act: Activation,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (a, slope) = activation::<B>(gate, act, true);
    let d_up = B::float_mul(grad.clone(), a);
    (B::float_mul(B::float_mul(grad, up), slope.expect("asked for")), d_up)
}

/// 1 / sqrt(mean(x^2) + eps) over the last axis, kept as a size-1 axis; and `weight` shaped to
/// broadcast against x.
fn inv_rms<B: Backend>(x: &FloatTensor<B>, weight: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let last = shape.num_dims() - 1;
    let r = row_inv_rms::<B>(x, eps);
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

/// 1 / sqrt(mean(x^2) + eps) of each row (over the last axis), kept as an axis of 1.
fn row_inv_rms<B: Backend>(x: &FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let last = x.shape().num_dims() - 1;
    let mean_square = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), last);
    B::float_recip(B::float_sqrt(B::float_add_scalar(mean_square, (eps as f32).into())))
}

/// dL/dweight of RMSNorm from dL/dy: the sum over every row of grad * x * r, [d].
pub fn rms_norm_weight_grad<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let d = x.shape()[x.shape().num_dims() - 1];
    let r = row_inv_rms::<B>(&x, eps);
    let per_row = B::float_mul(B::float_mul(x, r), grad);
    let rows = per_row.shape().num_elements() / d;
    B::float_reshape(B::float_sum_dim(B::float_reshape(per_row, [rows, d].into()), 0), [d].into())
}

pub fn lora<B: Backend>(
    base: FloatTensor<B>,
    x: FloatTensor<B>,
    dropout: Option<Dropout<B>>,
    a_t: FloatTensor<B>,
    b_t: FloatTensor<B>,
    scaling: f32,
) -> FloatTensor<B> {
    lora_epilogue::<B>(base, lora_down::<B>(x, dropout, a_t), b_t, scaling)
}

pub fn lora_epilogue<B: Backend>(base: FloatTensor<B>, xa: FloatTensor<B>, b_t: FloatTensor<B>, scaling: f32) -> FloatTensor<B> {
    // scaled at rank r, where it is a pass over [tokens, r] rather than [tokens, out]
    B::float_add(base, B::float_matmul(B::float_mul_scalar(xa, scaling.into()), b_t))
}

/// x * mask * keep_scale, where there is dropout (the mask scaled first, as torch's inverted
/// dropout multiplies by the scaled mask).
fn dropped<B: Backend>(x: FloatTensor<B>, dropout: Option<Dropout<B>>) -> FloatTensor<B> {
    match dropout {
        Some(Dropout { mask, keep_scale }) => B::float_mul(x, B::float_mul_scalar(mask, keep_scale.into())),
        None => x,
    }
}

pub fn lora_down<B: Backend>(x: FloatTensor<B>, dropout: Option<Dropout<B>>, a_t: FloatTensor<B>) -> FloatTensor<B> {
    B::float_matmul(dropped::<B>(x, dropout), a_t)
}

#[allow(clippy::too_many_arguments)]
pub fn lora_backward<B: Backend>(
    x: FloatTensor<B>,
    dropout: Option<Dropout<B>>,
    a_t: FloatTensor<B>,
    b_t: FloatTensor<B>,
    xa: FloatTensor<B>,
    grad: FloatTensor<B>,
    scaling: f32,
    skip_x: bool,
) -> (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
    let gb = B::float_mul_scalar(B::float_matmul(grad.clone(), B::float_transpose(b_t)), scaling.into());
    let d_b = B::float_matmul(B::float_transpose(B::float_mul_scalar(xa, scaling.into())), grad);
    let d_a = B::float_matmul(B::float_transpose(dropped::<B>(x, dropout.clone())), gb.clone());
    let d_x = (!skip_x).then(|| dropped::<B>(B::float_matmul(gb, B::float_transpose(a_t)), dropout));
    (d_x, d_a, d_b)
}

pub fn adamw<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    m: FloatTensor<B>,
    v: FloatTensor<B>,
    s: AdamWStep,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let g = if s.grad_scale != 1.0 { B::float_mul_scalar(grad, s.grad_scale.into()) } else { grad };
    let param = B::float_mul_scalar(param, s.decay.into());
    let m = B::float_add(B::float_mul_scalar(m, s.beta1.into()), B::float_mul_scalar(g.clone(), s.one_minus_beta1.into()));
    let v = B::float_add(B::float_mul_scalar(v, s.beta2.into()), B::float_mul_scalar(B::float_mul(g.clone(), g), s.one_minus_beta2.into()));
    let denom = B::float_add_scalar(B::float_mul_scalar(B::float_sqrt(v.clone()), s.inv_sqrt_bias2.into()), s.eps.into());
    let param = B::float_sub(param, B::float_mul_scalar(B::float_div(m.clone(), denom), s.step_size.into()));
    (param, m, v)
}

pub fn sum_squares_into<B: Backend>(sums: FloatTensor<B>, x: FloatTensor<B>, slot: usize) -> FloatTensor<B> {
    let square_sum = B::float_reshape(B::float_sum(B::float_mul(x.clone(), x)), [1].into());
    B::float_slice_assign(sums, &[Slice::new(slot as isize, Some(slot as isize + 1), 1)], square_sum)
}

pub fn add_rms_norm<B: FusedOps>(
    x: FloatTensor<B>,
    delta: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let h = B::float_add(x, delta);
    (h.clone(), B::rms_norm(h, weight, eps))
}

/// Additive causal mask [1, 1, groups * seq, keys] for queries stacked per key/value head (see
/// [`attend`]) over keys at positions first..first + keys: row g * seq + i is query i, at position
/// start + i, which sees keys 0..=start + i, within a sliding `window` the last w of them. One
/// query row: a single row.
fn causal_mask<B: Backend>(
    start: usize,
    seq: usize,
    groups: usize,
    keys: (usize, usize),
    window: Option<usize>,
    device: &B::Device,
) -> FloatTensor<B> {
    let ((first, total), rows) = (keys, if seq == 1 { 1 } else { groups * seq });
    let window = window.unwrap_or(usize::MAX);
    let values: Vec<f32> = (0..rows)
        .flat_map(|row| {
            let at = start + row % seq;
            (first..first + total).map(move |j| if j > at || at - j >= window { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    B::float_from_data(TensorData::new(values, [1, 1, rows, total]), device)
}

/// [batch, seq, heads * d] as [batch, heads, seq, d].
fn heads<B: Backend>(x: FloatTensor<B>, d: usize) -> FloatTensor<B> {
    let [batch, seq, width] = x.shape().dims::<3>();
    B::float_swap_dims(B::float_reshape(x, [batch, seq, width / d, d].into()), 1, 2)
}

/// Entry `which` (0, or 1) of the leading axis of `t`, that axis dropped.
fn part<B: Backend>(t: FloatTensor<B>, which: usize) -> FloatTensor<B> {
    let shape = t.shape();
    let mut slices = vec![Slice::full(); shape.num_dims()];
    slices[0] = Slice::new(which as isize, Some(which as isize + 1), 1);
    let rest: Vec<usize> = (1..shape.num_dims()).map(|i| shape[i]).collect();
    B::float_reshape(B::float_slice(t, &slices), rest.into())
}

/// The rotary tables [2, seq, d] as (cos, sin) [1, 1, seq, d], each times `scale`.
fn cos_sin<B: Backend>(tables: FloatTensor<B>, scale: f32) -> (FloatTensor<B>, FloatTensor<B>) {
    let [_, seq, d] = tables.shape().dims::<3>();
    let table = |which| {
        let t = B::float_reshape(part::<B>(tables.clone(), which), [1, 1, seq, d].into());
        if scale == 1.0 { t } else { B::float_mul_scalar(t, scale.into()) }
    };
    (table(0), table(1))
}

pub fn kv_append<B: FusedOps>(
    kv: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    tables: FloatTensor<B>,
    start: usize,
) -> FloatTensor<B> {
    let d = kv.shape()[4];
    let seq = k.shape()[1];
    let (cos, sin) = cos_sin::<B>(tables, 1.0);
    let positions = Slice::new(start as isize, Some((start + seq) as isize), 1);
    let at =
        |which: usize| [Slice::new(which as isize, Some(which as isize + 1), 1), Slice::full(), Slice::full(), positions, Slice::full()];
    let one = |t: FloatTensor<B>| {
        let [b, h, s, d] = t.shape().dims::<4>();
        B::float_reshape(t, [1, b, h, s, d].into())
    };
    let kv = B::float_slice_assign(kv, &at(0), one(B::rotary(heads::<B>(k, d), cos, sin, false)));
    B::float_slice_assign(kv, &at(1), one(heads::<B>(v, d)))
}

pub fn self_attention<B: FusedOps>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    tables: FloatTensor<B>,
    scale: f32,
    window: Option<usize>,
) -> FloatTensor<B> {
    let d = tables.shape()[2];
    let (cos, sin) = cos_sin::<B>(tables.clone(), 1.0);
    let k = B::rotary(heads::<B>(k, d), cos, sin, false);
    attend::<B>(q, k, heads::<B>(v, d), tables, scale, 0, 0, window)
}

pub fn causal_attention<B: FusedOps>(
    q: FloatTensor<B>,
    kv: FloatTensor<B>,
    tables: FloatTensor<B>,
    scale: f32,
    start: usize,
    cached_from: usize,
    window: Option<usize>,
) -> FloatTensor<B> {
    let seq = q.shape()[1];
    let keys = start + seq - cached_from;
    // the keys and values filled so far
    let filled = [Slice::full(), Slice::full(), Slice::new(0, Some(keys as isize), 1), Slice::full()];
    let (k, v) = (B::float_slice(part::<B>(kv.clone(), 0), &filled), B::float_slice(part::<B>(kv, 1), &filled));
    attend::<B>(q, k, v, tables, scale, start, cached_from, window)
}

/// softmax(rope(q) k^T scale + causal mask) v for queries [batch, seq, heads * d] as projected,
/// at positions start.., and keys (turned) and values [batch, kv_heads, keys, d] at positions
/// `first`..; the mask within a sliding `window` where there is one.
fn attend<B: FusedOps>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    tables: FloatTensor<B>,
    scale: f32,
    start: usize,
    first: usize,
    window: Option<usize>,
) -> FloatTensor<B> {
    let [batch, seq, width] = q.shape().dims::<3>();
    let [_, kv_heads, keys, d] = k.shape().dims::<4>();
    let (cos, sin) = cos_sin::<B>(tables, scale);
    // the query heads that share a key/value head stacked along the sequence axis,
    // [b, kv_heads, groups * seq, d]: grouped-query attention without copying k and v per group
    let groups = width / d / kv_heads;
    let q = B::float_reshape(B::rotary(heads::<B>(q, d), cos, sin, false), [batch, kv_heads, groups * seq, d].into());
    let mask = causal_mask::<B>(start, seq, groups, (first, keys), window, &v.device());
    let probs = B::masked_softmax(B::float_matmul(q, B::float_swap_dims(k, 2, 3)), mask);
    let out = B::float_reshape(B::float_matmul(probs, v), [batch, width / d, seq, d].into());
    B::float_reshape(B::float_swap_dims(out, 1, 2), [batch, seq, width].into())
}

pub fn rotary<B: Backend>(x: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>, inverse: bool) -> FloatTensor<B> {
    let shape = x.shape();
    let (n, half) = (shape.num_dims(), shape[shape.num_dims() - 1] / 2);
    let half_from = |from: usize| {
        let mut slices = vec![Slice::full(); n];
        slices[n - 1] = Slice::new(from as isize, Some((from + half) as isize), 1);
        B::float_slice(x.clone(), &slices)
    };
    let rotated = B::float_cat(vec![B::float_neg(half_from(half)), half_from(0)], n - 1);
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
