//! The model families one configured Llama runs, each a tiny random model made by transformers
//! (tests/fixtures/make_fixtures.py, `families`): Llama 3.x's rotary scaling, SmolLM3's layers
//! without rotary embeddings, Qwen2's q/k/v biases, Qwen3's q/k norms with a head_dim of its own
//! and Gemma 3 (GeGLU, 1 + w norms, scaled embeddings, norms after each block, sliding layers with
//! a window shorter than the ids). Against transformers' logits, with PEFT's all-linear adapter
//! and its merge, and the KV cache against a full pass, on the CPU backend and on native wgpu.

mod common;

use common::*;
use webgpu_lora::LoraModel;
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::tensor::read_f32;

/// Stated tolerance: max absolute logit difference against transformers/PEFT in f32.
const TOLERANCE: f32 = 1e-4;
const FAMILIES: [&str; 5] = ["tiny-llama3", "tiny-smollm3", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"];

fn reference(family: &str, key: &str) -> Vec<f32> {
    expected_tensor(fixture("families").join(family).join("expected.safetensors"), key)
}

fn families_match_transformers_and_peft(device: &burn::tensor::Device) {
    for family in FAMILIES {
        let dir = fixture("families").join(family);
        let mut model = load(&dir, device).model;
        let input = ids(&read_json(dir.join("expected.json"))["ids"]);
        let check = |logits: &[f32], key: &str, what: &str| {
            let diff = max_abs_diff(logits, &reference(family, key));
            assert!(diff < TOLERANCE, "{family}, {what}: max |ours - reference| = {diff}");
        };
        check(&logits_of(&model, &input), "logits", "base vs transformers");

        let adapter = AdapterSource::from_dir(&dir.join("peft-all-linear")).unwrap();
        pollster::block_on(model.load_adapter("all", adapter)).unwrap();
        model.set_adapter("all").unwrap();
        check(&logits_of(&model, &input), "adapter_logits", "all-linear adapter vs PEFT");
        pollster::block_on(model.merge_and_unload(&[], true)).unwrap();
        check(&logits_of(&model, &input), "merged_logits", "merged vs PEFT's merge_and_unload");
    }
}

/// Decoding a token at a time through the KV cache gives the logits of one full pass, past the
/// Llama 3 model's original context (32), through SmolLM3's NoPE layer and past Gemma 3's
/// sliding window (8).
fn kv_cache_decoding_equals_full_forward(device: &burn::tensor::Device) {
    for family in FAMILIES {
        let dir = fixture("families").join(family);
        let model = load(&dir, device).model;
        let input = ids(&read_json(dir.join("expected.json"))["ids"]);
        let full = logits_of(&model, &input);
        let mut cache = model.new_cache();
        let mut incremental = pollster::block_on(read_f32(model.forward(model.ids_tensor(&input[..5]), Some(&mut cache)))).unwrap();
        for &id in &input[5..] {
            incremental.extend(pollster::block_on(read_f32(model.forward_last(model.ids_tensor(&[id]), Some(&mut cache)))).unwrap());
        }
        // f32 rounding of sums over different key counts: 3e-6 of the largest logit
        let (diff, largest) = (max_abs_diff(&full, &incremental), full.iter().fold(0f32, |m, x| m.max(x.abs())));
        assert!(diff < 3e-6 * largest.max(1.0), "{family}: cached decoding differs from the full pass by {diff} (largest logit {largest})");
    }
}

/// A sliding layer's cache keeps only what its window still sees: decoding 270 tokens of the tiny
/// Gemma 3 (window 8) a token at a time, its sliding layers' buffers stop growing (dropping old
/// positions once, at 262) while the full-attention layer's holds every position, and each step's
/// logits equal one full pass's.
fn sliding_layers_cache_only_their_window(device: &burn::tensor::Device) {
    let model = load(&fixture("families/tiny-gemma3"), device).model;
    let input: Vec<u32> = (0..275).map(|i| (i * 37 + 11) % 250 + 3).collect();
    let full = logits_of(&model, &input);
    let mut cache = model.new_cache();
    let vocab = model.config.vocab_size;
    let mut diff = max_abs_diff(
        &pollster::block_on(read_f32(model.forward(model.ids_tensor(&input[..5]), Some(&mut cache)))).unwrap(),
        &full[..5 * vocab],
    );
    for (i, &id) in input.iter().enumerate().skip(5) {
        let step = pollster::block_on(read_f32(model.forward_last(model.ids_tensor(&[id]), Some(&mut cache)))).unwrap();
        diff = diff.max(max_abs_diff(&step, &full[i * vocab..(i + 1) * vocab]));
    }
    let largest = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(diff < 3e-6 * largest.max(1.0), "cached decoding differs from the full pass by {diff} (largest logit {largest})");
    let capacities: Vec<usize> = (0..3).map(|layer| cache.capacity(layer).unwrap()).collect();
    assert!(capacities[0] < 8 + 256 + 2 && capacities[2] == capacities[0], "sliding layers hold {capacities:?}");
    assert!(capacities[1] >= 275, "the full-attention layer holds {capacities:?}");
}

/// The loss and the gradient of every lora_A / lora_B of the all-linear adapter for one batch
/// equal PEFT's (1e-4 relative), with and without gradient checkpointing: training is PEFT's on
/// each family.
fn gradients_match_peft(device: &burn::tensor::Device) {
    for family in FAMILIES {
        let dir = fixture("families").join(family);
        let mut model = load(&dir, device).model;
        let adapter = dir.join("peft-all-linear");
        pollster::block_on(model.load_adapter("a", AdapterSource::from_dir(&adapter).unwrap())).unwrap();
        let grad_batch = batch(&read_json(dir.join("expected.json"))["grad_batch"]);
        for checkpointing in [false, true] {
            assert_gradients_match(&model, &grad_batch, adapter.join("grads.safetensors"), checkpointing);
        }
    }
}

on_cpu_and_wgpu!(
    families_match_transformers_and_peft,
    kv_cache_decoding_equals_full_forward,
    sliding_layers_cache_only_their_window,
    gradients_match_peft
);

/// A Llama 3.x GGUF as llama.cpp writes it, its scaled rotary frequencies as the rope_freqs
/// divisors: the scaling is recovered (factor 32, high_freq_factor 4, original context 8192) and
/// the logits are transformers' of the Hugging Face model (1e-4).
#[test]
fn a_llama3_gguf_loads_its_rotary_scaling() {
    let dir = fixture("families/gguf-llama3");
    let llm = load(&dir.join("model.gguf"), &cpu());
    assert_eq!(
        llm.model.config.rope.scaling,
        webgpu_lora::config::RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0
        }
    );
    let input = ids(&read_json(dir.join("expected.json"))["ids"]);
    let diff = max_abs_diff(&logits_of(&llm.model, &input), &expected_tensor(dir.join("expected.safetensors"), "logits"));
    assert!(diff < TOLERANCE, "llama3 GGUF: max |ours - transformers| = {diff}");
}

/// qwen2 and qwen3 GGUF files laid out as llama.cpp's converter writes them (gguf-py's tensor
/// names: biases, q/k norms, no rotary permutation) load directly and give transformers' logits
/// from loading the same file (F32: 1e-4), on the CPU backend.
#[test]
fn qwen_gguf_files_load_as_transformers_reads_them() {
    for arch in ["qwen2", "qwen3"] {
        let dir = fixture("families").join(format!("gguf-{arch}"));
        let llm = load(&dir.join("model.gguf"), &cpu());
        assert_eq!(llm.model.config.model_type, arch);
        let input = ids(&read_json(dir.join("expected.json"))["ids"]);
        let diff = max_abs_diff(&logits_of(&llm.model, &input), &expected_tensor(dir.join("expected.safetensors"), "logits"));
        assert!(diff < TOLERANCE, "{arch} GGUF: max |ours - transformers| = {diff}");
    }
}

/// What a family's file asks for and we do not run is refused by name.
#[test]
fn unsupported_family_features_are_named() {
    let config = std::fs::read_to_string(fixture("families/tiny-llama3/config.json")).unwrap();
    let yarn = config.replace("\"llama3\"", "\"yarn\"");
    let err = webgpu_lora::LlamaConfig::from_json(yarn.as_bytes(), "config.json").unwrap_err().to_string();
    assert!(err.contains("rope_parameters.rope_type \"yarn\" is not supported"), "{err}");
    let mistral = config.replace("LlamaForCausalLM", "MistralForCausalLM");
    let err = webgpu_lora::LlamaConfig::from_json(mistral.as_bytes(), "config.json").unwrap_err().to_string();
    let supported = "supported: LlamaForCausalLM (model_type \"llama\"), SmolLM3ForCausalLM (model_type \"smollm3\"), \
                     Qwen2ForCausalLM (model_type \"qwen2\"), Qwen3ForCausalLM (model_type \"qwen3\"), \
                     Gemma3ForCausalLM (model_type \"gemma3_text\")";
    assert!(err.contains(&format!("unsupported architecture: architectures [\"MistralForCausalLM\"]; {supported}")), "{err}");
    let gemma = std::fs::read_to_string(fixture("families/tiny-gemma3/config.json")).unwrap();
    let capped = gemma.replace("\"final_logit_softcapping\": null", "\"final_logit_softcapping\": 30.0");
    let err = webgpu_lora::LlamaConfig::from_json(capped.as_bytes(), "config.json").unwrap_err().to_string();
    assert!(err.contains("final_logit_softcapping = 30.0 is not supported"), "{err}");
}

/// A new adapter with `target_modules: "all-linear"` takes the modules PEFT's all-linear adapter of
/// the same family has (every linear layer but the head).
#[test]
fn all_linear_resolves_as_peft_on_each_family() {
    use webgpu_lora::lora::{LoraConfig, TargetModules};
    for family in FAMILIES {
        let dir = fixture("families").join(family);
        let mut model = load(&dir, &cpu()).model;
        pollster::block_on(model.load_adapter("peft", AdapterSource::from_dir(&dir.join("peft-all-linear")).unwrap())).unwrap();
        pollster::block_on(model.add_adapter("ours", LoraConfig::new(4, 8.0, TargetModules::AllLinear).unwrap(), 0)).unwrap();
        let modules = |name: &str| model.adapter_weights(name).unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(modules("ours"), modules("peft"), "{family}");
        assert_eq!(modules("ours").len(), 7 * model.layers.len(), "{family}: seven linears a layer");
    }
}

/// make_fixtures.py's cli-outputs loaded an adapter our `train` made on each family into PEFT and
/// found PEFT's logits equal to ours (convert/cli_outputs.json): every family is recorded there.
#[test]
fn peft_loaded_an_adapter_trained_here_on_each_family() {
    let checked = read_json(fixture("convert/cli_outputs.json"));
    for family in FAMILIES {
        let case = &checked["checked"][format!("train on {family}, loaded by PEFT")];
        let diff =
            case["max_abs_diff"].as_f64().unwrap_or_else(|| panic!("{family} is not recorded: rerun make_fixtures.py --only cli-outputs"));
        assert!(diff < 1e-4 && case["adapter_moved_logits_by"].as_f64().unwrap() > 1e-3, "{family}: {case}");
    }
}

/// GGUF export of the families. From a qwen2 GGUF base (tiny-qwen2's weights laid out by gguf-py),
/// the merged model of PEFT's all-linear adapter loads back with PEFT's merged logits (1e-4), and
/// the adapter as a GGUF LoRA holds PEFT's A and B under qwen2's tensor names, unpermuted. From a
/// Hugging Face directory a family's GGUF metadata is not written (its GGUF is the way), and
/// models llama.cpp runs otherwise (SmolLM3, Llama 3's scaled rotary) are refused, naming them.
#[test]
fn gguf_export_of_the_families() {
    use webgpu_lora::io::gguf::GgufFile;
    let adapter = || AdapterSource::from_dir(&fixture("families/tiny-qwen2/peft-all-linear")).unwrap();
    let mut llm = load(&fixture("families/gguf-qwen2/model.gguf"), &cpu());
    pollster::block_on(llm.model.load_adapter("all", adapter())).unwrap();
    let merged = pollster::block_on(llm.merged_gguf(Some("all"), webgpu_lora::nn::WeightDtype::Auto)).unwrap();
    let path = scratch("merged-qwen2").with_extension("gguf");
    std::fs::write(&path, &merged).unwrap();
    let back = load(&path, &cpu());
    std::fs::remove_file(&path).unwrap();
    let input = ids(&read_json(fixture("families/tiny-qwen2/expected.json"))["ids"]);
    let diff = max_abs_diff(&logits_of(&back.model, &input), &reference("tiny-qwen2", "merged_logits"));
    assert!(diff < TOLERANCE, "the merged qwen2 GGUF vs PEFT's merge_and_unload: {diff}");

    let lora = pollster::block_on(llm.adapter_gguf("all")).unwrap();
    let g = GgufFile::parse(&lora, "adapter.gguf").unwrap();
    assert_eq!(g.meta("general.architecture").and_then(|v| v.as_str()), Some("qwen2"));
    let peft = fixture("families/tiny-qwen2/peft-all-linear/adapter_model.safetensors");
    for (gguf_name, module) in [
        ("blk.1.attn_q.weight.lora_b", "layers.1.self_attn.q_proj.lora_B"),
        ("blk.0.ffn_down.weight.lora_a", "layers.0.mlp.down_proj.lora_A"),
    ] {
        let info = g.tensors.iter().find(|t| t.name == gguf_name).unwrap_or_else(|| panic!("{gguf_name} is missing"));
        let expected = expected_tensor(peft.clone(), &format!("base_model.model.model.{module}.weight"));
        assert_eq!(g.tensor_f32(info).unwrap().data, expected, "{gguf_name}");
    }

    let mut qwen2_dir = load(&fixture("families/tiny-qwen2"), &cpu());
    let err = pollster::block_on(qwen2_dir.merged_gguf(None, webgpu_lora::nn::WeightDtype::Auto)).unwrap_err().to_string();
    assert!(err.starts_with("a GGUF of a qwen2 model is written from its GGUF"), "{err}");
    pollster::block_on(qwen2_dir.model.load_adapter("all", adapter())).unwrap();
    assert!(pollster::block_on(qwen2_dir.adapter_gguf("all")).is_ok(), "an adapter needs no metadata of the base");
    for (family, kind) in [("tiny-smollm3", "smollm3"), ("tiny-llama3", "llama, with scaled rotary embeddings")] {
        let dir = fixture("families").join(family);
        let mut llm = load(&dir, &cpu());
        let merged = pollster::block_on(llm.merged_gguf(None, webgpu_lora::nn::WeightDtype::Auto)).unwrap_err().to_string();
        assert!(
            merged.starts_with("GGUF files are written for llama, qwen2, qwen3, gemma3_text models without rotary scaling"),
            "{merged}"
        );
        assert!(merged.contains(&format!("(this one is {kind})")), "{merged}");
        pollster::block_on(llm.model.load_adapter("all", AdapterSource::from_dir(&dir.join("peft-all-linear")).unwrap())).unwrap();
        let adapter = pollster::block_on(llm.adapter_gguf("all")).unwrap_err().to_string();
        assert_eq!(adapter, merged, "{family}");
    }
}
