//! `LoraLinear`: a frozen base linear layer with named low-rank adapters (PEFT's
//! tuners/lora/layer.py `Linear`):
//!
//! ```text
//! y = x W^T + scaling * (x A^T) B^T      A: [r, in], B: [out, r], scaling = alpha / r (or alpha / sqrt(r))
//! ```
//!
//! Like the base weight, A and B are kept transposed on the device ([in, r] and [r, out]). Which
//! adapter runs is chosen per forward call by name, so switching adapters moves no weights.

use std::collections::BTreeMap;

use burn::tensor::Tensor;

use crate::model::Linear;

/// One adapter's matrices for one layer.
#[derive(Clone)]
pub struct LoraWeights {
    /// A^T: [in, r]
    pub a_t: Tensor<2>,
    /// B^T: [r, out]
    pub b_t: Tensor<2>,
    pub scaling: f64,
}

impl LoraWeights {
    /// The adapter's rank r.
    pub fn rank(&self) -> usize {
        self.a_t.dims()[1]
    }
}

/// A base linear layer and the adapters loaded for it, by adapter name.
pub struct LoraLinear {
    pub base: Linear,
    pub adapters: BTreeMap<String, LoraWeights>,
    /// Adapters whose update is folded into `base`, in merge order.
    pub merged: Vec<String>,
}

impl LoraLinear {
    pub fn new(base: Linear) -> Self {
        LoraLinear { base, adapters: BTreeMap::new(), merged: Vec::new() }
    }

    /// scaling * (B A)^T = scaling * A^T B^T: the adapter's update of `weight_t`, [in, out], in f32.
    pub fn delta_t(&self, adapter: &str) -> Option<Tensor<2>> {
        self.adapters.get(adapter).map(|lora| self.delta_of(lora))
    }

    /// The update of `weight_t` that `lora` stands for.
    pub fn delta_of(&self, lora: &LoraWeights) -> Tensor<2> {
        lora.a_t.clone().matmul(lora.b_t.clone()).mul_scalar(lora.scaling)
    }

    /// The base output plus the named adapter's low-rank update, if this layer has it and it is not
    /// already merged into the base.
    pub fn forward(&self, x: Tensor<3>, adapter: Option<&str>) -> Tensor<3> {
        let lora = adapter.filter(|name| !self.merged.iter().any(|m| m == name)).and_then(|name| self.adapters.get(name));
        let Some(lora) = lora else { return self.base.forward(x) };
        let [batch, seq, d_in] = x.dims();
        let x2 = x.reshape([batch * seq, d_in]);
        let base = x2.clone().matmul(self.base.weight_t.clone());
        let update = x2.matmul(lora.a_t.clone()).matmul(lora.b_t.clone()).mul_scalar(lora.scaling);
        let d_out = self.base.weight_t.dims()[1];
        (base + update).reshape([batch, seq, d_out])
    }

    /// (d_in, d_out) of the base layer.
    pub fn shape(&self) -> (usize, usize) {
        let [d_in, d_out] = self.base.weight_t.dims();
        (d_in, d_out)
    }
}
