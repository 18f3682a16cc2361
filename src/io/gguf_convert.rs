//! GGUF -> Hugging Face: the config, the weights under their HF names (rotary rows of q/k
//! un-permuted, quantized blocks kept as stored until asked for f32) and a `tokenizer.json`
//! rebuilt from the GGUF tokenizer metadata, built the way transformers builds its GGUF tokenizer
//! (byte-level BPE, control tokens added as special). A GGUF loads directly through this
//! ([`GgufModel`]), or converts to a Hugging Face directory ([`GgufModel::write_dir`]).
//!
//! And back, Hugging Face -> GGUF, as llama.cpp's converters write it: a model's weights under
//! llama.cpp's names, in its order, with q/k rows permuted again ([`write_model_gguf`]), and
//! names, order and row orders for a LoRA adapter's GGUF ([`gguf_name`], [`gguf_order`],
//! [`permute_rotary_rows`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde_json::{Value, json};

use crate::config::LLAMA_ARCHITECTURE;
use crate::error::{Error, Result};
use crate::io::gguf::{
    GgmlType, GgufFile, MetaValue, RawMetadata, StoredTensor, TensorInfo, read_tensor, rotary_row_order, rows_in_order,
    unpermute_rotary_rows,
};
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
    /// Hugging Face name -> (the tensor's entry, the heads its rotary rows are permuted by)
    tensors: BTreeMap<String, (TensorInfo, Option<usize>)>,
}

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
        let (info, heads) =
            self.tensors.get(name).ok_or_else(|| Error::file(&self.file, format!("tensor {name} (Hugging Face name) is missing")))?;
        let t = read_tensor(&self.file, &self.bytes[self.data_start..], info)?;
        let Some(heads) = *heads else { return Ok(t) };
        let named = |e: Error| Error::file(&self.file, format!("tensor {}: {e}", info.name));
        Ok(match t {
            StoredTensor::Dense(t) => StoredTensor::Dense(unpermute_rotary_rows(&t, heads).map_err(named)?),
            StoredTensor::Quant(q) => StoredTensor::Quant(q.select_rows(&rotary_row_order(q.rows, heads).map_err(named)?)),
        })
    }

    /// The tensor named `name` in f32 (dequantized).
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        Ok(self.tensor(name)?.into_f32())
    }
}

impl GgufModel {
    /// Reads a GGUF of architecture "llama"; `file` names it in errors.
    pub fn parse(file: &str, bytes: Vec<u8>) -> Result<Self> {
        let g = GgufFile::parse(&bytes, file)?;
        let arch = g.require("general.architecture")?.as_str().unwrap_or("");
        if arch != "llama" {
            return Err(Error::file(&g.file, format!("unsupported architecture {arch:?}; only \"llama\" GGUF files load")));
        }
        let int = |key: &str| -> Result<usize> {
            g.require(key)?.as_u64().map(|v| v as usize).ok_or_else(|| Error::file(&g.file, format!("metadata {key:?} is not an integer")))
        };
        let heads = int("llama.attention.head_count")?;
        let kv_heads = g.meta("llama.attention.head_count_kv").and_then(MetaValue::as_u64).map_or(heads, |v| v as usize);
        let hidden = int("llama.embedding_length")?;
        let head_dim = g.meta("llama.rope.dimension_count").and_then(MetaValue::as_u64).map_or(hidden / heads.max(1), |v| v as usize);
        let layers = int("llama.block_count")?;

        let mut tensors = BTreeMap::new();
        for info in &g.tensors {
            g.check_tensor(info)?;
            let Some(name) = hf_name(&info.name) else {
                return Err(Error::file(&g.file, format!("tensor {} has no Hugging Face Llama counterpart", info.name)));
            };
            let heads = if info.name.ends_with("attn_q.weight") {
                Some(heads)
            } else if info.name.ends_with("attn_k.weight") {
                Some(kv_heads)
            } else {
                None
            };
            tensors.insert(name, (info.clone(), heads));
        }
        let vocab_size = match g.meta("llama.vocab_size").and_then(MetaValue::as_u64) {
            Some(v) => v as usize,
            None => tensors
                .get("model.embed_tokens.weight")
                .map(|(info, _)| info.shape()[0])
                .ok_or_else(|| Error::file(&g.file, "no token_embd.weight tensor: the file holds no token embeddings"))?,
        };
        // every tensor the architecture runs on, before anything is converted or loaded (named one
        // at a time: a layer count the file cannot hold makes no list of names)
        let layer_tensors = (0..layers).flat_map(|i| LAYER_TENSORS.iter().map(move |(_, hf)| format!("model.layers.{i}.{hf}")));
        let mut required = ["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()].into_iter().chain(layer_tensors);
        if let Some(missing) = required.find(|name| !tensors.contains_key(name)) {
            let gguf_name = reverse_name(&missing);
            return Err(Error::file(
                &g.file,
                format!(
                    "tensor {gguf_name} ({missing}) is missing: a {layers}-layer llama model needs it; the file holds {} tensors",
                    g.tensors.len()
                ),
            ));
        }
        let tied = !tensors.contains_key("lm_head.weight");
        // f32 metadata widened to f64 prints as 9.999999747378752e-06; keep the value the author wrote
        let shortest = |v: f64| format!("{}", v as f32).parse::<f64>().unwrap_or(v);
        let token_id = |key: &str| g.meta(key).and_then(MetaValue::as_u64);
        let (bos, eos, pad) =
            (token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id"), token_id("tokenizer.ggml.padding_token_id"));
        let config = json!({
            "architectures": [LLAMA_ARCHITECTURE],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": int("llama.feed_forward_length")?,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int("llama.context_length")?,
            "rms_norm_eps": shortest(g.meta("llama.attention.layer_norm_rms_epsilon").and_then(MetaValue::as_f64).unwrap_or(1e-5)),
            "rope_theta": shortest(g.meta("llama.rope.freq_base").and_then(MetaValue::as_f64).unwrap_or(10000.0)),
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": tied,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        });
        let generation_config = json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad});
        let (tokenizer, tokenizer_config) = match g.meta("tokenizer.ggml.model").and_then(MetaValue::as_str) {
            None => (None, None),
            Some("gpt2") => {
                let (tok, tok_config) = byte_level_tokenizer(&g)?;
                (Some(tok), Some(tok_config))
            }
            Some(other) => {
                return Err(Error::file(
                    &g.file,
                    format!("tokenizer.ggml.model {other:?} is not supported; only \"gpt2\" (byte-level BPE)"),
                ));
            }
        };
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

/// The tensors of each decoder layer: (llama.cpp name, Hugging Face name).
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

/// The tensors outside the layers: (llama.cpp name, Hugging Face name).
const MODEL_TENSORS: [(&str, &str); 3] =
    [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];

/// llama.cpp tensor names -> Hugging Face Llama names.
fn hf_name(gguf_name: &str) -> Option<String> {
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(gg, _)| *gg == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (_, hf) = LAYER_TENSORS.iter().find(|(gg, _)| *gg == part)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Hugging Face Llama names -> llama.cpp tensor names.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((gg, _)) = MODEL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(gg.to_string());
    }
    let (layer, part) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (gg, _) = LAYER_TENSORS.iter().find(|(_, h)| *h == part)?;
    Some(format!("blk.{layer}.{gg}"))
}

/// Where llama.cpp's converter writes the tensor `hf` (Hugging Face name): the embedding, each
/// layer's tensors in order, the final norm, the head.
pub fn gguf_order(hf: &str) -> (usize, usize) {
    let layer_part = |rest: &str| {
        let (layer, part) = rest.split_once('.')?;
        Some((1 + layer.parse::<usize>().ok()?, LAYER_TENSORS.iter().position(|(_, h)| *h == part)?))
    };
    match hf {
        "model.embed_tokens.weight" => (0, 0),
        "model.norm.weight" => (usize::MAX, 0),
        "lm_head.weight" => (usize::MAX, 1),
        _ => hf.strip_prefix("model.layers.").and_then(layer_part).unwrap_or((usize::MAX - 1, 0)),
    }
}

/// For messages: the llama.cpp name where there is one.
fn reverse_name(hf: &str) -> String {
    gguf_name(hf).unwrap_or_else(|| hf.to_string())
}

/// The heads whose rotary rows llama.cpp permutes in the tensor `hf` (q_proj: the attention
/// heads, k_proj: the key/value heads), if it does.
pub fn rotary_heads(hf: &str, heads: usize, kv_heads: usize) -> Option<usize> {
    if hf.ends_with("self_attn.q_proj.weight") {
        Some(heads)
    } else if hf.ends_with("self_attn.k_proj.weight") {
        Some(kv_heads)
    } else {
        None
    }
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

/// A model as a GGUF: `metadata` copied as stored (with `general.file_type` set to `file_type`,
/// llama.cpp's `LlamaFileType`, where given), then every tensor (Hugging Face name -> value, type to write)
/// under llama.cpp's name, q/k rows permuted for `heads`/`kv_heads` as llama.cpp's converter
/// does. Vectors are written in F32; a quantized type that is not written here (a k-quant) is
/// written as [`QuantType::requantized_as`]. The tensor is named in an error (a value that
/// cannot be quantized).
pub fn write_model_gguf(
    metadata: &RawMetadata,
    file_type: Option<u32>,
    mut tensors: Vec<(String, StoredTensor, TensorType)>,
    heads: usize,
    kv_heads: usize,
) -> Result<Vec<u8>> {
    let mut w = GgufWriter::default();
    w.copy_metadata(metadata);
    if let Some(file_type) = file_type {
        w.set_u32("general.file_type", file_type);
    }
    tensors.sort_by_key(|(hf, ..)| gguf_order(hf));
    for (hf, t, kind) in tensors {
        let name = gguf_name(&hf).ok_or_else(|| Error::invalid(format!("tensor {hf} has no llama.cpp name")))?;
        let permuted = |t: StoredTensor| -> Result<StoredTensor> {
            let Some(heads) = rotary_heads(&hf, heads, kv_heads) else { return Ok(t) };
            Ok(match t {
                StoredTensor::Dense(t) => StoredTensor::Dense(permute_rotary_rows(&t, heads)?),
                StoredTensor::Quant(q) => StoredTensor::Quant(q.select_rows(&llama_cpp_row_order(q.rows, heads)?)),
            })
        };
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

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut map = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap()
        };
    }
    map
}

/// tokenizer.json and tokenizer_config.json for a "gpt2" (byte-level BPE) GGUF vocabulary.
fn byte_level_tokenizer(g: &GgufFile) -> Result<(Value, Value)> {
    let strings = |key: &str| -> Result<Vec<&str>> {
        let arr = g.require(key)?.as_array().ok_or_else(|| Error::file(&g.file, format!("{key} is not an array")))?;
        arr.iter().map(|v| v.as_str().ok_or_else(|| Error::file(&g.file, format!("{key} holds a non-string")))).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.meta("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
        Some(arr) => arr.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
        None => vec![1; tokens.len()],
    };
    let spelling = bytes_to_unicode();
    let alphabet: BTreeSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    // tokens written in raw text (not in the byte alphabet) are respelled byte by byte
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, &t)| {
            let spelled = if in_alphabet(t) { t.to_string() } else { t.bytes().map(|b| spelling[b as usize]).collect() };
            (spelled, json!(id))
        })
        .collect();
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])).ok_or_else(|| Error::file(&g.file, format!("merge {m:?} is not \"a b\""))))
        .collect::<Result<_>>()?;
    let added_tokens: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (t, kind))| (**kind == TOKEN_CONTROL && in_alphabet(t)) || **kind == TOKEN_USER_DEFINED)
        .map(|(id, (t, kind))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *kind == TOKEN_CONTROL})
        })
        .collect();
    let token_text = |key: &str| g.meta(key).and_then(MetaValue::as_u64).and_then(|id| tokens.get(id as usize)).map(|t| t.to_string());
    let add_bos = g.meta("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(false);
    let bos = token_text("tokenizer.ggml.bos_token_id");
    let bos_id = g.meta("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64);
    let (single, pair, special) = match (add_bos, &bos, bos_id) {
        (true, Some(bos), Some(id)) => (
            json!([{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]),
            json!([{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]),
            json!({bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}}),
        ),
        _ => (
            json!([{"Sequence": {"id": "A", "type_id": 0}}]),
            json!([{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]),
            json!({}),
        ),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": g.meta("llama.context_length").and_then(MetaValue::as_u64),
        "bos_token": bos,
        "eos_token": token_text("tokenizer.ggml.eos_token_id"),
        "unk_token": token_text("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_text("tokenizer.ggml.padding_token_id"),
    });
    if let Some(template) = g.meta("tokenizer.chat_template").and_then(MetaValue::as_str) {
        config["chat_template"] = json!(template);
    }
    // transformers' name for it; a GGUF export writes it back (src/io/gguf_metadata.rs)
    if let Some(add) = g.meta("tokenizer.ggml.add_space_prefix").and_then(MetaValue::as_bool) {
        config["add_prefix_space"] = json!(add);
    }
    Ok((tokenizer, config))
}
