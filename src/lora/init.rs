//! Initial values of a new adapter's A [r, in] and B [out, r], as PEFT's
//! `LoraLayer.reset_lora_parameters` draws them (with our own seeded generator, so the values
//! differ from PyTorch's while the distributions are the same):
//!
//! - default (`true`): A ~ kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0
//! - `"gaussian"`: A ~ N(0, (1/r)^2); B = 0
//! - `false`: both keep nn.Linear's init: A ~ U(±1/sqrt(in)), B ~ U(±1/sqrt(r))
//!
//! and, from the base weight W [out, in] (the base then becomes W - scaling B A, so the layer's
//! output is unchanged at init), as PEFT's `olora_init` and `pissa_init`:
//!
//! - `"olora"`: W = QR; B = Q[:, :r], A = R[:r]
//! - `"pissa"`: W = V S U^T (thin SVD); B = V_r sqrt(S_r / scaling), A = sqrt(S_r / scaling) U_r^T
//!
//! Both products B A are independent of the sign conventions of QR and SVD, so the residual base
//! is PEFT's exactly (to rounding) even where A and B differ from PEFT's in sign.

use burn::tensor::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::linalg::{leading_columns, thin_qr, thin_svd};
use crate::lora::{LoraInit, LoraWeights};
use crate::tensor::{HostTensor, read_host, upload};

fn uniform(rng: &mut ChaCha8Rng, shape: [usize; 2], bound: f32) -> HostTensor {
    let data = (0..shape[0] * shape[1]).map(|_| rng.random_range(-bound..bound)).collect();
    HostTensor::new(shape.to_vec(), data)
}

/// N(0, std^2) by the Box-Muller transform.
fn normal(rng: &mut ChaCha8Rng, shape: [usize; 2], std: f32) -> HostTensor {
    let data = (0..shape[0] * shape[1])
        .map(|_| {
            let (u1, u2): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random());
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    HostTensor::new(shape.to_vec(), data)
}

fn zeros(shape: [usize; 2]) -> HostTensor {
    HostTensor::new(shape.to_vec(), vec![0.0; shape[0] * shape[1]])
}

/// (A, B) for a layer of `d_in` -> `d_out` at rank `r`.
pub fn init_lora(init: LoraInit, d_in: usize, d_out: usize, r: usize, rng: &mut ChaCha8Rng) -> Result<(HostTensor, HostTensor)> {
    let kaiming = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    Ok(match init {
        LoraInit::Default => (uniform(rng, [r, d_in], kaiming(d_in)), zeros([d_out, r])),
        LoraInit::Gaussian => (normal(rng, [r, d_in], 1.0 / r as f32), zeros([d_out, r])),
        LoraInit::Random => {
            let a = uniform(rng, [r, d_in], kaiming(d_in));
            (a, uniform(rng, [d_out, r], kaiming(r)))
        }
        LoraInit::Olora | LoraInit::Pissa => {
            return Err(Error::invalid(format!("init_lora_weights {init:?} derives A and B from the base weight, not from a random draw")));
        }
    })
}

/// OLoRA's or PiSSA's initial adapter for a base weight `weight_t` (W^T, [in, out]) at rank `r`.
/// The caller subtracts its update from the base.
pub async fn init_from_weight(init: LoraInit, weight_t: &Tensor<2>, r: usize, scaling: f64, module: &str) -> Result<LoraWeights> {
    let [d_in, d_out] = weight_t.dims();
    if r > d_in.min(d_out) {
        return Err(Error::invalid(format!("{init:?}: rank {r} exceeds min(in, out) = {} of {module}", d_in.min(d_out))));
    }
    match init {
        LoraInit::Olora => {
            // QR of W [out, in] (the transpose of weight_t): B = Q[:, :r], A = R[:r]
            let (q, r_mat) = thin_qr(&read_host(weight_t.clone()).await?.transpose());
            let b_t = leading_columns(&q, r, &vec![1.0; r]).transpose();
            let a_t = HostTensor::new(vec![r, d_in], r_mat.data[..r * d_in].to_vec()).transpose();
            let device = weight_t.device();
            Ok(LoraWeights { a_t: upload(a_t, &device), b_t: upload(b_t, &device), scaling })
        }
        LoraInit::Pissa => {
            // SVD of W^T = U' S V'^T, i.e. W = V' S U'^T: A^T = U'_r sqrt(S_r/s), B^T = (V'_r sqrt(S_r/s))^T
            let svd = thin_svd(&read_host(weight_t.clone()).await?)?;
            let root: Vec<f32> = svd.s[..r].iter().map(|s| (s / scaling as f32).sqrt()).collect();
            let device = weight_t.device();
            let a_t = leading_columns(&svd.u, r, &root);
            let b_t = leading_columns(&svd.v, r, &root).transpose();
            Ok(LoraWeights { a_t: upload(a_t, &device), b_t: upload(b_t, &device), scaling })
        }
        other => Err(Error::invalid(format!("init_lora_weights {other:?} does not derive the adapter from the base weight"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn stats(t: &HostTensor) -> (f32, f32, f32) {
        let n = t.data.len() as f32;
        let mean = t.data.iter().sum::<f32>() / n;
        let std = (t.data.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
        let max = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        (mean, std, max)
    }

    #[test]
    fn distributions_are_peft_s() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (a, b) = init_lora(LoraInit::Default, 256, 64, 8, &mut rng).unwrap();
        let (mean, std, max) = stats(&a);
        let bound = 1.0 / 16.0;
        assert!(max <= bound && max > 0.99 * bound, "A within U(±1/sqrt(in)): max {max}");
        assert!(mean.abs() < 0.003 && (std - bound / 3f32.sqrt()).abs() < 0.002, "uniform: mean {mean}, std {std}");
        assert!(b.data.iter().all(|&v| v == 0.0), "B is zero");

        let (a, b) = init_lora(LoraInit::Gaussian, 256, 64, 8, &mut rng).unwrap();
        let (mean, std, _) = stats(&a);
        assert!(mean.abs() < 0.01 && (std - 1.0 / 8.0).abs() < 0.005, "N(0, 1/r): mean {mean}, std {std}");
        assert!(b.data.iter().all(|&v| v == 0.0));

        let (_, b) = init_lora(LoraInit::Random, 256, 64, 8, &mut rng).unwrap();
        let (_, _, max) = stats(&b);
        assert!(max <= 1.0 / 8f32.sqrt() && max > 0.3, "B within U(±1/sqrt(r)) and not zero: {max}");
        assert!(init_lora(LoraInit::Olora, 4, 4, 2, &mut rng).is_err());
    }
}
