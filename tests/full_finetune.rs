//! Full fine-tuning against transformers + torch (tests/fixtures/full, make_fixtures.py `full`):
//! the loss and the gradient of every weight for one batch on four tiny models (tied and untied
//! heads, Qwen2's biases, Gemma 3's 1 + weight norms), with and without gradient checkpointing,
//! on the CPU backend and native wgpu; a 10-step trajectory with torch's AdamW in transformers'
//! Trainer groups; resume from a checkpoint; the whole job through `fine_tune` (a model directory
//! that loads back with the trained logits); and runs that cannot be done refused by name.

mod common;

use common::*;
use webgpu_lora::LlamaModel;
use webgpu_lora::io::{ModelFiles, SafetensorsWeights};
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::train::trainer::{Target, TrainedFiles, check_state_weights, train_steps};
use webgpu_lora::train::{Batch, Control, Method, TrainEnd, TrainEvent, TrainOptions, TrainStart, fine_tune};
use webgpu_lora::{Llm, LoraModel};

/// Stated tolerances: gradients as `assert_full_gradients_match` says; losses and gradient norms
/// 1e-4 relative; the weights after 10 AdamW steps within 1e-5 absolute (they move by up to
/// 5e-3; we measured 1.2e-7 here).
const WEIGHT_TOLERANCE: f32 = 1e-5;

fn trajectory() -> serde_json::Value {
    read_json(fixture("full/trajectory.json"))
}

fn reference(name: &str) -> SafetensorsWeights {
    SafetensorsWeights::new(vec![(name.into(), std::fs::read(fixture(&format!("full/{name}.safetensors"))).unwrap())]).unwrap()
}

fn gradients_match_transformers(device: &burn::tensor::Device) {
    let batch = batch(&trajectory()["grad_batch"]);
    for (name, dir) in [
        ("tiny-llama", "tiny-llama"),
        ("tiny-llama-untied", "tiny-llama-untied"),
        ("tiny-qwen2", "families/tiny-qwen2"),
        ("tiny-gemma3", "families/tiny-gemma3"),
    ] {
        let model = load(&fixture(dir), device).model;
        assert_full_gradients_match(&model, &batch, &fixture(&format!("full/grads-{name}.safetensors")), name);
    }
}

on_cpu_and_wgpu!(gradients_match_transformers);

/// The fixture's trainer settings, for the model's own weights.
fn full_options(t: &serde_json::Value) -> TrainOptions {
    TrainOptions { method: Method::Full, ..reference_options(t) }
}

/// A checkpoint as the run handed it out.
struct Checkpoint {
    step: usize,
    files: Vec<(String, Vec<u8>)>,
    state: Vec<u8>,
}

/// What a run reported: each step's loss and gradient norm, and the checkpoints.
#[derive(Default)]
struct Report {
    losses: Vec<f64>,
    norms: Vec<f64>,
    checkpoints: Vec<Checkpoint>,
}

fn run(model: &mut LlamaModel, steps: &[Vec<Batch>], options: &TrainOptions, resume: Option<&[u8]>) -> Report {
    let mut report = Report::default();
    let clock = || 0.0;
    let summary = pollster::block_on(train_steps(model, Target::Model, steps, steps.len(), None, options, resume, &clock, &mut |event| {
        match event {
            TrainEvent::Step(m) => {
                report.losses.push(m.loss);
                report.norms.push(m.grad_norm);
            }
            TrainEvent::Checkpoint { step, files, state } => match *files {
                TrainedFiles::Model(files) => report.checkpoints.push(Checkpoint { step, files, state }),
                TrainedFiles::Adapter(_) => panic!("full fine-tuning checkpoints the model"),
            },
            _ => {}
        }
        Control::Continue
    }))
    .unwrap();
    assert_eq!((summary.steps, summary.end), (steps.len(), TrainEnd::Completed));
    report
}

fn assert_weights_match_torch(model: &LlamaModel) {
    let torch = reference("final");
    let ours = pollster::block_on(model.hf_tensors(None)).unwrap();
    for name in torch.names() {
        let theirs = torch.tensor(name).unwrap();
        let diff = max_abs_diff(&ours[name].data, &theirs.data);
        assert!(diff <= WEIGHT_TOLERANCE, "{name}: max diff {diff} from torch's weight after the trajectory");
    }
}

fn trajectory_matches_torch(device: &burn::tensor::Device) {
    let t = trajectory();
    let mut model = load(&fixture("tiny-llama"), device).model;
    let before = pollster::block_on(model.hf_tensors(None)).unwrap();
    let report = run(&mut model, &trajectory_steps(&t), &full_options(&t), None);
    for (i, (ours, torch)) in report.losses.iter().zip(t["losses"].as_array().unwrap()).enumerate() {
        let torch = torch.as_f64().unwrap();
        assert!((ours - torch).abs() < 1e-4 * torch, "step {}: loss {ours} vs torch {torch}", i + 1);
    }
    for (i, (ours, torch)) in report.norms.iter().zip(t["grad_norms"].as_array().unwrap()).enumerate() {
        let torch = torch.as_f64().unwrap();
        assert!((ours - torch).abs() < 1e-4 * torch, "step {}: gradient norm {ours} vs torch {torch}", i + 1);
    }
    assert_eq!(report.losses.len(), 10);
    assert_weights_match_torch(&model);
    // the run moved every weight (norms included), further than the tolerance
    let after = pollster::block_on(model.hf_tensors(None)).unwrap();
    for (name, b) in &before {
        assert!(max_abs_diff(&b.data, &after[name].data) > 100.0 * WEIGHT_TOLERANCE, "{name} was trained");
    }
}

on_cpu_and_wgpu!(trajectory_matches_torch);

/// A run checkpointed at step 5 (a model directory and the trainer state) and resumed from it,
/// the model loaded from the checkpoint's files, ends as the uninterrupted run does.
#[test]
fn resumed_run_equals_the_uninterrupted_one() {
    let t = trajectory();
    let options = TrainOptions { checkpoint_every: Some(5), ..full_options(&t) };
    let mut whole = load(&fixture("tiny-llama"), &cpu()).model;
    let report = run(&mut whole, &trajectory_steps(&t), &options, None);
    let Checkpoint { step, files, state } = report.checkpoints.into_iter().next().expect("a checkpoint at step 5");
    assert_eq!(step, 5);
    assert_eq!(files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["model.safetensors", "config.json"]);
    let dir = scratch("full-checkpoint");
    webgpu_lora::io::write_files(&dir, files).unwrap();
    let mut resumed = load(&dir, &cpu()).model;
    // the state goes with the checkpoint's weights, not the base the run began on
    pollster::block_on(check_state_weights(&resumed, &state)).expect("the checkpoint's own model");
    let base = load(&fixture("tiny-llama"), &cpu()).model;
    let e = pollster::block_on(check_state_weights(&base, &state)).unwrap_err().to_string();
    assert!(
        e.starts_with("trainer state: it goes with other weights")
            && e.ends_with("resume on the model loaded from the checkpoint's own files"),
        "{e}"
    );
    let rest = run(&mut resumed, &trajectory_steps(&t), &options, Some(&state));
    assert_eq!(rest.losses.len(), 5, "steps 6 to 10");
    for (a, b) in rest.losses.iter().zip(&report.losses[5..]) {
        assert!((a - b).abs() < 1e-6, "resumed loss {a} vs {b}");
    }
    let (a, b) = (pollster::block_on(resumed.hf_tensors(None)).unwrap(), pollster::block_on(whole.hf_tensors(None)).unwrap());
    for (name, t) in &a {
        assert!(max_abs_diff(&t.data, &b[name].data) < 1e-6, "{name}");
    }
}

fn job(
    llm: &mut Llm,
    options: &TrainOptions,
) -> (webgpu_lora::Result<(webgpu_lora::train::FineTuneReport, TrainedFiles)>, Vec<TrainEvent>) {
    let data = std::fs::read(fixture("eval/ids.jsonl")).unwrap();
    let mut events = Vec::new();
    let clock = || 0.0;
    let result = pollster::block_on(fine_tune(llm, options, ("train.jsonl", &data), None, TrainStart::New, &clock, &mut |e| {
        events.push(e);
        Control::Continue
    }));
    (result, events)
}

/// `fine_tune` with method full: states its memory estimate first, trains, and hands back a
/// Hugging Face directory (f32 weights, config, the tokenizer's files) that loads with the
/// trained model's logits.
#[test]
fn the_job_writes_a_model_directory_with_the_trained_weights() {
    let mut llm = load(&fixture("tiny-chat"), &cpu());
    let options = TrainOptions { method: Method::Full, lr: 1e-3, max_steps: Some(3), batch_size: 2, ..Default::default() };
    let before = logits_of(&llm.model, &tiny_ids());
    let (result, events) = job(&mut llm, &options);
    let (report, files) = result.unwrap();
    assert_eq!(report.summary.steps, 3);
    let TrainEvent::Memory { parameters, parts } = &events[0] else { panic!("the memory estimate comes first") };
    assert_eq!(*parameters, webgpu_lora::lora::LoraLayers::base_parameters(&llm.model));
    assert_eq!(parts.iter().find(|p| p.what == "AdamW moments").unwrap().bytes, 8 * parameters);
    let TrainedFiles::Model(files) = files else { panic!("a model directory") };
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.starts_with(&["model.safetensors", "config.json"]) && names.contains(&"tokenizer.json"), "{names:?}");
    let trained = logits_of(&llm.model, &tiny_ids());
    assert!(max_abs_diff(&before, &trained) > 1e-3, "the run changed the model");
    let mut directory = ModelFiles::new("the trained model");
    for (name, bytes) in files {
        directory.insert(name, bytes);
    }
    let reloaded = Llm::load(directory, Default::default(), &cpu(), &mut |_, _, _| {}).unwrap();
    assert!(max_abs_diff(&logits_of(&reloaded.model, &tiny_ids()), &trained) < 1e-6, "the files hold the trained weights");
}

/// Full fine-tuning with an adapter loaded, over an f16 base, with a LoRA option set, or above
/// the memory limit: each refused naming what and why, the model unchanged.
#[test]
fn runs_that_cannot_be_done_are_refused_by_name() {
    let full = TrainOptions { method: Method::Full, max_steps: Some(1), batch_size: 2, ..Default::default() };
    let refused = |llm: &mut Llm, options: &TrainOptions| {
        let before = pollster::block_on(llm.model.hf_tensors(None)).unwrap();
        let e = job(llm, options).0.err().expect("refused").to_string();
        assert_eq!(pollster::block_on(llm.model.hf_tensors(None)).unwrap(), before, "nothing changed: {e}");
        e
    };
    let mut llm = load(&fixture("tiny-chat"), &cpu());
    let e = refused(&mut llm, &TrainOptions { memory_limit_mb: Some(1.0), ..full.clone() });
    assert!(e.starts_with("full fine-tuning of this model needs about "), "{e}");
    assert!(e.contains("more than the 1.0 MB (1000000 bytes) available (memory_limit_mb; CLI --memory-limit-mb, JS memoryLimitMb)"), "{e}");
    assert!(e.contains("AdamW moments"), "{e}");
    let e = refused(&mut llm, &TrainOptions { r: 16, target_modules: vec!["all-linear".into()], ..full.clone() });
    assert!(e.starts_with("full fine-tuning trains every weight, so the LoRA options do not apply"), "{e}");
    assert!(e.contains("r 16") && e.contains("target_modules all-linear"), "{e}");

    pollster::block_on(llm.model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/all7-r4")).unwrap())).unwrap();
    let e = refused(&mut llm, &full);
    assert!(e.starts_with("full fine-tuning trains the base model itself, and adapter \"a\" is loaded"), "{e}");

    let mut half = load_as(&fixture("tiny-chat"), webgpu_lora::nn::WeightDtype::F16, &cpu());
    let e = refused(&mut half, &full);
    assert_eq!(
        e,
        "full fine-tuning trains f32 weights, and model.embed_tokens.weight is stored as f16: load the model with dtype f32 (--dtype f32, dtype: 'f32')"
    );
}
