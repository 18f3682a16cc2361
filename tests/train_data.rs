//! Training data with the real model's tokenizer: what is trained on (decoded back to text), and
//! bad input, each with a clear error that names the file, the line and the problem.

mod common;

use common::*;
use webgpu_lora::io::{ChatMessage, ModelFiles, TextTokenizer};
use webgpu_lora::train::data::{DataOptions, IGNORE, read_dataset};

fn tokenizer() -> TextTokenizer {
    ModelFiles::from_dir(&real_model_dir()).unwrap().tokenizer().unwrap().unwrap()
}

fn trained_text(tok: &TextTokenizer, ids: &[u32], labels: &[i32]) -> String {
    let trained: Vec<u32> = ids.iter().zip(labels).filter(|(_, l)| **l != IGNORE).map(|(i, _)| *i).collect();
    tok.decode(&trained, false).unwrap()
}

/// Chat examples: ids are the chat template's rendering of the whole conversation; only the
/// assistant turns (text + end of turn) are trained on. prompt/completion: only completion + eos.
/// text: everything + eos.
#[test]
fn labels_cover_exactly_the_trained_part() {
    let tok = tokenizer();
    let data = br#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Beep boop! Hello."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Four."}]}
{"prompt": "Q: 2+3?\nA:", "completion": " 5"}
{"text": "plain words"}
"#;
    let d = read_dataset("d.jsonl", data, &tok, &DataOptions::default()).unwrap();
    assert_eq!(d.report.examples, 3);
    let chat = &d.examples[0];
    let messages = [
        ChatMessage::new("user", "Hi?"),
        ChatMessage::new("assistant", "Beep boop! Hello."),
        ChatMessage::new("user", "2+2?"),
        ChatMessage::new("assistant", "Four."),
    ];
    assert_eq!(chat.ids, tok.encode_chat(&messages, false).unwrap());
    assert_eq!(trained_text(&tok, &chat.ids, &chat.labels), "Beep boop! Hello.<|im_end|>\nFour.<|im_end|>\n");
    let pc = &d.examples[1];
    assert_eq!(trained_text(&tok, &pc.ids, &pc.labels), " 5<|im_end|>");
    assert_eq!(tok.decode(&pc.ids, false).unwrap(), "Q: 2+3?\nA: 5<|im_end|>");
    let text = &d.examples[2];
    assert_eq!(trained_text(&tok, &text.ids, &text.labels), "plain words<|im_end|>");
    let everything = read_dataset("d.jsonl", data, &tok, &DataOptions { train_on_everything: true, ..Default::default() }).unwrap();
    assert!(everything.examples.iter().all(|e| e.labels.iter().all(|&l| l != IGNORE)));
}

/// The sample dataset reads, every example has trainable tokens, and a split is seeded.
#[test]
fn the_sample_dataset_reads() {
    let tok = tokenizer();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/robot/train.jsonl");
    let d = read_dataset("train.jsonl", &std::fs::read(path).unwrap(), &tok, &DataOptions::default()).unwrap();
    assert_eq!(d.report.examples, 200);
    assert!(d.examples.iter().all(|e| e.trainable_tokens() > 3));
    let (a, b) = d.clone().split(0.1, 7).unwrap();
    let (c, _) = d.split(0.1, 7).unwrap();
    assert_eq!((a.examples.len(), b.examples.len()), (180, 20));
    assert_eq!(a.examples, c.examples, "same seed, same split");
}

#[test]
fn bad_data_errors_name_file_line_and_problem() {
    let tok = tokenizer();
    let opts = DataOptions::default();
    let err = |bytes: &[u8], opts: &DataOptions| read_dataset("data.jsonl", bytes, &tok, opts).unwrap_err().to_string();

    assert_eq!(err(b"  \n", &opts), "data.jsonl: the file is empty: give at least one example");
    let e = err(b"{\"text\": \"ok\"}\n{not json}\n", &opts);
    assert!(e.starts_with("data.jsonl:2: invalid JSON"), "{e}");
    let e = err(br#"{"messages": [{"role": "wizard", "content": "hi"}]}"#, &opts);
    assert!(e.starts_with("data.jsonl:1: message 0 has role \"wizard\""), "{e}");
    let e = err(br#"{"question": "x"}"#, &opts);
    assert!(e.contains("expected {\"messages\""), "{e}");
    let long = format!(r#"{{"text": "{}"}}"#, "word ".repeat(100));
    let short = DataOptions { max_seq_len: 16, ..Default::default() };
    let e = err(long.as_bytes(), &short);
    assert!(e.starts_with("data.jsonl:1: the example has") && e.contains("more than max_seq_len = 16"), "{e}");
    // allowed: cut and counted
    let cut = read_dataset("data.jsonl", long.as_bytes(), &tok, &DataOptions { truncate: true, ..short.clone() }).unwrap();
    assert_eq!((cut.report.truncated, cut.examples[0].ids.len()), (1, 16));
    // no trainable tokens: a conversation without an assistant turn
    let e = err(br#"{"messages": [{"role": "user", "content": "hi"}]}"#, &opts);
    assert!(e.contains("no assistant message"), "{e}");
    // a dataset whose only example is its eos: nothing to predict
    let e = err(br#"{"text": ""}"#, &opts);
    assert!(e.starts_with("data.jsonl: no trainable tokens"), "{e}");
    let e = err(br#"{"prompt": "a", "completion": ""}"#.as_slice(), &DataOptions { max_seq_len: 1, ..Default::default() });
    assert!(e.contains("max_seq_len = 1"), "{e}");
    // skipping bad lines counts them
    let mixed = b"{\"text\": \"fine\"}\n[1, 2]\n{\"text\": 3}\n";
    let d = read_dataset("data.jsonl", mixed, &tok, &DataOptions { skip_bad_lines: true, ..Default::default() }).unwrap();
    assert_eq!(d.report.examples, 1);
    assert_eq!(d.report.skipped.iter().map(|(line, _)| *line).collect::<Vec<_>>(), vec![2, 3]);
}

/// Settings that cannot train are refused before anything runs.
#[test]
fn bad_settings_are_refused() {
    use webgpu_lora::train::TrainOptions;
    let bad_lr = TrainOptions { lr: 0.0, ..Default::default() };
    assert!(bad_lr.check().unwrap_err().to_string().contains("learning rate 0"));
    let negative = TrainOptions { lr: -1e-4, ..Default::default() };
    assert!(negative.check().is_err());
    let zero_batch = TrainOptions { batch_size: 0, ..Default::default() };
    assert!(zero_batch.check().unwrap_err().to_string().contains("batch size 0"));
    let r0 = webgpu_lora::lora::LoraConfig::from_json(br#"{"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}"#, "options")
        .unwrap_err()
        .to_string();
    assert!(r0.contains("r = 0"), "{r0}");
}
