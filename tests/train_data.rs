//! Training data with the real model's tokenizer: what is trained on (decoded back to text),
//! already tokenized lines, packing and the order of batches, and bad input, each with a clear
//! error that names the file, the line and the problem.

mod common;

use common::*;
use webgpu_lora::io::{ChatMessage, ModelFiles, TextTokenizer};
use webgpu_lora::train::TrainOptions;
use webgpu_lora::train::data::{Batch, DataOptions, Dataset, Example, IGNORE, read_dataset};
use webgpu_lora::train::trainer::plan_steps;

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
    let d = read_dataset("d.jsonl", data, Some(&tok), &DataOptions::default()).unwrap();
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
    let everything = read_dataset("d.jsonl", data, Some(&tok), &DataOptions { train_on_everything: true, ..Default::default() }).unwrap();
    assert!(everything.examples.iter().all(|e| e.labels.iter().all(|&l| l != IGNORE)));
}

/// `{"input_ids", "labels"}` lines are taken as they are, without a tokenizer: labels default to
/// the ids (every token trained on); bad ids and labels name the line and the problem; text lines
/// without a tokenizer say what to give instead.
#[test]
fn already_tokenized_lines_need_no_tokenizer() {
    let data = b"{\"input_ids\": [5, 6, 7], \"labels\": [-100, 6, 7]}\n{\"input_ids\": [9, 8]}\n";
    let d = read_dataset("ids.jsonl", data, None, &DataOptions::default()).unwrap();
    assert_eq!(
        d.examples,
        vec![Example { ids: vec![5, 6, 7], labels: vec![IGNORE, 6, 7] }, Example { ids: vec![9, 8], labels: vec![9, 8] }]
    );
    assert_eq!((d.report.tokens, d.report.trainable_tokens), (5, 3));
    let err = |bytes: &[u8]| read_dataset("ids.jsonl", bytes, None, &DataOptions::default()).unwrap_err().to_string();
    let e = err(br#"{"input_ids": [1, 2], "labels": [1]}"#);
    assert_eq!(
        e,
        "ids.jsonl:1: \"labels\" has 1 entries and \"input_ids\" 2: give one label per token, or remove the line (training can leave such lines out: skip_bad_lines; CLI --skip-bad-lines, JS skipBadLines)"
    );
    let e = err(br#"{"input_ids": [1, -2]}"#);
    assert!(e.starts_with("ids.jsonl:1: \"input_ids\"[1] = -2 is not a token id"), "{e}");
    let e = err(br#"{"input_ids": [1, 2], "labels": [-1, 2]}"#);
    assert!(e.starts_with("ids.jsonl:1: \"labels\"[0] = -1 is not a token id or -100 (not trained on)"), "{e}");
    let e = err(br#"{"input_ids": []}"#);
    assert!(e.contains("must be a non-empty list of token ids"), "{e}");
    let e = err(br#"{"text": "words"}"#);
    assert!(e.starts_with("ids.jsonl:1: text needs the model's tokenizer") && e.contains("\"input_ids\""), "{e}");
    let e = read_dataset("notes.txt", b"words", None, &DataOptions::default()).unwrap_err().to_string();
    assert!(e.starts_with("notes.txt: text needs the model's tokenizer"), "{e}");
}

/// Packing: rows of whole examples in order, none longer than max_seq_len, the same tokens; an
/// example's first token is not trained on (no label crosses a boundary), so the trainable tokens
/// are exactly the unpacked examples'.
#[test]
fn packing_keeps_the_tokens_and_no_label_crosses_an_example() {
    let tok = tokenizer();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/robot/train.jsonl");
    let everything = DataOptions { train_on_everything: true, ..Default::default() };
    for options in [DataOptions::default(), everything] {
        let d = read_dataset("train.jsonl", &std::fs::read(&path).unwrap(), Some(&tok), &options).unwrap();
        let packed = d.packed(256);
        assert!(packed.examples.len() * 3 < d.examples.len(), "{} rows for {} examples", packed.examples.len(), d.examples.len());
        assert!(packed.examples.iter().all(|row| row.ids.len() <= 256));
        assert_eq!(packed.report.tokens, d.report.tokens);
        assert_eq!(packed.report.trainable_tokens, d.report.trainable_tokens, "train_on_everything {}", options.train_on_everything);
        // the rows cut back into the examples at their lengths give the examples, each first label masked
        let mut examples = d.examples.iter();
        for row in &packed.examples {
            let mut at = 0;
            while at < row.ids.len() {
                let e = examples.next().unwrap();
                let span = at..at + e.ids.len();
                assert_eq!(row.ids[span.clone()], e.ids[..]);
                assert_eq!(row.labels[at], IGNORE, "an example's first token is never trained on");
                assert_eq!(row.labels[at + 1..span.end], e.labels[1..]);
                at = span.end;
            }
        }
        assert!(examples.next().is_none());
    }
}

/// Batches are shuffled per epoch with the seed; without shuffling they follow the file's order,
/// `batch_size` rows at a time, `grad_accum` batches per step.
#[test]
fn batches_follow_the_file_without_shuffling() {
    let examples: Vec<Example> = (0..10u32).map(|i| Example { ids: vec![i, i + 1], labels: vec![i as i32, i as i32 + 1] }).collect();
    let d = Dataset::from_examples(examples);
    let first_ids = |options: &TrainOptions| -> Vec<u32> {
        plan_steps(&d.examples, options, |rows| Batch::new(rows, 0))
            .0
            .iter()
            .flatten()
            .flat_map(|b| b.ids.chunks(b.seq).map(|row| row[0]).collect::<Vec<_>>())
            .collect()
    };
    let ordered = TrainOptions { shuffle: false, batch_size: 2, grad_accum: 2, epochs: 2, ..Default::default() };
    let (steps, per_epoch) = plan_steps(&d.examples, &ordered, |rows| Batch::new(rows, 0));
    assert_eq!((steps.len(), per_epoch), (6, 3));
    assert_eq!(first_ids(&ordered), [(0..10).collect::<Vec<u32>>(), (0..10).collect()].concat());
    let shuffled = first_ids(&TrainOptions { shuffle: true, ..ordered.clone() });
    assert_ne!(shuffled, first_ids(&ordered));
    assert_ne!(shuffled[..10], shuffled[10..], "each epoch has its own order");
    assert_eq!(shuffled, first_ids(&TrainOptions { shuffle: true, ..ordered.clone() }), "the seed decides the order");
}

/// The sample dataset reads, every example has trainable tokens, and a split is seeded.
#[test]
fn the_sample_dataset_reads() {
    let tok = tokenizer();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/robot/train.jsonl");
    let d = read_dataset("train.jsonl", &std::fs::read(path).unwrap(), Some(&tok), &DataOptions::default()).unwrap();
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
    let err = |bytes: &[u8], opts: &DataOptions| read_dataset("data.jsonl", bytes, Some(&tok), opts).unwrap_err().to_string();

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
    let cut = read_dataset("data.jsonl", long.as_bytes(), Some(&tok), &DataOptions { truncate: true, ..short.clone() }).unwrap();
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
    let d = read_dataset("data.jsonl", mixed, Some(&tok), &DataOptions { skip_bad_lines: true, ..Default::default() }).unwrap();
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
