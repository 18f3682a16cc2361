//! Evaluation against independent references: the mean token loss (and perplexity, its exp) of
//! transformers on the same rows, rouge_score's ROUGE-L on fixed pairs (tests/fixtures/eval, made by
//! make_fixtures.py), and exact match and ROUGE-L of greedy answers by identity: an answer scored
//! against itself is 1, against a reference it shares nothing with, 0.

mod common;

use common::*;
use webgpu_lora::LoraModel;
use webgpu_lora::evaluate::{EvalOptions, evaluate, rouge_l};
use webgpu_lora::lora::AdapterSource;

#[test]
fn loss_and_perplexity_equal_transformers() {
    let expected = read_json(fixture("eval/expected.json"));
    let llm = load(&fixture("tiny-llama"), &cpu());
    let data = std::fs::read(fixture("eval/ids.jsonl")).unwrap();
    // rows of 4 to 30 ids, padded into batches of 2: padding must not count
    let options = EvalOptions { batch_size: 2, ..EvalOptions::default() };
    let e = pollster::block_on(evaluate(&llm, "ids.jsonl", &data, &options)).unwrap();
    let reference = expected["mean_loss"].as_f64().unwrap();
    assert_eq!((e.examples, e.tokens as u64), (5, expected["tokens"].as_u64().unwrap()));
    assert!((e.mean_loss - reference).abs() < 1e-5 * reference, "mean loss {} vs transformers {reference}", e.mean_loss);
    assert!((e.perplexity - reference.exp()).abs() < 1e-5 * reference.exp(), "perplexity {}", e.perplexity);
    assert_eq!(e.generation, None, "rows of ids have no references");
}

#[test]
fn rouge_l_equals_rouge_score() {
    for case in read_json(fixture("eval/expected.json"))["rouge_l"].as_array().unwrap() {
        let (answer, reference) = (case["answer"].as_str().unwrap(), case["reference"].as_str().unwrap());
        let ours = rouge_l(answer, reference);
        assert!((ours - case["f"].as_f64().unwrap()).abs() < 1e-12, "{answer:?} vs {reference:?}: {ours} vs rouge_score {}", case["f"]);
    }
}

/// Greedy answers scored against themselves (exact match 1, ROUGE-L 1) and against a reference
/// sharing no token (0, 0); a prompt over the context is skipped; a merged adapter scores as the
/// adapter does.
#[test]
fn generation_metrics_by_identity_and_merge_equals_adapter() {
    let mut llm = load(&fixture("tiny-chat"), &cpu());
    pollster::block_on(llm.model.load_adapter("qv", AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap())).unwrap();
    llm.model.set_adapter("qv").unwrap();
    let config = webgpu_lora::GenerationConfig { max_new_tokens: 8, ..Default::default() };
    let answer = |prompt: &[u32]| pollster::block_on(llm.generate_text(prompt, &config, &mut |_| true)).unwrap().1;
    let tokenizer = llm.tokenizer().unwrap();
    let own = answer(&tokenizer.encode("Hello robot", false).unwrap());
    let chat = answer(&llm.chat_ids(&[webgpu_lora::io::ChatMessage::new("user", "Hi")]).unwrap());
    assert!(!own.trim().is_empty() && !chat.trim().is_empty(), "the tiny model answers something: {own:?}, {chat:?}");
    let line = |v: serde_json::Value| v.to_string();
    let data = [
        line(serde_json::json!({"prompt": "Hello robot", "completion": own})),
        line(serde_json::json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": chat}]})),
        line(serde_json::json!({"prompt": "Hello robot", "completion": "\u{2603}"})), // no token rouge_score keeps
        // a prompt longer than the model's context (128): skipped, and counted
        line(serde_json::json!({"prompt": "robot ".repeat(200), "completion": "beep"})),
    ]
    .join("\n");
    let options = EvalOptions { max_new_tokens: 8, ..EvalOptions::default() };
    let adapter = pollster::block_on(evaluate(&llm, "pairs.jsonl", data.as_bytes(), &options)).unwrap();
    let scores = adapter.generation.clone().expect("four pairs");
    assert_eq!((scores.pairs, scores.skipped), (3, 1));
    assert!((scores.exact_match - 2.0 / 3.0).abs() < 1e-12, "{scores:?}");
    assert!((scores.rouge_l - 2.0 / 3.0).abs() < 1e-12, "{scores:?}");

    pollster::block_on(llm.model.merge_and_unload(&[], false)).unwrap();
    let merged = pollster::block_on(evaluate(&llm, "pairs.jsonl", data.as_bytes(), &options)).unwrap();
    assert_eq!(merged.generation, adapter.generation, "the merged model answers as the adapter");
    assert!((merged.mean_loss - adapter.mean_loss).abs() < 1e-4, "merged loss {} vs adapter {}", merged.mean_loss, adapter.mean_loss);
}

/// Bad data is refused naming the file and line, as training refuses it.
#[test]
fn bad_data_is_refused_with_the_line() {
    let llm = load(&fixture("tiny-chat"), &cpu());
    let run = |data: &str| {
        pollster::block_on(evaluate(&llm, "held-out.jsonl", data.as_bytes(), &EvalOptions::default())).unwrap_err().to_string()
    };
    assert_eq!(run(""), "held-out.jsonl: the file is empty: give at least one example");
    let e = run("{\"prompt\": \"Hi\", \"completion\": \"Hello\"}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"beep\"}]}");
    assert!(e.starts_with("held-out.jsonl:2: message 0 has role \"robot\""), "{e}");
}
