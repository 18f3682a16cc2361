//! The fused operations as cubecl kernels (WebGPU in the browser, wgpu natively), one dispatch
//! each where burn's primitives take several: RMSNorm and its backward (7 and 12 kernels
//! composed), the residual add with the norm after it, the rotary embedding (its own backward:
//! ~6), the head's cross-entropy with its gradient (~12), SwiGLU and its backward (3 and 8),
//! attention's masked softmax and its backward (6 and 4), LoRA's update (x A^T, then the rank-r
//! product added where the output is written; its backward four rank-r kernels), an AdamW step
//! and a gradient's sum of squares (~14 and 2).
//!
//! Attention reads the key/value cache ([2, batch, kv_heads, capacity, d]: keys turned, then
//! values) with one workgroup per query row and one thread per dimension of the head, under an
//! online softmax, so no [queries, keys] tensor exists (flash attention's idea, unblocked: a
//! decoded token has one query row); the cache's append turns the keys on the way in. Training's
//! self-attention lays the run's keys and values out the same way and keeps each row's
//! log-sum-exp; its backward is three kernels (each row's grad . out, then dL/dq a query row a
//! workgroup, then dL/dk and dL/dv a key a workgroup), writing the projections' layouts with the
//! rotation undone. No kernel binds more than 7 tensors: WebGPU's default limit is 8 storage
//! buffers per stage, and cubecl adds one for shapes.
//!
//! A row of RMSNorm, of a softmax or of the cross-entropy is one thread's loop: the rows are
//! short (hidden size, keys) or few (the head's positions, a few at a time). Other dtypes than
//! f32 go the composed way.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Cube, DType, TensorMetadata};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::{CubeCount, CubeDim};

use super::{Activation, AdamWStep, Dropout, FusedOps, InnerOps, SavedAttention, composed};

mod kernels {
    use cubecl::prelude::*;
    use cubecl::terminate;

    #[cube]
    fn sigmoid(x: f32) -> f32 {
        1.0f32 / (1.0f32 + f32::exp(-x))
    }

    /// tanh(x) = 1 - 2 / (exp(2x) + 1), exact at the limits (WGSL's tanh may be NaN for large x).
    #[cube]
    fn tanh(x: f32) -> f32 {
        1.0f32 - 2.0f32 / (f32::exp(2.0f32 * x) + 1.0f32)
    }

    /// The gated MLP's activation of x and its slope ([`super::Activation`]): gelu_tanh when
    /// `gelu`, silu otherwise.
    #[cube]
    fn activation(x: f32, #[comptime] gelu: bool) -> (f32, f32) {
        if gelu {
            let x2 = x * x;
            let t = tanh(f32::new(crate::nn::ops::GELU_C) * x * (1.0f32 + f32::new(crate::nn::ops::GELU_K) * x2));
            let slope = 0.5f32 * (1.0f32 + t)
                + 0.5f32 * x * (1.0f32 - t * t) * f32::new(crate::nn::ops::GELU_C) * (1.0f32 + f32::new(3.0 * crate::nn::ops::GELU_K) * x2);
            (0.5f32 * x * (1.0f32 + t), slope)
        } else {
            let s = sigmoid(x);
            let a = x * s;
            (a, s * (1.0f32 + x - a))
        }
    }

    #[cube(launch)]
    pub fn gated_kernel(gate: &Tensor<f32>, up: &Tensor<f32>, out: &mut Tensor<f32>, #[comptime] gelu: bool) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let (a, _) = activation(gate[i], gelu);
        out[i] = a * up[i];
    }

    #[cube(launch)]
    pub fn gated_backward_kernel(
        gate: &Tensor<f32>,
        up: &Tensor<f32>,
        grad: &Tensor<f32>,
        d_gate: &mut Tensor<f32>,
        d_up: &mut Tensor<f32>,
        #[comptime] gelu: bool,
    ) {
        let i = ABSOLUTE_POS;
        if i >= d_up.len() {
            terminate!();
        }
        let dy = grad[i];
        let (a, slope) = activation(gate[i], gelu);
        d_up[i] = dy * a;
        d_gate[i] = dy * up[i] * slope;
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

    /// Row `ABSOLUTE_POS` of h = x + delta, and of h * inv_rms(h) * weight.
    #[cube(launch)]
    pub fn add_rms_norm_kernel(
        x: &Tensor<f32>,
        delta: &Tensor<f32>,
        weight: &Tensor<f32>,
        h: &mut Tensor<f32>,
        out: &mut Tensor<f32>,
        eps: f32,
    ) {
        let (d, at) = (weight.len(), ABSOLUTE_POS * weight.len());
        if at >= out.len() {
            terminate!();
        }
        let mut sum = 0.0f32;
        for k in 0..d {
            let v = x[at + k] + delta[at + k];
            h[at + k] = v;
            sum += v * v;
        }
        let r = 1.0f32 / f32::sqrt(sum / f32::cast_from(d) + eps);
        for k in 0..d {
            out[at + k] = h[at + k] * r * weight[k];
        }
    }

    /// This workgroup's row (b * seq + position, of queries or of keys) in the attention kernels,
    /// which run `rows` of them: rows go along the grid's y and then z axes (WebGPU allows 65,535
    /// workgroups an axis), and the last z slice's surplus workgroups end here (whole
    /// workgroups, so the barriers after stay in uniform control flow).
    #[cube]
    fn grid_row(rows: usize) -> usize {
        let row = CUBE_POS_Y as usize + CUBE_POS_Z as usize * CUBE_COUNT_Y as usize;
        if row >= rows {
            terminate!();
        }
        row
    }

    /// x at `at` turned by the rotary tables [2, seq, d] (cos, then sin) at their row `row`:
    /// x * cos + rotate_half(x) * sin, for the element `e` of a head of size d (`at` is its index
    /// in x).
    #[cube]
    fn turned(x: &Tensor<f32>, at: usize, e: usize, tables: &Tensor<f32>, row: usize, d: usize) -> f32 {
        let half = d / 2;
        let rotated = if e < half { -x[at + half] } else { x[at - half] };
        let t = row * d + e;
        x[at] * tables[t] + rotated * tables[tables.len() / 2 + t]
    }

    /// Element `e` of R^T y for the rotation R of the tables' row `row`, from y_e and its partner
    /// y_{e+h} (e < h) or y_{e-h}, h = d / 2: y_e cos_e + y_{e+h} sin_{e+h}, or y_e cos_e -
    /// y_{e-h} sin_{e-h}.
    #[cube]
    fn turned_back(y: f32, partner: f32, e: usize, tables: &Tensor<f32>, row: usize, d: usize) -> f32 {
        let (half, sin) = (d / 2, tables.len() / 2 + row * d);
        let other = if e < half { partner * tables[sin + e + half] } else { -partner * tables[sin + e - half] };
        y * tables[row * d + e] + other
    }

    /// The index of e's partner in a head of size d under rotate_half.
    #[cube]
    fn partner(e: usize, d: usize) -> usize {
        if e < d / 2 { e + d / 2 } else { e - d / 2 }
    }

    /// Element `ABSOLUTE_POS` of k (turned by the rotary tables) and of v, [batch, seq, kv_heads
    /// * d] as projected, written into the cache kv [2, batch, kv_heads, capacity, d] at position
    /// start + its own.
    #[cube(launch)]
    pub fn kv_append_kernel(k: &Tensor<f32>, v: &Tensor<f32>, tables: &Tensor<f32>, kv: &mut Tensor<f32>, start: u32) {
        let i = ABSOLUTE_POS;
        if i >= k.len() {
            terminate!();
        }
        let (kv_heads, capacity, d) = (kv.shape(2), kv.shape(3), kv.shape(4));
        let seq = k.shape(1);
        let (e, head, pos, b) = (i % d, (i / d) % kv_heads, (i / (d * kv_heads)) % seq, i / (d * kv_heads * seq));
        let to = ((b * kv_heads + head) * capacity + start as usize + pos) * d + e;
        let values = kv.len() / 2;
        kv[to] = turned(k, i, e, tables, pos, d);
        kv[values + to] = v[i];
    }

    /// The first key a query at `position` sees: position + 1 - window, or 0.
    #[cube]
    fn first_key(position: usize, window: u32) -> usize {
        let mut first = 0usize;
        if position >= window as usize {
            first = position + 1 - window as usize;
        }
        first
    }

    /// Causal attention of one query: cube (head, b * seq + i), one thread per dimension of the
    /// head (`d` of them). The query, [batch, seq, heads * d] as projected, is turned by its
    /// tables and scaled into shared memory; the keys 0..=start + i of its key/value head in `kv`
    /// (the last `window` of them; slot s of the cache holds position `cached_from` + s) go by
    /// in chunks of d, one key's score a thread, under an online softmax (the running
    /// maximum m, the sum l of exp(score - m), and each thread's dimension of the weighted
    /// values, rescaled whenever m grows), so a row of scores is never stored. Writes each row's
    /// log-sum-exp to `stats` [batch, heads, seq, 2] (slot 0), for the backward pass.
    #[cube(launch)]
    pub fn attention_kernel(
        q: &Tensor<f32>,
        kv: &Tensor<f32>,
        tables: &Tensor<f32>,
        out: &mut Tensor<f32>,
        stats: &mut Tensor<f32>,
        start: u32,
        cached_from: u32,
        window: u32,
        scale: f32,
        #[comptime] d: usize,
    ) {
        let t = UNIT_POS_X as usize;
        let (seq, heads) = (q.shape(1), q.shape(2) / d);
        let (head, row) = (CUBE_POS_X as usize, grid_row(q.shape(0) * seq));
        let (kv_heads, capacity) = (kv.shape(2), kv.shape(3));
        let (b, i) = (row / seq, row % seq);
        let at = (row * heads + head) * d;
        let keys_at = (b * kv_heads + head / (heads / kv_heads)) * capacity * d;
        let values_at = kv.len() / 2 + keys_at;

        let mut query = Shared::<[f32]>::new_slice(d);
        let mut chunk = Shared::<[f32]>::new_slice(d);
        query[t] = turned(q, at + t, t, tables, i, d) * scale;
        sync_cube();

        let keys = start as usize + i + 1;
        let offset = cached_from as usize;
        let mut m = f32::new(-3.0e38);
        let mut l = 0.0f32;
        let mut acc = 0.0f32;
        let mut from = first_key(keys - 1, window);
        while from < keys {
            let j = from + t;
            let mut score = f32::new(-3.0e38);
            if j < keys {
                score = 0.0f32;
                for e in 0..d {
                    score += query[e] * kv[keys_at + (j - offset) * d + e];
                }
            }
            chunk[t] = score;
            sync_cube();
            let mut m_new = m;
            for e in 0..d {
                m_new = f32::max(m_new, chunk[e]);
            }
            sync_cube();
            let mut p = 0.0f32;
            if j < keys {
                p = f32::exp(score - m_new);
            }
            chunk[t] = p;
            sync_cube();
            let rescale = f32::exp(m - m_new);
            l *= rescale;
            acc *= rescale;
            let n = usize::min(d, keys - from);
            for e in 0..n {
                let p = chunk[e];
                l += p;
                acc += p * kv[values_at + (from + e - offset) * d + t];
            }
            m = m_new;
            sync_cube();
            from += d;
        }
        out[at + t] = acc / l;
        if t == 0 {
            stats[((b * heads + head) * seq + i) * 2] = m + f32::ln(l);
        }
    }

    /// Row `ABSOLUTE_POS` ([batch, seq, heads] order) of D = grad . out over the head's d
    /// dimensions, into `stats` slot 1: what every score's gradient subtracts (softmax's backward).
    #[cube(launch)]
    pub fn attention_delta_kernel(grad: &Tensor<f32>, out: &Tensor<f32>, stats: &mut Tensor<f32>, #[comptime] d: usize) {
        let row = ABSOLUTE_POS;
        if row * d >= out.len() {
            terminate!();
        }
        let (seq, heads) = (out.shape(1), out.shape(2) / d);
        let (head, i, b) = (row % heads, (row / heads) % seq, row / (heads * seq));
        let mut dot = 0.0f32;
        for e in 0..d {
            dot += grad[row * d + e] * out[row * d + e];
        }
        stats[((b * heads + head) * seq + i) * 2 + 1] = dot;
    }

    /// dL/dq of causal attention for one query (cube and threads as [`attention_kernel`]), from
    /// dL/dout `grad` and `stats` (the row's log-sum-exp and D): with p_j = exp(score_j - lse),
    /// dL/dscore_j = p_j (grad . v_j - D) and dL/dq' = scale sum_j dL/dscore_j k_j for the turned
    /// query q'; dL/dq is that turned back.
    #[cube(launch)]
    pub fn attention_query_grad_kernel(
        q: &Tensor<f32>,
        kv: &Tensor<f32>,
        tables: &Tensor<f32>,
        stats: &Tensor<f32>,
        grad: &Tensor<f32>,
        dq: &mut Tensor<f32>,
        window: u32,
        scale: f32,
        #[comptime] d: usize,
    ) {
        let t = UNIT_POS_X as usize;
        let (seq, heads) = (q.shape(1), q.shape(2) / d);
        let (head, row) = (CUBE_POS_X as usize, grid_row(q.shape(0) * seq));
        let (kv_heads, capacity) = (kv.shape(2), kv.shape(3));
        let (b, i) = (row / seq, row % seq);
        let at = (row * heads + head) * d;
        let keys_at = (b * kv_heads + head / (heads / kv_heads)) * capacity * d;
        let values_at = kv.len() / 2 + keys_at;
        let stat = ((b * heads + head) * seq + i) * 2;
        let (row_lse, row_delta) = (stats[stat], stats[stat + 1]);

        let mut query = Shared::<[f32]>::new_slice(d);
        let mut g = Shared::<[f32]>::new_slice(d);
        let mut work = Shared::<[f32]>::new_slice(d);
        query[t] = turned(q, at + t, t, tables, i, d) * scale;
        g[t] = grad[at + t];
        sync_cube();

        let keys = i + 1;
        let mut acc = 0.0f32;
        let mut from = first_key(i, window);
        while from < keys {
            let j = from + t;
            let mut d_score = 0.0f32;
            if j < keys {
                let mut score = 0.0f32;
                let mut d_p = 0.0f32;
                for e in 0..d {
                    score += query[e] * kv[keys_at + j * d + e];
                    d_p += g[e] * kv[values_at + j * d + e];
                }
                d_score = f32::exp(score - row_lse) * (d_p - row_delta);
            }
            work[t] = d_score;
            sync_cube();
            let n = usize::min(d, keys - from);
            for e in 0..n {
                acc += work[e] * kv[keys_at + (from + e) * d + t];
            }
            sync_cube();
            from += d;
        }
        work[t] = acc * scale;
        sync_cube();
        dq[at + t] = turned_back(work[t], work[partner(t, d)], t, tables, i, d);
    }

    /// dL/dk and dL/dv of causal attention for one key/value position: cube (kv_head, b * seq +
    /// j), one thread per dimension. The queries that see it (every query head of its group, at
    /// positions j..seq, within the window) go by in chunks of d, one a thread: p = exp(score - lse) and dL/dscore
    /// = p (grad . v_j - D) as in [`attention_query_grad_kernel`]; dL/dv_j = sum p grad and
    /// dL/dk'_j = sum dL/dscore q' for the turned key k' and turned, scaled queries q', turned
    /// back. Writes [batch, seq, kv_heads * d], the projections' layout.
    #[cube(launch)]
    pub fn attention_key_value_grad_kernel(
        q: &Tensor<f32>,
        kv: &Tensor<f32>,
        tables: &Tensor<f32>,
        stats: &Tensor<f32>,
        grad: &Tensor<f32>,
        dk: &mut Tensor<f32>,
        dv: &mut Tensor<f32>,
        window: u32,
        scale: f32,
        #[comptime] d: usize,
    ) {
        let t = UNIT_POS_X as usize;
        let (seq, heads) = (q.shape(1), q.shape(2) / d);
        let (kv_head, row) = (CUBE_POS_X as usize, grid_row(q.shape(0) * seq));
        let (kv_heads, capacity) = (kv.shape(2), kv.shape(3));
        let groups = heads / kv_heads;
        let (b, j) = (row / seq, row % seq);
        let key_at = ((b * kv_heads + kv_head) * capacity + j) * d;

        let mut key = Shared::<[f32]>::new_slice(d);
        let mut value = Shared::<[f32]>::new_slice(d);
        let mut p_chunk = Shared::<[f32]>::new_slice(d);
        let mut ds_chunk = Shared::<[f32]>::new_slice(d);
        key[t] = kv[key_at + t];
        value[t] = kv[kv.len() / 2 + key_at + t];
        sync_cube();

        // query rows r = (head in the group) * later + (i - j), later = seq - j of them per head
        // (those within the window: i - j < window)
        let later = usize::min(seq - j, window as usize);
        let rows = groups * later;
        let mut acc_k = 0.0f32;
        let mut acc_v = 0.0f32;
        let mut from = 0usize;
        while from < rows {
            let r = from + t;
            let mut p = 0.0f32;
            let mut d_score = 0.0f32;
            if r < rows {
                let (head, i) = (kv_head * groups + r / later, j + r % later);
                let at = ((b * seq + i) * heads + head) * d;
                let mut score = 0.0f32;
                let mut d_p = 0.0f32;
                for e in 0..d {
                    score += turned(q, at + e, e, tables, i, d) * key[e];
                    d_p += grad[at + e] * value[e];
                }
                let stat = ((b * heads + head) * seq + i) * 2;
                p = f32::exp(score * scale - stats[stat]);
                d_score = p * (d_p - stats[stat + 1]);
            }
            p_chunk[t] = p;
            ds_chunk[t] = d_score;
            sync_cube();
            let n = usize::min(d, rows - from);
            for e in 0..n {
                let r = from + e;
                let (head, i) = (kv_head * groups + r / later, j + r % later);
                let at = ((b * seq + i) * heads + head) * d;
                acc_v += p_chunk[e] * grad[at + t];
                acc_k += ds_chunk[e] * turned(q, at + t, t, tables, i, d);
            }
            sync_cube();
            from += d;
        }
        key[t] = acc_k * scale; // the key is read no more: its shared memory holds dL/dk' for turning back
        sync_cube();
        let to = ((b * seq + j) * kv_heads + kv_head) * d;
        dk[to + t] = turned_back(key[t], key[partner(t, d)], t, tables, j, d);
        dv[to + t] = acc_v;
    }

    /// Element `ABSOLUTE_POS` of base + scaling xa b_t ([tokens, out]; xa [tokens, r], b_t [r, out]).
    #[cube(launch)]
    pub fn lora_epilogue_kernel(base: &Tensor<f32>, xa: &Tensor<f32>, b_t: &Tensor<f32>, out: &mut Tensor<f32>, scaling: f32) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let (n, r) = (b_t.shape(1), b_t.shape(0));
        let (i, j) = (at / n, at % n);
        let mut acc = 0.0f32;
        for k in 0..r {
            acc += xa[i * r + k] * b_t[k * n + j];
        }
        out[at] = base[at] + scaling * acc;
    }

    /// Element `ABSOLUTE_POS` of out [rows, cols] = scaling sum_t L(i, t) R(t, j) over `inner`
    /// terms, with L(i, t) = lhs[i * l_row + t * l_inner] and R(t, j) = rhs[t * r_inner + j *
    /// r_col] (the strides make either side transposed), and dropout's keep-mask (0 or 1) taken
    /// on L's entries (`mask_lhs`: the mask laid out as lhs) or on the output (`mask_out`): LoRA's
    /// products at rank r, one output element a thread.
    #[cube(launch)]
    pub fn rank_product_kernel(
        lhs: &Tensor<f32>,
        rhs: &Tensor<f32>,
        mask: &Tensor<f32>,
        out: &mut Tensor<f32>,
        scaling: f32,
        l_row: u32,
        l_inner: u32,
        r_inner: u32,
        r_col: u32,
        inner: u32,
        #[comptime] mask_lhs: bool,
        #[comptime] mask_out: bool,
    ) {
        let at = ABSOLUTE_POS;
        if at >= out.len() {
            terminate!();
        }
        let (l_row, l_inner, r_inner, r_col) = (l_row as usize, l_inner as usize, r_inner as usize, r_col as usize);
        let cols = out.shape(1);
        let (i, j) = (at / cols, at % cols);
        let mut acc = 0.0f32;
        for t in 0..inner as usize {
            let from = i * l_row + t * l_inner;
            let mut l = lhs[from];
            if mask_lhs {
                l *= mask[from];
            }
            acc += l * rhs[t * r_inner + j * r_col];
        }
        let mut v = scaling * acc;
        if mask_out {
            v *= mask[at];
        }
        out[at] = v;
    }

    /// Element `ABSOLUTE_POS` of one AdamW step (the constants as [`super::AdamWStep`] names
    /// them): the moments in place, the parameter into `param_out`.
    #[cube(launch)]
    pub fn adamw_kernel(
        grad: &Tensor<f32>,
        param: &Tensor<f32>,
        m: &mut Tensor<f32>,
        v: &mut Tensor<f32>,
        param_out: &mut Tensor<f32>,
        grad_scale: f32,
        decay: f32,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        step_size: f32,
        inv_sqrt_bias2: f32,
        eps: f32,
    ) {
        let i = ABSOLUTE_POS;
        if i >= param_out.len() {
            terminate!();
        }
        let g = grad[i] * grad_scale;
        let m_new = beta1 * m[i] + one_minus_beta1 * g;
        let v_new = beta2 * v[i] + one_minus_beta2 * g * g;
        m[i] = m_new;
        v[i] = v_new;
        param_out[i] = param[i] * decay - step_size * (m_new / (f32::sqrt(v_new) * inv_sqrt_bias2 + eps));
    }

    /// sum(x^2) into `sums[slot]`: one cube of `threads` threads, each a strided partial sum,
    /// then halved in shared memory.
    #[cube(launch)]
    pub fn sum_squares_kernel(x: &Tensor<f32>, sums: &mut Tensor<f32>, slot: u32, #[comptime] threads: usize) {
        let t = UNIT_POS_X as usize;
        let mut partial = Shared::<[f32]>::new_slice(threads);
        let mut acc = 0.0f32;
        let mut i = t;
        while i < x.len() {
            acc += x[i] * x[i];
            i += threads;
        }
        partial[t] = acc;
        sync_cube();
        let mut half = CUBE_DIM_X as usize / 2;
        while half > 0 {
            if t < half {
                let both = partial[t] + partial[t + half];
                partial[t] = both;
            }
            sync_cube();
            half /= 2;
        }
        if t == 0 {
            sums[slot as usize] = partial[0];
        }
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

/// Whether the attention kernels take these inputs: f32, and a head of an even size that one
/// workgroup holds a thread per dimension of (WebGPU guarantees 256).
fn attention_kernels_take(tensors: &[&CubeTensor], d: usize) -> bool {
    all_f32(tensors) && d.is_multiple_of(2) && d <= 256
}

/// Workgroups for `heads` x `rows` (query or key rows): rows along y, and z past y's limit.
fn attention_grid(heads: usize, rows: usize) -> CubeCount {
    const AXIS: usize = 65_535;
    let y = rows.clamp(1, AXIS);
    CubeCount::Static(heads as u32, y as u32, rows.div_ceil(y) as u32)
}

/// A tensor a kernel writes in place: contiguous, and copied first where something else holds it.
fn writable(t: CubeTensor) -> CubeTensor {
    let t = burn_cubecl::kernel::into_contiguous(t);
    if t.can_mut() { t } else { t.copy() }
}

/// Causal attention of `q` over the cache `kv` ([`FusedOps::causal_attention`]), and the stats
/// [batch, heads, seq, 2] whose slot 0 holds each query row's log-sum-exp of scores.
fn attention_with_stats(
    q: CubeTensor,
    kv: CubeTensor,
    tables: CubeTensor,
    scale: f32,
    start: usize,
    cached_from: usize,
    window: Option<usize>,
) -> (CubeTensor, CubeTensor) {
    let [_, batch, kv_heads, capacity, d] = kv.shape().dims::<5>();
    let [q_batch, seq, width] = q.shape().dims::<3>();
    let needed = start + seq - cached_from;
    let first_seen = start.saturating_sub(window.map_or(usize::MAX, |w| w - 1));
    assert!(
        q_batch == batch && width % (kv_heads * d) == 0 && needed <= capacity && cached_from <= first_seen,
        "attention: queries [{q_batch}, {seq}, {width}] at {start} do not match the cache [2, {batch}, {kv_heads}, {capacity}, {d}] from {cached_from}"
    );
    let ([q, kv, tables], out) = prepare([q, kv, tables]);
    let [batch, seq, width] = out.shape().dims::<3>();
    let stats = empty_device_dtype(out.client.clone(), out.device.clone(), [batch, width / d, seq, 2].into(), DType::F32);
    kernels::attention_kernel::launch(
        &out.client,
        attention_grid(width / d, batch * seq),
        CubeDim::new_1d(d as u32),
        q.into_tensor_arg(),
        kv.into_tensor_arg(),
        tables.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        start as u32,
        cached_from as u32,
        window_arg(window),
        scale,
        d,
    );
    (out, stats)
}

/// A sliding window as the attention kernels take it: none is one longer than any sequence.
fn window_arg(window: Option<usize>) -> u32 {
    window.map_or(u32::MAX, |w| w.min(u32::MAX as usize) as u32)
}

/// Dropout for the LoRA kernels: its mask, contiguous, the scale of what is kept, and whether
/// there is dropout; without, `like` stands in for the mask (the kernels do not read it).
fn mask_or(dropout: Option<Dropout<Cube>>, like: &CubeTensor) -> (CubeTensor, f32, bool) {
    match dropout {
        Some(Dropout { mask, keep_scale }) => (burn_cubecl::kernel::into_contiguous(mask), keep_scale, true),
        None => (like.clone(), 1.0, false),
    }
}

/// Where a rank product takes dropout's keep-mask ([`kernels::rank_product_kernel`]).
#[derive(Clone, Copy, PartialEq)]
enum Masking {
    None,
    Lhs,
    Out,
}

impl Masking {
    fn only_if(self, masked: bool) -> Self {
        if masked { self } else { Masking::None }
    }
}

/// out [rows, cols] = scaling sum_t L(i, t) R(t, j) over `inner` terms, each side a contiguous
/// tensor with the strides [`kernels::rank_product_kernel`] reads it by, in its order: lhs
/// (l_row, l_inner), rhs (r_inner, r_col). `mask` is read only as `masking` says.
fn rank_product(
    (lhs, l_row, l_inner): (CubeTensor, usize, usize),
    (rhs, r_inner, r_col): (CubeTensor, usize, usize),
    inner: usize,
    [rows, cols]: [usize; 2],
    scaling: f32,
    mask: CubeTensor,
    masking: Masking,
) -> CubeTensor {
    let out = empty_device_dtype(lhs.client.clone(), lhs.device.clone(), [rows, cols].into(), DType::F32);
    let (l_row, l_inner, r_inner, r_col, inner) = (l_row as u32, l_inner as u32, r_inner as u32, r_col as u32, inner as u32);
    let (mask_lhs, mask_out) = (masking == Masking::Lhs, masking == Masking::Out);
    launch!(rank_product_kernel, rows * cols, [lhs, rhs, mask], out, scaling, l_row, l_inner, r_inner, r_col, inner, mask_lhs, mask_out);
    out
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

    fn add_rms_norm(
        x: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &delta, &weight]) || x.shape() != delta.shape() {
            return composed::add_rms_norm::<Self>(x, delta, weight, eps);
        }
        let ([x, delta, weight], h) = prepare([x, delta, weight]);
        let out = empty_device_dtype(h.client.clone(), h.device.clone(), h.shape(), DType::F32);
        launch!(add_rms_norm_kernel, rows(&out), [x, delta, weight, h.clone()], out, eps as f32);
        (h, out)
    }

    fn kv_append(
        kv: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&kv, &k, &v, &tables]) {
            return composed::kv_append::<Self>(kv, k, v, tables, start);
        }
        let [_, batch, kv_heads, capacity, d] = kv.shape().dims::<5>();
        let [k_batch, seq, width] = k.shape().dims::<3>();
        assert!(
            k_batch == batch && width == kv_heads * d && start + seq <= capacity,
            "kv_append: keys [{k_batch}, {seq}, {width}] at {start} do not fit the cache [2, {batch}, {kv_heads}, {capacity}, {d}]"
        );
        let kv = writable(kv);
        let [k, v, tables] = [k, v, tables].map(burn_cubecl::kernel::into_contiguous);
        launch!(kv_append_kernel, k.shape().num_elements(), [k, v, tables], kv, start as u32);
        kv
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        scale: f32,
        start: usize,
        cached_from: usize,
        window: Option<usize>,
    ) -> FloatTensor<Self> {
        if !attention_kernels_take(&[&q, &kv, &tables], kv.shape()[4]) {
            return composed::causal_attention::<Self>(q, kv, tables, scale, start, cached_from, window);
        }
        attention_with_stats(q, kv, tables, scale, start, cached_from, window).0
    }

    fn self_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        scale: f32,
        window: Option<usize>,
    ) -> FloatTensor<Self> {
        match Self::self_attention_kernels(q.clone(), k.clone(), v.clone(), tables.clone(), scale, window) {
            Some((out, _)) => out,
            None => composed::self_attention::<Self>(q, k, v, tables, scale, window),
        }
    }

    fn lora(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a_t: FloatTensor<Self>,
        b_t: FloatTensor<Self>,
        scaling: f32,
    ) -> FloatTensor<Self> {
        let xa = Self::lora_down(x, None, a_t);
        Self::lora_epilogue(base, xa, b_t, scaling)
    }

    fn lora_dropout(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        keep_scale: f32,
        a_t: FloatTensor<Self>,
        b_t: FloatTensor<Self>,
        scaling: f32,
    ) -> FloatTensor<Self> {
        let xa = Self::lora_down(x, Some(Dropout { mask, keep_scale }), a_t);
        Self::lora_epilogue(base, xa, b_t, scaling)
    }

    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&param, &grad, &m, &v]) {
            return composed::adamw::<Self>(param, grad, m, v, s);
        }
        // the moments in place (the trainer gives them up; held elsewhere, they are copied
        // first), the parameter, which the model still holds, into a new tensor
        let [grad, param, m, v] = [grad, param, m, v].map(burn_cubecl::kernel::into_contiguous);
        let [m, v] = [m, v].map(writable);
        let out = empty_device_dtype(param.client.clone(), param.device.clone(), param.shape(), DType::F32);
        launch!(
            adamw_kernel,
            out.shape().num_elements(),
            [grad, param, m.clone(), v.clone()],
            out,
            s.grad_scale,
            s.decay,
            s.beta1,
            s.one_minus_beta1,
            s.beta2,
            s.one_minus_beta2,
            s.step_size,
            s.inv_sqrt_bias2,
            s.eps
        );
        (out, m, v)
    }

    fn sum_squares_into(sums: FloatTensor<Self>, x: FloatTensor<Self>, slot: usize) -> FloatTensor<Self> {
        if !all_f32(&[&sums, &x]) {
            return composed::sum_squares_into::<Self>(sums, x, slot);
        }
        let sums = writable(sums);
        let x = burn_cubecl::kernel::into_contiguous(x);
        const THREADS: usize = 256;
        kernels::sum_squares_kernel::launch(
            &sums.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(THREADS as u32),
            x.into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            slot as u32,
            THREADS,
        );
        sums
    }

    fn gated(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: Activation) -> FloatTensor<Self> {
        if !all_f32(&[&gate, &up]) {
            return composed::gated::<Self>(gate, up, act);
        }
        let ([gate, up], out) = prepare([gate, up]);
        launch!(gated_kernel, out.shape().num_elements(), [gate, up], out, act == Activation::GeluTanh);
        out
    }

    fn gated_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&gate, &up, &grad]) {
            return composed::gated_backward::<Self>(gate, up, grad, act);
        }
        let ([gate, up, grad], d_gate) = prepare([gate, up, grad]);
        let d_up = empty_device_dtype(d_gate.client.clone(), d_gate.device.clone(), d_gate.shape(), DType::F32);
        launch!(gated_backward_kernel, d_up.shape().num_elements(), [gate, up, grad, d_gate.clone()], d_up, act == Activation::GeluTanh);
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

impl InnerOps for Cube {
    fn lora_down(x: FloatTensor<Self>, dropout: Option<Dropout<Self>>, a_t: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&x, &a_t]) || dropout.as_ref().is_some_and(|d| !all_f32(&[&d.mask])) {
            return composed::lora_down::<Self>(x, dropout, a_t);
        }
        let [x, a_t] = [x, a_t].map(burn_cubecl::kernel::into_contiguous);
        let ([tokens, d_in], [_, r]) = (x.shape().dims::<2>(), a_t.shape().dims::<2>());
        let (mask, keep_scale, masked) = mask_or(dropout, &x);
        // x (masked) [tokens, d_in] times a_t [d_in, r]
        rank_product((x, d_in, 1), (a_t, r, 1), d_in, [tokens, r], keep_scale, mask, Masking::Lhs.only_if(masked))
    }

    fn lora_epilogue(base: FloatTensor<Self>, xa: FloatTensor<Self>, b_t: FloatTensor<Self>, scaling: f32) -> FloatTensor<Self> {
        if !all_f32(&[&base, &xa, &b_t]) {
            return composed::lora_epilogue::<Self>(base, xa, b_t, scaling);
        }
        let ([base, xa, b_t], out) = prepare([base, xa, b_t]);
        launch!(lora_epilogue_kernel, out.shape().num_elements(), [base, xa, b_t], out, scaling);
        out
    }

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
        if !all_f32(&[&x, &a_t, &b_t, &xa, &grad]) || dropout.as_ref().is_some_and(|d| !all_f32(&[&d.mask])) {
            return composed::lora_backward::<Self>(x, dropout, a_t, b_t, xa, grad, scaling, skip_x);
        }
        let [x, a_t, b_t, xa, grad] = [x, a_t, b_t, xa, grad].map(burn_cubecl::kernel::into_contiguous);
        let (mask, keep_scale, masked) = mask_or(dropout, &x);
        let ([tokens, d_in], [r, d_out]) = (x.shape().dims::<2>(), b_t.shape().dims::<2>());
        let none = Masking::None;
        // gb = scaling g b_t^T; dL/dx = (gb a_t^T) * dropout; dL/da_t = (x * dropout)^T gb; dL/db_t = scaling xa^T g
        let gb = rank_product((grad.clone(), d_out, 1), (b_t, 1, d_out), d_out, [tokens, r], scaling, mask.clone(), none);
        let d_x = (!skip_x).then(|| {
            rank_product((gb.clone(), r, 1), (a_t, 1, r), r, [tokens, d_in], keep_scale, mask.clone(), Masking::Out.only_if(masked))
        });
        let d_a = rank_product((x, 1, d_in), (gb, r, 1), tokens, [d_in, r], keep_scale, mask.clone(), Masking::Lhs.only_if(masked));
        let d_b = rank_product((xa, 1, r), (grad, d_out, 1), tokens, [r, d_out], scaling, mask, none);
        (d_x, d_a, d_b)
    }

    fn self_attention_kernels(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        tables: FloatTensor<Self>,
        scale: f32,
        window: Option<usize>,
    ) -> Option<(FloatTensor<Self>, SavedAttention<Self>)> {
        let d = tables.shape()[2];
        if !attention_kernels_take(&[&q, &k, &v, &tables], d) {
            return None;
        }
        // the keys turned and both laid out as a cache of exactly this run
        let [batch, seq, width] = k.shape().dims::<3>();
        let kv = empty_device_dtype(k.client.clone(), k.device.clone(), [2, batch, width / d, seq, d].into(), DType::F32);
        let kv = Self::kv_append(kv, k, v, tables.clone(), 0);
        let (out, stats) = attention_with_stats(q.clone(), kv.clone(), tables.clone(), scale, 0, 0, window);
        Some((out.clone(), SavedAttention { q, kv, out, stats, tables, scale, window }))
    }

    fn self_attention_backward(
        saved: SavedAttention<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let SavedAttention { q, kv, out, stats, tables, scale, window } = saved;
        let ([q, grad, kv, out, stats, tables], d_q) = prepare([q, grad, kv, out, stats, tables]);
        let [batch, seq, width] = q.shape().dims::<3>();
        let [_, _, kv_heads, _, d] = kv.shape().dims::<5>();
        let (client, device) = (q.client.clone(), q.device.clone());
        // each row's grad . out into the stats' scratch slot (slot 1: nothing else reads it)
        launch!(attention_delta_kernel, batch * seq * width / d, [grad.clone(), out], stats, d);
        kernels::attention_query_grad_kernel::launch(
            &client,
            attention_grid(width / d, batch * seq),
            CubeDim::new_1d(d as u32),
            q.clone().into_tensor_arg(),
            kv.clone().into_tensor_arg(),
            tables.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            d_q.clone().into_tensor_arg(),
            window_arg(window),
            scale,
            d,
        );
        let projected = || empty_device_dtype(client.clone(), device.clone(), [batch, seq, kv_heads * d].into(), DType::F32);
        let (d_k, d_v) = (projected(), projected());
        kernels::attention_key_value_grad_kernel::launch(
            &client,
            attention_grid(kv_heads, batch * seq),
            CubeDim::new_1d(d as u32),
            q.into_tensor_arg(),
            kv.into_tensor_arg(),
            tables.into_tensor_arg(),
            stats.into_tensor_arg(),
            grad.into_tensor_arg(),
            d_k.clone().into_tensor_arg(),
            d_v.clone().into_tensor_arg(),
            window_arg(window),
            scale,
            d,
        );
        (d_q, d_k, d_v)
    }
}
