//! DPO on a LoRA adapter against TRL's `DPOTrainer` (tests/fixtures/dpo, make_fixtures.py `dpo`):
//! the tiny chat model with a new q/v adapter TRL made, three preference pairs. TRL's tokenization
//! of each pair, then for the one batch of them the sigmoid loss (beta 0.1), its reward metrics
//! and every lora_A / lora_B gradient, on the CPU backend and on native wgpu; and bad preference
//! data refused naming the line.

mod common;

use common::*;
use webgpu_lora::LoraModel;
use webgpu_lora::lora::{AdapterSource, LoraRun};
use webgpu_lora::train::dpo::{dpo_gradients, preference_batch, read_preferences};

/// Stated tolerance: relative, on the loss and each reward metric.
const TOLERANCE: f64 = 1e-4;

fn dpo_step_matches_trl(device: &burn::tensor::Device) {
    let dir = fixture("dpo");
    let mut llm = load(&fixture("tiny-chat"), device);
    let expected = read_json(dir.join("expected.json"));
    let pairs = read_preferences("pairs.jsonl", &std::fs::read(dir.join("pairs.jsonl")).unwrap(), llm.tokenizer().unwrap()).unwrap();
    for (ours, trl) in pairs.iter().zip(expected["tokenized"].as_array().unwrap()) {
        assert_eq!(ours.prompt, ids(&trl["prompt_ids"]), "prompt ids");
        assert_eq!(ours.chosen, ids(&trl["chosen_ids"]), "chosen ids (EOS appended)");
        assert_eq!(ours.rejected, ids(&trl["rejected_ids"]), "rejected ids");
    }
    pollster::block_on(llm.model.load_adapter("a", AdapterSource::from_dir(&dir.join("adapter")).unwrap())).unwrap();
    let batch = preference_batch(&pairs.iter().collect::<Vec<_>>(), llm.model.config.pad_token_id());
    for checkpointing in [false, true] {
        let (leaves, named) = peft_named_leaves(&llm.model, "a");
        let run = LoraRun { adapter: "a", weights: Some(&leaves), dropout: None };
        let tensors: Vec<_> = named.iter().map(|(_, t)| t.clone()).collect();
        let beta = expected["beta"].as_f64().unwrap();
        let (stats, grads) = pollster::block_on(dpo_gradients(&llm.model, run, &tensors, &batch, beta, checkpointing)).unwrap();
        let metrics = &expected["metrics"];
        for (what, ours, theirs) in [
            ("loss", stats.loss, expected["loss"].as_f64().unwrap()),
            ("rewards/chosen", stats.chosen_rewards, metrics["rewards/chosen"].as_f64().unwrap()),
            ("rewards/rejected", stats.rejected_rewards, metrics["rewards/rejected"].as_f64().unwrap()),
            ("rewards/accuracies", stats.accuracy, metrics["rewards/accuracies"].as_f64().unwrap()),
            ("rewards/margins", stats.margin, metrics["rewards/margins"].as_f64().unwrap()),
        ] {
            assert!((ours - theirs).abs() <= TOLERANCE * theirs.abs().max(1e-2), "{what}: ours {ours}, TRL {theirs}");
        }
        let trl = webgpu_lora::io::SafetensorsWeights::new(vec![("grads".into(), std::fs::read(dir.join("grads.safetensors")).unwrap())])
            .unwrap();
        assert_same_gradients(&in_peft_layout(named, grads), &trl, &format!("DPO, checkpointing {checkpointing}"));
    }
}

on_cpu_and_wgpu!(dpo_step_matches_trl);

/// A line without "chosen", identical completions, a conversation where text is expected and a
/// file without pairs are each refused, naming the file and line and what to give.
#[test]
fn bad_preference_data_is_named() {
    let llm = load(&fixture("tiny-chat"), &cpu());
    let tokenizer = llm.tokenizer().unwrap();
    let refused = |text: &str| read_preferences("prefs.jsonl", text.as_bytes(), tokenizer).unwrap_err().to_string();
    let good = r#"{"prompt": "Hi", "chosen": " Hello!", "rejected": " No."}"#;
    assert_eq!(
        refused(&format!("{good}\n{{\"prompt\": \"Hi\", \"rejected\": \" No.\"}}")),
        "prefs.jsonl:2: missing \"chosen\": each line needs \"prompt\", \"chosen\" and \"rejected\" (text)"
    );
    assert_eq!(
        refused(r#"{"prompt": "Hi", "chosen": " Same", "rejected": " Same"}"#),
        "prefs.jsonl:1: \"chosen\" and \"rejected\" are the same text: a pair needs two different completions"
    );
    let conversation = r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": " a", "rejected": " b"}"#;
    assert!(refused(conversation).starts_with("prefs.jsonl:1: \"prompt\" is a conversation"), "{}", refused(conversation));
    assert!(refused("\n\n").starts_with("prefs.jsonl: no preference pairs"));
    assert!(refused("{not json").starts_with("prefs.jsonl:1: invalid JSON"));
}
