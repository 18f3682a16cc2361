//! Loading PEFT adapters into a [`LlamaModel`] and choosing which one runs.
//!
//! An adapter is `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. Loading
//! checks everything (targets, names, shapes) before it touches the model, so a bad adapter leaves
//! the model as it was. As in PEFT, `load_adapter` does not activate the adapter.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::io::{HostTensor, SafetensorsWeights};
use crate::lora::LoraWeights;
use crate::model::{LlamaModel, transpose};

/// PEFT's prefix of every key in adapter_model.safetensors.
const KEY_PREFIX: &str = "base_model.model.";

/// The safetensors key of a module's `lora_A` or `lora_B` weight.
pub fn lora_key(module: &str, matrix: &str) -> String {
    format!("{KEY_PREFIX}{module}.{matrix}.weight")
}

/// Which adapters are loaded, which one is active, and whether adapters are disabled.
#[derive(Default)]
pub struct AdapterState {
    configs: BTreeMap<String, LoraConfig>,
    active: Option<String>,
    disabled: bool,
}

impl AdapterState {
    /// The adapter the forward pass runs: the active one unless adapters are disabled.
    pub fn running(&self) -> Option<&str> {
        if self.disabled { None } else { self.active.as_deref() }
    }
}

impl LlamaModel {
    /// Loads a PEFT adapter under `name` without activating it. `config_file` and `weights_file`
    /// label the two files in errors (e.g. their paths or URLs).
    pub fn load_adapter(
        &mut self,
        name: &str,
        (config_file, config_json): (&str, &[u8]),
        (weights_file, weights): (&str, Vec<u8>),
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("an adapter needs a non-empty name"));
        }
        if self.adapters.configs.contains_key(name) {
            return Err(Error::invalid(format!("an adapter named {name:?} is already loaded: delete it first or choose another name")));
        }
        let config = LoraConfig::from_json(config_json, config_file)?;
        let tensors = SafetensorsWeights::new(vec![(weights_file.to_string(), weights)])?;
        let modules = self.config.linear_module_names();

        // every tensor must be the A or B of a linear layer this base has
        for key in tensors.names() {
            let module = key
                .strip_prefix(KEY_PREFIX)
                .and_then(|k| k.strip_suffix(".lora_A.weight").or_else(|| k.strip_suffix(".lora_B.weight")))
                .ok_or_else(|| Error::file(weights_file, format!("tensor {key} is not a LoRA weight (expected {KEY_PREFIX}<module>.lora_A.weight / lora_B.weight)")))?;
            if !modules.iter().any(|m| m == module) {
                return Err(Error::file(weights_file, format!("tensor {key} adapts module {module}, which this base model does not have: the adapter was made for another model")));
            }
        }

        let mut built: BTreeMap<String, LoraWeights> = BTreeMap::new();
        for module in modules.iter().filter(|m| config.targets(m, true)) {
            let (a_key, b_key) = (lora_key(module, "lora_A"), lora_key(module, "lora_B"));
            if !tensors.contains(&a_key) || !tensors.contains(&b_key) {
                return Err(Error::file(weights_file, format!("adapter_config.json targets {module} but {a_key} or {b_key} is missing")));
            }
            let (d_in, d_out) = self.linear(module).expect("listed by the config").shape();
            let r = config.rank_for(module);
            let a = tensors.tensor(&a_key)?;
            let b = tensors.tensor(&b_key)?;
            for (key, t, expected) in [(&a_key, &a, [r, d_in]), (&b_key, &b, [d_out, r])] {
                if t.shape != expected {
                    return Err(Error::file(
                        weights_file,
                        format!("{key} has shape {:?} but this base and rank {r} need {expected:?}: the adapter does not fit this model", t.shape),
                    ));
                }
            }
            let device = self.device();
            let upload = |t: HostTensor| {
                let shape = [t.shape[0], t.shape[1]];
                Tensor::<2>::from_data(TensorData::new(t.data, shape), &device)
            };
            built.insert(module.clone(), LoraWeights { a_t: upload(transpose(&a)), b_t: upload(transpose(&b)), scaling: config.scaling_for(module) });
        }
        if built.is_empty() {
            return Err(Error::file(config_file, "target_modules matches no linear layer of this base model"));
        }
        for (module, weights) in built {
            self.linear(&module).expect("checked above").adapters.insert(name.to_string(), weights);
        }
        self.adapters.configs.insert(name.to_string(), config);
        Ok(())
    }

    /// The linear layer called `module` (e.g. `model.layers.0.self_attn.q_proj`).
    fn linear(&mut self, module: &str) -> Option<&mut crate::lora::LoraLinear> {
        let rest = module.strip_prefix("model.layers.")?;
        let (index, part) = rest.split_once('.')?;
        let layer = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        layer.linears_mut().into_iter().find(|(name, _)| *name == part).map(|(_, l)| l)
    }

    /// Makes `name` the adapter that runs. Moves no weights.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        if !self.adapters.configs.contains_key(name) {
            return Err(Error::invalid(format!("no adapter named {name:?}; loaded: {:?}", self.adapter_names())));
        }
        self.adapters.active = Some(name.to_string());
        Ok(())
    }

    /// The active adapter's name (also while adapters are disabled).
    pub fn active_adapter(&self) -> Option<&str> {
        self.adapters.active.as_deref()
    }

    /// The names of the loaded adapters, sorted.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.configs.keys().map(String::as_str).collect()
    }

    /// The config an adapter was loaded with.
    pub fn adapter_config(&self, name: &str) -> Option<&LoraConfig> {
        self.adapters.configs.get(name)
    }

    /// Runs the base model alone until [`enable_adapter`](Self::enable_adapter).
    pub fn disable_adapter(&mut self) {
        self.adapters.disabled = true;
    }

    pub fn enable_adapter(&mut self) {
        self.adapters.disabled = false;
    }
}
