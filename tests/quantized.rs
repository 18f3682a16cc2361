//! Quantized base weights against gguf-py and transformers (tests/fixtures/quant, made by
//! make_fixtures.py): every block type dequantizes bit for bit as gguf-py's `dequantize`, on the
//! host and on the device; quantizing gives gguf-py's blocks; tiny GGUFs in Q8_0, Q4_0, Q4_1 and
//! Q5_0 give the logits of transformers loading each GGUF itself, with and without a PEFT adapter;
//! quantizing on load gives the logits of the model whose linears went through gguf-py's
//! quantize -> dequantize.

mod common;

use burn::tensor::Device;
use common::*;
use webgpu_lora::io::gguf::{GgufFile, StoredTensor};
use webgpu_lora::io::quant::{QuantMatrix, QuantType};
use webgpu_lora::io::{ModelFiles, SafetensorsWeights};
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::nn::{Weight, WeightDtype};
use webgpu_lora::tensor::read_f32;
use webgpu_lora::{Llm, LoraModel};

/// Logits of a quantized base against transformers' on the same blocks: the same f32 values, so
/// only the order of summation differs.
const TOLERANCE: f32 = 1e-4;

fn blocks() -> Vec<u8> {
    std::fs::read(fixture("quant/blocks.gguf")).unwrap()
}

fn types(key: &str) -> Vec<QuantType> {
    let names = read_json(fixture("quant/expected.json"))[key].clone();
    names.as_array().unwrap().iter().map(|n| QuantType::parse(n.as_str().unwrap()).unwrap()).collect()
}

fn expected(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture("quant/expected.safetensors")).unwrap();
    SafetensorsWeights::new(vec![("expected".into(), bytes)]).unwrap().tensor(name).unwrap().data
}

/// The blocks of `kind` in blocks.gguf and gguf-py's dequantization of them.
fn blocks_of(g: &GgufFile, kind: QuantType) -> (QuantMatrix, Vec<f32>) {
    let info = |name: &str| g.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name} in blocks.gguf"));
    let StoredTensor::Quant(q) = g.tensor(info(kind.name())).unwrap() else { panic!("{} is stored quantized", kind.name()) };
    assert_eq!(q.kind, kind);
    (q, g.tensor_f32(info(&format!("{}.expected", kind.name()))).unwrap().data)
}

/// Bit for bit, every type (the k-quants included), on the host.
#[test]
fn blocks_dequantize_as_gguf_py_on_the_host() {
    let bytes = blocks();
    let g = GgufFile::parse(&bytes, "blocks.gguf").unwrap();
    for kind in types("block_types") {
        let (q, expected) = blocks_of(&g, kind);
        let ours = q.dequantize().data;
        assert!(expected.iter().any(|&v| v != 0.0), "{kind:?}: the fixture is not all zeros");
        let first = ours.iter().zip(&expected).position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(first, None, "{kind:?}: value {first:?} differs: {:?}", first.map(|i| (ours[i], expected[i])));
    }
}

/// Bit for bit on the device: the dequantization kernel (wgpu) and the CPU backend's, whole
/// matrices and selected rows (the embedding lookup).
fn blocks_dequantize_as_gguf_py_on_the_device(device: &Device) {
    let bytes = blocks();
    let g = GgufFile::parse(&bytes, "blocks.gguf").unwrap();
    for kind in types("block_types") {
        let (q, expected) = blocks_of(&g, kind);
        let cols = q.cols();
        let weight = Weight::quantized(q, false, device);
        let ours = pollster::block_on(read_f32(weight.value())).unwrap();
        let first = ours.iter().zip(&expected).position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(first, None, "{kind:?}: value {first:?} differs: {:?}", first.map(|i| (ours[i], expected[i])));
        let ids = burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(vec![2i32, 0], [2]), device);
        let rows = pollster::block_on(read_f32(weight.rows(ids))).unwrap();
        assert_eq!(rows[..cols], expected[2 * cols..3 * cols], "{kind:?}: row 2");
        assert_eq!(rows[cols..], expected[..cols], "{kind:?}: row 0");
    }
}

on_cpu_and_wgpu!(blocks_dequantize_as_gguf_py_on_the_device);

/// llama.cpp's reference rounding as gguf-py computes it: the same blocks, word for word (a zero
/// block and a constant block included).
#[test]
fn quantizing_gives_gguf_py_blocks() {
    let bytes = blocks();
    let g = GgufFile::parse(&bytes, "blocks.gguf").unwrap();
    let info = |name: &str| g.tensors.iter().find(|t| t.name == name).unwrap();
    let input = g.tensor_f32(info("input")).unwrap();
    for kind in types("types") {
        let StoredTensor::Quant(expected) = g.tensor(info(&format!("quantized.{}", kind.name()))).unwrap() else { panic!() };
        let ours = QuantMatrix::quantize(kind, &input, "input").unwrap();
        assert_eq!(ours.words.len(), expected.words.len());
        let first = ours.words.iter().zip(&expected.words).position(|(a, b)| a != b);
        assert_eq!(first, None, "{kind:?}: word {first:?} differs");
    }
}

fn tiny_gguf(kind: QuantType) -> ModelFiles {
    let name = format!("tiny-{}.gguf", kind.name().to_lowercase());
    ModelFiles::from_path(&fixture("quant").join(name)).unwrap()
}

fn load_files(files: ModelFiles, dtype: WeightDtype, device: &Device) -> Llm {
    Llm::load(files, dtype, device, &mut |_, _, _| {}).unwrap()
}

/// The tiny model as GGUFs of each type, loaded as they are: transformers' logits; the PEFT
/// adapter on that base: PEFT's logits, active, merged (the base becomes f32, exactly the
/// dequantized values plus the adapter's delta) and unloaded.
fn tiny_ggufs_match_transformers_and_peft(device: &Device) {
    let f32_bytes = load(&fixture("tiny-llama"), device).model.memory_footprint();
    for kind in types("types") {
        let mut llm = load_files(tiny_gguf(kind), WeightDtype::Auto, device);
        let ids = tiny_ids();
        let diff = max_abs_diff(&logits_of(&llm.model, &ids), &expected(&format!("{}.logits", kind.name())));
        assert!(diff < TOLERANCE, "{kind:?}: max |ours - transformers| = {diff}");
        let bytes = llm.model.memory_footprint();
        assert!(bytes * 3 < f32_bytes, "{kind:?}: {bytes} bytes on the device, f32 {f32_bytes}");

        let model = &mut llm.model;
        pollster::block_on(model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap())).unwrap();
        model.set_adapter("a").unwrap();
        let peft = expected(&format!("{}.qv-r8.logits", kind.name()));
        let diff = max_abs_diff(&logits_of(model, &ids), &peft);
        assert!(diff < TOLERANCE, "{kind:?} + qv-r8: max |ours - PEFT| = {diff}");
        pollster::block_on(model.merge_and_unload(&[], true)).unwrap();
        let diff = max_abs_diff(&logits_of(model, &ids), &peft);
        assert!(diff < TOLERANCE, "{kind:?} + qv-r8 merged: max |ours - PEFT| = {diff}");
    }
}

on_cpu_and_wgpu!(tiny_ggufs_match_transformers_and_peft);

/// `dtype: "q8_0"` etc. on a safetensors model: the decoder layers' linears quantized as gguf-py
/// quantizes them, embeddings and norms as loaded: the logits of that model in transformers.
fn quantize_on_load_matches_gguf_py_rounding(device: &Device) {
    let f32_llm = load(&fixture("tiny-llama"), device);
    for kind in types("types") {
        let llm = load_as(&fixture("tiny-llama"), WeightDtype::Quant(kind), device);
        let diff = max_abs_diff(&logits_of(&llm.model, &tiny_ids()), &expected(&format!("load_in_{}.logits", kind.name())));
        assert!(diff < TOLERANCE, "{kind:?}: max |ours - transformers on gguf-py's rounding| = {diff}");
        assert!(llm.model.embed_tokens.dtype() == WeightDtype::F32, "the embedding stays as loaded");
        assert!(llm.model.memory_footprint() < f32_llm.model.memory_footprint(), "{kind:?}: smaller than f32");
    }
}

on_cpu_and_wgpu!(quantize_on_load_matches_gguf_py_rounding);

/// Asking for a type to quantize to that is not one (a k-quant, an unknown name) says which are.
#[test]
fn dtype_names_are_checked() {
    assert_eq!(WeightDtype::parse("q4_1").unwrap(), WeightDtype::Quant(QuantType::Q4_1));
    assert_eq!(WeightDtype::parse("auto").unwrap(), WeightDtype::Auto);
    for bad in ["q4_k", "int8", "Q3_K"] {
        let err = WeightDtype::parse(bad).unwrap_err().to_string();
        assert!(err.contains(&format!("{bad:?}")) && err.contains("q8_0, q4_0, q4_1, q5_0"), "{err}");
    }
}

/// The product with a quantized matrix (the CPU backend's row-by-row dot products for up to 8
/// rows of x, the dequantized matrix and a matmul above; the kernel and a matmul on wgpu) equals
/// x times the dequantized matrix, for every type, transposed or not, and so does the input
/// gradient the backward pass computes (1e-5 relative).
fn products_equal_the_dequantized_product(device: &Device) {
    use burn::tensor::{Distribution, Tensor};
    let bytes = blocks();
    let g = GgufFile::parse(&bytes, "blocks.gguf").unwrap();
    for kind in types("block_types") {
        let (q, values) = blocks_of(&g, kind);
        let (rows, cols) = (q.rows, q.cols());
        let w = Tensor::<2>::from_data(burn::tensor::TensorData::new(values, [rows, cols]), device);
        let (plain, transposed) = (Weight::quantized(q.clone(), false, device), Weight::quantized(q, true, device));
        for m in [1, 3, 8, 9, 20] {
            let close = |ours: Tensor<2>, reference: Tensor<2>, what: &str| {
                let (ours, reference) = (pollster::block_on(read_f32(ours)).unwrap(), pollster::block_on(read_f32(reference)).unwrap());
                let scale = reference.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let diff = max_abs_diff(&ours, &reference);
                assert!(diff <= 1e-5 * scale, "{kind:?}, {m} rows, {what}: max diff {diff}, max |value| {scale}");
            };
            let x = Tensor::<2>::random([m, cols], Distribution::Normal(0.0, 1.0), device);
            close(plain.apply_transposed(x.clone()), x.clone().matmul(w.clone().transpose()), "x Wᵀ");
            close(transposed.apply(x.clone()), x.clone().matmul(w.clone().transpose()), "x (Wᵀ)");
            // the input gradient through autodiff: d(sum(x Wᵀ · r))/dx = r W
            let r = Tensor::<2>::random([m, rows], Distribution::Normal(0.0, 1.0), device);
            let leaf = x.autodiff().require_grad();
            let grads = (transposed.apply(leaf.clone()) * r.clone()).sum().backward();
            close(leaf.grad(&grads).unwrap(), r.matmul(w.clone()), "dL/dx");
        }
    }
}

on_cpu_and_wgpu!(products_equal_the_dequantized_product);
