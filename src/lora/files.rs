//! PEFT's adapter files (peft/utils/save_and_load.py): `adapter_config.json` and
//! `adapter_model.safetensors`, whose keys are `base_model.model.<module>.lora_A.weight` [r, in]
//! and `...lora_B.weight` [out, r], stored in F32 with metadata {"format": "pt"}.
//!
//! An adapter's files also convert to llama.cpp's GGUF LoRA ([`AdapterContents::to_gguf`]).
//!
//! Reading checks everything that does not depend on the base model (the config, the safetensors
//! structure, that every tensor is a LoRA matrix); [`AdapterContents::matrices`] checks the rest
//! against the layer it is for.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::io::gguf_convert::{GgufArchitecture, permute_rotary_rows};
use crate::io::gguf_write::GgufWriter;
use crate::io::safetensors::write_safetensors;
use crate::io::{SafetensorsWeights, StoreDtype};
use crate::lora::{LoraConfig, LoraInit};
use crate::tensor::{HostTensor, read_host};

/// The file names of a PEFT adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's prefix of every key in adapter_model.safetensors.
const KEY_PREFIX: &str = "base_model.model.";

/// The safetensors key of a module's `lora_A` or `lora_B` weight.
pub fn lora_key(module: &str, matrix: &str) -> String {
    format!("{KEY_PREFIX}{module}.{matrix}.weight")
}

/// An adapter as PEFT files: `adapter_config.json` text and `adapter_model.safetensors` bytes.
#[derive(Clone)]
pub struct AdapterFiles {
    pub config_json: String,
    pub safetensors: Vec<u8>,
}

impl AdapterFiles {
    /// The two files under their PEFT names, for writing a directory.
    pub fn into_named(self) -> Vec<(&'static str, Vec<u8>)> {
        vec![(ADAPTER_CONFIG_FILE, self.config_json.into_bytes()), (ADAPTER_WEIGHTS_FILE, self.safetensors)]
    }
}

/// An adapter's two files as bytes, each with a label (its path or URL) for error messages.
pub struct AdapterSource {
    pub config: (String, Vec<u8>),
    pub weights: (String, Vec<u8>),
}

impl AdapterSource {
    /// Reads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(
                dir.display().to_string(),
                format!("not a directory: give the folder that holds {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}"),
            ));
        }
        let read = |file: &str| {
            let path = dir.join(file);
            crate::io::read_file(&path).map(|bytes| (path.display().to_string(), bytes))
        };
        Ok(AdapterSource { config: read(ADAPTER_CONFIG_FILE)?, weights: read(ADAPTER_WEIGHTS_FILE)? })
    }

    /// Files given as bytes, labelled `origin/<file name>` in errors.
    pub fn from_files(files: AdapterFiles, origin: &str) -> Self {
        AdapterSource {
            config: (format!("{origin}/{ADAPTER_CONFIG_FILE}"), files.config_json.into_bytes()),
            weights: (format!("{origin}/{ADAPTER_WEIGHTS_FILE}"), files.safetensors),
        }
    }

    /// Parses and checks both files as far as they can be without a base model.
    pub fn read(self) -> Result<AdapterContents> {
        let AdapterSource { config: (config_file, config_json), weights: (weights_file, weights) } = self;
        let config = LoraConfig::from_json(&config_json, &config_file)?;
        let tensors = SafetensorsWeights::new(vec![(weights_file.clone(), weights)])?;
        let mut modules = BTreeMap::new();
        for key in tensors.names() {
            let module = key
                .strip_prefix(KEY_PREFIX)
                .and_then(|k| k.strip_suffix(".lora_A.weight").or_else(|| k.strip_suffix(".lora_B.weight")))
                .ok_or_else(|| {
                    Error::file(
                        &weights_file,
                        format!("tensor {key} is not a LoRA weight (expected {KEY_PREFIX}<module>.lora_A.weight / lora_B.weight)"),
                    )
                })?;
            modules.entry(module.to_string()).or_insert_with(|| key.to_string());
        }
        Ok(AdapterContents { config, config_file, weights_file, tensors, modules })
    }
}

/// An adapter's parsed files.
pub struct AdapterContents {
    pub config: LoraConfig,
    pub config_file: String,
    pub weights_file: String,
    tensors: SafetensorsWeights,
    /// The modules that have a lora_A or lora_B tensor, each with the first such key.
    pub modules: BTreeMap<String, String>,
}

impl AdapterContents {
    /// " (adapter_config.json says it was made for X)", or nothing: for errors about a mismatch.
    pub fn made_for(&self) -> String {
        let base = self.config.base_model_name_or_path.as_deref();
        base.map(|b| format!(" (adapter_config.json says it was made for {b})")).unwrap_or_default()
    }

    /// Module `module`'s (A [r, in], B [out, r]) in PEFT's layout, checked against the layer's
    /// `d_in` and `d_out` and the rank the config gives it.
    pub fn matrices(&self, module: &str, d_in: usize, d_out: usize) -> Result<(HostTensor, HostTensor)> {
        let (a_key, b_key) = (lora_key(module, "lora_A"), lora_key(module, "lora_B"));
        if !self.tensors.contains(&a_key) || !self.tensors.contains(&b_key) {
            return Err(Error::file(&self.weights_file, format!("adapter_config.json targets {module} but {a_key} or {b_key} is missing")));
        }
        let r = self.config.rank_for(module);
        let (a, b) = (self.tensors.tensor(&a_key)?, self.tensors.tensor(&b_key)?);
        for (key, t, expected) in [(&a_key, &a, [r, d_in]), (&b_key, &b, [d_out, r])] {
            if t.shape != expected {
                return Err(Error::file(
                    &self.weights_file,
                    format!(
                        "{key} has shape {:?} but this base and rank {r} need {expected:?}: the adapter does not fit this model{}",
                        t.shape,
                        self.made_for()
                    ),
                ));
            }
        }
        Ok((a, b))
    }
}

impl AdapterContents {
    /// The adapter as a GGUF LoRA in llama.cpp's adapter format, as its convert_lora_to_gguf.py
    /// writes it for a base of architecture `arch`: general.architecture (the base's), general.type
    /// "adapter", adapter.type "lora", adapter.lora.alpha, and for each module
    /// `blk.N.<tensor>.weight.lora_a` (A, [r, in]) and `.lora_b` (B, [out, r]) in F32, llama's B
    /// rows of q/k in llama.cpp's rotary order (`heads`, `kv_heads`), as the converter permutes
    /// them with the weight's. llama.cpp scales every
    /// module by alpha / r (1 where alpha is 0): where PEFT's scaling differs (rsLoRA,
    /// rank_pattern, alpha_pattern), the ratio is folded into B. An OLoRA/PiSSA adapter is
    /// refused: it is relative to a residual base that llama.cpp does not make.
    pub fn to_gguf(&self, arch: &GgufArchitecture, heads: usize, kv_heads: usize) -> Result<Vec<u8>> {
        if matches!(self.config.init_lora_weights, LoraInit::Olora | LoraInit::Pissa) {
            return Err(Error::file(
                &self.config_file,
                "an OLoRA/PiSSA adapter is relative to a residual base, which llama.cpp does not make: convert it to a plain LoRA first (convert-to-lora)",
            ));
        }
        let alpha = self.config.lora_alpha;
        let mut w = GgufWriter::default();
        w.set_str("general.architecture", arch.name);
        w.set_str("general.type", "adapter");
        w.set_u32("general.file_type", 0);
        w.set_str("adapter.type", "lora");
        w.set_f32("adapter.lora.alpha", alpha as f32);
        let mut modules: Vec<&String> = self.modules.keys().collect();
        modules.sort_by_key(|m| arch.order(&format!("{m}.weight")));
        for module in modules {
            let weight = format!("{module}.weight");
            let name = arch
                .gguf_name(&weight)
                .ok_or_else(|| Error::file(&self.weights_file, format!("module {module} has no llama.cpp tensor to adapt")))?;
            let (a, mut b) = (self.tensors.tensor(&lora_key(module, "lora_A"))?, self.tensors.tensor(&lora_key(module, "lora_B"))?);
            let rank = a.shape[0] as f64;
            let llama_cpp_scaling = if alpha != 0.0 { alpha / rank } else { 1.0 };
            let ratio = (self.config.scaling_for(module) / llama_cpp_scaling) as f32;
            if ratio != 1.0 {
                b.data.iter_mut().for_each(|v| *v *= ratio);
            }
            if let Some(heads) = arch.rotary_heads(&weight, heads, kv_heads) {
                b = permute_rotary_rows(&b, heads).map_err(|e| Error::file(&self.weights_file, format!("{module}: {e}")))?;
            }
            w.add_dense(&format!("{name}.lora_a"), &a, false);
            w.add_dense(&format!("{name}.lora_b"), &b, false);
        }
        Ok(w.bytes())
    }
}

/// PEFT files from a config and each module's (A^T, B^T) on the device (transposed back to
/// PEFT's layout on the way out).
pub(crate) async fn write_adapter(config_json: String, matrices: Vec<(String, Tensor<2>, Tensor<2>)>) -> Result<AdapterFiles> {
    let mut tensors = BTreeMap::new();
    for (module, a_t, b_t) in matrices {
        for (matrix, t) in [("lora_A", a_t), ("lora_B", b_t)] {
            tensors.insert(lora_key(&module, matrix), read_host(t).await?.transpose());
        }
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(AdapterFiles { config_json, safetensors: write_safetensors(&tensors, StoreDtype::F32, Some(metadata))? })
}
