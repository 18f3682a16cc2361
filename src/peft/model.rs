//! PEFT's model-level verbs on a [`LlamaModel`]: load (from PEFT files) or add (initialised)
//! adapters, choose which one runs, disable, merge / unmerge / unload, delete, save, combine, count.
//!
//! An adapter is `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. Loading
//! checks everything (targets, names, shapes) before it touches the model, so a bad adapter leaves
//! the model as it was. As in PEFT, `load_adapter` does not activate the adapter.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};

use crate::config::{LoraConfig, LoraInit, TargetModules};
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

fn upload(t: HostTensor, device: &burn::tensor::Device) -> Tensor<2> {
    let shape = [t.shape[0], t.shape[1]];
    Tensor::from_data(TensorData::new(t.data, shape), device)
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
        self.check_new_name(name)?;
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
            built.insert(module.clone(), LoraWeights { a_t: upload(transpose(&a), &device), b_t: upload(transpose(&b), &device), scaling: config.scaling_for(module) });
        }
        if built.is_empty() {
            return Err(Error::file(config_file, "target_modules matches no linear layer of this base model"));
        }
        self.install_adapter(name, config, built);
        Ok(())
    }

    /// Puts a fully built adapter in place (nothing can fail from here on).
    fn install_adapter(&mut self, name: &str, config: LoraConfig, built: BTreeMap<String, LoraWeights>) {
        for (module, weights) in built {
            self.linear(&module).expect("module names come from the config").adapters.insert(name.to_string(), weights);
        }
        self.adapters.configs.insert(name.to_string(), config);
    }

    /// Adds a new adapter `name` initialised as `config.init_lora_weights` says (PEFT's
    /// `add_adapter`), without activating it. `seed` makes the initial values reproducible.
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        self.check_new_name(name)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let device = self.device();
        let mut built = BTreeMap::new();
        let mut shifted_bases = Vec::new();
        for module in self.config.linear_module_names().into_iter().filter(|m| config.targets(m, true)) {
            let layer = self.linear(&module).expect("listed by the config");
            let (d_in, d_out) = layer.shape();
            let (r, scaling) = (config.rank_for(&module), config.scaling_for(&module));
            let weights = if config.init_lora_weights == LoraInit::Olora {
                if r > d_in.min(d_out) {
                    return Err(Error::invalid(format!("OLoRA: rank {r} exceeds min(in, out) = {} of {module}", d_in.min(d_out))));
                }
                // PEFT's olora_init: W = QR; B = Q[:, :r], A = R[:r]; W <- W - scaling * B A
                let (q, r_mat) = burn::linalg::qr(layer.base.weight_t.clone().transpose(), true);
                let (b, a) = (q.narrow(1, 0, r), r_mat.narrow(0, 0, r));
                let lora = LoraWeights { a_t: a.transpose(), b_t: b.transpose(), scaling };
                shifted_bases.push((module.clone(), layer.base.weight_t.clone() - layer.delta_of(&lora)));
                lora
            } else {
                let (a, b) = crate::lora::init_lora(config.init_lora_weights, d_in, d_out, r, &mut rng)?;
                LoraWeights { a_t: upload(transpose(&a), &device), b_t: upload(transpose(&b), &device), scaling }
            };
            built.insert(module, weights);
        }
        if built.is_empty() {
            return Err(Error::invalid("target_modules matches no linear layer of this base model"));
        }
        for (module, weight_t) in shifted_bases {
            self.linear(&module).expect("listed by the config").base.weight_t = weight_t;
        }
        self.install_adapter(name, config, built);
        Ok(())
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("an adapter needs a non-empty name"));
        }
        if self.adapters.configs.contains_key(name) {
            return Err(Error::invalid(format!("an adapter named {name:?} is already loaded: delete it first or choose another name")));
        }
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

    /// Runs the base model alone until [`enable_adapter`](Self::enable_adapter). Merged adapters
    /// are unmerged first (as PEFT does), so disabled really means the base.
    pub fn disable_adapter(&mut self) {
        self.unmerge_adapter();
        self.adapters.disabled = true;
    }

    pub fn enable_adapter(&mut self) {
        self.adapters.disabled = false;
    }
}

/// What [`LlamaModel::merge_adapter`] did.
#[derive(Debug, Default, PartialEq)]
pub struct MergeReport {
    pub merged: Vec<String>,
    /// Already merged, so left alone (PEFT warns and skips them too).
    pub skipped: Vec<String>,
}

impl LlamaModel {
    fn lora_layers_mut(&mut self) -> impl Iterator<Item = &mut crate::lora::LoraLinear> {
        self.layers.iter_mut().flat_map(|l| l.linears_mut().into_iter().map(|(_, linear)| linear))
    }

    fn lora_layers(&self) -> impl Iterator<Item = &crate::lora::LoraLinear> {
        self.layers.iter().flat_map(|l| l.linears().into_iter().map(|(_, linear)| linear))
    }

    fn merged_adapters(&self) -> Vec<String> {
        let mut merged: Vec<String> = self.lora_layers().flat_map(|l| l.merged.iter().cloned()).collect();
        merged.sort();
        merged.dedup();
        merged
    }

    fn check_known(&self, name: &str) -> Result<()> {
        if self.adapters.configs.contains_key(name) {
            Ok(())
        } else {
            Err(Error::invalid(format!("no adapter named {name:?}; loaded: {:?}", self.adapter_names())))
        }
    }

    /// Folds adapters into the base weights: W <- W + scaling * B A (in f32). `names` empty means
    /// the active adapter. With `safe_merge`, merged weights are checked for NaN/Inf first and
    /// nothing changes if any is found. Already merged adapters are skipped, as PEFT does.
    pub async fn merge_adapter(&mut self, names: &[&str], safe_merge: bool) -> Result<MergeReport> {
        let names: Vec<String> = if names.is_empty() {
            vec![self.active_adapter().ok_or_else(|| Error::invalid("no active adapter to merge: set_adapter first or name the adapters"))?.to_string()]
        } else {
            names.iter().map(|n| n.to_string()).collect()
        };
        for name in &names {
            self.check_known(name)?;
        }
        let already = self.merged_adapters();
        let mut report = MergeReport::default();
        for name in names {
            if already.contains(&name) {
                report.skipped.push(name);
                continue;
            }
            // compute every new weight before changing any
            let mut updates = Vec::new();
            for (index, layer) in self.lora_layers().enumerate() {
                if let Some(delta) = layer.delta_t(&name) {
                    let merged = layer.base.weight_t.clone() + delta;
                    if safe_merge {
                        let finite = merged.clone().is_finite().all().into_data_async().await
                            .map_err(|e| Error::Backend(format!("reading a result back failed: {e:?}")))?;
                        if finite.as_slice::<bool>().map(|v| !v[0]).unwrap_or(true) {
                            return Err(Error::invalid(format!("NaNs detected in the merged weights. The adapter {name} seems to be broken")));
                        }
                    }
                    updates.push((index, merged));
                }
            }
            let mut layers: Vec<_> = self.lora_layers_mut().collect();
            for (index, merged) in updates {
                layers[index].base.weight_t = merged;
                layers[index].merged.push(name.clone());
            }
            report.merged.push(name);
        }
        Ok(report)
    }

    /// Takes every merged adapter back out of the base weights (W <- W - scaling * B A).
    pub fn unmerge_adapter(&mut self) {
        for layer in self.lora_layers_mut() {
            while let Some(name) = layer.merged.pop() {
                let delta = layer.delta_t(&name).expect("a merged adapter is loaded");
                layer.base.weight_t = layer.base.weight_t.clone() - delta;
            }
        }
    }

    /// Merges (see [`merge_adapter`](Self::merge_adapter)) and then removes every adapter: the
    /// model becomes a plain base model with the merged weights.
    pub async fn merge_and_unload(&mut self, names: &[&str], safe_merge: bool) -> Result<MergeReport> {
        let report = self.merge_adapter(names, safe_merge).await?;
        self.drop_adapters();
        Ok(report)
    }

    /// Removes every adapter and undoes every merge: back to the base model.
    pub fn unload(&mut self) {
        self.unmerge_adapter();
        self.drop_adapters();
    }

    fn drop_adapters(&mut self) {
        for layer in self.lora_layers_mut() {
            layer.adapters.clear();
            layer.merged.clear();
        }
        self.adapters = AdapterState::default();
    }

    /// Removes one adapter. A merged adapter cannot be deleted (unmerge first). If it was active,
    /// the first remaining adapter (by name) becomes active, as PEFT does.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.check_known(name)?;
        if self.merged_adapters().iter().any(|m| m == name) {
            return Err(Error::invalid(format!("adapter {name:?} is merged into the base weights: unmerge_adapter before deleting it")));
        }
        for layer in self.lora_layers_mut() {
            layer.adapters.remove(name);
        }
        self.adapters.configs.remove(name);
        if self.adapters.active.as_deref() == Some(name) {
            self.adapters.active = self.adapters.configs.keys().next().cloned();
        }
        Ok(())
    }

    /// (trainable, all) parameter counts, as PEFT's `get_nb_trainable_parameters`: the active
    /// adapter's A and B are trainable; all counts the base (a tied head once) and every adapter.
    pub fn trainable_parameters(&self) -> (usize, usize) {
        let numel = |t: &Tensor<2>| t.dims().iter().product::<usize>();
        let c = &self.config;
        let mut base = c.vocab_size * c.hidden_size + c.hidden_size;
        base += self.lm_head.as_ref().map_or(0, numel);
        base += self.layers.len() * 2 * c.hidden_size;
        let (mut trainable, mut adapters) = (0, 0);
        for layer in self.lora_layers() {
            base += numel(&layer.base.weight_t);
            for (name, lora) in &layer.adapters {
                let n = numel(&lora.a_t) + numel(&lora.b_t);
                adapters += n;
                if self.adapters.active.as_deref() == Some(name) {
                    trainable += n;
                }
            }
        }
        (trainable, base + adapters)
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_parameters_line(&self) -> String {
        let (trainable, all) = self.trainable_parameters();
        let pct = 100.0 * trainable as f64 / all as f64;
        format!("trainable params: {} || all params: {} || trainable%: {pct:.4}", thousands(trainable), thousands(all))
    }
}

/// 1234567 -> "1,234,567" (Python's `{:,d}`).
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// An adapter as PEFT files: `adapter_config.json` text and `adapter_model.safetensors` bytes.
pub struct AdapterFiles {
    pub config_json: String,
    pub safetensors: Vec<u8>,
}

impl LlamaModel {
    /// The adapter `name` as PEFT files (F32 weights, metadata {"format": "pt"}): they load in
    /// PEFT's `PeftModel.from_pretrained` and here.
    pub async fn save_adapter(&self, name: &str) -> Result<AdapterFiles> {
        self.check_known(name)?;
        let modules = self.config.linear_module_names();
        let mut tensors = BTreeMap::new();
        for (module, layer) in modules.iter().zip(self.lora_layers()) {
            let Some(lora) = layer.adapters.get(name) else { continue };
            for (matrix, t) in [("lora_A", &lora.a_t), ("lora_B", &lora.b_t)] {
                let [rows, cols] = t.dims();
                let values = crate::generate::read_f32(t.clone()).await?;
                // stored transposed on the device; PEFT's layout is the transpose
                tensors.insert(lora_key(module, matrix), transpose(&HostTensor::new(vec![rows, cols], values)));
            }
        }
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(AdapterFiles {
            config_json: self.adapters.configs[name].to_json(),
            safetensors: crate::io::safetensors::write_safetensors(&tensors, crate::io::StoreDtype::F32, Some(metadata))?,
        })
    }
}

/// The file names of a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

impl LlamaModel {
    /// Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) as `name`.
    pub fn load_adapter_dir(&mut self, name: &str, dir: &std::path::Path) -> Result<()> {
        let read = |file: &str| {
            let path = dir.join(file);
            let label = path.display().to_string();
            std::fs::read(&path).map(|bytes| (label.clone(), bytes)).map_err(|source| Error::Io { file: label, source })
        };
        let (config_label, config) = read(ADAPTER_CONFIG_FILE)?;
        let (weights_label, weights) = read(ADAPTER_WEIGHTS_FILE)?;
        self.load_adapter(name, (&config_label, &config), (&weights_label, weights))
    }
}

/// How [`LlamaModel::add_weighted_adapter`] combines adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// A = sum sign_i sqrt(|w_i s_i|) A_i, B = sum sqrt(|w_i s_i|) B_i (equal ranks).
    Linear,
    /// A = rows of w_i s_i A_i stacked, B = columns of B_i side by side: rank sum r_i, exact sum of deltas.
    Cat,
}

impl Combination {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "linear" => Ok(Combination::Linear),
            "cat" => Ok(Combination::Cat),
            other => Err(Error::invalid(format!("combination {other:?} is not supported; use \"linear\" or \"cat\" (\"svd\" is not implemented yet)"))),
        }
    }
}

impl LlamaModel {
    /// PEFT's `add_weighted_adapter`: a new adapter `new_name` from weighted adapters, with
    /// r = lora_alpha = the new rank (scaling 1), the other settings from the first adapter.
    /// With one adapter PEFT always combines linearly; so do we. Not activated.
    pub fn add_weighted_adapter(&mut self, names: &[&str], weights: &[f64], new_name: &str, combination: Combination) -> Result<()> {
        if names.is_empty() || names.len() != weights.len() {
            return Err(Error::invalid(format!("give one weight per adapter: {} adapters, {} weights", names.len(), weights.len())));
        }
        self.check_new_name(new_name)?;
        for name in names {
            self.check_known(name)?;
        }
        let combination = if names.len() == 1 { Combination::Linear } else { combination };
        let configs: Vec<&LoraConfig> = names.iter().map(|n| &self.adapters.configs[*n]).collect();
        let max_rank = |c: &LoraConfig| c.rank_pattern.iter().map(|(_, r)| *r).chain([c.r]).max().unwrap_or(c.r);
        let ranks: Vec<usize> = configs.iter().map(|c| max_rank(c)).collect();
        let new_rank = match combination {
            Combination::Linear if ranks.iter().any(|&r| r != ranks[0]) => {
                return Err(Error::invalid(format!("linear combination needs equal ranks, got {ranks:?}: use \"cat\"")));
            }
            Combination::Linear => ranks[0],
            Combination::Cat => ranks.iter().sum(),
        };
        let mut config = configs[0].clone();
        config.target_modules = TargetModules::union(&configs.iter().map(|c| &c.target_modules).collect::<Vec<_>>())?;
        config.r = new_rank;
        config.lora_alpha = new_rank as f64;
        config.use_rslora = false;
        config.rank_pattern.clear();
        config.alpha_pattern.clear();

        let mut built = BTreeMap::new();
        for (module, layer) in self.config.linear_module_names().into_iter().zip(self.lora_layers()) {
            let parts: Vec<(&LoraWeights, f64)> =
                names.iter().zip(weights).filter_map(|(n, &w)| layer.adapters.get(*n).map(|l| (l, w * l.scaling))).collect();
            if parts.is_empty() {
                continue;
            }
            if combination == Combination::Linear && parts.iter().any(|(l, _)| l.rank() != parts[0].0.rank()) {
                return Err(Error::invalid(format!("linear combination needs equal ranks, but the adapters' ranks differ at {module}: use \"cat\"")));
            }
            // a_t: [in, r], b_t: [r, out]
            let (a_t, b_t) = match combination {
                Combination::Linear => {
                    let a = parts.iter().map(|(l, ws)| l.a_t.clone().mul_scalar(ws.abs().sqrt() * ws.signum())).reduce(|x, y| x + y);
                    let b = parts.iter().map(|(l, ws)| l.b_t.clone().mul_scalar(ws.abs().sqrt())).reduce(|x, y| x + y);
                    (a.expect("non-empty"), b.expect("non-empty"))
                }
                Combination::Cat => (
                    Tensor::cat(parts.iter().map(|(l, ws)| l.a_t.clone().mul_scalar(*ws)).collect(), 1),
                    Tensor::cat(parts.iter().map(|(l, _)| l.b_t.clone()).collect(), 0),
                ),
            };
            // modules with a smaller rank than the new one (cat of fewer adapters) are zero-padded, as PEFT
            let r = a_t.dims()[1];
            let (a_t, b_t) = if r < new_rank {
                let device = self.device();
                let [d_in, _] = a_t.dims();
                let d_out = b_t.dims()[1];
                (Tensor::cat(vec![a_t, Tensor::zeros([d_in, new_rank - r], &device)], 1), Tensor::cat(vec![b_t, Tensor::zeros([new_rank - r, d_out], &device)], 0))
            } else {
                (a_t, b_t)
            };
            built.insert(module, LoraWeights { a_t, b_t, scaling: 1.0 });
        }
        self.install_adapter(new_name, config, built);
        Ok(())
    }
}
