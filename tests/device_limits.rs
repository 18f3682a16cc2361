//! The largest buffer a device binds (WebGPU's maxStorageBufferBindingSize / maxBufferSize, set
//! by the web edge from the adapter): a matrix above it is kept in parts, a buffer each, and the
//! model computes what it computes in one buffer: transformers' logits, PEFT's logits, merges and
//! gradients, gguf-py's requantized merge, f32, f16 and quantized. A row that fits in no buffer is
//! refused before anything is allocated, naming the matrix, both sizes and what to do. Its own
//! test binary: the limit is one value per process (the tests take turns).

mod common;

use std::sync::Mutex;

use burn::tensor::Device;
use common::*;
use webgpu_lora::io::quant::QuantType;
use webgpu_lora::io::{ModelFiles, SafetensorsWeights};
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::nn::weight::set_max_buffer_bytes;
use webgpu_lora::{LlamaModel, Llm, LoraModel};

static LIMIT: Mutex<()> = Mutex::new(());

/// Runs `f` with the device's largest buffer set to `bytes`.
fn with_limit<T>(bytes: usize, f: impl FnOnce() -> T) -> T {
    let _turn = LIMIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    set_max_buffer_bytes(bytes);
    let result = f();
    set_max_buffer_bytes(0);
    result
}

fn buffers(model: &LlamaModel, name: &str) -> usize {
    model.matrix(name).unwrap().buffers()
}

fn with_adapter(model: &mut LlamaModel, adapter: &str) {
    pollster::block_on(model.load_adapter("a", AdapterSource::from_dir(&fixture("peft").join(adapter)).unwrap())).unwrap();
    model.set_adapter("a").unwrap();
}

fn assert_close(ours: &[f32], reference: &[f32], what: &str) {
    let diff = max_abs_diff(ours, reference);
    assert!(diff < 1e-4, "{what}: max |ours - reference| = {diff}");
}

/// The tiny model's f32 embedding (256 x 64 x 4 = 65,536 bytes) in four buffers of at most
/// 20,000 bytes: transformers' logits, PEFT's adapter logits, its merge, and PEFT's gradients.
fn f32_matrices_split_across_buffers(device: &Device) {
    let mut llm = with_limit(20_000, || load(&fixture("tiny-llama"), device));
    let model = &mut llm.model;
    assert_eq!(buffers(model, "model.embed_tokens.weight"), 4);
    let ids = tiny_ids();
    assert_close(&logits_of(model, &ids), &expected_logits(fixture("tiny-llama/expected.safetensors")), "split f32 base");
    with_adapter(model, "qv-r8");
    assert_close(&logits_of(model, &ids), &expected_logits(fixture("peft/qv-r8/expected_logits.safetensors")), "qv-r8");
    pollster::block_on(model.merge_adapter(&["a"], false)).unwrap();
    assert_close(&logits_of(model, &ids), &expected_logits(fixture("peft/qv-r8/expected_merged_logits.safetensors")), "merged");
}

on_cpu_and_wgpu!(f32_matrices_split_across_buffers);

/// The head's logits and input gradient in the loss, part by part: PEFT's gradients.
#[test]
fn training_gradients_on_a_split_head_are_pefts() {
    let mut llm = with_limit(20_000, || load(&fixture("tiny-llama"), &cpu()));
    assert_eq!(buffers(&llm.model, "model.embed_tokens.weight"), 4);
    with_adapter(&mut llm.model, "all7-r4");
    with_limit(20_000, || assert_gradients_match_peft(&llm.model));
}

/// f16 (packed two to a word on a device without f16 arithmetic): transposed linears split
/// along their output (an even number of columns per part, as packing needs).
fn f16_matrices_split_across_buffers(device: &Device) {
    let dir = fixture("tiny-llama");
    let llm = with_limit(6_000, || load_as(&dir, WeightDtype::F16, device));
    assert!(buffers(&llm.model, "model.layers.0.mlp.up_proj.weight") > 1);
    let rounded = Llm::load(rounded_to_f16_files(&dir), WeightDtype::F32, device, &mut |_, _, _| {}).unwrap();
    assert_close(&logits_of(&llm.model, &tiny_ids()), &logits_of(&rounded.model, &tiny_ids()), "split f16");
}

on_cpu_and_wgpu!(f16_matrices_split_across_buffers);

fn quant_expected(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture("quant/expected.safetensors")).unwrap();
    SafetensorsWeights::new(vec![("expected".into(), bytes)]).unwrap().tensor(name).unwrap().data
}

/// The Q4_0 GGUF with every matrix split (rows of 36 bytes, at most 1,000 bytes a buffer):
/// transformers' logits, PEFT's adapter on it, gguf-py's requantization of PEFT's merge, and the
/// loaded blocks back, whole, after unmerging.
fn quantized_matrices_split_across_buffers(device: &Device) {
    let path = fixture(&format!("quant/tiny-{}.gguf", QuantType::Q4_0.name().to_lowercase()));
    let mut llm =
        with_limit(1_000, || Llm::load(ModelFiles::from_path(&path).unwrap(), WeightDtype::Auto, device, &mut |_, _, _| {}).unwrap());
    let model = &mut llm.model;
    assert!(buffers(model, "model.embed_tokens.weight") > 1 && buffers(model, "model.layers.0.self_attn.q_proj.weight") > 1);
    let ids = tiny_ids();
    assert_close(&logits_of(model, &ids), &quant_expected("Q4_0.logits"), "split Q4_0 base");
    let loaded = pollster::block_on(model.hf_weights(None, true)).unwrap();
    with_adapter(model, "qv-r8");
    assert_close(&logits_of(model, &ids), &quant_expected("Q4_0.qv-r8.logits"), "qv-r8 on Q4_0");
    with_limit(1_000, || pollster::block_on(model.merge_adapter(&["a"], false))).unwrap();
    assert!(buffers(model, "model.layers.0.self_attn.q_proj.weight") > 1, "the requantized merge is split too");
    assert_close(&logits_of(model, &ids), &quant_expected("Q4_0.qv-r8.merged.logits"), "merged into Q4_0");
    pollster::block_on(model.unmerge_adapter()).unwrap();
    assert!(pollster::block_on(model.hf_weights(None, true)).unwrap() == loaded, "unmerged, the loaded blocks are back");
}

on_cpu_and_wgpu!(quantized_matrices_split_across_buffers);

#[test]
fn a_row_above_the_buffer_limit_is_refused() {
    // a row of the tiny model's f32 embedding is 64 x 4 = 256 bytes
    let err = with_limit(200, || {
        Llm::load(ModelFiles::from_dir(&fixture("tiny-llama")).unwrap(), WeightDtype::Auto, &cpu(), &mut |_, _, _| {}).err()
    })
    .expect("refused")
    .to_string();
    assert!(
        err.contains(
            "a row of model.embed_tokens.weight needs 256 bytes (0.0 MiB) in one GPU buffer, but this GPU binds at most 200 bytes"
        ) && err.contains("smaller dtype"),
        "{err}"
    );
}

/// Full fine-tuning with every matrix in parts (tied and untied heads): the gradient of every
/// weight for one batch equals transformers' (tests/fixtures/full), the head's computed a
/// buffer's run of the vocabulary at a time, each part its own parameter.
#[test]
fn full_fine_tuning_gradients_with_matrices_in_parts() {
    let t = read_json(fixture("full/trajectory.json"));
    let batch = batch(&t["grad_batch"]);
    for name in ["tiny-llama", "tiny-llama-untied"] {
        with_limit(20_000, || {
            let model = load(&fixture(name), &cpu()).model;
            assert_eq!(buffers(&model, "model.embed_tokens.weight"), 4, "[256, 64] f32 in 20 kB buffers");
            assert!(model.parameters().unwrap().iter().any(|p| p.name == "model.embed_tokens.weight[78..156]"));
            assert_full_gradients_match(&model, &batch, &fixture(&format!("full/grads-{name}.safetensors")), name);
        });
    }
}
