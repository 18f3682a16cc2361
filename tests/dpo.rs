//! DPO on a LoRA adapter against TRL's `DPOTrainer` (tests/fixtures/dpo, make_fixtures.py `dpo`):
//! the tiny chat model with a new q/v adapter TRL made, three preference pairs. TRL's tokenization
//! of each pair (as text, and in TRL's conversational form), then for the one batch of them the sigmoid loss (beta 0.1), its reward metrics
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
    // the conversational form: the prompt through the chat template with its generation prompt
    let chat =
        read_preferences("pairs-chat.jsonl", &std::fs::read(dir.join("pairs-chat.jsonl")).unwrap(), llm.tokenizer().unwrap()).unwrap();
    assert_eq!(chat.len(), expected["chat_tokenized"].as_array().unwrap().len());
    for (ours, trl) in chat.iter().zip(expected["chat_tokenized"].as_array().unwrap()) {
        assert_eq!(
            [&ours.prompt, &ours.chosen, &ours.rejected],
            [&ids(&trl["prompt_ids"]), &ids(&trl["chosen_ids"]), &ids(&trl["rejected_ids"])]
        );
    }
    pollster::block_on(llm.model.load_adapter("a", AdapterSource::from_dir(&dir.join("adapter")).unwrap())).unwrap();
    let batch = preference_batch(&pairs.iter().collect::<Vec<_>>(), llm.model.config.pad_token_id());
    for checkpointing in [false, true] {
        let (leaves, named) = peft_named_leaves(&llm.model, "a");
        let run = LoraRun { adapter: "a", weights: Some(&leaves), dropout: None };
        let tensors: Vec<_> = named.iter().map(|(_, t)| t.clone()).collect();
        let beta = expected["beta"].as_f64().unwrap();
        let (stats, grads) =
            pollster::block_on(dpo_gradients(&llm.model, &llm.model.head_for_slices(), run, &tensors, &batch, beta, checkpointing))
                .unwrap();
        let metrics = &expected["metrics"];
        for (what, ours, theirs) in [
            ("loss", stats.loss, expected["loss"].as_f64().unwrap()),
            ("rewards/chosen", stats.rewards.chosen, metrics["rewards/chosen"].as_f64().unwrap()),
            ("rewards/rejected", stats.rewards.rejected, metrics["rewards/rejected"].as_f64().unwrap()),
            ("rewards/accuracies", stats.rewards.accuracies, metrics["rewards/accuracies"].as_f64().unwrap()),
            ("rewards/margins", stats.rewards.margins, metrics["rewards/margins"].as_f64().unwrap()),
        ] {
            assert!((ours - theirs).abs() <= TOLERANCE * theirs.abs().max(1e-2), "{what}: ours {ours}, TRL {theirs}");
        }
        let trl = webgpu_lora::io::SafetensorsWeights::new(vec![("grads".into(), std::fs::read(dir.join("grads.safetensors")).unwrap())])
            .unwrap();
        assert_same_gradients(&in_peft_layout(named, grads), &trl, &format!("DPO, checkpointing {checkpointing}"));
    }
}

on_cpu_and_wgpu!(dpo_step_matches_trl);

/// DPO's settings that cannot hold are refused before anything runs, naming the setting.
#[test]
fn dpo_settings_that_cannot_hold_are_named() {
    use webgpu_lora::train::{Control, Method, TrainOptions, TrainStart, fine_tune};
    let dpo = TrainOptions { method: Method::Dpo, ..Default::default() };
    // the new adapter's dropout (0.05 by default): refused before an adapter is added
    let mut llm = load(&fixture("tiny-chat"), &cpu());
    let pairs = std::fs::read(fixture("dpo/pairs.jsonl")).unwrap();
    let (clock, mut on_event) = (|| 0.0, |_| Control::Continue);
    let run = fine_tune(&mut llm, &dpo, ("pairs.jsonl", &pairs), None, TrainStart::New, &clock, &mut on_event);
    let err = pollster::block_on(run).err().unwrap().to_string();
    assert_eq!(err, "DPO: the adapter's lora_dropout must be 0 (--dropout 0, loraDropout: 0), not 0.05");
    assert!(llm.model.adapter_names().is_empty(), "nothing added");
    let refused = |options: TrainOptions| options.check().unwrap_err().to_string();
    let dpo = TrainOptions { lora_dropout: 0.0, ..dpo };
    assert!(dpo.check().is_ok());
    assert_eq!(refused(TrainOptions { packing: true, ..dpo.clone() }), "DPO: packing does not apply to preference pairs");
    assert_eq!(refused(TrainOptions { beta: 0.0, ..dpo.clone() }), "DPO: beta must be positive");
    assert!(refused(TrainOptions { val_split: Some(0.1), ..dpo }).starts_with("DPO: val_split is not supported"));
}

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
        "prefs.jsonl:2: missing \"chosen\": each line needs \"prompt\", \"chosen\" and \"rejected\" (text, or messages)"
    );
    assert_eq!(
        refused(r#"{"prompt": "Hi", "chosen": " Same", "rejected": " Same"}"#),
        "prefs.jsonl:1: \"chosen\" and \"rejected\" are the same: a pair needs two different completions"
    );
    let mixed = r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": " a", "rejected": " b"}"#;
    assert_eq!(refused(mixed), "prefs.jsonl:1: \"prompt\", \"chosen\" and \"rejected\" must all be text or all be messages");
    let wizard = r#"{"prompt": [{"role": "wizard", "content": "Hi"}], "chosen": [], "rejected": []}"#;
    assert!(refused(wizard).starts_with("prefs.jsonl:1: \"prompt\": message 0 has role \"wizard\""), "{}", refused(wizard));
    assert!(refused("\n\n").starts_with("prefs.jsonl: no preference pairs"));
    assert!(refused("{not json").starts_with("prefs.jsonl:1: invalid JSON"));
}
