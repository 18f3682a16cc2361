//! `tokenizer.json` and `tokenizer_config.json` rebuilt from a GGUF's tokenizer metadata, as
//! transformers builds its GGUF tokenizers (`integrations/gguf/gguf_tokenizer_mapping.py`), so that
//! a GGUF tokenizes here as transformers tokenizes it:
//!
//! - `gpt2`: byte-level BPE; tokens written in raw text respelled into GPT-2's byte alphabet, the
//!   file's merges; text split first by the regex `tokenizer.ggml.pre` names where transformers
//!   knows one ([`PRE_TOKENIZER_SPLITS`]: Llama 3's, Qwen2's, ...), by GPT-2's otherwise.
//! - `llama` in a `gemma3` file: Gemma's SentencePiece BPE. Spaces become "▁" (whitespace-only
//!   tokens are stored with real spaces and respelled so), unknown bytes fall back to `<0xNN>`
//!   tokens, and the merges, which the file does not list, are rebuilt from the vocabulary: every
//!   split of a token into two tokens, ranked by the token's place in the file (Gemma's scores do
//!   not follow its merge order), longer left parts first.
//!
//! Control tokens are added as special tokens and user-defined ones (`\n`, `<start_of_turn>`-like
//! markup) as plain added tokens, both matched whole; BOS is prepended where the file says so.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, MetaValue};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// SentencePiece's space.
const SPACE: char = '\u{2581}';

/// The pre-tokenizer regexes of byte-level vocabularies, by `tokenizer.ggml.pre` (transformers'
/// `GGUF_PRE_TOKENIZER_SPLITS`, the regexes of each family's own tokenizer.json); a name not
/// here splits as GPT-2 does.
const PRE_TOKENIZER_SPLITS: [(&[&str], &str); 5] = [
    (
        &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"],
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        &["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"],
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        &["qwen35"],
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        &["tekken"],
        concat!(
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
            r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
    ),
    (
        &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        concat!(
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
    ),
];

/// (tokenizer.json, tokenizer_config.json) for the file's tokenizer, `None` without one; a
/// tokenizer kind not rebuilt here is refused by name.
pub fn gguf_tokenizer(g: &GgufFile, architecture: &str) -> Result<Option<(Value, Value)>> {
    let Some(kind) = g.meta("tokenizer.ggml.model").and_then(MetaValue::as_str) else { return Ok(None) };
    let build: fn(&GgufFile, &Vocabulary) -> Result<Parts> = match (kind, architecture) {
        ("gpt2", _) => byte_level,
        ("llama", "gemma3") => gemma,
        (other, _) => {
            return Err(Error::file(
                &g.file,
                format!(
                    "tokenizer.ggml.model {other:?} of a {architecture:?} file is not supported; supported: \"gpt2\" \
                     (byte-level BPE) and \"llama\" in gemma3 files (Gemma's SentencePiece)"
                ),
            ));
        }
    };
    let vocab = Vocabulary::read(g)?;
    let (model, added, text) = build(g, &vocab)?;
    let add_bos = g.meta("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(kind == "llama");
    let mut tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "post_processor": bos_template(g, &vocab, add_bos),
        "model": model,
    });
    for (key, value) in text {
        tokenizer[key] = value;
    }
    Ok(Some((tokenizer, tokenizer_config(g, &vocab, add_bos, architecture))))
}

/// The file's tokens and their types.
struct Vocabulary<'a> {
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

impl<'a> Vocabulary<'a> {
    fn read(g: &'a GgufFile) -> Result<Self> {
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types = match g.meta("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
            Some(arr) => arr.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
            None => vec![1; tokens.len()],
        };
        Ok(Vocabulary { tokens, types })
    }

    /// The text of the token whose id is stored under `key`.
    fn token_at(&self, g: &GgufFile, key: &str) -> Option<String> {
        g.meta(key).and_then(MetaValue::as_u64).and_then(|id| self.tokens.get(id as usize)).map(|t| t.to_string())
    }

    /// Added tokens (tokenizer.json's `added_tokens`) for the ids `keep` accepts of type `kind`.
    fn added(&self, kind: i64, keep: impl Fn(usize, &str) -> bool) -> impl Iterator<Item = (usize, Value)> {
        self.tokens.iter().zip(&self.types).enumerate().filter(move |(id, (t, k))| **k == kind && keep(*id, t)).map(move |(id, (t, _))| {
            (
                id,
                json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": kind == TOKEN_CONTROL}),
            )
        })
    }
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = g.require(key)?.as_array().ok_or_else(|| Error::file(&g.file, format!("{key} is not an array")))?;
    arr.iter().map(|v| v.as_str().ok_or_else(|| Error::file(&g.file, format!("{key} holds a non-string")))).collect()
}

/// A tokenizer's model, added tokens (sorted by id) and text handling (normalizer,
/// pre-tokenizer, decoder).
type Parts = (Value, Vec<Value>, [(&'static str, Value); 3]);

/// Added tokens from several kinds, by id.
fn by_id(parts: impl IntoIterator<Item = (usize, Value)>) -> Vec<Value> {
    let mut added: Vec<(usize, Value)> = parts.into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    added.into_iter().map(|(_, v)| v).collect()
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

/// Byte-level BPE ("gpt2"): tokens written in raw text (not in the byte alphabet) respelled byte
/// by byte; control tokens outside the alphabet (llama.cpp mislabels) are not added.
fn byte_level(g: &GgufFile, vocab: &Vocabulary) -> Result<Parts> {
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let spelling = bytes_to_unicode();
    let alphabet: BTreeSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let spelled: serde_json::Map<String, Value> = vocab
        .tokens
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
    let added = by_id(vocab.added(TOKEN_CONTROL, |_, t| in_alphabet(t)).chain(vocab.added(TOKEN_USER_DEFINED, |_, _| true)));
    let pre = g.meta("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("");
    let byte_level = match PRE_TOKENIZER_SPLITS.iter().find(|(names, _)| names.contains(&pre)) {
        Some((_, split)) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                       "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                       "vocab": spelled, "merges": merges});
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    Ok((model, added, [("normalizer", Value::Null), ("pre_tokenizer", byte_level), ("decoder", decoder)]))
}

/// Gemma's SentencePiece BPE (transformers' `gemma_tokenizer` and `GemmaTokenizer`).
fn gemma(g: &GgufFile, vocab: &Vocabulary) -> Result<Parts> {
    // whitespace-only tokens with a space are stored with real spaces: respelled as "▁"s
    let respelled: Vec<String> = vocab
        .tokens
        .iter()
        .map(|t| if t.contains(' ') && t.trim().is_empty() { SPACE.to_string().repeat(t.chars().count()) } else { t.to_string() })
        .collect();
    // a token written twice keeps its last id, as a Python dict does
    let ids: HashMap<&str, usize> = respelled.iter().enumerate().map(|(id, t)| (t.as_str(), id)).collect();
    let merges = rebuilt_merges(&respelled, &ids);
    let unk = vocab.token_at(g, "tokenizer.ggml.unknown_token_id").unwrap_or_else(|| "<unk>".to_string());
    let model = json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                       "vocab": ids, "merges": merges});
    // user-defined tokens as the file writes them, where the vocabulary (respelled) still has them
    let added = by_id(vocab.added(TOKEN_CONTROL, |_, _| true).chain(vocab.added(TOKEN_USER_DEFINED, |_, t| ids.contains_key(t))));
    let text = [
        ("normalizer", json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE.to_string()})),
        ("pre_tokenizer", json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false})),
        (
            "decoder",
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE.to_string()}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]}),
        ),
    ];
    Ok((model, added, text))
}

/// BPE merges implied by a vocabulary without them (transformers' `generate_merges` ranked by
/// file position): each token's splits into two tokens, tokens in file order (the first place a
/// token appears; its rank is its last id), a token's splits longest left part first.
fn rebuilt_merges(tokens: &[String], ids: &HashMap<&str, usize>) -> Vec<Value> {
    let mut seen = BTreeSet::new();
    let mut ranked: Vec<(usize, usize, [&str; 2])> = Vec::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let rank = ids[token.as_str()];
        let mut local: Vec<[&str; 2]> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| [l, r])
            .collect();
        local.sort_by_key(|[l, r]| (ids[l], ids[r]));
        ranked.extend(local.into_iter().map(|pair| (rank, pair[0].chars().count(), pair)));
    }
    // best first: the earliest token; among a token's splits the longest left part (stable)
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    ranked.into_iter().map(|(_, _, [l, r])| json!([l, r])).collect()
}

/// The post-processor: BOS before each sequence where the file adds it.
fn bos_template(g: &GgufFile, vocab: &Vocabulary, add_bos: bool) -> Value {
    let bos = vocab.token_at(g, "tokenizer.ggml.bos_token_id");
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
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}

/// tokenizer_config.json: the special tokens by text, BOS, the chat template, the prefix space.
fn tokenizer_config(g: &GgufFile, vocab: &Vocabulary, add_bos: bool, architecture: &str) -> Value {
    let token = |key: &str| vocab.token_at(g, key);
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": g.meta(&format!("{architecture}.context_length")).and_then(MetaValue::as_u64),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
    });
    if let Some(template) = g.meta("tokenizer.chat_template").and_then(MetaValue::as_str) {
        config["chat_template"] = json!(template);
    }
    // transformers' name for it; a GGUF export writes it back (src/io/gguf_metadata.rs)
    if let Some(add) = g.meta("tokenizer.ggml.add_space_prefix").and_then(MetaValue::as_bool) {
        config["add_prefix_space"] = json!(add);
    }
    config
}
