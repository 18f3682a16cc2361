//! Hugging Face -> GGUF metadata, as llama.cpp's `convert_hf_to_gguf.py` writes it for a llama
//! model with a byte-level BPE ("gpt2") tokenizer: the hyperparameters from config.json, then the
//! vocabulary, its pre-tokenizer's name, the merges, the special tokens and the chat template from
//! the tokenizer files. A GGUF export of a model loaded from a Hugging Face directory carries this
//! metadata; one loaded from a GGUF copies that file's instead.
//!
//! llama.cpp names a pre-tokenizer by the SHA-256 of the ids its check text encodes to, and splits
//! text by the regex it keeps under that name: a tokenizer it does not know is refused, as its
//! converter refuses it, rather than written with a splitting that would tokenize differently.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::io::gguf::RawMetadata;
use crate::io::gguf_convert::GgufArchitecture;
use crate::io::gguf_write::GgufWriter;
use crate::io::model_files::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use crate::io::tokenizer::{TextTokenizer, special_token};

/// llama.cpp's check text: its converter names a pre-tokenizer by the hash of its ids.
const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1f680} (normal) \u{1f636}\u{200d}\u{1f32b}\u{fe0f} (multiple emojis concatenated) \u{2705} \u{1f999}\u{1f999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17b6}\u{1793}\u{17cb}\u{178f}\u{17c2}\u{1796}\u{17b7}\u{179f}\u{17c1}\u{179f}\u{17a2}\u{17b6}\u{1785}\u{1f601} ?\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e} ------======= \u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{411}\u{44a}\u{43b}\u{433}\u{430}\u{440}\u{441}\u{43a}\u{438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// (SHA-256 of the check text's ids as Python prints the list, llama.cpp's name), from
/// llama.cpp's table, for the tokenizers of the models loaded here.
const KNOWN_PRE_TOKENIZERS: [(&str, &str); 1] = [
    // HuggingFaceTB/SmolLM-135M and SmolLM2: GPT-2's splitting with digits one by one
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
];

/// The pre-tokenizer llama.cpp calls "gpt-2" (GPT-2's regex, which `ByteLevel` applies when
/// `use_regex` is on), for a vocabulary of its own that the table above cannot name.
const GPT2_NAME: &str = "gpt-2";

/// GGUF token types (llama.cpp `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The special tokens SpecialVocab writes, in its order: (tokenizer_config.json's name without
/// `_token`, the GGUF key; llama.cpp spells "seperator" so).
const SPECIAL_TOKENS: [(&str, &str); 6] = [
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
];

/// Refuses a model whose GGUF metadata is not written here from its Hugging Face files: only
/// plain Llama's (`llama.*` and a byte-level vocabulary); the other families' GGUFs are written
/// from a GGUF base, whose metadata is copied.
fn check_metadata_family(config: &LlamaConfig) -> Result<()> {
    GgufArchitecture::of(config)?;
    if config.model_type == "llama" {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "a GGUF of a {} model is written from its GGUF (its metadata is copied); from a Hugging Face directory, \
         only plain Llama models: load the model's GGUF, or export a Hugging Face directory and convert it with \
         llama.cpp's convert_hf_to_gguf.py",
        config.model_type
    )))
}

/// GGUF metadata for the model of `config` with `text_tokenizer`, loaded from `text_files` (the
/// vocabulary and merges are read from its tokenizer.json, the special tokens from
/// tokenizer_config.json), `file_type` being llama.cpp's `LlamaFileType` of the tensors written.
pub fn model_metadata(
    config: &LlamaConfig,
    text_tokenizer: Option<&TextTokenizer>,
    text_files: &[(String, Vec<u8>)],
    file_type: u32,
) -> Result<RawMetadata> {
    check_metadata_family(config)?;
    let file = |name: &str| text_files.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice());
    let (Some(text_tokenizer), Some(tokenizer_json)) = (text_tokenizer, file(TOKENIZER_FILE)) else {
        return Err(Error::invalid(
            "a GGUF carries the model's tokenizer, and this model was loaded without tokenizer.json: \
             load it from a directory that has one, or export a Hugging Face directory",
        ));
    };
    let json = |name: &str, bytes: &[u8]| -> Result<Value> {
        serde_json::from_slice(bytes).map_err(|e| Error::file(name, format!("not valid JSON: {e}")))
    };
    let tokenizer = json(TOKENIZER_FILE, tokenizer_json)?;
    let tokenizer_config = file(TOKENIZER_CONFIG_FILE).map(|b| json(TOKENIZER_CONFIG_FILE, b)).transpose()?.unwrap_or(Value::Null);

    let mut w = GgufWriter::default();
    w.set_str("general.architecture", "llama");
    w.set_str("general.type", "model");
    if let Some(name) = config.raw.get("_name_or_path").and_then(Value::as_str).and_then(|p| p.rsplit('/').find(|s| !s.is_empty())) {
        w.set_str("general.name", name);
    }
    hyperparameters(&mut w, config, file_type);
    if let Some(add) = tokenizer_config.get("add_prefix_space").and_then(Value::as_bool) {
        w.set_bool("tokenizer.ggml.add_space_prefix", add);
    }
    w.set_str("tokenizer.ggml.model", "gpt2");
    w.set_str("tokenizer.ggml.pre", &pre_tokenizer_name(&tokenizer, text_tokenizer)?);
    let (tokens, types) = vocabulary(&tokenizer, config.vocab_size)?;
    w.set_str_array("tokenizer.ggml.tokens", &tokens);
    w.set_i32_array("tokenizer.ggml.token_type", &types);
    w.set_str_array("tokenizer.ggml.merges", &merges(&tokenizer)?);
    special_tokens(&mut w, &tokenizer, &tokenizer_config, &config.raw);
    if let Some(template) = text_tokenizer.chat_template() {
        w.set_str("tokenizer.chat_template", template);
    }
    w.set_u32("general.quantization_version", 2);
    Ok(w.into_metadata())
}

/// `llama.*`: what `LlamaModel.set_gguf_parameters` writes.
fn hyperparameters(w: &mut GgufWriter, c: &LlamaConfig, file_type: u32) {
    w.set_u32("llama.block_count", c.num_hidden_layers as u32);
    w.set_u32("llama.context_length", c.max_position_embeddings as u32);
    w.set_u32("llama.embedding_length", c.hidden_size as u32);
    w.set_u32("llama.feed_forward_length", c.intermediate_size as u32);
    w.set_u32("llama.attention.head_count", c.num_attention_heads as u32);
    w.set_u32("llama.attention.head_count_kv", c.num_key_value_heads as u32);
    w.set_f32("llama.rope.freq_base", c.rope.theta as f32);
    w.set_f32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps as f32);
    w.set_u32("general.file_type", file_type);
    w.set_u32("llama.vocab_size", c.vocab_size as u32);
    w.set_u32("llama.rope.dimension_count", c.head_dim as u32);
}

/// llama.cpp's name for the tokenizer's pre-tokenizer: by the hash of the check text's ids, or
/// "gpt-2" for a plain byte-level one (GPT-2's regex) whose vocabulary the table does not know.
fn pre_tokenizer_name(tokenizer: &Value, text_tokenizer: &TextTokenizer) -> Result<String> {
    let ids = text_tokenizer.encode(CHECK_TEXT, true)?;
    let printed = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    let hash = format!("{:x}", Sha256::digest(printed.as_bytes()));
    if let Some((_, name)) = KNOWN_PRE_TOKENIZERS.iter().find(|(h, _)| *h == hash) {
        return Ok(name.to_string());
    }
    let pre = &tokenizer["pre_tokenizer"];
    let gpt2 = pre["type"] == "ByteLevel" && pre["use_regex"] != false && pre["add_prefix_space"] != true;
    if gpt2 && tokenizer["normalizer"].is_null() {
        return Ok(GPT2_NAME.to_string());
    }
    Err(Error::file(
        TOKENIZER_FILE,
        format!(
            "its pre-tokenizer ({pre}) is not one this GGUF export can name for llama.cpp (hash of llama.cpp's check text: {hash}), \
             and a GGUF with the wrong one tokenizes differently: convert the merged Hugging Face directory with llama.cpp's \
             convert_hf_to_gguf.py instead"
        ),
    ))
}

/// Token strings and types by id, as `get_vocab_base` lists them: added tokens control (special,
/// or looking special) or user-defined, ids the tokenizer does not use `[PAD{id}]`, unused.
fn vocabulary(tokenizer: &Value, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>)> {
    let mut tokens = vec![None; vocab_size];
    let mut put = |id: Option<u64>, token: &str, kind: i32| -> Result<()> {
        let slot = id.and_then(|id| tokens.get_mut(id as usize)).ok_or_else(|| {
            Error::file(TOKENIZER_FILE, format!("token {token:?} has id {id:?}, outside config.json's vocab_size {vocab_size}"))
        })?;
        *slot = Some((token.to_string(), kind));
        Ok(())
    };
    let vocab = tokenizer["model"]["vocab"].as_object().ok_or_else(|| Error::file(TOKENIZER_FILE, "model.vocab is not a map"))?;
    for (token, id) in vocab {
        put(id.as_u64(), token, NORMAL)?;
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let content = added["content"].as_str().unwrap_or_default();
        let looks_special = (content.starts_with("<|") && content.ends_with("|>")) || ["<pad>", "<mask>"].contains(&content);
        let (token, kind) = if added["special"] == true || looks_special {
            (content.to_string(), CONTROL)
        } else {
            (content.replace('\u{2581}', " "), USER_DEFINED)
        };
        put(added["id"].as_u64(), &token, kind)?;
    }
    Ok(tokens.into_iter().enumerate().map(|(id, t)| t.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED))).unzip())
}

/// Merges as "a b", a space inside a part written as U+0120 as SpecialVocab writes it.
fn merges(tokenizer: &Value) -> Result<Vec<String>> {
    let merges = tokenizer["model"]["merges"].as_array().ok_or_else(|| Error::file(TOKENIZER_FILE, "model.merges is not a list"))?;
    merges
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => {
                let part = |v: &Value| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                part(&pair[0]).zip(part(&pair[1])).map(|(a, b)| format!("{a} {b}"))
            }
            .ok_or_else(|| Error::file(TOKENIZER_FILE, format!("merge {m} is not two strings"))),
            other => Err(Error::file(TOKENIZER_FILE, format!("merge {other} is not \"a b\" or [a, b]"))),
        })
        .collect()
}

/// `tokenizer.ggml.<kind>_token_id` and `add_<kind>_token`, as SpecialVocab finds them: ids of
/// tokenizer_config.json's tokens among the added tokens, else config.json's `<kind>_token_id`;
/// whether BOS/EOS are added from the post-processor's template, else tokenizer_config.json.
fn special_tokens(w: &mut GgufWriter, tokenizer: &Value, tokenizer_config: &Value, config: &serde_json::Map<String, Value>) {
    let added = tokenizer["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
    let content = |kind: &str| special_token(tokenizer_config, &format!("{kind}_token"));
    for (kind, key) in SPECIAL_TOKENS {
        let from_tokenizer = content(kind).and_then(|c| added.iter().find(|t| t["content"] == c.as_str())).and_then(|t| t["id"].as_u64());
        if let Some(id) = from_tokenizer.or_else(|| config.get(&format!("{kind}_token_id")).and_then(Value::as_u64)) {
            w.set_u32(key, id as u32);
        }
    }
    let template = &tokenizer["post_processor"];
    let single = template["single"].as_array().filter(|_| template["type"] == "TemplateProcessing");
    let special_at = |t: Option<&Value>| t.and_then(|t| t["SpecialToken"]["id"].as_str()).map(str::to_string);
    for (kind, at) in [("bos", single.and_then(|s| s.first())), ("eos", single.and_then(|s| s.last()))] {
        let from_template = special_at(at).map(|token| Some(token) == content(kind));
        if let Some(add) = from_template.or_else(|| tokenizer_config[format!("add_{kind}_token")].as_bool()) {
            w.set_bool(&format!("tokenizer.ggml.add_{kind}_token"), add);
        }
    }
}
