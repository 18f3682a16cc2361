//! PEFT's model-level verbs on a [`LlamaModel`]: load (from PEFT files) or add (initialised)
//! adapters, choose which one runs, disable, merge / unmerge / unload, delete, save, combine, count.
//!
//! An adapter is `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. Loading
//! checks everything (targets, names, shapes) before it touches the model, so a bad adapter leaves
//! the model as it was. As in PEFT, `load_adapter` does not activate the adapter.

use std::collections::BTreeMap;

use burn::tensor::Tensor;

use crate::config::{LoraConfig, LoraInit, TargetModules};
use crate::error::{Error, Result};
use crate::io::SafetensorsWeights;
use crate::lora::{LoraRun, LoraWeights, init_from_weight, upload, upload_all};
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
    /// The adapter the forward pass runs (without dropout: training sets its own runs): the
    /// active one unless adapters are disabled.
    pub fn running(&self) -> Option<LoraRun<'_>> {
        let adapter = if self.disabled { None } else { self.active.as_deref() }?;
        Some(LoraRun { adapter, dropout: None })
    }
}

impl LlamaModel {
    /// Loads a PEFT adapter under `name` without activating it. An OLoRA or PiSSA adapter
    /// (init_lora_weights "olora"/"pissa") is trained against a residual base: as PEFT does on
    /// load, the base is decomposed again and its principal part subtracted, so the files give
    /// the fine-tuned model on the original base.
    pub async fn load_adapter(&mut self, name: &str, source: AdapterSource) -> Result<()> {
        self.check_new_name(name)?;
        let AdapterSource { config: (config_file, config_json), weights: (weights_file, weights) } = source;
        let config = LoraConfig::from_json(&config_json, &config_file)?;
        let tensors = SafetensorsWeights::new(vec![(weights_file.clone(), weights)])?;
        let modules = self.config.linear_module_names();
        let for_base = config.base_model_name_or_path.as_deref().map(|b| format!(" (adapter_config.json says it was made for {b})")).unwrap_or_default();

        // every tensor must be the A or B of a linear layer this base has
        for key in tensors.names() {
            let module = key
                .strip_prefix(KEY_PREFIX)
                .and_then(|k| k.strip_suffix(".lora_A.weight").or_else(|| k.strip_suffix(".lora_B.weight")))
                .ok_or_else(|| Error::file(&weights_file, format!("tensor {key} is not a LoRA weight (expected {KEY_PREFIX}<module>.lora_A.weight / lora_B.weight)")))?;
            if !modules.iter().any(|m| m == module) {
                return Err(Error::file(&weights_file, format!("tensor {key} adapts module {module}, which this base model does not have: the adapter was made for another model{for_base}")));
            }
        }

        // checked and laid out on the host first, then sent to the device in one transfer
        let mut host = Vec::new();
        for module in modules.iter().filter(|m| config.targets(m, true)) {
            let (a_key, b_key) = (lora_key(module, "lora_A"), lora_key(module, "lora_B"));
            if !tensors.contains(&a_key) || !tensors.contains(&b_key) {
                return Err(Error::file(&weights_file, format!("adapter_config.json targets {module} but {a_key} or {b_key} is missing")));
            }
            let (d_in, d_out) = self.linear(module).expect("listed by the config").shape();
            let r = config.rank_for(module);
            let a = tensors.tensor(&a_key)?;
            let b = tensors.tensor(&b_key)?;
            for (key, t, expected) in [(&a_key, &a, [r, d_in]), (&b_key, &b, [d_out, r])] {
                if t.shape != expected {
                    return Err(Error::file(
                        &weights_file,
                        format!("{key} has shape {:?} but this base and rank {r} need {expected:?}: the adapter does not fit this model{for_base}", t.shape),
                    ));
                }
            }
            host.push((module.clone(), transpose(&a), transpose(&b)));
        }
        let uploaded = upload_all(host.iter().flat_map(|(_, a_t, b_t)| [a_t, b_t]), &self.device());
        let mut built: BTreeMap<String, LoraWeights> = BTreeMap::new();
        for ((module, ..), pair) in host.into_iter().zip(uploaded.chunks_exact(2)) {
            let scaling = config.scaling_for(&module);
            built.insert(module, LoraWeights { a_t: pair[0].clone(), b_t: pair[1].clone(), scaling });
        }
        if built.is_empty() {
            return Err(Error::file(&config_file, "target_modules matches no linear layer of this base model"));
        }
        let initial = self.initial_from_base(&config, built.keys()).await?;
        self.install_adapter(name, config, built, initial);
        Ok(())
    }

    /// For an OLoRA/PiSSA config, each targeted module's initial adapter from its base weight
    /// (computed before anything changes); empty for other inits.
    async fn initial_from_base<'a>(&self, config: &LoraConfig, modules: impl Iterator<Item = &'a String>) -> Result<BTreeMap<String, LoraWeights>> {
        let mut initial = BTreeMap::new();
        if !matches!(config.init_lora_weights, LoraInit::Olora | LoraInit::Pissa) {
            return Ok(initial);
        }
        for module in modules {
            let layer = self.linear_ref(module).expect("listed by the config");
            let weights = init_from_weight(config.init_lora_weights, &layer.base.weight_t.value(), config.rank_for(module), config.scaling_for(module), module).await?;
            initial.insert(module.clone(), weights);
        }
        Ok(initial)
    }

    /// Puts a fully built adapter in place (nothing can fail from here on).
    fn install_adapter(&mut self, name: &str, config: LoraConfig, built: BTreeMap<String, LoraWeights>, initial: BTreeMap<String, LoraWeights>) {
        for (module, weights) in built {
            self.linear(&module).expect("module names come from the config").adapters.insert(name.to_string(), weights);
        }
        for (module, weights) in initial {
            self.linear(&module).expect("module names come from the config").subtract_initial(name, weights);
        }
        self.adapters.configs.insert(name.to_string(), config);
    }

    /// Adds a new adapter `name` initialised as `config.init_lora_weights` says (PEFT's
    /// `add_adapter`), without activating it. `seed` makes the random initial values
    /// reproducible. OLoRA and PiSSA shift the base so the output is unchanged.
    pub async fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        self.check_new_name(name)?;
        let modules: Vec<String> = self.config.linear_module_names().into_iter().filter(|m| config.targets(m, true)).collect();
        if modules.is_empty() {
            return Err(Error::invalid("target_modules matches no linear layer of this base model"));
        }
        let initial = self.initial_from_base(&config, modules.iter()).await?;
        let built = if initial.is_empty() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let device = self.device();
            let mut built = BTreeMap::new();
            for module in modules {
                let (d_in, d_out) = self.linear_ref(&module).expect("listed by the config").shape();
                let (a, b) = crate::lora::init_lora(config.init_lora_weights, d_in, d_out, config.rank_for(&module), &mut rng)?;
                built.insert(module.clone(), LoraWeights { a_t: upload(transpose(&a), &device), b_t: upload(transpose(&b), &device), scaling: config.scaling_for(&module) });
            }
            built
        } else {
            initial.clone()
        };
        self.install_adapter(name, config, built, initial);
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
        let (index, part) = split_module(module)?;
        self.layers.get_mut(index)?.linears_mut().into_iter().find(|(name, _)| *name == part).map(|(_, l)| l)
    }

    fn linear_ref(&self, module: &str) -> Option<&crate::lora::LoraLinear> {
        let (index, part) = split_module(module)?;
        self.layers.get(index)?.linears().into_iter().find(|(name, _)| *name == part).map(|(_, l)| l)
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

    /// Whether [`disable_adapter`](Self::disable_adapter) is in effect.
    pub fn adapters_disabled(&self) -> bool {
        self.adapters.disabled
    }
}

/// "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj").
fn split_module(module: &str) -> Option<(usize, &str)> {
    let (index, part) = module.strip_prefix("model.layers.")?.split_once('.')?;
    Some((index.parse().ok()?, part))
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

    /// The adapters folded into the base weights now, sorted.
    pub fn merged_adapters(&self) -> Vec<String> {
        let mut merged: Vec<String> = self.lora_layers().flat_map(|l| l.merged.iter().cloned()).collect();
        merged.sort();
        merged.dedup();
        merged
    }

    pub(crate) fn check_known(&self, name: &str) -> Result<()> {
        if self.adapters.configs.contains_key(name) {
            Ok(())
        } else {
            Err(Error::invalid(format!("no adapter named {name:?}; loaded: {:?}", self.adapter_names())))
        }
    }

    /// Folds adapters into the base weights: W <- W + scaling * B A (in f32). `names` empty means
    /// the active adapter. With `safe_merge`, the adapters' A and B are checked for NaN/Inf first
    /// (one read-back) and nothing changes if any is found. Already merged adapters are skipped,
    /// as PEFT does.
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
        let (skipped, to_merge): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| already.contains(n));
        if safe_merge {
            for name in &to_merge {
                // an update built from finite factors is finite: checking A and B is enough and
                // costs no full-size temporary
                let checks: Vec<Tensor<1, burn::tensor::Bool>> = self
                    .lora_layers()
                    .filter_map(|l| l.adapters.get(name))
                    .flat_map(|lora| [lora.a_t.clone().is_finite().all(), lora.b_t.clone().is_finite().all()])
                    .collect();
                // read back as a number: backends store booleans differently (WebGPU as u32)
                let finite = crate::generate::read_f32(Tensor::cat(checks, 0).all().float()).await?;
                if finite.first() != Some(&1.0) {
                    return Err(Error::invalid(format!("NaNs detected in the merged weights. The adapter {name} seems to be broken")));
                }
            }
        }
        for name in &to_merge {
            for layer in self.lora_layers_mut() {
                layer.merge(name);
            }
        }
        Ok(MergeReport { merged: to_merge, skipped })
    }

    /// Takes every merged adapter back out of the base weights (W <- W - scaling * B A).
    pub fn unmerge_adapter(&mut self) {
        for layer in self.lora_layers_mut() {
            layer.unmerge();
        }
    }

    /// Merges (see [`merge_adapter`](Self::merge_adapter)) and then removes every adapter: the
    /// model becomes a plain base model with the merged weights (for an OLoRA/PiSSA adapter, the
    /// residual base plus its update: the fine-tuned weights).
    pub async fn merge_and_unload(&mut self, names: &[&str], safe_merge: bool) -> Result<MergeReport> {
        let report = self.merge_adapter(names, safe_merge).await?;
        self.drop_adapters();
        Ok(report)
    }

    /// Removes every adapter and undoes every merge and every OLoRA/PiSSA residual shift: back to
    /// the base model (PEFT keeps the residual base here; we give the base back).
    pub fn unload(&mut self) {
        self.unmerge_adapter();
        for layer in self.lora_layers_mut() {
            let names: Vec<String> = layer.initial.keys().cloned().collect();
            for name in names {
                layer.restore_initial(&name);
            }
        }
        self.drop_adapters();
    }

    fn drop_adapters(&mut self) {
        for layer in self.lora_layers_mut() {
            layer.adapters.clear();
            layer.merged.clear();
            layer.initial.clear();
        }
        self.adapters = AdapterState::default();
    }

    /// Removes one adapter (and, for OLoRA/PiSSA, its shift of the base). A merged adapter cannot
    /// be deleted (unmerge first). If it was active, the first remaining adapter (by name) becomes
    /// active, as PEFT does.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.check_known(name)?;
        if self.merged_adapters().iter().any(|m| m == name) {
            return Err(Error::invalid(format!("adapter {name:?} is merged into the base weights: unmerge_adapter before deleting it")));
        }
        for layer in self.lora_layers_mut() {
            layer.restore_initial(name);
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
        base += self.lm_head.as_ref().map_or(0, |head| head.dims().iter().product());
        base += self.layers.len() * 2 * c.hidden_size;
        let (mut trainable, mut adapters) = (0, 0);
        for layer in self.lora_layers() {
            base += layer.base.weight_t.dims().iter().product::<usize>();
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

    /// PEFT's (trainable, all) counts for a new adapter made from `config`, as if it were added
    /// and active, without adding it (what a training form shows as its settings change):
    /// r (in + out) for every linear layer it targets.
    pub fn count_new_adapter(&self, config: &LoraConfig) -> Result<(usize, usize)> {
        let trainable: usize = self
            .config
            .linear_module_names()
            .iter()
            .filter(|m| config.targets(m, true))
            .map(|m| {
                let (d_in, d_out) = self.linear_ref(m).expect("a module of this model").shape();
                config.rank_for(m) * (d_in + d_out)
            })
            .sum();
        if trainable == 0 {
            return Err(Error::invalid("target_modules matches no linear layer of this base model"));
        }
        Ok((trainable, self.trainable_parameters().1 + trainable))
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
#[derive(Clone)]
pub struct AdapterFiles {
    pub config_json: String,
    pub safetensors: Vec<u8>,
}

impl LlamaModel {
    /// The adapter `name` as PEFT files (F32 weights, metadata {"format": "pt"}): they load in
    /// PEFT's `PeftModel.from_pretrained` and here.
    pub async fn save_adapter(&self, name: &str) -> Result<AdapterFiles> {
        self.check_known(name)?;
        let matrices = self.adapter_matrices(name, |lora, _| Ok((lora.a_t.clone(), lora.b_t.clone())))?;
        adapter_files(self.adapters.configs[name].to_json(), matrices).await
    }

    /// An OLoRA/PiSSA adapter as a plain LoRA of rank 2r for the original base, as PEFT's
    /// `save_pretrained(path_initial_model_for_weight_conversion=...)`: with the initial values
    /// A0, B0, A' = [A; A0] and B' = [B, -B0], so scaling B'A' = scaling (BA - B0A0) is the whole
    /// change from the original weights; r and lora_alpha double (alpha x sqrt 2 with rsLoRA) so
    /// the scaling stays.
    pub async fn save_adapter_as_lora(&self, name: &str) -> Result<AdapterFiles> {
        self.check_known(name)?;
        let mut config = self.adapters.configs[name].clone();
        if !matches!(config.init_lora_weights, LoraInit::Olora | LoraInit::Pissa) {
            return Err(Error::invalid(format!("adapter {name:?} is already a plain LoRA (init_lora_weights is not \"olora\" or \"pissa\"): save it with save_adapter")));
        }
        if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
            return Err(Error::invalid("converting to LoRA is not supported with rank_pattern or alpha_pattern together with use_rslora (PEFT refuses it too)"));
        }
        let matrices = self.adapter_matrices(name, |lora, initial| {
            let initial = initial.ok_or_else(|| Error::invalid(format!("adapter {name:?} has no recorded initial values to convert against")))?;
            Ok((Tensor::cat(vec![lora.a_t.clone(), initial.a_t.clone()], 1), Tensor::cat(vec![lora.b_t.clone(), initial.b_t.clone().neg()], 0)))
        })?;
        config.init_lora_weights = LoraInit::Default;
        config.r *= 2;
        config.lora_alpha *= if config.use_rslora { std::f64::consts::SQRT_2 } else { 2.0 };
        config.rank_pattern.iter_mut().for_each(|(_, r)| *r *= 2);
        config.alpha_pattern.iter_mut().for_each(|(_, a)| *a *= 2.0);
        adapter_files(config.to_json(), matrices).await
    }

    /// (module, A^T, B^T) of adapter `name` in every layer it has, as `pick` makes them from the
    /// adapter's weights and its OLoRA/PiSSA initial values.
    fn adapter_matrices(
        &self,
        name: &str,
        pick: impl Fn(&LoraWeights, Option<&LoraWeights>) -> Result<(Tensor<2>, Tensor<2>)>,
    ) -> Result<Vec<(String, Tensor<2>, Tensor<2>)>> {
        let mut out = Vec::new();
        for (module, layer) in self.config.linear_module_names().into_iter().zip(self.lora_layers()) {
            if let Some(lora) = layer.adapters.get(name) {
                let (a_t, b_t) = pick(lora, layer.initial.get(name))?;
                out.push((module, a_t, b_t));
            }
        }
        Ok(out)
    }
}

/// PEFT files from a config and each module's (A^T, B^T) on the device.
async fn adapter_files(config_json: String, matrices: Vec<(String, Tensor<2>, Tensor<2>)>) -> Result<AdapterFiles> {
    let mut tensors = BTreeMap::new();
    for (module, a_t, b_t) in matrices {
        for (matrix, t) in [("lora_A", a_t), ("lora_B", b_t)] {
            // stored transposed on the device; PEFT's layout is the transpose
            tensors.insert(lora_key(&module, matrix), transpose(&crate::generate::read_host(t).await?));
        }
    }
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(AdapterFiles { config_json, safetensors: crate::io::safetensors::write_safetensors(&tensors, crate::io::StoreDtype::F32, Some(metadata))? })
}

/// The file names of a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// An adapter's two files as bytes, each with a label (its path or URL) for error messages.
pub struct AdapterSource {
    pub config: (String, Vec<u8>),
    pub weights: (String, Vec<u8>),
}

impl AdapterSource {
    /// Reads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir.display().to_string(), format!("not a directory: give the folder that holds {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}")));
        }
        let read = |file: &str| {
            let path = dir.join(file);
            let label = path.display().to_string();
            std::fs::read(&path).map(|bytes| (label.clone(), bytes)).map_err(|source| Error::Io { file: label, source })
        };
        Ok(AdapterSource { config: read(ADAPTER_CONFIG_FILE)?, weights: read(ADAPTER_WEIGHTS_FILE)? })
    }

    /// Files made by [`LlamaModel::save_adapter`], labelled `origin/<file name>` in errors.
    pub fn from_files(files: AdapterFiles, origin: &str) -> Self {
        AdapterSource {
            config: (format!("{origin}/{ADAPTER_CONFIG_FILE}"), files.config_json.into_bytes()),
            weights: (format!("{origin}/{ADAPTER_WEIGHTS_FILE}"), files.safetensors),
        }
    }
}

/// How [`LlamaModel::add_weighted_adapter`] combines adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// A = sum sign_i sqrt(|w_i s_i|) A_i, B = sum sqrt(|w_i s_i|) B_i (equal ranks).
    Linear,
    /// A = rows of w_i s_i A_i stacked, B = columns of B_i side by side: rank sum r_i, exact sum of deltas.
    Cat,
    /// The best rank-k approximation of sum w_i s_i B_i A_i (truncated SVD: B = U_k S_k, A = V_k^T);
    /// k = `rank`, or the largest rank of the adapters. PEFT's default.
    Svd { rank: Option<usize> },
}

impl Combination {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "linear" => Ok(Combination::Linear),
            "cat" => Ok(Combination::Cat),
            "svd" => Ok(Combination::Svd { rank: None }),
            other => Err(Error::invalid(format!("combination {other:?} is not supported; use \"svd\", \"linear\" or \"cat\""))),
        }
    }
}

impl LlamaModel {
    /// PEFT's `add_weighted_adapter`: a new adapter `new_name` from weighted adapters, with
    /// r = lora_alpha = the new rank (scaling 1), the other settings from the first adapter.
    /// With one adapter PEFT always combines linearly; so do we. Not activated.
    pub async fn add_weighted_adapter(&mut self, names: &[&str], weights: &[f64], new_name: &str, combination: Combination) -> Result<()> {
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
            Combination::Svd { rank: Some(0) } => return Err(Error::invalid("the svd combination needs a rank of at least 1")),
            Combination::Svd { rank } => rank.unwrap_or_else(|| ranks.iter().copied().max().expect("non-empty")),
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
                Combination::Svd { .. } => {
                    let delta_t = parts.iter().map(|(l, ws)| l.a_t.clone().matmul(l.b_t.clone()).mul_scalar(*ws)).reduce(|x, y| x + y).expect("non-empty");
                    truncated_svd(delta_t, new_rank).await?
                }
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
        self.install_adapter(new_name, config, built, BTreeMap::new());
        Ok(())
    }
}

/// (A^T, B^T) of rank <= k whose product is the best rank-k approximation of `delta_t` = (dW)^T
/// [in, out]. With dW^T = U S V^T: PEFT's B = V_k S_k ([out, k]) and A = U_k^T ([k, in]).
async fn truncated_svd(delta_t: Tensor<2>, k: usize) -> Result<(Tensor<2>, Tensor<2>)> {
    let device = delta_t.device();
    let svd = crate::linalg::thin_svd(&crate::generate::read_host(delta_t).await?)?;
    let k = k.min(svd.s.len());
    let a_t = crate::linalg::leading_columns(&svd.u, k, &vec![1.0; k]);
    let b_t = transpose(&crate::linalg::leading_columns(&svd.v, k, &svd.s[..k]));
    Ok((upload(a_t, &device), upload(b_t, &device)))
}
