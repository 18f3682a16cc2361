//! GGUF -> Hugging Face: the config, the weights under their HF names (llama's rotary rows of q/k
//! un-permuted, Gemma's norms back from the 1 + weight llama.cpp stores, quantized blocks kept as
//! stored until asked for f32) and a `tokenizer.json` rebuilt from the GGUF tokenizer metadata
//! ([`gguf_tokenizer`]), for the architectures of [`GGUF_ARCHITECTURES`]. A GGUF loads directly
//! through this ([`GgufModel`]), or converts to a Hugging Face directory ([`GgufModel::write_dir`]).
//!
//! And back, Hugging Face -> GGUF, as llama.cpp's converters write it: a model's weights under
//! llama.cpp's names for its architecture, in its order, with llama's q/k rows permuted again and
//! Gemma's norms stored as 1 + weight ([`write_model_gguf`]), and names, order and row orders for
//! a LoRA adapter's GGUF ([`GgufArchitecture`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Value, json};

use crate::config::{LLAMA_ARCHITECTURE, LlamaConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::io::gguf::{
    GgmlType, GgufFile, MetaValue, RawMetadata, StoredTensor, TensorInfo, read_tensor, rotary_row_order, rows_in_order,
    unpermute_rotary_rows,
};
use crate::io::gguf_tokenizer::gguf_tokenizer;
use crate::io::gguf_write::GgufWriter;
use crate::io::model_files::{CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, write_files};
use crate::io::quant::{QuantMatrix, QuantType};
use crate::io::safetensors::{SINGLE_FILE, StoreDtype, write_safetensors_as};
use crate::tensor::HostTensor;

/// A GGUF model as a Hugging Face model: config, tokenizer and generation files made from its
/// metadata, and its tensors under their Hugging Face names.
pub struct GgufModel {
    /// The file's metadata as stored: a GGUF written from this model copies it.
    pub metadata: RawMetadata,
    pub config: Value,
    /// `None` when the GGUF carries no tokenizer.
    pub tokenizer: Option<Value>,
    pub tokenizer_config: Option<Value>,
    pub generation_config: Value,
    pub weights: GgufWeights,
}

/// The tensors of a GGUF file under their Hugging Face names, read on demand.
pub struct GgufWeights {
    file: String,
    bytes: Vec<u8>,
    data_start: usize,
    /// Hugging Face name -> (the tensor's entry, how llama.cpp changed it)
    tensors: BTreeMap<String, (TensorInfo, Stored)>,
}

/// How llama.cpp's converter changed a tensor from its Hugging Face values, undone on reading.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stored {
    AsIs,
    /// llama's q/k rows, permuted by this many heads for its rotary layout.
    RotaryRows(usize),
    /// Gemma's norms, stored as 1 + weight.
    PlusOne,
}

/// A GGUF architecture that loads: its metadata prefix, the Hugging Face model it is, its layers'
/// tensors (llama.cpp name, Hugging Face name: a table, and the family's own besides) and what
/// llama.cpp changed.
pub struct GgufArchitecture {
    pub name: &'static str,
    hf_architecture: &'static str,
    model_type: &'static str,
    layer_tensors: &'static [(&'static str, &'static str)],
    extra_layer_tensors: &'static [(&'static str, &'static str)],
    rotary_rows_permuted: bool,
    norms_plus_one: bool,
}

impl GgufArchitecture {
    /// The architecture llama.cpp gives a model of `config`, where GGUF files of it are written
    /// here; a model llama.cpp runs otherwise is refused by name (Llama 3's scaled rotary
    /// frequencies are a tensor of their own there, SmolLM3 an architecture of its own).
    pub fn of(config: &LlamaConfig) -> Result<&'static GgufArchitecture> {
        let arch = GGUF_ARCHITECTURES.iter().find(|a| a.model_type == config.model_type);
        match arch {
            Some(arch) if config.rope.scaling == RopeScaling::None && config.local_rope.is_none_or(|r| r.scaling == RopeScaling::None) => {
                Ok(arch)
            }
            _ => {
                let supported: Vec<&str> = GGUF_ARCHITECTURES.iter().map(|a| a.model_type).collect();
                Err(Error::invalid(format!(
                    "GGUF files are written for {} models without rotary scaling (this one is {}{}): export a Hugging Face \
                     directory (or a PEFT adapter) and convert it with llama.cpp's convert_hf_to_gguf.py (or convert_lora_to_gguf.py)",
                    supported.join(", "),
                    config.model_type,
                    if config.rope.scaling == RopeScaling::None { "" } else { ", with scaled rotary embeddings" }
                )))
            }
        }
    }

    /// Every tensor of a layer: (llama.cpp name, Hugging Face name).
    fn layer_tensors(&self) -> impl Iterator<Item = &(&'static str, &'static str)> {
        self.layer_tensors.iter().chain(self.extra_layer_tensors)
    }

    /// llama.cpp's name of the tensor `hf` (Hugging Face name).
    pub fn gguf_name(&self, hf: &str) -> Option<String> {
        gguf_name_in(hf, self.layer_tensors())
    }

    /// Where llama.cpp's converter writes the tensor `hf`: the embedding, each layer's tensors in
    /// order, the final norm, the head.
    pub fn order(&self, hf: &str) -> (usize, usize) {
        let layer_part = |rest: &str| {
            let (layer, part) = rest.split_once('.')?;
            Some((1 + layer.parse::<usize>().ok()?, self.layer_tensors().position(|(_, h)| *h == part)?))
        };
        match hf {
            "model.embed_tokens.weight" => (0, 0),
            "model.norm.weight" => (usize::MAX, 0),
            "lm_head.weight" => (usize::MAX, 1),
            _ => hf.strip_prefix("model.layers.").and_then(layer_part).unwrap_or((usize::MAX - 1, 0)),
        }
    }

    /// The heads whose rotary rows llama.cpp permutes in the tensor `hf` (llama's q_proj: the
    /// attention heads, k_proj: the key/value heads), if it does.
    pub fn rotary_heads(&self, hf: &str, heads: usize, kv_heads: usize) -> Option<usize> {
        match hf {
            _ if !self.rotary_rows_permuted => None,
            hf if hf.ends_with("self_attn.q_proj.weight") => Some(heads),
            hf if hf.ends_with("self_attn.k_proj.weight") => Some(kv_heads),
            _ => None,
        }
    }

    /// The tensor `hf` as llama.cpp's converter stores it: q/k rows in llama's rotary order, Gemma's
    /// norms as 1 + weight.
    fn stored(&self, hf: &str, t: StoredTensor, heads: usize, kv_heads: usize) -> Result<StoredTensor> {
        if let Some(heads) = self.rotary_heads(hf, heads, kv_heads) {
            return Ok(match t {
                StoredTensor::Dense(t) => StoredTensor::Dense(permute_rotary_rows(&t, heads)?),
                StoredTensor::Quant(q) => StoredTensor::Quant(q.select_rows(&llama_cpp_row_order(q.rows, heads)?)),
            });
        }
        if self.norms_plus_one && hf.ends_with("norm.weight") {
            let mut t = t.into_f32();
            t.data.iter_mut().for_each(|w| *w += 1.0);
            return Ok(StoredTensor::Dense(t));
        }
        Ok(t)
    }
}

/// The GGUF architectures that load.
const GGUF_ARCHITECTURES: [GgufArchitecture; 4] = [
    GgufArchitecture {
        name: "llama",
        hf_architecture: LLAMA_ARCHITECTURE,
        model_type: "llama",
        layer_tensors: &LAYER_TENSORS,
        extra_layer_tensors: &[],
        rotary_rows_permuted: true,
        norms_plus_one: false,
    },
    GgufArchitecture {
        name: "qwen2",
        hf_architecture: "Qwen2ForCausalLM",
        model_type: "qwen2",
        layer_tensors: &LAYER_TENSORS,
        extra_layer_tensors: &[
            ("attn_q.bias", "self_attn.q_proj.bias"),
            ("attn_k.bias", "self_attn.k_proj.bias"),
            ("attn_v.bias", "self_attn.v_proj.bias"),
        ],
        rotary_rows_permuted: false,
        norms_plus_one: false,
    },
    GgufArchitecture {
        name: "qwen3",
        hf_architecture: "Qwen3ForCausalLM",
        model_type: "qwen3",
        layer_tensors: &LAYER_TENSORS,
        extra_layer_tensors: &[("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight")],
        rotary_rows_permuted: false,
        norms_plus_one: false,
    },
    GgufArchitecture {
        name: "gemma3",
        hf_architecture: "Gemma3ForCausalLM",
        model_type: "gemma3_text",
        layer_tensors: &GEMMA3_LAYER_TENSORS,
        extra_layer_tensors: &[],
        rotary_rows_permuted: false,
        norms_plus_one: true,
    },
];

impl GgufWeights {
    /// The file, for error messages.
    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor named `name` (Hugging Face name) as stored, q/k rows un-permuted.
    pub fn tensor(&self, name: &str) -> Result<StoredTensor> {
        let (info, stored) =
            self.tensors.get(name).ok_or_else(|| Error::file(&self.file, format!("tensor {name} (Hugging Face name) is missing")))?;
        let t = read_tensor(&self.file, &self.bytes[self.data_start..], info)?;
        let named = |e: Error| Error::file(&self.file, format!("tensor {}: {e}", info.name));
        Ok(match (*stored, t) {
            (Stored::AsIs, t) => t,
            (Stored::RotaryRows(heads), StoredTensor::Dense(t)) => StoredTensor::Dense(unpermute_rotary_rows(&t, heads).map_err(named)?),
            (Stored::RotaryRows(heads), StoredTensor::Quant(q)) => {
                StoredTensor::Quant(q.select_rows(&rotary_row_order(q.rows, heads).map_err(named)?))
            }
            (Stored::PlusOne, t) => {
                let mut t = t.into_f32();
                t.data.iter_mut().for_each(|w| *w -= 1.0);
                StoredTensor::Dense(t)
            }
        })
    }

    /// The tensor named `name` in f32 (dequantized).
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        Ok(self.tensor(name)?.into_f32())
    }
}

impl GgufModel {
    /// Reads a GGUF of an architecture in [`GGUF_ARCHITECTURES`]; `file` names it in errors.
    pub fn parse(file: &str, bytes: Vec<u8>) -> Result<Self> {
        let g = GgufFile::parse(&bytes, file)?;
        let arch_name = g.require("general.architecture")?.as_str().unwrap_or("");
        let Some(arch) = GGUF_ARCHITECTURES.iter().find(|a| a.name == arch_name) else {
            let supported: Vec<String> = GGUF_ARCHITECTURES.iter().map(|a| format!("{:?}", a.name)).collect();
            return Err(Error::file(
                &g.file,
                format!("unsupported architecture {arch_name:?}; GGUF files of {} load", supported.join(" and ")),
            ));
        };
        let key = |k: &str| format!("{}.{k}", arch.name);
        let meta_u64 = |k: &str| g.meta(&key(k)).and_then(MetaValue::as_u64).map(|v| v as usize);
        let int = |k: &str| -> Result<usize> {
            let k = key(k);
            g.require(&k)?.as_u64().map(|v| v as usize).ok_or_else(|| Error::file(&g.file, format!("metadata {k:?} is not an integer")))
        };
        let heads = int("attention.head_count")?;
        let kv_heads = meta_u64("attention.head_count_kv").unwrap_or(heads);
        let hidden = int("embedding_length")?;
        let head_dim = meta_u64("attention.key_length").or(meta_u64("rope.dimension_count")).unwrap_or(hidden / heads.max(1));
        let layers = int("block_count")?;

        let mut tensors = BTreeMap::new();
        let mut rope_freqs = None;
        for info in &g.tensors {
            g.check_tensor(info)?;
            if info.name == ROPE_FREQS && arch.name == "llama" {
                rope_freqs = Some(g.tensor_f32(info)?.data);
                continue;
            }
            let Some(name) = hf_name(&info.name, arch.layer_tensors()) else {
                return Err(Error::file(&g.file, format!("tensor {} has no Hugging Face {} counterpart", info.name, arch.hf_architecture)));
            };
            let stored = match &info.name {
                n if arch.rotary_rows_permuted && n.ends_with("attn_q.weight") => Stored::RotaryRows(heads),
                n if arch.rotary_rows_permuted && n.ends_with("attn_k.weight") => Stored::RotaryRows(kv_heads),
                n if arch.norms_plus_one && n.ends_with("norm.weight") => Stored::PlusOne,
                _ => Stored::AsIs,
            };
            tensors.insert(name, (info.clone(), stored));
        }
        let vocab_size = match meta_u64("vocab_size") {
            Some(v) => v,
            None => tensors
                .get("model.embed_tokens.weight")
                .map(|(info, _)| info.shape()[0])
                .ok_or_else(|| Error::file(&g.file, "no token_embd.weight tensor: the file holds no token embeddings"))?,
        };
        // every tensor the architecture runs on, before anything is converted or loaded (named one
        // at a time: a layer count the file cannot hold makes no list of names)
        let layer_tensors = (0..layers).flat_map(|i| arch.layer_tensors().map(move |(_, hf)| format!("model.layers.{i}.{hf}")));
        let mut required = ["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()].into_iter().chain(layer_tensors);
        if let Some(missing) = required.find(|name| !tensors.contains_key(name)) {
            let gguf_name = gguf_name_in(&missing, arch.layer_tensors()).unwrap_or_else(|| missing.clone());
            return Err(Error::file(
                &g.file,
                format!(
                    "tensor {gguf_name} ({missing}) is missing: a {layers}-layer {} model needs it; the file holds {} tensors",
                    arch.name,
                    g.tensors.len()
                ),
            ));
        }
        let tied = !tensors.contains_key("lm_head.weight");
        // f32 metadata widened to f64 prints as 9.999999747378752e-06; keep the value the author wrote
        let shortest = |v: f64| format!("{}", v as f32).parse::<f64>().unwrap_or(v);
        let float = |k: &str| g.meta(&key(k)).and_then(MetaValue::as_f64).map(shortest);
        let token_id = |key: &str| g.meta(key).and_then(MetaValue::as_u64);
        let (bos, eos, pad) =
            (token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id"), token_id("tokenizer.ggml.padding_token_id"));
        let gemma = arch.name == "gemma3";
        let mut config = json!({
            "architectures": [arch.hf_architecture],
            "model_type": arch.model_type,
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": int("feed_forward_length")?,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": int("context_length")?,
            "rms_norm_eps": float("attention.layer_norm_rms_epsilon").unwrap_or(if gemma { 1e-6 } else { 1e-5 }),
            "rope_theta": float("rope.freq_base").unwrap_or(if gemma { 1e6 } else { 1e4 }),
            "rope_scaling": null,
            "attention_bias": false,
            "tie_word_embeddings": tied,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        });
        if let Some(divisors) = rope_freqs {
            let theta = config["rope_theta"].as_f64().expect("a number");
            config["rope_scaling"] = llama3_scaling(&divisors, theta, head_dim).ok_or_else(|| {
                Error::file(
                    &g.file,
                    format!("{ROPE_FREQS} holds rotary divisors that are not Llama 3's scaling (low_freq_factor 1): {divisors:?}"),
                )
            })?;
        }
        if gemma {
            // what llama.cpp runs a gemma3 file with (and transformers reads it as): every sixth
            // layer full attention, the sliding ones at base 10000, scores by 1 / sqrt(head_dim)
            let sliding = |i: usize| if (i + 1) % 6 != 0 { "sliding_attention" } else { "full_attention" };
            let extra = json!({
                "hidden_activation": "gelu_pytorch_tanh",
                "sliding_window": meta_u64("attention.sliding_window"),
                "layer_types": (0..layers).map(sliding).collect::<Vec<_>>(),
                "rope_local_base_freq": 10000.0,
                "query_pre_attn_scalar": head_dim,
                "final_logit_softcapping": null,
                "attn_logit_softcapping": null,
            });
            config.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
        } else {
            config["hidden_act"] = json!("silu");
            config["mlp_bias"] = json!(false);
        }
        let generation_config = json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad});
        let (tokenizer, tokenizer_config) = gguf_tokenizer(&g, arch.name)?.unzip();
        let (file, data_start, metadata) = (g.file.clone(), g.data_start, g.raw_metadata);
        let weights = GgufWeights { file, bytes, data_start, tensors };
        Ok(GgufModel { metadata, config, tokenizer, tokenizer_config, generation_config, weights })
    }

    /// config.json, generation_config.json and, when the file has a tokenizer, tokenizer.json
    /// and tokenizer_config.json: the Hugging Face files besides the weights.
    pub fn text_files(&self, dtype: StoreDtype) -> Vec<(&'static str, Vec<u8>)> {
        let mut config = self.config.clone();
        config["torch_dtype"] = json!(dtype.torch_name());
        let mut files = vec![(CONFIG_FILE, pretty(&config)), (GENERATION_CONFIG_FILE, pretty(&self.generation_config))];
        if let (Some(tok), Some(tok_config)) = (&self.tokenizer, &self.tokenizer_config) {
            files.push((TOKENIZER_FILE, serde_json::to_vec(tok).expect("JSON")));
            files.push((TOKENIZER_CONFIG_FILE, pretty(tok_config)));
        }
        files
    }

    /// The dtype a Hugging Face directory keeps this file's matrices in (config.json's
    /// torch_dtype): f16 or bf16 when every matrix is stored so, f32 otherwise (quantized blocks
    /// dequantize exactly only to f32).
    pub fn stored_dtype(&self) -> StoreDtype {
        let matrices = || self.weights.tensors.values().map(|(info, _)| info).filter(|info| info.dims.len() == 2);
        [StoreDtype::F16, StoreDtype::BF16].into_iter().find(|&d| matrices().all(|info| kept_as(info) == d)).unwrap_or(StoreDtype::F32)
    }

    /// Writes config.json, model.safetensors (dequantized), tokenizer files and
    /// generation_config.json. The tensors in `dtype`, or with `None` each as the GGUF stores it
    /// (F16 and BF16 kept, F32 and quantized blocks in f32): nothing is rounded.
    pub fn write_dir(&self, dir: &Path, dtype: Option<StoreDtype>) -> Result<()> {
        let tensors =
            self.weights.names().map(|name| Ok((name.to_string(), self.weights.tensor_f32(name)?))).collect::<Result<BTreeMap<_, _>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut files = self.text_files(dtype.unwrap_or_else(|| self.stored_dtype()));
        let dtype_of = |name: &str| dtype.unwrap_or_else(|| kept_as(&self.weights.tensors[name].0));
        files.push((SINGLE_FILE, write_safetensors_as(&tensors, &dtype_of, Some(metadata))?));
        write_files(dir, files)
    }
}

/// The safetensors dtype that holds a GGUF tensor's values exactly.
fn kept_as(info: &TensorInfo) -> StoreDtype {
    match GgmlType::from_id(info.ggml_type) {
        Some(GgmlType::F16) => StoreDtype::F16,
        Some(GgmlType::BF16) => StoreDtype::BF16,
        _ => StoreDtype::F32,
    }
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("JSON");
    bytes.push(b'\n');
    bytes
}

/// Llama 3's scaled rotary frequencies in a llama file: a divisor per frequency.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// config.json's `rope_scaling` of Llama 3 from the divisors llama.cpp stores for it (rope_freqs:
/// 1 for high frequencies, `factor` for low ones, 1 / ((1 - s) / factor + s) between, s =
/// (L / wavelength - low) / (high - low)). factor is the largest divisor; with low_freq_factor 1
/// (every Llama 3.x's) two divisors of the band fix high_freq_factor and the original context L.
/// `None` where the band holds fewer than two, or where the scaling found does not give back
/// every divisor (1e-5 relative). Divisors of 1 alone scale nothing: null.
fn llama3_scaling(divisors: &[f32], theta: f64, head_dim: usize) -> Option<Value> {
    let wavelength = |i: usize| 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / head_dim as f64);
    let factor = divisors.iter().fold(1.0f32, |m, &d| m.max(d)) as f64;
    if factor == 1.0 && divisors.iter().all(|&d| d == 1.0) {
        return Some(Value::Null);
    }
    let band: Vec<usize> = (0..divisors.len()).filter(|&i| divisors[i] > 1.0 && (divisors[i] as f64) < factor).collect();
    let (&first, &last) = (band.first()?, band.last().filter(|&&l| l != band[0])?);
    let smooth = |i: usize| (1.0 / divisors[i] as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
    // L / w = 1 + s k (k = high - 1) at both ends of the band
    let (w1, s1, w2, s2) = (wavelength(first), smooth(first), wavelength(last), smooth(last));
    let ratio = w1 / w2;
    let k = (1.0 - ratio) / (s1 * ratio - s2);
    let (high, context) = (((1.0 + k) * 1000.0).round() / 1000.0, (w1 * (1.0 + s1 * k)).round());
    let recomputed = |i: usize| {
        let w = wavelength(i);
        if w < context / high {
            1.0
        } else if w > context {
            factor
        } else {
            let s = (context / w - 1.0) / (high - 1.0);
            1.0 / ((1.0 - s) / factor + s)
        }
    };
    let fits = (0..divisors.len()).all(|i| (recomputed(i) - divisors[i] as f64).abs() <= 1e-5 * recomputed(i));
    fits.then(|| {
        json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
               "original_max_position_embeddings": context as u64})
    })
}

/// The tensors of each decoder layer of a `llama` file: (llama.cpp name, Hugging Face name).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Gemma 3's, as llama.cpp names them (its ffn_norm is the MLP's input norm, its
/// post_attention_norm the norm of attention's output).
const GEMMA3_LAYER_TENSORS: [(&str, &str); 13] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The tensors outside the layers: (llama.cpp name, Hugging Face name).
const MODEL_TENSORS: [(&str, &str); 3] =
    [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];

/// llama.cpp tensor names -> Hugging Face names, with an architecture's layer tensors.
fn hf_name<'a, 'b: 'a>(gguf_name: &str, mut layer_tensors: impl Iterator<Item = &'a (&'b str, &'b str)>) -> Option<String> {
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(gg, _)| *gg == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (_, hf) = layer_tensors.find(|(gg, _)| *gg == part)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Hugging Face names -> llama.cpp tensor names, with an architecture's layer tensors.
fn gguf_name_in<'a, 'b: 'a>(hf: &str, mut layer_tensors: impl Iterator<Item = &'a (&'b str, &'b str)>) -> Option<String> {
    if let Some((gg, _)) = MODEL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(gg.to_string());
    }
    let (layer, part) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (gg, _) = layer_tensors.find(|(_, h)| *h == part)?;
    Some(format!("blk.{layer}.{gg}"))
}

/// Rows of a Hugging Face matrix in llama.cpp's rotary order (the permutation its converter
/// applies to q/k; the inverse of [`rotary_row_order`]).
pub fn permute_rotary_rows(t: &HostTensor, heads: usize) -> Result<HostTensor> {
    Ok(rows_in_order(t, &llama_cpp_row_order(t.shape[0], heads)?))
}

/// Stored row s of llama.cpp's layout is Hugging Face row `order[s]`.
fn llama_cpp_row_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    let hf_to_stored = rotary_row_order(rows, heads)?;
    let mut order = vec![0; rows];
    for (hf, &stored) in hf_to_stored.iter().enumerate() {
        order[stored] = hf;
    }
    Ok(order)
}

/// The type a tensor is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Quant(QuantType),
}

/// A model of `config` as a GGUF: `metadata` copied as stored (with `general.file_type` set to
/// `file_type`, llama.cpp's `LlamaFileType`, where given), then every tensor (Hugging Face name ->
/// value, type to write) under llama.cpp's name for the model's architecture, stored as its
/// converter stores it ([`GgufArchitecture`]). Vectors are written in F32; a quantized type that
/// is not written here (a k-quant) is written as [`QuantType::requantized_as`]. The tensor is
/// named in an error (a value that cannot be quantized).
pub fn write_model_gguf(
    config: &LlamaConfig,
    metadata: &RawMetadata,
    file_type: Option<u32>,
    mut tensors: Vec<(String, StoredTensor, TensorType)>,
) -> Result<Vec<u8>> {
    let arch = GgufArchitecture::of(config)?;
    let mut w = GgufWriter::default();
    w.copy_metadata(metadata);
    if let Some(file_type) = file_type {
        w.set_u32("general.file_type", file_type);
    }
    tensors.sort_by_key(|(hf, ..)| arch.order(hf));
    for (hf, t, kind) in tensors {
        let name = arch.gguf_name(&hf).ok_or_else(|| Error::invalid(format!("tensor {hf} has no llama.cpp name")))?;
        let permuted = |t: StoredTensor| arch.stored(&hf, t, config.num_attention_heads, config.num_key_value_heads);
        let kind = match (&t, kind) {
            (StoredTensor::Dense(d), _) if d.shape.len() == 1 => TensorType::F32,
            (_, TensorType::Quant(k)) => TensorType::Quant(k.requantized_as()),
            (_, other) => other,
        };
        match (permuted(t)?, kind) {
            (StoredTensor::Quant(q), TensorType::Quant(k)) if q.kind == k => w.add_quant(&name, &q).expect("a type written here"),
            (t, TensorType::Quant(k)) => w.add_quant(&name, &QuantMatrix::quantize(k, &t.into_f32(), &name)?).expect("quantized"),
            (t, dense) => w.add_dense(&name, &t.into_f32(), dense == TensorType::F16),
        }
    }
    Ok(w.bytes())
}
