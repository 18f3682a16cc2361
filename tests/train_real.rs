//! Learning on the real models: a short LoRA run (CPU backend) on the sample dataset
//! (data/robot, and data/robot-completions for the base without a chat template) teaches SmolLM2-135M-Instruct, and Gemma 3 270M from its quantized GGUF, the
//! "Bolt" persona they do not have; DPO on the same examples as preference pairs teaches
//! SmolLM2 to prefer it.

mod common;

use common::*;
use serde_json::Value;
use webgpu_lora::io::ChatMessage;
use webgpu_lora::train::{Control, FineTuneReport, Method, Schedule, TrainEvent, TrainOptions, TrainStart, fine_tune};
use webgpu_lora::{GenerationConfig, Llm, LoraModel};

/// A file of the sample dataset (data/make_robot_dataset.py): `folder` "robot" (chat) or
/// "robot-completions" (the same examples as prompt/completion pairs).
fn data(folder: &str, name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(folder).join(name)).unwrap()
}

/// `spec` run on `folder`'s train.jsonl with its val.jsonl evaluated, events to `on_event`.
fn train_on(llm: &mut Llm, spec: &TrainOptions, folder: &str, on_event: &mut dyn FnMut(TrainEvent) -> Control) -> FineTuneReport {
    let (train, val) = (data(folder, "train.jsonl"), data(folder, "val.jsonl"));
    let start = std::time::Instant::now();
    let clock = move || start.elapsed().as_secs_f64();
    let run = fine_tune(llm, spec, ("train.jsonl", &train), Some(("val.jsonl", &val)), TrainStart::New, &clock, on_event);
    pollster::block_on(run).unwrap().0
}

/// Validation loss falls by at least 30%, and greedy answers to held-out questions open with the
/// taught "Beep boop!" while the base model's (adapter disabled) do not. Asserts the behaviour,
/// not exact text.
#[test]
fn fine_tuning_teaches_the_persona() {
    let mut llm = load(&real_model_dir(), &cpu());
    let ask = |llm: &Llm, example: &Value| {
        let question = example["messages"][0]["content"].as_str().unwrap();
        llm.tokenizer().unwrap().encode_chat(&[ChatMessage::new("user", question)], true).unwrap()
    };
    teaches_the_persona(&mut llm, "robot", &ask);
}

/// The same on Gemma 3 270M, the pre-trained base loaded from its Q4_K_M GGUF (QLoRA: the base
/// stays quantized): it has no chat template, so it learns from the prompt/completion form.
#[test]
fn fine_tuning_teaches_gemma3_the_persona() {
    let files = webgpu_lora::io::ModelFiles::from_path(&gemma3_gguf()).unwrap();
    let mut llm = Llm::load(files, webgpu_lora::nn::WeightDtype::Auto, &cpu(), &mut |_, _, _| {}).unwrap();
    let ask = |llm: &Llm, example: &Value| llm.tokenizer().unwrap().encode(example["prompt"].as_str().unwrap(), true).unwrap();
    teaches_the_persona(&mut llm, "robot-completions", &ask);
}

/// DPO on SmolLM2 with the sample preference pairs (data/robot-preferences: the persona's answer
/// chosen over the same answer without it): 8 steps take the validation DPO loss from ln 2 (the
/// new adapter is the reference at first) below 0.2, and the last step prefers the chosen answer
/// in every pair with a positive margin.
#[test]
fn dpo_prefers_the_persona() {
    let mut llm = load(&real_model_dir(), &cpu());
    let spec = TrainOptions {
        method: Method::Dpo,
        adapter_name: "dpo".into(),
        lora_dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        lr: 2e-3,
        warmup_steps: 2,
        max_steps: Some(8),
        eval_every: Some(8),
        ..Default::default()
    };
    let (mut evals, mut last) = (Vec::new(), None);
    train_on(&mut llm, &spec, "robot-preferences", &mut |event| {
        match event {
            TrainEvent::Eval { val_loss, .. } => evals.push(val_loss),
            TrainEvent::Step(m) => last = m.rewards,
            TrainEvent::Checkpoint { .. } | TrainEvent::Memory { .. } => {}
        }
        Control::Continue
    });
    assert!((evals[0] - std::f64::consts::LN_2).abs() < 1e-6, "the first evaluation is DPO's ln 2: {evals:?}");
    assert!(*evals.last().unwrap() < 0.2, "validation DPO loss {evals:?}");
    let last = last.expect("DPO steps report rewards");
    assert!(last.accuracies == 1.0 && last.margins > 0.0 && last.chosen > last.rejected, "{last:?}");
}

/// 20 steps of all-linear r=8 on `folder`'s train.jsonl with its val.jsonl evaluated: the
/// validation loss falls by 30%, and the tuned model's greedy answers to six held-out examples
/// (asked as `ask` asks them) open with "Beep boop" (five at least) while the base model's do not.
fn teaches_the_persona(llm: &mut Llm, folder: &str, ask: &dyn Fn(&Llm, &Value) -> Vec<u32>) {
    let spec = TrainOptions {
        adapter_name: "robot".into(),
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.05,
        target_modules: vec!["all-linear".into()],
        max_seq_len: 128,
        lr: 2e-3,
        schedule: Schedule::Cosine,
        warmup_steps: 2,
        batch_size: 4,
        max_steps: Some(20),
        eval_every: Some(20),
        seed: 0,
        ..Default::default()
    };
    let mut evals = Vec::new();
    let report = train_on(llm, &spec, folder, &mut |event| {
        if let TrainEvent::Eval { step, val_loss, .. } = event {
            eprintln!("step {step}: val_loss {val_loss:.4}");
            evals.push(val_loss);
        }
        Control::Continue
    });
    let (first, last) = (evals[0], *evals.last().unwrap());
    assert!(last <= 0.7 * first, "validation loss {first:.3} -> {last:.3}: less than a 30% drop ({report:?})");

    let held_out: Vec<Value> =
        String::from_utf8(data(folder, "val.jsonl")).unwrap().lines().take(6).map(|line| serde_json::from_str(line).unwrap()).collect();
    let answers = |llm: &Llm| -> Vec<String> {
        held_out
            .iter()
            .map(|example| {
                let config = GenerationConfig { max_new_tokens: 6, ..Default::default() };
                pollster::block_on(llm.generate_text(&ask(llm, example), &config, &mut |_| true)).unwrap().1
            })
            .collect()
    };
    let persona = |texts: &[String]| texts.iter().filter(|t| t.trim_start().to_lowercase().starts_with("beep boop")).count();
    let tuned = answers(llm);
    assert!(persona(&tuned) >= 5, "the tuned model answers in persona: {tuned:?}");
    pollster::block_on(llm.model.disable_adapter()).unwrap();
    let base = answers(llm);
    assert_eq!(persona(&base), 0, "the base model does not: {base:?}");
}
