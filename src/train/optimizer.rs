//! AdamW, learning-rate schedules and gradient clipping, as PyTorch's `torch.optim.AdamW`,
//! transformers' `get_{linear,cosine,constant}_schedule_with_warmup` and
//! `torch.nn.utils.clip_grad_norm_` compute them, on plain tensors: the trained parameters are an
//! adapter's matrices or the model's own weights as matrices (`model::parameters`), not a burn
//! `Module`.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::nn::ops::{AdamWStep, adamw, sum_squares_into};
use crate::tensor::read_f32;

/// AdamW's settings (PyTorch's defaults besides lr).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamW {
    pub fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::invalid(what.to_string()));
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(&format!("learning rate {}: must be a positive number", self.lr));
        }
        if !((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2)) {
            return bad(&format!("betas ({}, {}): each must be in [0, 1)", self.beta1, self.beta2));
        }
        if !(self.eps > 0.0) || self.weight_decay < 0.0 {
            return bad(&format!("eps {} must be positive and weight decay {} not negative", self.eps, self.weight_decay));
        }
        Ok(())
    }

    /// One step for one parameter at optimizer step `t` (from 1) with learning rate `lr`, its
    /// gradient scaled by `grad_scale` (clipping): returns the new (parameter, m, v).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        param: Tensor<2>,
        grad: Tensor<2>,
        m: Tensor<2>,
        v: Tensor<2>,
        t: usize,
        lr: f64,
        grad_scale: f64,
    ) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let bias1 = 1.0 - self.beta1.powi(t as i32);
        let bias2 = 1.0 - self.beta2.powi(t as i32);
        let step = AdamWStep {
            grad_scale: grad_scale as f32,
            decay: (1.0 - lr * self.weight_decay) as f32,
            beta1: self.beta1 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            step_size: (lr / bias1) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            eps: self.eps as f32,
        };
        adamw(param, grad, m, v, step)
    }
}

/// How the learning rate moves after warmup ("cosine", "linear" or "constant" in options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        })
    }
}

impl Schedule {
    /// The factor of the base learning rate at optimizer step `step` (from 0) of `total`, after
    /// `warmup` steps of linear warmup from 0 (transformers' lambdas).
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// The global L2 norm of `grads`: sqrt of the sum of squares of every entry, each matrix's sum
/// taken on the device (one pass each, into one small tensor read back once), the total in f64.
pub async fn global_norm(grads: &[Tensor<2>]) -> Result<f64> {
    let Some(first) = grads.first() else { return Ok(0.0) };
    let mut sums = Tensor::<1>::empty([grads.len()], &first.device());
    for (slot, g) in grads.iter().enumerate() {
        sums = sum_squares_into(sums, g.clone(), slot);
    }
    Ok(read_f32(sums).await?.iter().map(|&s| s as f64).sum::<f64>().sqrt())
}

/// clip_grad_norm_'s factor for a global norm: max_norm / (norm + 1e-6), capped at 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_transformers_lambdas() {
        assert_eq!(Schedule::Cosine.factor(0, 10, 100), 0.0);
        assert_eq!(Schedule::Cosine.factor(5, 10, 100), 0.5);
        assert_eq!(Schedule::Cosine.factor(10, 10, 100), 1.0);
        assert!((Schedule::Cosine.factor(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(Schedule::Cosine.factor(100, 10, 100).abs() < 1e-12);
        assert_eq!(Schedule::Linear.factor(55, 10, 100), 0.5);
        assert_eq!(Schedule::Constant.factor(99, 0, 100), 1.0);
        assert_eq!(clip_factor(10.0, 1.0), 1.0 / (10.0 + 1e-6));
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
    }

    /// One AdamW step from zero moments moves each entry by lr * sign(g) (bias-corrected m/sqrt(v)
    /// = g/|g|), after the decoupled weight decay.
    #[test]
    fn first_adamw_step_is_lr_times_sign() {
        let device = burn::tensor::Device::flex();
        let t = |v: Vec<f32>| Tensor::<2>::from_data(burn::tensor::TensorData::new(v, [1, 3]), &device);
        let opt = AdamW { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let (p, _, _) = opt.update(t(vec![1.0, 2.0, 3.0]), t(vec![0.3, -2.0, 0.0]), t(vec![0.0; 3]), t(vec![0.0; 3]), 1, 0.1, 1.0);
        let p = p.into_data().try_into_vec::<f32>().unwrap();
        let expected = [1.0 * 0.95 - 0.1, 2.0 * 0.95 + 0.1, 3.0 * 0.95];
        for (a, b) in p.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{p:?}");
        }
    }
}
