//! PEFT's model-level LoRA API (`tuners/lora/model.py` with `PeftModel`'s verbs) as the trait
//! [`LoraModel`]: load (from PEFT files) or add (initialised) adapters, choose which one runs,
//! disable, merge / unmerge / unload, delete, export, combine, count.
//!
//! As PEFT's tuners work on any `nn.Module` through `named_modules()`, these verbs work on any
//! model that shows its adaptable linear layers and keeps an [`AdapterState`] ([`LoraLayers`]):
//! the base model implements that and gets every verb, without depending on them. Loading checks
//! everything (targets, names, shapes) before it touches the model, so a bad adapter leaves the
//! model as it was. As in PEFT, `load_adapter` does not activate the adapter.

use std::collections::BTreeMap;

use burn::tensor::{Bool, Tensor};

use crate::error::{Error, Result};
use crate::lora::combine::{Combination, add_weighted_adapter};
use crate::lora::files::{AdapterFiles, AdapterSource, write_adapter};
use crate::lora::init::{init_from_weight, init_lora};
use crate::lora::{AdapterState, AdapterWeights, LoraConfig, LoraInit, LoraLayers, LoraWeights};
use crate::tensor::{read_f32, upload, upload_all};

/// What [`LoraModel::merge_adapter`] did.
#[derive(Debug, Default, PartialEq)]
pub struct MergeReport {
    pub merged: Vec<String>,
    /// Already merged, so left alone (PEFT warns and skips them too).
    pub skipped: Vec<String>,
}

/// PEFT's verbs, for every model that shows its adaptable layers ([`LoraLayers`]).
// The futures run on one thread (the browser's worker, pollster natively): no Send bound wanted.
#[allow(async_fn_in_trait)]
pub trait LoraModel: LoraLayers {
    /// Loads a PEFT adapter under `name` without activating it. An OLoRA or PiSSA adapter
    /// (init_lora_weights "olora"/"pissa") is trained against a residual base: as PEFT does on
    /// load, the base is decomposed again and its principal part subtracted, so the files give
    /// the fine-tuned model on the original base.
    async fn load_adapter(&mut self, name: &str, source: AdapterSource) -> Result<()> {
        check_new_name(self, name)?;
        let contents = source.read()?;
        // every tensor must be the A or B of a linear layer this base has
        if let Some((module, key)) = contents.modules.iter().find(|(m, _)| !self.lora_linears().any(|l| &l.name == *m)) {
            return Err(Error::file(
                &contents.weights_file,
                format!(
                    "tensor {key} adapts module {module}, which this base model does not have: the adapter was made for another model{}",
                    contents.made_for()
                ),
            ));
        }
        // checked and laid out on the host first, then sent to the device in one transfer
        let mut host = Vec::new();
        for layer in self.lora_linears().filter(|l| contents.config.targets(&l.name, true)) {
            let (d_in, d_out) = layer.shape();
            let (a, b) = contents.matrices(&layer.name, d_in, d_out)?;
            host.push((layer.name.clone(), a.transpose(), b.transpose()));
        }
        if host.is_empty() {
            return Err(Error::file(&contents.config_file, "target_modules matches no linear layer of this base model"));
        }
        let uploaded = upload_all(host.iter().flat_map(|(_, a_t, b_t)| [a_t, b_t]), &self.device());
        let config = contents.config;
        let built: AdapterWeights = host
            .into_iter()
            .zip(uploaded.chunks_exact(2))
            .map(|((module, ..), pair)| {
                let scaling = config.scaling_for(&module);
                (module, LoraWeights { a_t: pair[0].clone(), b_t: pair[1].clone(), scaling })
            })
            .collect();
        let initial = initial_from_base(self, &config, built.keys()).await?;
        install_adapter(self, name, config, built, initial).await
    }

    /// Adds a new adapter `name` initialised as `config.init_lora_weights` says (PEFT's
    /// `add_adapter`), without activating it. `seed` makes the random initial values
    /// reproducible. OLoRA and PiSSA shift the base so the output is unchanged.
    async fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        check_new_name(self, name)?;
        let modules: Vec<String> = self.lora_linears().filter(|l| config.targets(&l.name, true)).map(|l| l.name.clone()).collect();
        if modules.is_empty() {
            return Err(Error::invalid("target_modules matches no linear layer of this base model"));
        }
        let initial = initial_from_base(self, &config, modules.iter()).await?;
        let built = if initial.is_empty() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let device = self.device();
            let mut built = BTreeMap::new();
            for layer in self.lora_linears().filter(|l| modules.contains(&l.name)) {
                let (d_in, d_out) = layer.shape();
                let (a, b) = init_lora(config.init_lora_weights, d_in, d_out, config.rank_for(&layer.name), &mut rng)?;
                let (a_t, b_t) = (upload(a.transpose(), &device), upload(b.transpose(), &device));
                built.insert(layer.name.clone(), LoraWeights { a_t, b_t, scaling: config.scaling_for(&layer.name) });
            }
            built
        } else {
            initial.clone()
        };
        install_adapter(self, name, config, built, initial).await
    }

    /// Makes `name` the adapter that runs. Moves no weights.
    fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.known_adapter(name)?;
        self.adapter_state_mut().active = Some(name.to_string());
        Ok(())
    }

    /// The active adapter's name (also while adapters are disabled).
    fn active_adapter(&self) -> Option<&str> {
        self.adapter_state().active.as_deref()
    }

    /// The names of the loaded adapters, sorted.
    fn adapter_names(&self) -> Vec<&str> {
        self.adapter_state().configs.keys().map(String::as_str).collect()
    }

    /// The config an adapter was loaded with.
    fn adapter_config(&self, name: &str) -> Option<&LoraConfig> {
        self.adapter_state().configs.get(name)
    }

    /// The config of adapter `name`, or an error listing the loaded ones.
    fn known_adapter(&self, name: &str) -> Result<&LoraConfig> {
        self.adapter_config(name).ok_or_else(|| Error::invalid(format!("no adapter named {name:?}; loaded: {:?}", self.adapter_names())))
    }

    /// Runs the base model alone until [`enable_adapter`](Self::enable_adapter). Merged adapters
    /// are unmerged first (as PEFT does), so disabled really means the base.
    async fn disable_adapter(&mut self) -> Result<()> {
        self.unmerge_adapter().await?;
        self.adapter_state_mut().disabled = true;
        Ok(())
    }

    fn enable_adapter(&mut self) {
        self.adapter_state_mut().disabled = false;
    }

    /// Whether [`disable_adapter`](Self::disable_adapter) is in effect.
    fn adapters_disabled(&self) -> bool {
        self.adapter_state().disabled
    }

    /// The adapters folded into the base weights now, sorted.
    fn merged_adapters(&self) -> Vec<String> {
        let mut merged: Vec<String> = self.lora_linears().flat_map(|l| l.merged.iter().cloned()).collect();
        merged.sort();
        merged.dedup();
        merged
    }

    /// Folds adapters into the base weights: W <- W + scaling * B A (in f32). `names` empty means
    /// the active adapter. With `safe_merge`, the adapters' A and B are checked for NaN/Inf first
    /// (one read-back) and nothing changes if any is found. Already merged adapters are skipped,
    /// as PEFT does. A quantized base is requantized (with PEFT's warning that generations may
    /// differ by rounding) and always checked first: quantized blocks cannot hold NaN.
    async fn merge_adapter(&mut self, names: &[&str], safe_merge: bool) -> Result<MergeReport> {
        let names: Vec<String> = if names.is_empty() {
            let active = self.active_adapter();
            vec![active.ok_or_else(|| Error::invalid("no active adapter to merge: set_adapter first or name the adapters"))?.to_string()]
        } else {
            names.iter().map(|n| n.to_string()).collect()
        };
        for name in &names {
            self.known_adapter(name)?;
        }
        let already = self.merged_adapters();
        let (skipped, to_merge): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| already.contains(n));
        let quantized = self.lora_linears().filter(|l| l.base.weight_t.is_quantized()).count();
        if safe_merge || quantized > 0 {
            for name in &to_merge {
                check_finite(self, name).await?;
            }
        }
        if quantized > 0 && !to_merge.is_empty() {
            log::warn!(
                "Merging LoRA into the {quantized} quantized linear layers requantizes them: generations may differ from the unmerged adapter's due to rounding errors."
            );
        }
        for name in &to_merge {
            for layer in self.lora_linears_mut() {
                layer.merge(name).await?;
            }
        }
        Ok(MergeReport { merged: to_merge, skipped })
    }

    /// Takes every merged adapter back out of the base weights (W <- W - scaling * B A; a
    /// quantized base gets its requantized weights before the merge back exactly).
    async fn unmerge_adapter(&mut self) -> Result<()> {
        for layer in self.lora_linears_mut() {
            layer.unmerge().await?;
        }
        Ok(())
    }

    /// Merges (see [`merge_adapter`](Self::merge_adapter)) and then removes every adapter: the
    /// model becomes a plain base model with the merged weights (for an OLoRA/PiSSA adapter, the
    /// residual base plus its update: the fine-tuned weights).
    async fn merge_and_unload(&mut self, names: &[&str], safe_merge: bool) -> Result<MergeReport> {
        let report = self.merge_adapter(names, safe_merge).await?;
        drop_adapters(self);
        Ok(report)
    }

    /// Removes every adapter and undoes every merge and every OLoRA/PiSSA residual shift: back to
    /// the base model (PEFT keeps the residual base here; we give the base back).
    async fn unload(&mut self) -> Result<()> {
        self.unmerge_adapter().await?;
        for layer in self.lora_linears_mut() {
            let names: Vec<String> = layer.initial.keys().cloned().collect();
            for name in names {
                layer.restore_initial(&name).await?;
            }
        }
        drop_adapters(self);
        Ok(())
    }

    /// Removes one adapter (and, for OLoRA/PiSSA, its shift of the base). A merged adapter cannot
    /// be deleted (unmerge first). If it was active, the first remaining adapter (by name) becomes
    /// active, as PEFT does.
    async fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.known_adapter(name)?;
        if self.merged_adapters().iter().any(|m| m == name) {
            return Err(Error::invalid(format!("adapter {name:?} is merged into the base weights: unmerge_adapter before deleting it")));
        }
        for layer in self.lora_linears_mut() {
            layer.restore_initial(name).await?;
            layer.adapters.remove(name);
        }
        let state = self.adapter_state_mut();
        state.configs.remove(name);
        if state.active.as_deref() == Some(name) {
            state.active = state.configs.keys().next().cloned();
        }
        Ok(())
    }

    /// (trainable, all) parameter counts, as PEFT's `get_nb_trainable_parameters`: the active
    /// adapter's A and B are trainable; all counts the base and every adapter.
    fn trainable_parameters(&self) -> (usize, usize) {
        let numel = |t: &Tensor<2>| t.dims().iter().product::<usize>();
        let active = self.active_adapter();
        let (mut trainable, mut adapters) = (0, 0);
        for layer in self.lora_linears() {
            for (name, lora) in &layer.adapters {
                let n = numel(&lora.a_t) + numel(&lora.b_t);
                adapters += n;
                if active == Some(name.as_str()) {
                    trainable += n;
                }
            }
        }
        (trainable, self.base_parameters() + adapters)
    }

    /// PEFT's (trainable, all) counts for a new adapter made from `config`, as if it were added
    /// and active, without adding it (what a training form shows as its settings change):
    /// r (in + out) for every linear layer it targets.
    fn count_new_adapter(&self, config: &LoraConfig) -> Result<(usize, usize)> {
        let trainable: usize = self
            .lora_linears()
            .filter(|l| config.targets(&l.name, true))
            .map(|l| {
                let (d_in, d_out) = l.shape();
                config.rank_for(&l.name) * (d_in + d_out)
            })
            .sum();
        if trainable == 0 {
            return Err(Error::invalid("target_modules matches no linear layer of this base model"));
        }
        Ok((trainable, self.trainable_parameters().1 + trainable))
    }

    /// PEFT's `print_trainable_parameters` line.
    fn trainable_parameters_line(&self) -> String {
        let (trainable, all) = self.trainable_parameters();
        let pct = 100.0 * trainable as f64 / all as f64;
        format!("trainable params: {} || all params: {} || trainable%: {pct:.4}", thousands(trainable), thousands(all))
    }

    /// Adapter `name`'s current matrices in every layer it adapts.
    fn adapter_weights(&self, name: &str) -> Result<AdapterWeights> {
        self.known_adapter(name)?;
        Ok(self.lora_linears().filter_map(|l| l.adapters.get(name).map(|w| (l.name.clone(), w.clone()))).collect())
    }

    /// Replaces adapter `name`'s matrices (what training does after each step); `weights` must
    /// hold every layer the adapter has.
    fn set_adapter_weights(&mut self, name: &str, weights: &AdapterWeights) -> Result<()> {
        self.known_adapter(name)?;
        for layer in self.lora_linears_mut() {
            if let Some(lora) = layer.adapters.get_mut(name) {
                *lora = weights
                    .get(&layer.name)
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("no weights for {} of adapter {name:?}", layer.name)))?;
            }
        }
        Ok(())
    }

    /// The adapter `name` as PEFT files (PEFT's `save_pretrained`, as bytes): they load in PEFT's
    /// `PeftModel.from_pretrained` and here.
    async fn export_adapter(&self, name: &str) -> Result<AdapterFiles> {
        let config = self.known_adapter(name)?.to_json();
        let matrices = self.lora_linears().filter_map(|l| l.adapters.get(name).map(|w| (l.name.clone(), w.a_t.clone(), w.b_t.clone())));
        write_adapter(config, matrices.collect()).await
    }

    /// An OLoRA/PiSSA adapter as a plain LoRA of rank 2r for the original base, as PEFT's
    /// `save_pretrained(path_initial_model_for_weight_conversion=...)`: with the initial values
    /// A0, B0, A' = [A; A0] and B' = [B, -B0], so scaling B'A' = scaling (BA - B0A0) is the whole
    /// change from the original weights; r and lora_alpha double (alpha x sqrt 2 with rsLoRA) so
    /// the scaling stays.
    async fn export_adapter_as_lora(&self, name: &str) -> Result<AdapterFiles> {
        let mut config = self.known_adapter(name)?.clone();
        if !matches!(config.init_lora_weights, LoraInit::Olora | LoraInit::Pissa) {
            return Err(Error::invalid(format!(
                "adapter {name:?} is already a plain LoRA (init_lora_weights is not \"olora\" or \"pissa\"): export it as it is"
            )));
        }
        if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
            return Err(Error::invalid(
                "converting to LoRA is not supported with rank_pattern or alpha_pattern together with use_rslora (PEFT refuses it too)",
            ));
        }
        let mut matrices = Vec::new();
        for layer in self.lora_linears() {
            let Some(lora) = layer.adapters.get(name) else { continue };
            let initial = layer
                .initial
                .get(name)
                .ok_or_else(|| Error::invalid(format!("adapter {name:?} has no recorded initial values to convert against")))?;
            let a_t = Tensor::cat(vec![lora.a_t.clone(), initial.a_t.clone()], 1);
            let b_t = Tensor::cat(vec![lora.b_t.clone(), initial.b_t.clone().neg()], 0);
            matrices.push((layer.name.clone(), a_t, b_t));
        }
        config.init_lora_weights = LoraInit::Default;
        config.r *= 2;
        config.lora_alpha *= if config.use_rslora { std::f64::consts::SQRT_2 } else { 2.0 };
        config.rank_pattern.iter_mut().for_each(|(_, r)| *r *= 2);
        config.alpha_pattern.iter_mut().for_each(|(_, a)| *a *= 2.0);
        write_adapter(config.to_json(), matrices).await
    }

    /// PEFT's `add_weighted_adapter`: a new adapter `new_name` from weighted adapters, with
    /// r = lora_alpha = the new rank (scaling 1), the other settings from the first adapter.
    /// With one adapter PEFT always combines linearly; so do we. Not activated.
    async fn add_weighted_adapter(&mut self, names: &[&str], weights: &[f64], new_name: &str, combination: Combination) -> Result<()> {
        add_weighted_adapter(self, names, weights, new_name, combination).await
    }
}

pub(super) fn check_new_name<M: LoraModel + ?Sized>(model: &M, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("an adapter needs a non-empty name"));
    }
    if model.adapter_config(name).is_some() {
        return Err(Error::invalid(format!("an adapter named {name:?} is already loaded: delete it first or choose another name")));
    }
    Ok(())
}

/// For an OLoRA/PiSSA config, each targeted module's initial adapter from its base weight
/// (computed before anything changes); empty for other inits.
async fn initial_from_base<'a, M: LoraModel + ?Sized>(
    model: &M,
    config: &LoraConfig,
    modules: impl Iterator<Item = &'a String>,
) -> Result<AdapterWeights> {
    let mut initial = BTreeMap::new();
    if !matches!(config.init_lora_weights, LoraInit::Olora | LoraInit::Pissa) {
        return Ok(initial);
    }
    for module in modules {
        let layer = model.lora_linears().find(|l| &l.name == module).expect("a module of this model");
        let (r, scaling) = (config.rank_for(module), config.scaling_for(module));
        let weights = init_from_weight(config.init_lora_weights, &layer.base.weight_t.value(), r, scaling, module).await?;
        initial.insert(module.clone(), weights);
    }
    Ok(initial)
}

/// Puts a fully built adapter in place. Only a quantized base's residual can fail here (a
/// value quantized blocks cannot hold, which finite weights never give); then the layers
/// already shifted are shifted back and the model is as it was.
pub(super) async fn install_adapter<M: LoraModel + ?Sized>(
    model: &mut M,
    name: &str,
    config: LoraConfig,
    mut built: AdapterWeights,
    mut initial: AdapterWeights,
) -> Result<()> {
    if model.lora_linears().any(|l| initial.contains_key(&l.name) && l.base.weight_t.is_quantized()) {
        log::warn!(
            "the OLoRA/PiSSA initialisation of adapter {name:?} writes the residual base weights back requantized: the adapter starts from a base that differs from the quantized one by rounding."
        );
    }
    let mut failure = None;
    for layer in model.lora_linears_mut() {
        if let Some(weights) = initial.remove(&layer.name) {
            if let Err(e) = layer.subtract_initial(name, weights).await {
                failure = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failure {
        for layer in model.lora_linears_mut() {
            layer.restore_initial(name).await?;
        }
        return Err(e);
    }
    for layer in model.lora_linears_mut() {
        if let Some(weights) = built.remove(&layer.name) {
            layer.adapters.insert(name.to_string(), weights);
        }
    }
    model.adapter_state_mut().configs.insert(name.to_string(), config);
    Ok(())
}

fn drop_adapters<M: LoraModel + ?Sized>(model: &mut M) {
    for layer in model.lora_linears_mut() {
        layer.keep_base();
    }
    *model.adapter_state_mut() = AdapterState::default();
}

/// Refuses an adapter holding NaN or Inf. An update built from finite factors is finite:
/// checking A and B is enough and costs no full-size temporary.
async fn check_finite<M: LoraModel + ?Sized>(model: &M, name: &str) -> Result<()> {
    let checks: Vec<Tensor<1, Bool>> = model
        .lora_linears()
        .filter_map(|l| l.adapters.get(name))
        .flat_map(|lora| [lora.a_t.clone().is_finite().all(), lora.b_t.clone().is_finite().all()])
        .collect();
    // read back as a number: backends store booleans differently (WebGPU as u32)
    let finite = read_f32(Tensor::cat(checks, 0).all().float()).await?;
    if finite.first() != Some(&1.0) {
        return Err(Error::invalid(format!("NaNs detected in the merged weights. The adapter {name} seems to be broken")));
    }
    Ok(())
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

impl<M: LoraLayers + ?Sized> LoraModel for M {}
