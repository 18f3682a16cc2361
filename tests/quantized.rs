//! Quantized base weights against gguf-py and transformers (tests/fixtures/quant, made by
//! make_fixtures.py): every block type dequantizes bit for bit as gguf-py's `dequantize`, on the
//! host and on the device; quantizing gives gguf-py's blocks; tiny GGUFs in Q8_0, Q4_0, Q4_1 and
//! Q5_0 give the logits of transformers loading each GGUF itself, with and without a PEFT adapter;
//! quantizing on load gives the logits of the model whose linears went through gguf-py's
//! quantize -> dequantize; merging requantizes as gguf-py requantizes PEFT's merge, unmerging
//! gives the loaded blocks back; the merged model and LoRA adapters as GGUFs are the files
//! gguf-py writes in llama.cpp's layouts.

mod common;

use burn::tensor::Device;
use common::*;
use webgpu_lora::io::gguf::{GgufFile, StoredTensor};
use webgpu_lora::io::quant::{QuantMatrix, QuantType};
use webgpu_lora::io::{ModelFiles, SafetensorsWeights};
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::nn::{Weight, WeightDtype};
use webgpu_lora::tensor::read_f32;
use webgpu_lora::{Llm, LoraLayers, LoraModel};

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
        let weight = Weight::quantized(q, false, "w", device).unwrap();
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
/// block and a constant block included), written back as GGUF blocks byte for byte.
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
        let ggml = ours.to_ggml().unwrap();
        let start = g.data_start + info(&format!("quantized.{}", kind.name())).offset as usize;
        assert!(ggml == bytes[start..start + ggml.len()], "{kind:?}: the GGUF blocks gguf-py wrote");
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
/// adapter on that base: PEFT's logits. Merged, the adapted linears are requantized to the base's
/// type: the logits of gguf-py's requantization of PEFT's merged weights, with the base as small
/// as before; unmerged, the loaded blocks come back bit for bit; merged and unloaded, the same
/// requantized model.
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
        let loaded = pollster::block_on(model.hf_tensors(None)).unwrap();
        pollster::block_on(model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap())).unwrap();
        model.set_adapter("a").unwrap();
        let diff = max_abs_diff(&logits_of(model, &ids), &expected(&format!("{}.qv-r8.logits", kind.name())));
        assert!(diff < TOLERANCE, "{kind:?} + qv-r8: max |ours - PEFT| = {diff}");

        let requantized = expected(&format!("{}.qv-r8.merged.logits", kind.name()));
        let with_adapter = model.memory_footprint();
        pollster::block_on(model.merge_adapter(&[], false)).unwrap();
        let diff = max_abs_diff(&logits_of(model, &ids), &requantized);
        assert!(diff < TOLERANCE, "{kind:?} + qv-r8 merged: max |ours - gguf-py's requantization| = {diff}");
        assert_eq!(model.memory_footprint(), with_adapter, "{kind:?}: the merged base stays quantized");
        pollster::block_on(model.unmerge_adapter()).unwrap();
        assert!(pollster::block_on(model.hf_tensors(None)).unwrap() == loaded, "{kind:?}: unmerged, the loaded blocks are back");

        pollster::block_on(model.merge_and_unload(&[], true)).unwrap();
        let diff = max_abs_diff(&logits_of(model, &ids), &requantized);
        assert!(diff < TOLERANCE, "{kind:?} + qv-r8 merged and unloaded: max |ours - gguf-py's requantization| = {diff}");
        assert_eq!(model.memory_footprint(), bytes, "{kind:?}: the merged base stays quantized");
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
/// gradient the backward pass computes: within 1e-5 of the largest sum of |x_k w_k| (f32
/// summation in another order differs in proportion to the terms' magnitudes, not the sum's,
/// which cancellation can make small).
fn products_equal_the_dequantized_product(device: &Device) {
    use burn::tensor::{Distribution, Tensor};
    let bytes = blocks();
    let g = GgufFile::parse(&bytes, "blocks.gguf").unwrap();
    for kind in types("block_types") {
        let (q, values) = blocks_of(&g, kind);
        let (rows, cols) = (q.rows, q.cols());
        let w = Tensor::<2>::from_data(burn::tensor::TensorData::new(values, [rows, cols]), device);
        let (plain, transposed) =
            (Weight::quantized(q.clone(), false, "w", device).unwrap(), Weight::quantized(q, true, "w", device).unwrap());
        for m in [1, 3, 8, 9, 20, 45] {
            let close = |ours: Tensor<2>, reference: Tensor<2>, magnitudes: Tensor<2>, what: &str| {
                let read = |t: Tensor<2>| pollster::block_on(read_f32(t)).unwrap();
                let (ours, reference, magnitudes) = (read(ours), read(reference), read(magnitudes));
                let scale = magnitudes.iter().fold(0.0f32, |a, v| a.max(*v));
                let diff = max_abs_diff(&ours, &reference);
                assert!(diff <= 1e-5 * scale, "{kind:?}, {m} rows, {what}: max diff {diff}, largest sum of |terms| {scale}");
            };
            let x = Tensor::<2>::random([m, cols], Distribution::Normal(0.0, 1.0), device);
            let (xw, xw_terms) = (x.clone().matmul(w.clone().transpose()), x.clone().abs().matmul(w.clone().abs().transpose()));
            close(plain.apply_transposed(x.clone()), xw.clone(), xw_terms.clone(), "x Wᵀ");
            close(transposed.apply(x.clone()), xw, xw_terms, "x (Wᵀ)");
            // the input gradient through autodiff: d(sum(x Wᵀ · r))/dx = r W
            let r = Tensor::<2>::random([m, rows], Distribution::Normal(0.0, 1.0), device);
            let leaf = x.autodiff().require_grad();
            let grads = (transposed.apply(leaf.clone()) * r.clone()).sum().backward();
            close(leaf.grad(&grads).unwrap(), r.clone().matmul(w.clone()), r.abs().matmul(w.clone().abs()), "dL/dx");
        }
    }
}

on_cpu_and_wgpu!(products_equal_the_dequantized_product);

/// The merged model as a GGUF (`merged_gguf`, the model itself unchanged): the Q4_0 base's
/// metadata and blocks, q and v requantized after the merge: the GGUF gguf-py writes from PEFT's
/// merge, which transformers loads (make_fixtures.py checks it); loaded back here, the logits of
/// that requantized model. In f32 the merge is exact: PEFT's logits on the dequantized base.
fn merged_gguf_is_the_requantized_merge(device: &Device) {
    let mut llm = load_files(tiny_gguf(QuantType::Q4_0), WeightDtype::Auto, device);
    pollster::block_on(llm.model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap())).unwrap();
    let ours = pollster::block_on(llm.merged_gguf(Some("a"), WeightDtype::Auto)).unwrap();
    assert_same_gguf(&ours, "merged-q4_0.gguf");
    assert!(llm.model.merged_adapters().is_empty(), "the model is not changed");

    let ids = tiny_ids();
    let reloaded = load_files(ModelFiles::from_gguf("merged.gguf", ours).unwrap(), WeightDtype::Auto, device);
    let diff = max_abs_diff(&logits_of(&reloaded.model, &ids), &expected("Q4_0.qv-r8.merged.logits"));
    assert!(diff < TOLERANCE, "merged GGUF: max |ours - gguf-py's requantization| = {diff}");

    let f32_gguf = pollster::block_on(llm.merged_gguf(Some("a"), WeightDtype::F32)).unwrap();
    let reloaded = load_files(ModelFiles::from_gguf("merged-f32.gguf", f32_gguf).unwrap(), WeightDtype::Auto, device);
    assert_eq!(reloaded.model.matrix("model.layers.0.self_attn.q_proj.weight").unwrap().dtype(), WeightDtype::F32);
    let diff = max_abs_diff(&logits_of(&reloaded.model, &ids), &expected("Q4_0.qv-r8.logits"));
    assert!(diff < TOLERANCE, "merged f32 GGUF: max |ours - PEFT| = {diff}");
}

on_cpu_and_wgpu!(merged_gguf_is_the_requantized_merge);

/// PEFT adapters as llama.cpp LoRA adapters: the GGUF convert_lora_to_gguf.py's layout gives
/// (built with gguf-py from PEFT's own matrices and scalings): q and k rows of B permuted, the
/// rank_pattern / alpha_pattern / rsLoRA scaling folded into B. A merged GGUF carries the
/// tokenizer, so a model without tokenizer.json has none.
#[test]
fn adapter_ggufs_are_llama_cpps() {
    for adapter in ["qv-r8", "rank-pattern", "rslora"] {
        let mut llm = load(&fixture("tiny-llama"), &cpu());
        pollster::block_on(llm.model.load_adapter("a", AdapterSource::from_dir(&fixture("peft").join(adapter)).unwrap())).unwrap();
        assert_same_gguf(&pollster::block_on(llm.adapter_gguf("a")).unwrap(), &format!("adapter-{adapter}.gguf"));
        let err = pollster::block_on(llm.merged_gguf(Some("a"), WeightDtype::Auto)).unwrap_err().to_string();
        assert!(err.contains("loaded without tokenizer.json"), "{err}");
    }
}

/// A base loaded from a Hugging Face directory exports a GGUF whose metadata llama.cpp's
/// converter would write (the real model's test compares it with llama.cpp's own file): loaded
/// back it is the same model, with the same tokenizer and chat template. In f32 the values are
/// the directory's; quantized on load to Q8_0, the blocks are written as they are.
#[test]
fn a_hugging_face_base_exports_a_gguf_that_loads_back_as_itself() {
    use webgpu_lora::io::ChatMessage;
    let device = cpu();
    let ids = tiny_ids();
    let messages = [ChatMessage::new("user", "Hi there, 123 wörld!")];
    for dtype in [WeightDtype::F32, WeightDtype::Quant(QuantType::Q8_0)] {
        let llm = load_as(&fixture("tiny-chat"), dtype, &device);
        let gguf = pollster::block_on(llm.merged_gguf(None, WeightDtype::Auto)).unwrap();
        let g = GgufFile::parse(&gguf, "tiny-chat.gguf").unwrap();
        assert_eq!(g.meta("tokenizer.ggml.pre").and_then(|v| v.as_str()), Some("gpt-2"), "a plain byte-level pre-tokenizer");
        let file_type = if dtype == WeightDtype::F32 { 0 } else { QuantType::Q8_0.llama_file_type() as u64 };
        assert_eq!(g.meta("general.file_type").and_then(|v| v.as_u64()), Some(file_type));

        let reloaded = load_files(ModelFiles::from_gguf("tiny-chat.gguf", gguf).unwrap(), WeightDtype::Auto, &device);
        assert_eq!(reloaded.model.matrix("model.layers.1.mlp.down_proj.weight").unwrap().dtype(), dtype);
        let diff = max_abs_diff(&logits_of(&reloaded.model, &ids), &logits_of(&llm.model, &ids));
        assert!(diff < 1e-6, "{dtype:?}: max |GGUF - directory| = {diff}");
        assert_eq!(reloaded.chat_ids(&messages).unwrap(), llm.chat_ids(&messages).unwrap(), "chat template and tokenizer");
        assert_eq!(reloaded.tokenizer().unwrap().eos_token_id(), llm.tokenizer().unwrap().eos_token_id());
    }
}

/// Merging a broken adapter (NaN in B) into a quantized base is refused, even without
/// safe_merge (quantized blocks cannot hold NaN), and nothing changes. OLoRA on a quantized base
/// writes its residual back requantized; deleting the adapter gives the loaded blocks back.
#[test]
fn nan_merges_are_refused_and_residuals_undone_on_a_quantized_base() {
    let device = cpu();
    let mut llm = load_files(tiny_gguf(QuantType::Q4_1), WeightDtype::Auto, &device);
    let model = &mut llm.model;
    let loaded = pollster::block_on(model.hf_weights(None, true)).unwrap();
    pollster::block_on(model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap())).unwrap();
    let layer = model.lora_linears_mut().next().unwrap();
    let lora = layer.adapters.get_mut("a").unwrap();
    lora.b_t = lora.b_t.clone().mul_scalar(f32::NAN);
    let err = pollster::block_on(model.merge_adapter(&["a"], false)).unwrap_err().to_string();
    assert!(err.contains("NaNs detected in the merged weights. The adapter a seems to be broken"), "{err}");
    assert!(model.merged_adapters().is_empty());
    assert!(pollster::block_on(model.hf_weights(None, true)).unwrap() == loaded, "nothing changed");
    pollster::block_on(model.delete_adapter("a")).unwrap();

    let config = webgpu_lora::lora::LoraConfig::from_json(
        br#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "olora"}"#,
        "olora",
    )
    .unwrap();
    let before = logits_of(model, &tiny_ids());
    pollster::block_on(model.add_adapter("o", config, 0)).unwrap();
    model.set_adapter("o").unwrap();
    let q = |m: &webgpu_lora::LlamaModel| m.matrix("model.layers.0.self_attn.q_proj.weight").unwrap().dtype();
    assert_eq!(q(model), WeightDtype::Quant(QuantType::Q4_1), "the residual is requantized");
    assert!(pollster::block_on(model.hf_weights(None, true)).unwrap() != loaded, "the residual base differs from the loaded one");
    // the residual plus the adapter is the base up to one more Q4_1 rounding (of the residual):
    // the logits move less than twice as far as quantizing the f32 model to Q4_1 moved them
    let diff = max_abs_diff(&logits_of(model, &tiny_ids()), &before);
    let rounding = max_abs_diff(&logits_of(&load(&fixture("tiny-llama"), &device).model, &tiny_ids()), &before);
    assert!(diff < 2.0 * rounding, "OLoRA on Q4_1: logits moved by {diff}; Q4_1 rounding of the model moved them by {rounding}");
    pollster::block_on(model.delete_adapter("o")).unwrap();
    assert!(pollster::block_on(model.hf_weights(None, true)).unwrap() == loaded, "deleting the adapter gives the loaded blocks back");
}

/// Written in gguf-py's order and layout, a GGUF LoRA adapter is gguf-py's file byte for byte
/// (the browser test compares its exports with that file).
#[test]
fn adapter_gguf_bytes_are_gguf_pys() {
    let mut llm = load(&fixture("tiny-llama"), &cpu());
    pollster::block_on(llm.model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap())).unwrap();
    let ours = pollster::block_on(llm.adapter_gguf("a")).unwrap();
    assert!(ours == std::fs::read(fixture("quant/adapter-qv-r8.gguf")).unwrap());
}
