//! The fused operations (`nn::ops`): RMSNorm (alone and after a residual add), the rotary
//! embedding, SwiGLU, attention's masked softmax, causal attention over a key/value cache and the
//! cache's append, training's self-attention with its backward, LoRA's update added to a base
//! output, the head's cross-entropy, and the optimizer's AdamW step and sums of squares (the
//! gradient norm): values and gradients on the CPU backend (its own vectorised passes where it
//! has them, the composed steps otherwise) and on wgpu (the cubecl kernels), against the math in
//! f64 on the host; gradients against central finite differences of that f64 math, so no
//! derivative formula is shared with the code. Sizes are odd and large enough that the CPU
//! kernels split their work and leave vector tails.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use webgpu_lora::nn::ops::{
    Activation, AdamWStep, adamw, add_rms_norm, causal_attention, cross_entropy, gated, kv_append, lora, masked_softmax, rms_norm, rotary,
    self_attention, sum_squares_into,
};

fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

/// Checks `ours` against `reference` within `tol` relative to max(1, |reference|).
fn assert_close(what: &str, ours: &[f32], reference: &[f64], tol: f64) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        assert!((a as f64 - b).abs() <= tol * b.abs().max(1.0), "{what}[{i}]: {a} vs {b}");
    }
}

/// d/dx f at x by central differences in f64.
fn derivative(mut f: impl FnMut(f64) -> f64, x: f64) -> f64 {
    let h = 1e-5 * x.abs().max(1.0);
    (f(x + h) - f(x - h)) / (2.0 * h)
}

fn silu_f64(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// torch's gelu(approximate="tanh") in f64.
fn gelu_tanh_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// RMSNorm of one row in f64: x / sqrt(mean(x^2) + eps) * w.
fn rms_norm_f64(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * r * w as f64).collect()
}

fn rms_norm_matches(device: &Device) {
    let (rows, d, eps) = (3 * 7, 577, 1e-5);
    let shape = [3, 7, d];
    let (x, w, c) = (random(rows * d, 4.0, 11), random(d, 2.0, 12), random(rows * d, 1.0, 13));
    let row = |v: &[f32], r: usize| v[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect::<Vec<_>>();
    let expected: Vec<f64> = (0..rows).flat_map(|r| rms_norm_f64(&row(&x, r), &w, eps)).collect();
    let weight = Tensor::<1>::from_data(TensorData::new(w.clone(), [d]), device);
    let plain = Tensor::<3>::from_data(TensorData::new(x.clone(), shape), device);
    assert_close("rms_norm", &values(rms_norm(plain, weight.clone(), eps)), &expected, 1e-5);

    // L = sum(out * c): dL/dx by central differences of the f64 row, for a few elements per row;
    // and dL/dw (the weight trained, as full fine-tuning trains it), summed over the rows
    let tracked = Tensor::<3>::from_data(TensorData::new(x.clone(), shape), &device.clone().autodiff()).require_grad();
    let weight = Tensor::<1>::from_data(TensorData::new(w.clone(), [d]), &device.clone().autodiff()).require_grad();
    let out = rms_norm(tracked.clone(), weight.clone(), eps);
    let grads = (out * Tensor::from_data(TensorData::new(c.clone(), shape), &device.clone().autodiff())).sum().backward();
    let ours = values(tracked.grad(&grads).unwrap());
    let ours_w = values(weight.grad(&grads).unwrap());
    for k in [0, 1, 288, d - 1] {
        // L as a function of w[k] alone (the other weights' terms are constants): sum over rows of
        // x[k] / rms(x) * w[k] * c[k]
        let loss = |v: f64| {
            let term = |r: usize| {
                let xr = row(&x, r);
                let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
                xr[k] * inv * v * c[r * d + k] as f64
            };
            (0..rows).map(term).sum::<f64>()
        };
        assert_close(&format!("dL/dw[{k}]"), &ours_w[k..k + 1], &[derivative(loss, w[k] as f64)], 1e-4);
    }
    for r in [0, 9, rows - 1] {
        for k in [0, 1, 288, d - 1] {
            let loss = |v: f64| {
                let mut xr = row(&x, r);
                xr[k] = v;
                rms_norm_f64(&xr, &w, eps).iter().zip(&c[r * d..(r + 1) * d]).map(|(y, &c)| y * c as f64).sum::<f64>()
            };
            let i = r * d + k;
            assert_close(&format!("dL/dx[{r}, {k}]"), &ours[i..i + 1], &[derivative(loss, x[i] as f64)], 1e-4);
        }
    }
}

/// The rotary embedding of one row [d] at one position in f64: x * cos + [-x2, x1] * sin.
fn rotary_f64(x: &[f64], cos: &[f32], sin: &[f32]) -> Vec<f64> {
    let half = x.len() / 2;
    (0..x.len()).map(|j| x[j] * cos[j] as f64 + if j < half { -x[j + half] } else { x[j - half] } * sin[j] as f64).collect()
}

fn rotary_matches(device: &Device) {
    let (b, h, seq, d) = (2, 3, 5, 64);
    let n = b * h * seq * d;
    let (x, c) = (random(n, 3.0, 21), random(n, 1.0, 22));
    // the model's tables: both halves of a row turn by the same angles, scaled (the queries' 1/sqrt(d))
    let angles: Vec<f32> = (0..seq * d).map(|i| (i / d) as f32 * 0.37 * (1.0 + (i % (d / 2)) as f32)).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (0.8 * a.cos(), 0.8 * a.sin())).unzip();
    let table = |v: &[f32], device: &Device| Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 1, seq, d]), device);
    let row = |v: &[f32], r: usize| v[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect::<Vec<_>>();
    let at = |r: usize| (r % seq) * d..(r % seq + 1) * d;
    let expected: Vec<f64> = (0..n / d).flat_map(|r| rotary_f64(&row(&x, r), &cos[at(r)], &sin[at(r)])).collect();
    let plain = Tensor::<4>::from_data(TensorData::new(x.clone(), [b, h, seq, d]), device);
    assert_close("rotary", &values(rotary(plain, table(&cos, device), table(&sin, device))), &expected, 1e-5);

    // L = sum(out * c): dL/dx by central differences of the f64 row
    let ad = device.clone().autodiff();
    let tracked = Tensor::<4>::from_data(TensorData::new(x.clone(), [b, h, seq, d]), &ad).require_grad();
    let out = rotary(tracked.clone(), table(&cos, &ad), table(&sin, &ad));
    let grads = (out * Tensor::from_data(TensorData::new(c.clone(), [b, h, seq, d]), &ad)).sum().backward();
    let ours = values(tracked.grad(&grads).unwrap());
    for r in [0, 7, n / d - 1] {
        for k in [0, 5, d / 2, d - 1] {
            let loss = |v: f64| {
                let mut xr = row(&x, r);
                xr[k] = v;
                rotary_f64(&xr, &cos[at(r)], &sin[at(r)]).iter().zip(&c[r * d..(r + 1) * d]).map(|(y, &c)| y * c as f64).sum::<f64>()
            };
            let i = r * d + k;
            assert_close(&format!("dL/dx[{r}, {k}]"), &ours[i..i + 1], &[derivative(loss, x[i] as f64)], 1e-4);
        }
    }
}

/// act(gate) * up and its gradients for SwiGLU's silu and GeGLU's gelu_tanh, against the f64
/// functions and central differences of them.
fn gated_matches(device: &Device) {
    let shape = [2, 37, 1001]; // 74074 elements: several parallel tasks, a tail of 10
    let n: usize = shape.iter().product();
    let (g, u, w) = (random(n, 12.0, 1), random(n, 3.0, 2), random(n, 1.0, 3));
    for (act, f) in [(Activation::Silu, silu_f64 as fn(f64) -> f64), (Activation::GeluTanh, gelu_tanh_f64)] {
        let tracked = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), shape), &device.clone().autodiff()).require_grad();
        let (gate, up) = (tracked(&g), tracked(&u));
        let out = gated(gate.clone(), up.clone(), act);
        let expected: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| f(g as f64) * u as f64).collect();
        assert_close(&format!("{act:?}"), &values(out.clone().inner()), &expected, 1e-6);

        // L = sum(out * w): dL/dgate = w u act'(gate), dL/dup = w act(gate)
        let grads = (out * Tensor::from_data(TensorData::new(w.clone(), shape), &device.clone().autodiff())).sum().backward();
        let d_gate: Vec<f64> = (0..n).map(|i| w[i] as f64 * u[i] as f64 * derivative(f, g[i] as f64)).collect();
        let d_up: Vec<f64> = (0..n).map(|i| w[i] as f64 * f(g[i] as f64)).collect();
        assert_close(&format!("{act:?}: dL/dgate"), &values(gate.grad(&grads).unwrap()), &d_gate, 1e-5);
        assert_close(&format!("{act:?}: dL/dup"), &values(up.grad(&grads).unwrap()), &d_up, 1e-6);

        // untracked (inference): the same values
        let plain = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), shape), device);
        assert_close(&format!("{act:?} (plain)"), &values(gated(plain(&g), plain(&u), act)), &expected, 1e-6);
    }
}

/// softmax over a row of `keys` scores with an additive mask, in f64.
fn softmax_f64(scores: &[f64], mask: &[f64]) -> Vec<f64> {
    let z: Vec<f64> = scores.iter().zip(mask).map(|(s, m)| s + m).collect();
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|z| (z - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|e| e / total).collect()
}

fn masked_softmax_matches(device: &Device) {
    // 4 x 9 heads x 67 queries x 101 keys; query i sees keys 0..=34 + i (a cache of 34 before it)
    let (b, h, q, k) = (4, 9, 67, 101);
    let scores = random(b * h * q * k, 8.0, 4);
    let mask: Vec<f32> = (0..q * k).map(|at| if at % k > 34 + at / k { f32::NEG_INFINITY } else { 0.0 }).collect();
    let w = random(b * h * q * k, 1.0, 5);
    let ad = device.clone().autodiff();
    let s = Tensor::<4>::from_data(TensorData::new(scores.clone(), [b, h, q, k]), &ad).require_grad();
    let m = Tensor::<4>::from_data(TensorData::new(mask.clone(), [1, 1, q, k]), device);
    let probs = masked_softmax(s.clone(), m);
    let grads = (probs.clone() * Tensor::from_data(TensorData::new(w.clone(), [b, h, q, k]), &ad)).sum().backward();
    let (probs, d_scores) = (values(probs.inner()), values(s.grad(&grads).unwrap()));

    let mask64: Vec<f64> = mask.iter().map(|&m| m as f64).collect();
    for row in 0..b * h * q {
        let at = row * k..(row + 1) * k;
        let x: Vec<f64> = scores[at.clone()].iter().map(|&v| v as f64).collect();
        let m = &mask64[(row % q) * k..][..k];
        assert_close(&format!("probs row {row}"), &probs[at.clone()], &softmax_f64(&x, m), 1e-6);
        // L = sum_j w_j p_j: dL/dscore_i by differences, masked keys get exactly nothing
        let loss = |i: usize, xi: f64| {
            let mut x = x.clone();
            x[i] = xi;
            softmax_f64(&x, m).iter().zip(&w[at.clone()]).map(|(p, &w)| p * w as f64).sum::<f64>()
        };
        let expected: Vec<f64> = (0..k).map(|i| if m[i].is_finite() { derivative(|xi| loss(i, xi), x[i]) } else { 0.0 }).collect();
        assert_close(&format!("dL/dscores row {row}"), &d_scores[at], &expected, 1e-5);
    }
}

fn cross_entropy_matches(device: &Device) {
    let (rows, vocab) = (5, 3001);
    let mut z = random(rows * vocab, 15.0, 6);
    let targets: Vec<i32> = vec![0, 3000, 17, 1500, 2];
    z[3 * vocab + 7] = f32::NAN; // a NaN logit makes that row's loss NaN, not silently finite
    let logits = Tensor::<2>::from_data(TensorData::new(z.clone(), [rows, vocab]), device);
    let (loss, grad) = cross_entropy(logits, Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [rows, 1]), device));
    let (loss, grad) = (values(loss), values(grad));
    for row in 0..rows {
        let x: Vec<f64> = z[row * vocab..][..vocab].iter().map(|&v| v as f64).collect();
        if x.iter().any(|v| v.is_nan()) {
            assert!(loss[row].is_nan(), "row {row}: loss {} from a NaN logit", loss[row]);
            continue;
        }
        let t = targets[row] as usize;
        let ce = |x: &[f64]| {
            let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - x[t]
        };
        assert_close(&format!("loss row {row}"), &loss[row..row + 1], &[ce(&x)], 1e-6);
        // dL/dz by differences at a sample of positions (the target's among them)
        for i in (0..vocab).step_by(97).chain([t]) {
            let mut y = x.clone();
            let expected = derivative(
                |zi| {
                    y[i] = zi;
                    ce(&y)
                },
                x[i],
            );
            assert!(
                (grad[row * vocab + i] as f64 - expected).abs() < 1e-6,
                "row {row} dL/dz[{i}]: {} vs {expected}",
                grad[row * vocab + i]
            );
        }
    }
}

fn add_rms_norm_matches(device: &Device) {
    let (rows, d, eps) = (2 * 9, 577, 1e-5);
    let (x, delta, w) = (random(rows * d, 4.0, 31), random(rows * d, 4.0, 32), random(d, 2.0, 33));
    let t = |v: &[f32], device: &Device| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [2, 9, d]), device);
    let weight = Tensor::<1>::from_data(TensorData::new(w.clone(), [d]), device);
    let (h, normed) = add_rms_norm(t(&x, device), t(&delta, device), weight, eps);
    let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
    assert_eq!(values(h), sum, "the residual add");
    let row = |r: usize| sum[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect::<Vec<_>>();
    let expected: Vec<f64> = (0..rows).flat_map(|r| rms_norm_f64(&row(r), &w, eps)).collect();
    assert_close("add_rms_norm", &values(normed), &expected, 1e-5);

    // tracked (training), the add and RMSNorm's own node: the same values, and dL/ddelta = dL/dh
    let ad = device.clone().autodiff();
    let tracked = t(&delta, &ad).require_grad();
    let (h, normed) = add_rms_norm(t(&x, &ad), tracked.clone(), Tensor::from_data(TensorData::new(w.clone(), [d]), &ad), eps);
    assert_close("add_rms_norm, tracked", &values(normed.clone().inner()), &expected, 1e-5);
    let grads = (h * 2.0 + normed).sum().backward();
    let plain = t(&sum, &ad).require_grad();
    let reference = (plain.clone() * 2.0 + rms_norm(plain.clone(), Tensor::from_data(TensorData::new(w, [d]), &ad), eps)).sum().backward();
    let reference: Vec<f64> = values(plain.grad(&reference).unwrap()).iter().map(|&v| v as f64).collect();
    assert_close("dL/ddelta", &values(tracked.grad(&grads).unwrap()), &reference, 1e-6);
}

/// Rotary tables as the model's: both halves of a row turn by the same angles; (cos, sin), each
/// [seq, d] row-major, for positions first..first + seq.
fn tables(seq: usize, d: usize, first: usize) -> (Vec<f32>, Vec<f32>) {
    let angles: Vec<f32> = (0..seq * d).map(|i| (first + i / d) as f32 * 0.37 * (1.0 + (i % (d / 2)) as f32)).collect();
    angles.iter().map(|a| (a.cos(), a.sin())).unzip()
}

/// (cos, sin) as the ops take them: one tensor [2, seq, d].
fn tables_tensor((cos, sin): &(Vec<f32>, Vec<f32>), d: usize, device: &Device) -> Tensor<3> {
    let both: Vec<f32> = cos.iter().chain(sin).copied().collect();
    Tensor::from_data(TensorData::new(both, [2, cos.len() / d, d]), device)
}

fn kv_append_matches(device: &Device) {
    let (b, kv_heads, capacity, d, seq, start) = (2, 3, 40, 32, 7, 21);
    let half = b * kv_heads * capacity * d;
    let old = random(2 * half, 1.0, 41);
    let (k, v) = (random(b * seq * kv_heads * d, 3.0, 43), random(b * seq * kv_heads * d, 3.0, 44));
    let (cos, sin) = tables(seq, d, start);
    let t3 = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [b, seq, kv_heads * d]), device);
    let cache = Tensor::<5>::from_data(TensorData::new(old.clone(), [2, b, kv_heads, capacity, d]), device);
    let held = cache.clone(); // the cache held elsewhere too: it is copied, not written
    let cache = kv_append(cache, t3(&k), t3(&v), tables_tensor(&(cos.clone(), sin.clone()), d, device), start);
    let mut expected: Vec<f64> = old.iter().map(|&x| x as f64).collect();
    for (bi, s, h) in (0..b).flat_map(|bi| (0..seq).flat_map(move |s| (0..kv_heads).map(move |h| (bi, s, h)))) {
        let from = ((bi * seq + s) * kv_heads + h) * d;
        let to = ((bi * kv_heads + h) * capacity + start + s) * d;
        let row: Vec<f64> = k[from..from + d].iter().map(|&x| x as f64).collect();
        expected[to..to + d].copy_from_slice(&rotary_f64(&row, &cos[s * d..(s + 1) * d], &sin[s * d..(s + 1) * d]));
        for e in 0..d {
            expected[half + to + e] = v[from + e] as f64;
        }
    }
    assert_close("keys and values", &values(cache), &expected, 1e-6);
    assert_eq!(values(held), old, "a cache held elsewhere was written");
}

/// Causal attention of one query row (already turned) over keys and values [n, d] in f64.
fn attention_f64(q: &[f64], keys: &[f64], vals: &[f64], n: usize, d: usize) -> Vec<f64> {
    let scores: Vec<f64> = (0..n).map(|j| (0..d).map(|e| q[e] * keys[j * d + e]).sum()).collect();
    let p = softmax_f64(&scores, &vec![0.0; n]);
    (0..d).map(|e| (0..n).map(|j| p[j] * vals[j * d + e]).sum()).collect()
}

/// Queries at positions start..start + seq over a cache of `capacity` whose unfilled tail is NaN
/// (never read); 6 query heads over 2 key/value heads; more keys than one chunk of d; with a
/// sliding `window`, each query over its last w keys only, from a cache whose first slot holds
/// position `cached_from` (the positions before it dropped, as a sliding layer's cache drops them).
fn causal_attention_case(device: &Device, d: usize, seq: usize, start: usize, window: Option<usize>, cached_from: usize) {
    let (b, heads, kv_heads, capacity) = (2, 6, 2, start + seq - cached_from + 3);
    let (groups, keys, scale) = (heads / kv_heads, start + seq - cached_from, 1.0 / (d as f32).sqrt());
    let q = random(b * seq * heads * d, 2.0, 51);
    let mut kv = random(2 * b * kv_heads * capacity * d, 1.0, 52);
    kv.iter_mut().enumerate().filter(|(i, _)| (i / d) % capacity >= keys).for_each(|(_, x)| *x = f32::NAN);
    let (cos, sin) = tables(seq, d, start);
    let run = |q: Tensor<3>, device: &Device| {
        let cache = Tensor::<5>::from_data(TensorData::new(kv.clone(), [2, b, kv_heads, capacity, d]), device);
        causal_attention(q, cache, tables_tensor(&(cos.clone(), sin.clone()), d, device), scale, start, cached_from, window)
    };
    let mut expected = vec![0.0; q.len()];
    let values_at = b * kv_heads * capacity * d;
    for (bi, i, h) in (0..b).flat_map(|bi| (0..seq).flat_map(move |i| (0..heads).map(move |h| (bi, i, h)))) {
        let at = ((bi * seq + i) * heads + h) * d;
        let row: Vec<f64> = q[at..at + d].iter().map(|&x| x as f64).collect();
        let turned: Vec<f64> =
            rotary_f64(&row, &cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]).iter().map(|x| x * scale as f64).collect();
        let first = (start + i + 1).saturating_sub(window.unwrap_or(usize::MAX));
        let base = (bi * kv_heads + h / groups) * capacity * d + (first - cached_from) * d;
        let n = start + i + 1 - first;
        let as64 = |from: usize| kv[from..from + n * d].iter().map(|&x| x as f64).collect::<Vec<_>>();
        expected[at..at + d].copy_from_slice(&attention_f64(&turned, &as64(base), &as64(values_at + base), n, d));
    }
    let shape = [b, seq, heads * d];
    let plain = Tensor::<3>::from_data(TensorData::new(q.clone(), shape), device);
    assert_close(
        &format!("attention d={d} seq={seq} start={start} window={window:?} from {cached_from}"),
        &values(run(plain, device)),
        &expected,
        1e-5,
    );

    // tracked: the composed steps give the same values
    let ad = device.clone().autodiff();
    let tracked = Tensor::<3>::from_data(TensorData::new(q.clone(), shape), &ad).require_grad();
    assert_close("attention, tracked", &values(run(tracked, &ad).inner()), &expected, 1e-5);
}

fn causal_attention_matches(device: &Device) {
    causal_attention_case(device, 32, 5, 70, None, 0); // a prefill after a cache: 75 keys, chunks of 32
    causal_attention_case(device, 64, 1, 130, None, 0); // a decoded token: 131 keys, chunks of 64
    causal_attention_case(device, 16, 9, 0, None, 0); // a prefill without a cache
    // sliding windows: starting inside a chunk, shorter than the run, and over a cache that
    // dropped what the window no longer sees
    causal_attention_case(device, 32, 5, 70, Some(45), 0);
    causal_attention_case(device, 64, 1, 130, Some(100), 0);
    causal_attention_case(device, 16, 9, 0, Some(4), 0);
    causal_attention_case(device, 32, 5, 70, Some(45), 26);
    causal_attention_case(device, 64, 1, 130, Some(100), 31);
}

/// One AdamW step against PyTorch's formula in f64, with a clipping scale and weight decay; the
/// moments given are written in place, but not ones held elsewhere too.
fn adamw_matches(device: &Device) {
    let n = 3 * 1001;
    let (p, g, m) = (random(n, 1.0, 61), random(n, 0.1, 62), random(n, 0.01, 63));
    let v: Vec<f32> = random(n, 0.01, 64).iter().map(|x| x * x).collect();
    let (lr, beta1, beta2, eps, wd, t, scale) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 0.1f64, 3, 0.5f64);
    let step = AdamWStep {
        grad_scale: scale as f32,
        decay: (1.0 - lr * wd) as f32,
        beta1: beta1 as f32,
        one_minus_beta1: (1.0 - beta1) as f32,
        beta2: beta2 as f32,
        one_minus_beta2: (1.0 - beta2) as f32,
        step_size: (lr / (1.0 - beta1.powi(t))) as f32,
        inv_sqrt_bias2: (1.0 / (1.0 - beta2.powi(t)).sqrt()) as f32,
        eps: eps as f32,
    };
    let t2 = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [3, 1001]), device);
    let held_m = t2(&m);
    let (new_p, new_m, new_v) = adamw(t2(&p), t2(&g), held_m.clone(), t2(&v), step);
    let (mut ep, mut em, mut ev) = (vec![], vec![], vec![]);
    for i in 0..n {
        let gi = g[i] as f64 * scale;
        let mi = beta1 * m[i] as f64 + (1.0 - beta1) * gi;
        let vi = beta2 * v[i] as f64 + (1.0 - beta2) * gi * gi;
        let m_hat = mi / (1.0 - beta1.powi(t));
        let v_hat = vi / (1.0 - beta2.powi(t));
        ep.push(p[i] as f64 * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps));
        em.push(mi);
        ev.push(vi);
    }
    assert_close("param", &values(new_p), &ep, 1e-6);
    assert_close("m", &values(new_m), &em, 1e-6);
    assert_close("v", &values(new_v), &ev, 1e-6);
    assert_eq!(values(held_m), m, "moments held elsewhere were written");
}

fn sum_squares_matches(device: &Device) {
    let sizes = [(1, 1), (1, 255), (3, 257), (100, 101)];
    let mut sums = Tensor::<1>::zeros([sizes.len() + 1], device);
    let mut expected = vec![0.0; sizes.len() + 1];
    for (slot, &(rows, cols)) in sizes.iter().enumerate() {
        let x = random(rows * cols, 2.0, 70 + slot as u64);
        expected[slot] = x.iter().map(|&v| v as f64 * v as f64).sum();
        sums = sum_squares_into(sums, Tensor::from_data(TensorData::new(x, [rows, cols]), device), slot);
    }
    assert_close("sums of squares", &values(sums), &expected, 1e-5);
}

/// out = base + s ((x * mask / (1 - p)) A^T) B^T and, for L = sum(out * c), dL/dbase, dL/dx,
/// dL/dA^T and dL/dB^T by central differences of the f64 math at a sample of entries; with a
/// dropout keep-mask (each entry 0 or 1) and without.
fn lora_matches(device: &Device) {
    let (tokens, d_in, r, d_out, s) = (37, 129, 8, 67, 2.5f32);
    let (base, x, a, b, c) = (
        random(tokens * d_out, 1.0, 81),
        random(tokens * d_in, 1.0, 82),
        random(d_in * r, 0.3, 83),
        random(r * d_out, 0.3, 84),
        random(tokens * d_out, 1.0, 85),
    );
    let keep: Vec<f32> = random(tokens * d_in, 1.0, 86).iter().map(|&u| if u < -0.8 { 0.0 } else { 1.0 }).collect();
    let keep_scale = 1.0 / 0.9f32;
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    for mask in [None, Some(&keep)] {
        let forward = |base: &[f64], x: &[f64], a: &[f64], b: &[f64]| -> Vec<f64> {
            let xm = |at: usize| x[at] * mask.map_or(1.0, |m| (m[at] * keep_scale) as f64);
            let xa: Vec<f64> = (0..tokens * r).map(|at| (0..d_in).map(|p| xm(at / r * d_in + p) * a[p * r + at % r]).sum()).collect();
            (0..tokens * d_out)
                .map(|at| base[at] + s as f64 * (0..r).map(|k| xa[at / d_out * r + k] * b[k * d_out + at % d_out]).sum::<f64>())
                .collect()
        };
        let inputs = [f64s(&base), f64s(&x), f64s(&a), f64s(&b)];
        let expected = forward(&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
        let t = |v: &[f32], shape: [usize; 2], device: &Device| Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), device);
        let shapes = [[tokens, d_out], [tokens, d_in], [d_in, r], [r, d_out]];
        let mask_on = |device: &Device| mask.map(|m| (t(m, [tokens, d_in], device), keep_scale));
        let out = lora(
            t(&base, shapes[0], device),
            t(&x, shapes[1], device),
            mask_on(device),
            t(&a, shapes[2], device),
            t(&b, shapes[3], device),
            s,
        );
        let what = if mask.is_some() { "lora with dropout" } else { "lora" };
        assert_close(what, &values(out), &expected, 1e-5);

        let ad = device.clone().autodiff();
        let leaves: Vec<Tensor<2>> = [&base, &x, &a, &b].iter().zip(shapes).map(|(v, shape)| t(v, shape, &ad).require_grad()).collect();
        let out = lora(leaves[0].clone(), leaves[1].clone(), mask_on(&ad), leaves[2].clone(), leaves[3].clone(), s);
        let grads = (out * t(&c, shapes[0], &ad)).sum().backward();
        for (which, leaf) in leaves.iter().enumerate() {
            let ours = values(leaf.grad(&grads).unwrap());
            for i in (0..ours.len()).step_by(ours.len() / 7 + 1).chain([ours.len() - 1]) {
                let loss = |v: f64| {
                    let mut at = inputs.clone();
                    at[which][i] = v;
                    forward(&at[0], &at[1], &at[2], &at[3]).iter().zip(&c).map(|(y, &c)| y * c as f64).sum::<f64>()
                };
                assert_close(&format!("{what}: dL/d(input {which})[{i}]"), &ours[i..i + 1], &[derivative(loss, inputs[which][i])], 1e-4);
            }
        }
    }
}

/// Self-attention of a run as training computes it, from the projections [batch, seq, heads * d]
/// and [batch, seq, kv_heads * d]: values against the f64 math, and for L = sum(out * c) the
/// gradients of q, k and v against central differences of it at a sample of entries (6 query
/// heads over 2 key/value heads; more keys and more queries per key than one chunk of d), without
/// and with a sliding window shorter than the run.
fn self_attention_matches(device: &Device) {
    self_attention_case(device, None);
    self_attention_case(device, Some(5));
}

fn self_attention_case(device: &Device, window: Option<usize>) {
    let (b, heads, kv_heads, seq, d) = (2, 6, 2, 21, 16);
    let groups = heads / kv_heads;
    let (q, k, v) =
        (random(b * seq * heads * d, 2.0, 91), random(b * seq * kv_heads * d, 2.0, 92), random(b * seq * kv_heads * d, 1.0, 93));
    let c = random(b * seq * heads * d, 1.0, 94);
    let (cos, sin) = tables(seq, d, 0);
    let scale = 1.0 / (d as f32).sqrt();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let forward = |q: &[f64], k: &[f64], v: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; q.len()];
        for (bi, i, h) in (0..b).flat_map(|bi| (0..seq).flat_map(move |i| (0..heads).map(move |h| (bi, i, h)))) {
            let at = ((bi * seq + i) * heads + h) * d;
            let turned: Vec<f64> =
                rotary_f64(&q[at..at + d], &cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]).iter().map(|x| x * scale as f64).collect();
            let (mut keys, mut vals) = (vec![], vec![]);
            let first = (i + 1).saturating_sub(window.unwrap_or(usize::MAX));
            for j in first..=i {
                let kat = ((bi * seq + j) * kv_heads + h / groups) * d;
                keys.extend(rotary_f64(&k[kat..kat + d], &cos[j * d..(j + 1) * d], &sin[j * d..(j + 1) * d]));
                vals.extend_from_slice(&v[kat..kat + d]);
            }
            out[at..at + d].copy_from_slice(&attention_f64(&turned, &keys, &vals, i + 1 - first, d));
        }
        out
    };
    let inputs = [f64s(&q), f64s(&k), f64s(&v)];
    let expected = forward(&inputs[0], &inputs[1], &inputs[2]);
    let shapes = [[b, seq, heads * d], [b, seq, kv_heads * d], [b, seq, kv_heads * d]];
    let run = |[q, k, v]: [Tensor<3>; 3], device: &Device| {
        self_attention(q, k, v, tables_tensor(&(cos.clone(), sin.clone()), d, device), scale, window)
    };
    let t3 = |v: &[f32], shape: [usize; 3], device: &Device| Tensor::<3>::from_data(TensorData::new(v.to_vec(), shape), device);
    let plain = [t3(&q, shapes[0], device), t3(&k, shapes[1], device), t3(&v, shapes[2], device)];
    assert_close(&format!("self_attention, window {window:?}"), &values(run(plain, device)), &expected, 1e-5);

    let ad = device.clone().autodiff();
    let leaves = [t3(&q, shapes[0], &ad).require_grad(), t3(&k, shapes[1], &ad).require_grad(), t3(&v, shapes[2], &ad).require_grad()];
    let out = run(leaves.clone(), &ad);
    assert_close(&format!("self_attention, tracked, window {window:?}"), &values(out.clone().inner()), &expected, 1e-5);
    let grads = (out * t3(&c, shapes[0], &ad)).sum().backward();
    for (which, leaf) in leaves.iter().enumerate() {
        let ours = values(leaf.grad(&grads).unwrap());
        for i in (0..ours.len()).step_by(ours.len() / 23 + 1).chain([0, ours.len() - 1]) {
            let loss = |x: f64| {
                let mut at = inputs.clone();
                at[which][i] = x;
                forward(&at[0], &at[1], &at[2]).iter().zip(&c).map(|(y, &c)| y * c as f64).sum::<f64>()
            };
            assert_close(&format!("dL/d{}[{i}]", ["q", "k", "v"][which]), &ours[i..i + 1], &[derivative(loss, inputs[which][i])], 1e-4);
        }
    }
}

on_cpu_and_wgpu!(
    self_attention_matches,
    lora_matches,
    adamw_matches,
    sum_squares_matches,
    add_rms_norm_matches,
    kv_append_matches,
    causal_attention_matches,
    rms_norm_matches,
    rotary_matches,
    gated_matches,
    masked_softmax_matches,
    cross_entropy_matches
);
