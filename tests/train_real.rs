//! Learning on the real model: a short LoRA run (CPU backend) on the sample dataset
//! (data/robot) teaches SmolLM2-135M-Instruct the "Bolt" persona it does not have.

mod common;

use common::*;
use webgpu_lora::io::ChatMessage;
use webgpu_lora::train::{Control, Schedule, TrainEvent, TrainOptions, fine_tune};
use webgpu_lora::{GenerationConfig, LoraModel};

fn data(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/robot").join(name)).unwrap()
}

/// Validation loss falls by at least 30%, and greedy answers to held-out questions open with the
/// taught "Beep boop!" while the base model's (adapter disabled) do not. Asserts the behaviour,
/// not exact text.
#[test]
fn fine_tuning_teaches_the_persona() {
    let mut llm = load(&real_model_dir(), &cpu());
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
    let (train, val) = (data("train.jsonl"), data("val.jsonl"));
    let mut evals = Vec::new();
    let start = std::time::Instant::now();
    let clock = move || start.elapsed().as_secs_f64();
    let (report, _) = pollster::block_on(fine_tune(
        &mut llm,
        &spec,
        ("train.jsonl", &train),
        Some(("val.jsonl", &val)),
        webgpu_lora::train::TrainStart::New,
        &clock,
        &mut |event| {
            if let TrainEvent::Eval { step, val_loss, .. } = event {
                eprintln!("step {step}: val_loss {val_loss:.4}");
                evals.push(val_loss);
            }
            Control::Continue
        },
    ))
    .unwrap();
    let (first, last) = (evals[0], *evals.last().unwrap());
    assert!(last <= 0.7 * first, "validation loss {first:.3} -> {last:.3}: less than a 30% drop ({report:?})");

    let questions: Vec<String> = String::from_utf8(val)
        .unwrap()
        .lines()
        .take(6)
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["messages"][0]["content"].as_str().unwrap().to_string())
        .collect();
    let answers = |llm: &webgpu_lora::Llm| -> Vec<String> {
        questions
            .iter()
            .map(|q| {
                let ids = llm.tokenizer().unwrap().encode_chat(&[ChatMessage::new("user", q)], true).unwrap();
                let config = GenerationConfig { max_new_tokens: 6, ..Default::default() };
                pollster::block_on(llm.generate_text(&ids, &config, &mut |_| true)).unwrap().1
            })
            .collect()
    };
    let persona = |texts: &[String]| texts.iter().filter(|t| t.trim_start().to_lowercase().starts_with("beep boop")).count();
    let tuned = answers(&llm);
    assert!(persona(&tuned) >= 5, "the tuned model answers in persona: {tuned:?}");
    pollster::block_on(llm.model.disable_adapter()).unwrap();
    let base = answers(&llm);
    assert_eq!(persona(&base), 0, "the base model does not: {base:?}");
}
