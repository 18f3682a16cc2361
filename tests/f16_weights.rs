//! Base weights stored in f16 (`WeightDtype::F16`, `fromPretrained(..., {dtype: "f16"})`), computed
//! with in f32. References: transformers' logits of the tiny model saved in f16 and computed in f32
//! (tests/fixtures/tiny-llama-f16), and the `half` crate's IEEE conversions for our packing
//! kernels (the path of WebGPU devices without shader-f16) and for merge rounding.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use common::*;
use half::f16;
use webgpu_lora::io::{ModelFiles, SafetensorsWeights, StoreDtype};
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::nn::weight::packed_f16;
use webgpu_lora::nn::{Weight, WeightDtype};
use webgpu_lora::tensor::{HostTensor, read_f32, read_host};
use webgpu_lora::{LlamaModel, Llm, LoraModel};

/// Stated tolerance: max absolute logit difference against transformers in f32 (as golden_tiny).
const TOLERANCE: f32 = 1e-4;

fn load_f16(files: ModelFiles, device: &Device) -> Llm {
    Llm::load(files, WeightDtype::F16, device, &mut |_, _, _| {}).unwrap()
}

fn logits(model: &LlamaModel) -> Vec<f32> {
    logits_of(model, &tiny_ids())
}

/// A model saved in f16 loads in f16 without any rounding: transformers' logits (f16 weights,
/// f32 compute), and the matrices take half the bytes.
fn f16_model_matches_transformers(device: &Device) {
    let dir = fixture("tiny-llama-f16");
    let f16_llm = load_f16(ModelFiles::from_dir(&dir).unwrap(), device);
    let diff = max_abs_diff(&logits(&f16_llm.model), &expected_logits(dir.join("expected.safetensors")));
    assert!(diff < TOLERANCE, "max |ours - transformers| = {diff}");

    let f32_llm = load(&dir, device);
    let c = &f32_llm.model.config;
    let norm_bytes = 4 * c.hidden_size * (2 * c.num_hidden_layers + 1);
    let (full, half) = (f32_llm.model.memory_footprint(), f16_llm.model.memory_footprint());
    assert_eq!(full - norm_bytes, 2 * (half - norm_bytes), "matrices: f16 takes half of f32 ({full} vs {half} bytes)");
}

on_cpu_and_wgpu!(f16_model_matches_transformers, merge_rounds_to_f16);

/// An f32 model loaded in f16 computes exactly what the same model with its matrices rounded to
/// f16 beforehand (by `half`, to nearest even) computes in f32. Norm weights stay f32.
#[test]
fn loading_in_f16_rounds_the_matrices_only() {
    let dir = fixture("tiny-llama");
    let reference = Llm::load(rounded_to_f16_files(&dir), WeightDtype::F32, &cpu(), &mut |_, _, _| {}).unwrap();
    let ours = load_f16(ModelFiles::from_dir(&dir).unwrap(), &cpu());
    let diff = max_abs_diff(&logits(&ours.model), &logits(&reference.model));
    assert!(diff <= 1e-6, "{diff}");
}

/// A weight that does not fit in f16 is refused, naming the tensor, rather than stored as infinity.
#[test]
fn a_value_beyond_f16_range_is_refused() {
    let dir = fixture("tiny-llama");
    let weights = SafetensorsWeights::new(vec![("m".into(), std::fs::read(dir.join("model.safetensors")).unwrap())]).unwrap();
    let mut tensors: BTreeMap<String, _> = weights.names().into_iter().map(|n| (n.to_string(), weights.tensor(n).unwrap())).collect();
    tensors.get_mut("model.layers.1.mlp.up_proj.weight").unwrap().data[3] = 70000.0;
    let files = || {
        let mut files = ModelFiles::new("big");
        files.insert("config.json", std::fs::read(dir.join("config.json")).unwrap());
        files.insert("model.safetensors", webgpu_lora::io::safetensors::write_safetensors(&tensors, StoreDtype::F32, None).unwrap());
        files
    };
    let err = Llm::load(files(), WeightDtype::F16, &cpu(), &mut |_, _, _| {}).err().expect("refused").to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("70000") && err.contains("\"f32\""), "{err}");
    assert!(Llm::load(files(), WeightDtype::F32, &cpu(), &mut |_, _, _| {}).is_ok());
    assert!(WeightDtype::parse("bf16").unwrap_err().to_string().contains("\"f16\""));
}

/// Merging into an f16 base stores round_f16(W + delta) (PEFT's merge into an f16 base), and
/// unmerging subtracts again in f16. The adapter on the f16 base and the merged model give PEFT's
/// logits of each (tiny-llama-f16/expected_qv-r8.safetensors, 1e-4).
fn merge_rounds_to_f16(device: &Device) {
    let mut llm = load_f16(ModelFiles::from_dir(&fixture("tiny-llama-f16")).unwrap(), device);
    let model = &mut llm.model;
    pollster::block_on(model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap())).unwrap();
    model.set_adapter("a").unwrap();
    let with_adapter = logits(model);
    let peft = std::fs::read(fixture("tiny-llama-f16/expected_qv-r8.safetensors")).unwrap();
    let peft = webgpu_lora::io::SafetensorsWeights::new(vec![("peft".into(), peft)]).unwrap();
    let diff = max_abs_diff(&with_adapter, &peft.tensor("logits").unwrap().data);
    assert!(diff < 1e-4, "the adapter on the f16 base vs PEFT: {diff}");
    let host = |t: Tensor<2>| pollster::block_on(read_host(t)).unwrap().data;
    let q = |model: &LlamaModel| model.layers[1].self_attn.q_proj.base.weight_t.value();
    let before = host(q(model));
    let delta = host(model.layers[1].self_attn.q_proj.delta_t("a").unwrap());

    pollster::block_on(model.merge_adapter(&["a"], true)).unwrap();
    let merged = host(q(model));
    for i in 0..before.len() {
        let expected = f16::from_f32(before[i] + delta[i]).to_f32();
        assert_eq!(merged[i].to_bits(), expected.to_bits(), "element {i}: {} + {} -> {}", before[i], delta[i], merged[i]);
    }
    let diff = max_abs_diff(&logits(model), &peft.tensor("merged_logits").unwrap().data);
    assert!(diff < 1e-4, "merged into the f16 base vs PEFT's merge: {diff}");

    pollster::block_on(model.unmerge_adapter()).unwrap();
    let unmerged = host(q(model));
    for i in 0..before.len() {
        assert_eq!(unmerged[i].to_bits(), f16::from_f32(merged[i] - delta[i]).to_f32().to_bits(), "element {i}");
    }
}

/// The packing kernels (WebGPU devices without shader-f16), run on native wgpu: unpacking every
/// one of the 65536 f16 bit patterns gives `half`'s f32 value, bit for bit.
#[test]
fn unpacking_every_f16_bit_pattern_is_exact() {
    let halves: Vec<u16> = (0..=u16::MAX).collect();
    let words = Tensor::<2, Int>::from_data(TensorData::new(packed_f16::words_of(&halves), [128, 256]), (&wgpu(), DType::I32));
    let values = pollster::block_on(read_f32(packed_f16::unpack(words))).unwrap();
    for (&h, v) in halves.iter().zip(values) {
        let expected = f16::from_bits(h).to_f32();
        assert!(v.to_bits() == expected.to_bits() || (v.is_nan() && expected.is_nan()), "{h:#06x}: {v} instead of {expected}");
    }
}

/// Packing rounds like `half` (IEEE round to nearest, ties to even): every f16 value, every
/// midpoint between neighbours (a tie) and the f32 values just either side of it, both signs,
/// plus overflow, underflow, infinities and NaN.
#[test]
fn packing_rounds_to_nearest_even() {
    let finite: Vec<f32> = (0..0x7c00u16).map(|h| f16::from_bits(h).to_f32()).collect();
    let mut values =
        vec![0.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e30, f32::MAX, f32::INFINITY, f32::NAN, 1e-40, 2f32.powi(-25), 2f32.powi(-26)];
    values.extend(&finite);
    for pair in finite.windows(2) {
        let mid = (pair[0] + pair[1]) / 2.0;
        values.extend([mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1)]);
    }
    values.extend(values.clone().iter().map(|v| -v));
    values.resize(values.len().next_multiple_of(512), 0.0);
    let n = values.len();
    let packed = packed_f16::pack(Tensor::from_data(TensorData::new(values.clone(), [n / 512, 512]), &wgpu()));
    let words: Vec<i32> = pollster::block_on(packed.into_data_async()).unwrap().try_into_vec().unwrap();
    let halves = words.iter().flat_map(|&w| [(w as u32 & 0xffff) as u16, (w as u32 >> 16) as u16]);
    for (v, h) in values.iter().zip(halves) {
        let expected = f16::from_f32(*v);
        assert!(
            h == expected.to_bits() || (f16::from_bits(h).is_nan() && expected.is_nan()),
            "{v:e}: {h:#06x} instead of {:#06x}",
            expected.to_bits()
        );
    }
}

/// The packed variant of `Weight` (what a WebGPU device without shader-f16 gets) on native wgpu:
/// its value is the f16-rounded matrix, an embedding lookup converts just those rows, and updates
/// round W + delta (and W - delta) to f16.
#[test]
fn packed_weight_values_rows_and_updates() {
    let device = wgpu();
    let (rows, cols) = (6, 8);
    let data: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
    let round = |v: f32| f16::from_f32(v).to_f32();
    let host = |t: Tensor<2>| pollster::block_on(read_f32(t)).unwrap();
    let mut weight = Weight::packed_f16(&HostTensor::new(vec![rows, cols], data.clone()), "w", &device).unwrap();
    assert_eq!((weight.dims(), weight.bytes(), weight.dtype()), ([rows, cols], rows * cols * 2, WeightDtype::F16));
    let rounded: Vec<f32> = data.iter().map(|&v| round(v)).collect();
    assert_eq!(host(weight.value()), rounded);
    let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![4i32, 0], [2]), &device);
    assert_eq!(host(weight.rows(ids)), [&rounded[4 * cols..5 * cols], &rounded[..cols]].concat());

    let delta: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 20.0) * 1.37e-3).collect();
    let delta_t = || Tensor::<2>::from_data(TensorData::new(delta.clone(), [rows, cols]), &device);
    weight.add(delta_t(), 1.0);
    let plus: Vec<f32> = rounded.iter().zip(&delta).map(|(w, d)| round(w + d)).collect();
    assert_eq!(host(weight.value()), plus);
    weight.add(delta_t(), -1.0);
    assert_eq!(host(weight.value()), plus.iter().zip(&delta).map(|(w, d)| round(w - d)).collect::<Vec<_>>());
    assert!(
        Weight::packed_f16(&HostTensor::new(vec![2, 3], vec![0.0; 6]), "odd", &device)
            .err()
            .unwrap()
            .to_string()
            .contains("odd number of columns")
    );
}
