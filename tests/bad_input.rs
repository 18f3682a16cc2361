//! Bad input: each case gives an error that names the file and the problem.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use webgpu_lora::io::ModelFiles;
use webgpu_lora::io::gguf_convert::GgufModel;
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::{Error, Llm};

/// A scratch copy of the tiny model that a test may damage.
fn damaged_copy(name: &str) -> PathBuf {
    let dir = scratch(&format!("bad-{name}"));
    fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fs::copy(fixture("tiny-llama").join(file), dir.join(file)).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    let result = ModelFiles::from_dir(dir).and_then(|files| Llm::load(files, WeightDtype::F32, &cpu(), &mut |_, _, _| {}));
    match result {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors() {
    let dir = damaged_copy("truncated");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(err.starts_with(&format!("{}: invalid safetensors", path.display())), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

/// A shard the index lists but the directory lacks is named before anything is read.
#[test]
fn missing_shard() {
    let dir = scratch("bad-missing-shard");
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(fixture("tiny-llama-sharded")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    fs::remove_file(dir.join("model-00004-of-00011.safetensors")).unwrap();
    let err = load_error(&dir);
    let shard = dir.join("model-00004-of-00011.safetensors");
    assert_eq!(err, format!("{}: missing: model.safetensors.index.json lists it", shard.display()));
}

#[test]
fn header_that_lies_about_offsets() {
    let dir = damaged_copy("offsets");
    let path = dir.join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    // shift the first data_offsets' start by 4 bytes, keeping the header's length
    let at = header.find("\"data_offsets\":[").unwrap() + "\"data_offsets\":[".len();
    let end = at + header[at..].find(',').unwrap();
    let start: u64 = header[at..end].parse().unwrap();
    let replaced = format!("{}{}{}", &header[..at], start + 4, &header[end..]);
    let replaced = format!("{replaced:<width$}", width = header_len.max(replaced.len()));
    assert_eq!(replaced.len(), header_len, "the edit must keep the header length");
    bytes.splice(8..8 + header_len, replaced.bytes());
    fs::write(&path, &bytes).unwrap();
    let err = load_error(&dir);
    assert!(err.starts_with(&format!("{}: invalid safetensors", path.display())), "{err}");
    assert!(err.contains("offset"), "{err}");
}

#[test]
fn config_of_an_unsupported_architecture() {
    let dir = damaged_copy("arch");
    fs::write(dir.join("config.json"), r#"{"architectures": ["MistralForCausalLM"], "model_type": "mistral"}"#).unwrap();
    let err = load_error(&dir);
    assert!(err.starts_with(&format!("{}: unsupported architecture", dir.join("config.json").display())), "{err}");
    assert!(err.contains("MistralForCausalLM") && err.contains("LlamaForCausalLM"), "{err}");
}

#[test]
fn directory_without_weights() {
    let dir = damaged_copy("noweights");
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("no model weights") && err.contains("model.safetensors"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
}

#[test]
fn weights_that_do_not_fit_the_config() {
    let dir = damaged_copy("shape");
    let config = fs::read_to_string(dir.join("config.json")).unwrap().replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    fs::write(dir.join("config.json"), config).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.safetensors") && err.contains("mlp.gate_proj.weight has shape [128, 64]"), "{err}");
}

#[test]
fn gguf_with_an_unknown_tensor_type() {
    let mut g = one_layer_header();
    // type 20 is IQ4_NL: a real GGML type this reader does not read
    g.tensor("token_embd.weight", &[8, 256], 20, vec![0; 8 * 136]);
    let err = GgufModel::parse("model.gguf", g.bytes()).err().unwrap().to_string();
    assert!(err.starts_with("model.gguf: tensor token_embd.weight has GGML type IQ4_NL (type 20)"), "{err}");
    assert!(err.contains("supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K"), "{err}");
}

/// The header of a one-layer llama GGUF (hidden 32, 2 heads), without tensors.
fn one_layer_header() -> GgufWriter {
    let mut g = GgufWriter::new();
    g.str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", 32)
        .u32("llama.feed_forward_length", 64)
        .u32("llama.attention.head_count", 2);
    g
}

/// A GGUF whose header says it holds no tensors, or only some, is refused when it is read (before
/// a conversion writes anything, or a load uploads anything), naming the first missing tensor.
#[test]
fn gguf_without_the_tensors_the_architecture_needs() {
    let err = GgufModel::parse("empty.gguf", one_layer_header().bytes()).err().unwrap().to_string();
    assert!(err.starts_with("empty.gguf: no token_embd.weight tensor"), "{err}");
    let mut g = one_layer_header();
    g.u32("llama.vocab_size", 8).f32_tensor("token_embd.weight", &[32, 8], &[0.5; 256]).f32_tensor("output_norm.weight", &[32], &[1.0; 32]);
    let err = GgufModel::parse("partial.gguf", g.bytes()).err().unwrap().to_string();
    assert!(err.contains("tensor blk.0.attn_norm.weight (model.layers.0.input_layernorm.weight) is missing"), "{err}");
    assert!(err.contains("the file holds 2 tensors"), "{err}");
    // a layer count no file holds is refused as quickly, without a list of its tensors' names
    g.u32("llama.block_count", 1_000_000_000);
    let err = GgufModel::parse("huge.gguf", g.bytes()).err().unwrap().to_string();
    assert!(err.contains("is missing: a 1000000000-layer llama model needs it"), "{err}");
    let path = scratch("partial").with_extension("gguf");
    fs::write(&path, g.bytes()).unwrap();
    let err = ModelFiles::from_path(&path).err().unwrap().to_string();
    fs::remove_file(&path).unwrap();
    assert!(err.contains("blk.0.attn_norm.weight"), "{err}");
}

/// A GGUF architecture or tokenizer that does not load here is named, with what does.
#[test]
fn gguf_architectures_and_tokenizers_not_supported_are_named() {
    let mut g = GgufWriter::new();
    g.str("general.architecture", "phi3");
    let err = GgufModel::parse("phi.gguf", g.bytes()).err().unwrap().to_string();
    assert_eq!(err, "phi.gguf: unsupported architecture \"phi3\"; GGUF files of \"llama\" and \"qwen2\" and \"qwen3\" and \"gemma3\" load");
    let mut g = one_layer_header();
    g.u32("llama.vocab_size", 8).f32_tensor("token_embd.weight", &[8, 32], &[0.5; 256]).f32_tensor("output_norm.weight", &[32], &[1.0; 32]);
    for name in ["attn_norm", "ffn_norm"] {
        g.f32_tensor(&format!("blk.0.{name}.weight"), &[32], &[1.0; 32]);
    }
    for (name, rows, cols) in [
        ("attn_q", 32, 32),
        ("attn_k", 32, 32),
        ("attn_v", 32, 32),
        ("attn_output", 32, 32),
        ("ffn_gate", 64, 32),
        ("ffn_up", 64, 32),
        ("ffn_down", 32, 64),
    ] {
        g.f32_tensor(&format!("blk.0.{name}.weight"), &[rows, cols], &vec![0.01; rows * cols]);
    }
    assert!(GgufModel::parse("ok.gguf", g.bytes()).is_ok(), "the one-layer model loads without a tokenizer");
    // rotary divisors that are not Llama 3's scaling (tests/families.rs loads those that are)
    let divisors = [1.0, 3.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0];
    let err = GgufModel::parse("odd.gguf", g.clone().f32_tensor("rope_freqs.weight", &[8], &divisors).bytes()).err().unwrap().to_string();
    assert!(err.starts_with("odd.gguf: rope_freqs.weight holds rotary divisors that are not Llama 3's scaling"), "{err}");
    assert!(
        GgufModel::parse("ones.gguf", g.clone().f32_tensor("rope_freqs.weight", &[8], &[1.0; 8]).bytes()).is_ok(),
        "divisors of 1 scale nothing"
    );
    g.str("tokenizer.ggml.model", "llama");
    let err = GgufModel::parse("spm.gguf", g.bytes()).err().unwrap().to_string();
    assert!(err.starts_with("spm.gguf: tokenizer.ggml.model \"llama\" of a \"llama\" file is not supported; supported: \"gpt2\""), "{err}");
}

/// A tensor whose header claims more bytes than the file holds (a Q8_0 matrix of 4 blocks with
/// the bytes of 3) is refused when the file is read.
#[test]
fn gguf_that_lies_about_a_tensor_size() {
    let mut g = one_layer_header();
    g.tensor("token_embd.weight", &[4, 32], 8, vec![0; 3 * 34]);
    let err = GgufModel::parse("short.gguf", g.bytes()).err().unwrap().to_string();
    assert!(err.contains("tensor token_embd.weight lies past the end of the file"), "{err}");
}

#[test]
fn out_of_vocabulary_ids_are_refused_before_the_device() {
    let llm = load(&fixture("tiny-llama"), &cpu());
    let err = llm.model.check_ids(&[1, 999]).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)));
    assert!(err.to_string().contains("token id 999 is out of the vocabulary (size 256)"));
}

/// A chat template comes from an arbitrary model file: one that never ends runs out of steps,
/// one that recurses without end reaches the nesting limit, and one that floods is stopped past
/// 1 MiB beyond the messages' text; each is a clear error, and a real template still renders.
#[test]
fn chat_templates_cannot_hang_or_flood_the_worker() {
    use webgpu_lora::io::{ChatMessage, TextTokenizer};
    let tokenizer_json = fs::read(fixture("tiny-chat/tokenizer.json")).unwrap();
    let render = |template: &str| {
        let tokenizer = TextTokenizer::from_files(&tokenizer_json, None, Some(template.as_bytes())).unwrap();
        tokenizer.apply_chat_template(&[ChatMessage::new("user", "hi")], true)
    };
    let err = render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").unwrap_err().to_string();
    assert!(err.starts_with("chat template: stopped after 5000000 steps"), "{err}");
    let err = render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").unwrap_err().to_string();
    assert!(err.starts_with("chat template: cannot render") && err.contains("recursion"), "{err}");
    let err = render("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}").unwrap_err().to_string();
    assert!(err.starts_with("chat template: rendered more than 1048578 bytes"), "{err}");
    let smollm2 =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}";
    assert_eq!(render(smollm2).unwrap(), "<|im_start|>user\nhi<|im_end|>\n");
}

/// tokenizer.json that is not valid JSON is refused with where it breaks (the tokenizers crate
/// panics on some of these itself; found by tests/fuzz.rs).
#[test]
fn tokenizer_json_with_a_syntax_error() {
    use webgpu_lora::io::TextTokenizer;
    let mut bytes = fs::read(fixture("tiny-chat/tokenizer.json")).unwrap();
    let decoder = bytes.windows(9).position(|w| w == b"\"decoder\"").unwrap();
    bytes.truncate(decoder + 14);
    let err = TextTokenizer::from_files(&bytes, None, None).err().unwrap().to_string();
    assert!(err.starts_with("tokenizer.json: not valid JSON: EOF while parsing"), "{err}");
}
