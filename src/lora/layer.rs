//! `LoraLinear`: a frozen base linear layer with named low-rank adapters (PEFT's
//! tuners/lora/layer.py `Linear`):
//!
//! ```text
//! y = x W^T + scaling * (x A^T) B^T      A: [r, in], B: [out, r], scaling = alpha / r (or alpha / sqrt(r))
//! ```
//!
//! Like the base weight, A and B are kept transposed on the device ([in, r] and [r, out]). Which
//! adapter runs is chosen per forward call by name, so switching adapters moves no weights.
//!
//! Merging (W <- W + scaling B A) and OLoRA/PiSSA's residual (W <- W - scaling B0 A0) change
//! the base in its storage precision. A quantized base is requantized, as PEFT does for
//! bitsandbytes layers, but always from the weight as loaded: W = requantize(W_loaded + Σ merged
//! updates - Σ initial updates), so rounding never compounds and undoing every change gives the
//! loaded weight back bit for bit.

use std::collections::BTreeMap;

use burn::tensor::Tensor;

use crate::error::Result;
use crate::lora::PartDropout;
use crate::nn::{self, Linear, Weight};

/// Which adapter a forward pass runs, and the LoRA dropout to apply before A (none outside
/// training).
#[derive(Clone, Copy)]
pub struct LoraRun<'a> {
    pub adapter: &'a str,
    /// The matrices to run instead of the adapter's stored ones, by module name: training runs
    /// its own autodiff copies (one per thread) without touching the model.
    pub weights: Option<&'a AdapterWeights>,
    pub dropout: Option<&'a PartDropout<'a>>,
}

impl<'a> LoraRun<'a> {
    /// The stored adapter `adapter`, without dropout.
    pub fn stored(adapter: &'a str) -> Self {
        LoraRun { adapter, weights: None, dropout: None }
    }
}

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
    /// The same adapter matrices, each passed through `f` (the scaling kept).
    pub fn map(&self, f: impl Fn(&Tensor<2>) -> Tensor<2>) -> LoraWeights {
        LoraWeights { a_t: f(&self.a_t), b_t: f(&self.b_t), scaling: self.scaling }
    }

    /// The adapter's rank r.
    pub fn rank(&self) -> usize {
        self.a_t.dims()[1]
    }
}

/// One adapter's matrices in every layer it adapts, by module name.
pub type AdapterWeights = BTreeMap<String, LoraWeights>;

/// A base linear layer and the adapters loaded for it, by adapter name.
#[derive(Clone)]
pub struct LoraLinear {
    /// The module's Hugging Face name (`model.layers.3.self_attn.q_proj`): what PEFT's
    /// `target_modules` and adapter keys refer to.
    pub name: String,
    pub base: Linear,
    pub adapters: BTreeMap<String, LoraWeights>,
    /// Adapters whose update is folded into `base`, in merge order.
    pub merged: Vec<String>,
    /// OLoRA/PiSSA adapters' initial values, whose update was subtracted from `base` when the
    /// adapter was added (so the output did not change); kept to undo that and to convert.
    pub initial: BTreeMap<String, LoraWeights>,
    /// A quantized base as loaded (None for an f32 or f16 base): what every change is
    /// requantized from.
    loaded: Option<Weight>,
}

impl LoraLinear {
    pub fn new(name: String, base: Linear) -> Self {
        let loaded = base.weight_t.is_quantized().then(|| base.weight_t.clone());
        LoraLinear { name, base, adapters: BTreeMap::new(), merged: Vec::new(), initial: BTreeMap::new(), loaded }
    }

    /// scaling * (B A)^T = scaling * A^T B^T: the adapter's update of `weight_t`, [in, out], in f32.
    pub fn delta_t(&self, adapter: &str) -> Option<Tensor<2>> {
        self.adapters.get(adapter).map(|lora| self.delta_of(lora))
    }

    /// The update of `weight_t` that `lora` stands for.
    pub fn delta_of(&self, lora: &LoraWeights) -> Tensor<2> {
        // scale the thin factor, not the [in, out] product: one pass less over a full-size matrix
        lora.a_t.clone().mul_scalar(lora.scaling).matmul(lora.b_t.clone())
    }

    /// W^T <- W^T + sign * delta_t, in the base's storage precision, after `merged` and `initial`
    /// were updated to say so: a quantized base is requantized from the loaded weight with every
    /// change they list.
    async fn update_base(&mut self, delta_t: Tensor<2>, sign: f64) -> Result<()> {
        let Some(loaded) = &self.loaded else {
            self.base.weight_t.add(delta_t, sign);
            return Ok(());
        };
        let merged = self.merged.iter().map(|m| self.delta_t(m).expect("a merged adapter is loaded"));
        let residuals = self.initial.values().map(|init| self.delta_of(init).neg());
        self.base.weight_t = match merged.chain(residuals).reduce(|a, b| a + b) {
            Some(changes) => loaded.plus(changes, &self.name).await?,
            None => loaded.clone(),
        };
        Ok(())
    }

    /// Folds the named adapter into the base (W <- W + scaling B A); false if this layer does
    /// not have it or it is already merged. On an error (a value a quantized base cannot hold)
    /// nothing changed.
    pub async fn merge(&mut self, adapter: &str) -> Result<bool> {
        let Some(delta) = self.delta_t(adapter).filter(|_| !self.merged.iter().any(|m| m == adapter)) else { return Ok(false) };
        self.merged.push(adapter.to_string());
        if let Err(e) = self.update_base(delta, 1.0).await {
            self.merged.pop();
            return Err(e);
        }
        Ok(true)
    }

    /// Takes every merged adapter back out of the base, last merged first.
    pub async fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.merged.pop() {
            let delta = self.delta_t(&name).expect("a merged adapter is loaded");
            self.update_base(delta, -1.0).await?;
        }
        Ok(())
    }

    /// Subtracts the update of an OLoRA/PiSSA adapter's initial values from the base: the
    /// residual weight W - scaling * B0 A0 that the adapter trains on. On an error nothing changed.
    pub async fn subtract_initial(&mut self, adapter: &str, initial: LoraWeights) -> Result<()> {
        let delta = self.delta_of(&initial);
        self.initial.insert(adapter.to_string(), initial);
        if let Err(e) = self.update_base(delta, -1.0).await {
            self.initial.remove(adapter);
            return Err(e);
        }
        Ok(())
    }

    /// Undoes [`subtract_initial`](Self::subtract_initial) (to f32 rounding; exactly for a
    /// quantized base), if it was done.
    pub async fn restore_initial(&mut self, adapter: &str) -> Result<()> {
        if let Some(initial) = self.initial.remove(adapter) {
            self.update_base(self.delta_of(&initial), 1.0).await?;
        }
        Ok(())
    }

    /// Drops every adapter and keeps the base as it is now (merged updates and residuals
    /// included): what a quantized base is requantized from from now on.
    pub fn keep_base(&mut self) {
        self.adapters.clear();
        self.merged.clear();
        self.initial.clear();
        if self.loaded.is_some() {
            self.loaded = Some(self.base.weight_t.clone());
        }
    }

    /// The base output plus the named adapter's low-rank update, if this layer has it and it is not
    /// already merged into the base.
    pub fn forward(&self, x: Tensor<3>, run: Option<LoraRun>) -> Tensor<3> {
        let run = run.filter(|run| !self.merged.iter().any(|m| m == run.adapter));
        let lora = run.and_then(|run| match run.weights {
            Some(weights) => weights.get(&self.name),
            None => self.adapters.get(run.adapter),
        });
        let Some(lora) = lora else { return self.base.forward(x) };
        let dropout = run.and_then(|run| run.dropout);
        let [batch, seq, d_in] = x.dims();
        let x2 = x.reshape([batch * seq, d_in]);
        let base = self.base.apply(x2.clone());
        let dropout = dropout.map(|dropout| dropout.mask(d_in, &x2.device()));
        let d_out = self.base.weight_t.dims()[1];
        nn::ops::lora(base, x2, dropout, lora.a_t.clone(), lora.b_t.clone(), lora.scaling as f32).reshape([batch, seq, d_out])
    }

    /// (d_in, d_out) of the base layer.
    pub fn shape(&self) -> (usize, usize) {
        self.base.shape()
    }
}
