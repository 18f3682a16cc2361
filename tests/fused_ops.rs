//! The fused operations (`nn::ops`): RMSNorm, the rotary embedding, SwiGLU, attention's masked
//! softmax and the head's cross-entropy, values and gradients, on the CPU backend (its own
//! vectorised kernels, the rotary embedding composed) and on wgpu (a cubecl kernel each), against
//! the math in f64 on the host; gradients against
//! central finite differences of that f64 math, so no derivative formula is shared with the code.
//! Sizes are odd and large enough that the CPU kernels split their work and leave vector tails.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use webgpu_lora::nn::ops::{attend, cross_entropy, rms_norm, rotary, swiglu};

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

    // L = sum(out * c): dL/dx by central differences of the f64 row, for a few elements per row
    let tracked = Tensor::<3>::from_data(TensorData::new(x.clone(), shape), &device.clone().autodiff()).require_grad();
    let out = rms_norm(tracked.clone(), Tensor::from_data(TensorData::new(w.clone(), [d]), &device.clone().autodiff()), eps);
    let grads = (out * Tensor::from_data(TensorData::new(c.clone(), shape), &device.clone().autodiff())).sum().backward();
    let ours = values(tracked.grad(&grads).unwrap());
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

fn swiglu_matches(device: &Device) {
    let shape = [2, 37, 1001]; // 74074 elements: several parallel tasks, a tail of 10
    let n: usize = shape.iter().product();
    let (g, u, w) = (random(n, 12.0, 1), random(n, 3.0, 2), random(n, 1.0, 3));
    let tracked = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), shape), &device.clone().autodiff()).require_grad();
    let (gate, up) = (tracked(&g), tracked(&u));
    let out = swiglu(gate.clone(), up.clone());
    let expected: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| silu_f64(g as f64) * u as f64).collect();
    assert_close("swiglu", &values(out.clone().inner()), &expected, 1e-6);

    // L = sum(out * w): dL/dgate = w u silu'(gate), dL/dup = w silu(gate)
    let grads = (out * Tensor::from_data(TensorData::new(w.clone(), shape), &device.clone().autodiff())).sum().backward();
    let d_gate: Vec<f64> = (0..n).map(|i| w[i] as f64 * u[i] as f64 * derivative(silu_f64, g[i] as f64)).collect();
    let d_up: Vec<f64> = (0..n).map(|i| w[i] as f64 * silu_f64(g[i] as f64)).collect();
    assert_close("dL/dgate", &values(gate.grad(&grads).unwrap()), &d_gate, 1e-5);
    assert_close("dL/dup", &values(up.grad(&grads).unwrap()), &d_up, 1e-6);

    // untracked (inference): the same values
    let plain = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), shape), device);
    assert_close("swiglu (plain)", &values(swiglu(plain(&g), plain(&u))), &expected, 1e-6);
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
    // P v with v = identity is P itself
    let eye: Vec<f32> = (0..k * k).map(|at| if at / k == at % k { 1.0 } else { 0.0 }).collect();
    let v = Tensor::<4>::from_data(TensorData::new(eye, [1, 1, k, k]), device).expand([b, h, k, k]);
    let probs = attend(s.clone(), m, v);
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

on_cpu_and_wgpu!(rms_norm_matches, rotary_matches, swiglu_matches, masked_softmax_matches, cross_entropy_matches);
