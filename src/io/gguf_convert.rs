//! GGUF -> Hugging Face: the config, the weights under their HF names (rotary rows of q/k
//! un-permuted) and a `tokenizer.json` rebuilt from the GGUF tokenizer metadata, built the way
//! transformers builds its GGUF tokenizer (byte-level BPE, control tokens added as special).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde_json::{Value, json};

use crate::config::LLAMA_ARCHITECTURE;
use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, MetaValue, unpermute_rotary_rows};
use crate::io::model_files::{CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, write_files};
use crate::io::safetensors::{SINGLE_FILE, StoreDtype, write_safetensors};
use crate::tensor::HostTensor;

/// A model converted to the Hugging Face layout, in memory.
pub struct HfModel {
    pub config: Value,
    pub tensors: BTreeMap<String, HostTensor>,
    /// `None` when the GGUF carries no tokenizer.
    pub tokenizer: Option<Value>,
    pub tokenizer_config: Option<Value>,
    pub generation_config: Value,
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

impl HfModel {
    /// Converts a parsed GGUF of architecture "llama".
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.require("general.architecture")?.as_str().unwrap_or("");
        if arch != "llama" {
            return Err(Error::file(&g.file, format!("unsupported architecture {arch:?}; only \"llama\" GGUF files convert")));
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
            let Some(name) = hf_name(&info.name) else {
                return Err(Error::file(&g.file, format!("tensor {} has no Hugging Face Llama counterpart", info.name)));
            };
            let mut t = g.tensor_f32(info)?;
            if info.name.ends_with("attn_q.weight") {
                t = unpermute_rotary_rows(&t, heads)?;
            } else if info.name.ends_with("attn_k.weight") {
                t = unpermute_rotary_rows(&t, kv_heads)?;
            }
            tensors.insert(name, t);
        }
        let vocab_size = match g.meta("llama.vocab_size").and_then(MetaValue::as_u64) {
            Some(v) => v as usize,
            None => tensors
                .get("model.embed_tokens.weight")
                .map(|t| t.shape[0])
                .ok_or_else(|| Error::file(&g.file, "no token_embd.weight tensor"))?,
        };
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
                let (tok, tok_config) = byte_level_tokenizer(g)?;
                (Some(tok), Some(tok_config))
            }
            Some(other) => {
                return Err(Error::file(
                    &g.file,
                    format!("tokenizer.ggml.model {other:?} is not supported; only \"gpt2\" (byte-level BPE)"),
                ));
            }
        };
        Ok(HfModel { config, tensors, tokenizer, tokenizer_config, generation_config })
    }

    /// Writes config.json, model.safetensors (in `dtype`), tokenizer files and generation_config.json.
    pub fn write_dir(&self, dir: &Path, dtype: StoreDtype) -> Result<()> {
        let mut config = self.config.clone();
        config["torch_dtype"] = json!(dtype.torch_name());
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut files: Vec<(&str, Vec<u8>)> = vec![
            (SINGLE_FILE, write_safetensors(&self.tensors, dtype, Some(metadata))?),
            (CONFIG_FILE, pretty(&config)),
            (GENERATION_CONFIG_FILE, pretty(&self.generation_config)),
        ];
        if let (Some(tok), Some(tok_config)) = (&self.tokenizer, &self.tokenizer_config) {
            files.push((TOKENIZER_FILE, serde_json::to_vec(tok).expect("JSON")));
            files.push((TOKENIZER_CONFIG_FILE, pretty(tok_config)));
        }
        write_files(dir, files)
    }
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("JSON");
    bytes.push(b'\n');
    bytes
}

/// llama.cpp tensor names -> Hugging Face Llama names.
fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

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
    Ok((tokenizer, config))
}
