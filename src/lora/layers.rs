//! What LoRA needs of a model ([`LoraLayers`]): its adaptable linear layers, in model order and
//! by their Hugging Face names, and the [`AdapterState`] it keeps (which adapters are loaded and
//! which one runs). A model implements this; PEFT's verbs ([`LoraModel`](crate::lora::LoraModel))
//! come with it.

use std::collections::BTreeMap;

use burn::tensor::Device;

use crate::lora::{LoraConfig, LoraLinear, LoraRun};

/// A model whose linear layers carry LoRA adapters (PEFT finds them with `named_modules()`).
pub trait LoraLayers {
    /// The linear layers LoRA can adapt, in model order (the output head is not one).
    fn lora_linears(&self) -> impl Iterator<Item = &LoraLinear>;

    /// The same, mutable.
    fn lora_linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear>;

    fn adapter_state(&self) -> &AdapterState;

    fn adapter_state_mut(&mut self) -> &mut AdapterState;

    /// The number of parameters of the base model (a tied head counted once).
    fn base_parameters(&self) -> usize;

    /// Where the model's tensors live.
    fn device(&self) -> Device;
}

/// Which adapters are loaded (with their configs), which one is active, and whether adapters are
/// disabled.
#[derive(Clone, Default)]
pub struct AdapterState {
    pub(super) configs: BTreeMap<String, LoraConfig>,
    pub(super) active: Option<String>,
    pub(super) disabled: bool,
}

impl AdapterState {
    /// The adapter the forward pass runs (stored weights, no dropout): the active one unless
    /// adapters are disabled.
    pub fn running(&self) -> Option<LoraRun<'_>> {
        let adapter = if self.disabled { None } else { self.active.as_deref() }?;
        Some(LoraRun::stored(adapter))
    }
}
