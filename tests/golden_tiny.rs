//! Golden tests: a tiny random Llama against transformers' logits (tests/fixtures/make_fixtures.py),
//! on the CPU backend and on native wgpu, in every storage layout we load.

mod common;

use common::*;
use webgpu_lora::tensor::read_f32;

/// Stated tolerance: max absolute logit difference against transformers in f32.
const TOLERANCE: f32 = 1e-4;
const VARIANTS: [&str; 5] = ["tiny-llama", "tiny-llama-sharded", "tiny-llama-f16", "tiny-llama-bf16", "tiny-llama-untied"];

fn tiny_llama_matches_transformers(device: &burn::tensor::Device) {
    for variant in VARIANTS {
        let dir = fixture(variant);
        let llm = load(&dir, device);
        assert!(llm.tokenizer.is_none(), "the tiny fixtures have no tokenizer: ids only");
        let input = ids(&read_json(dir.join("expected.json"))["ids"]);
        let logits = logits_of(&llm.model, &input);
        let expected = expected_logits(dir.join("expected.safetensors"));
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff < TOLERANCE, "{variant}: max |ours - transformers| = {diff}");
    }
}

on_cpu_and_wgpu!(tiny_llama_matches_transformers, kv_cache_decoding_equals_full_forward);

/// Decoding token by token through the KV cache (which grows after the prefill: it was made for
/// the prefill's 5 positions) gives the logits of one full forward pass.
fn kv_cache_decoding_equals_full_forward(device: &burn::tensor::Device) {
    let dir = fixture("tiny-llama");
    let llm = load(&dir, device);
    let input = ids(&read_json(dir.join("expected.json"))["ids"]);
    let vocab = llm.model.config.vocab_size;
    let full = logits_of(&llm.model, &input);
    let mut cache = llm.model.new_cache();
    // a prefill of 5 tokens, then one at a time
    let mut incremental = pollster::block_on(read_f32(llm.model.forward(llm.model.ids_tensor(&input[..5]), Some(&mut cache)))).unwrap();
    for &id in &input[5..] {
        let step = llm.model.forward_last(llm.model.ids_tensor(&[id]), Some(&mut cache));
        incremental.extend(pollster::block_on(read_f32(step)).unwrap());
    }
    assert_eq!(cache.seen(), input.len());
    assert_eq!(incremental.len(), input.len() * vocab);
    let diff = max_abs_diff(&full, &incremental);
    assert!(diff < 1e-5, "cached decoding differs from the full pass by {diff}");
}

/// A GGUF written llama.cpp's way (q/k rows permuted, GGML dims, names) converts back to the same
/// model: the converted directory reproduces transformers' logits.
#[test]
fn gguf_of_the_tiny_model_converts_back_exactly() {
    use webgpu_lora::io::SafetensorsWeights;
    use webgpu_lora::io::StoreDtype;
    use webgpu_lora::io::gguf_convert::GgufModel;

    let dir = fixture("tiny-llama");
    let st = SafetensorsWeights::new(vec![("m".into(), std::fs::read(dir.join("model.safetensors")).unwrap())]).unwrap();
    let (heads, kv_heads) = (4, 2);
    // llama.cpp's permutation: HF row (h, j, i) -> row (h, i, j)
    let permute = |data: &[f32], rows: usize, cols: usize, heads: usize| {
        let (hd, half) = (rows / heads, rows / heads / 2);
        let mut out = vec![0.0; data.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let (src, dst) = (h * hd + j * half + i, h * hd + 2 * i + j);
                    out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    };
    let mut g = GgufWriter::new();
    g.str("general.architecture", "llama")
        .u32("llama.block_count", 2)
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", 64)
        .u32("llama.feed_forward_length", 128)
        .u32("llama.attention.head_count", heads as u32)
        .u32("llama.attention.head_count_kv", kv_heads as u32)
        .f32("llama.rope.freq_base", 50000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .u32("tokenizer.ggml.eos_token_id", 2);
    let gguf_names = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")];
    for (hf, gg) in gguf_names {
        let t = st.tensor(hf).unwrap();
        g.f32_tensor(gg, &t.shape, &t.data);
    }
    for layer in 0..2 {
        for (hf, gg) in [
            ("input_layernorm", "attn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("post_attention_layernorm", "ffn_norm"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ] {
            let t = st.tensor(&format!("model.layers.{layer}.{hf}.weight")).unwrap();
            let data = match gg {
                "attn_q" => permute(&t.data, t.shape[0], t.shape[1], heads),
                "attn_k" => permute(&t.data, t.shape[0], t.shape[1], kv_heads),
                _ => t.data.clone(),
            };
            g.f32_tensor(&format!("blk.{layer}.{gg}.weight"), &t.shape, &data);
        }
    }
    let out = scratch("tiny-gguf");
    GgufModel::parse("tiny.gguf", g.bytes()).unwrap().write_dir(&out, Some(StoreDtype::F32)).unwrap();
    let llm = load(&out, &cpu());
    let input = ids(&read_json(dir.join("expected.json"))["ids"]);
    let logits = logits_of(&llm.model, &input);
    let diff = max_abs_diff(&logits, &expected_logits(dir.join("expected.safetensors")));
    std::fs::remove_dir_all(&out).unwrap();
    assert!(diff < TOLERANCE, "converted GGUF: max |ours - transformers| = {diff}");
}
