//! Evaluation of the model as it is (its running adapter, merged or not) on held-out data, as the
//! course compares a base model, an adapter and its merge:
//!
//! ```text
//! mean token loss = sum of -log p(label) over the counted tokens / their number  (the training loss)
//! perplexity      = exp(mean token loss)
//! exact match     = the share of pairs whose greedy answer equals the reference (both trimmed)
//! ROUGE-L         = the mean over pairs of F(LCS) = 2 P R / (P + R),  P = LCS / |answer|, R = LCS / |reference|
//! ```
//!
//! LCS is the longest common subsequence of tokens made as `rouge_score` makes them (its default,
//! no stemming): lowercase, runs of ASCII letters and digits, everything else a separator. The
//! pairs are the data's lines with a reference: `{"prompt", "completion"}` (the prompt continued as
//! it is, encoded as training encodes it) and `{"messages"}` ending with an assistant message (the
//! conversation before it rendered with the chat template). Other lines count for the loss only;
//! an answer stops at the model's context, and a prompt that fills it is skipped (and counted).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
use crate::llm::Llm;
use crate::train::data::{Batch, DataOptions, is_jsonl, ordered_batches, parse_messages, read_dataset};
use crate::train::trainer;

/// What to evaluate and how (camelCase in JS: maxSeqLen, batchSize, maxNewTokens).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct EvalOptions {
    /// Longer examples are cut to this many tokens for the loss.
    pub max_seq_len: usize,
    pub batch_size: usize,
    /// The longest greedy answer of a pair; 0 skips the generation metrics.
    pub max_new_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { max_seq_len: DataOptions::default().max_seq_len, batch_size: 4, max_new_tokens: 64 }
    }
}

/// The scores of one model on one data file.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    pub examples: usize,
    /// The tokens the loss counts (completions and assistant turns; every token of plain text).
    pub tokens: usize,
    pub mean_loss: f64,
    pub perplexity: f64,
    /// Exact match and ROUGE-L over the pairs, when the data has any and generation is asked for.
    pub generation: Option<GenerationScores>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerationScores {
    /// The pairs scored.
    pub pairs: usize,
    /// Pairs whose prompt fills the model's context, leaving no room for an answer: not scored.
    pub skipped: usize,
    pub exact_match: f64,
    pub rouge_l: f64,
}

/// Evaluates `llm` as it is on the data `bytes` (JSONL as training reads it, or plain text);
/// `file` names it in errors.
pub async fn evaluate(llm: &Llm, file: &str, bytes: &[u8], options: &EvalOptions) -> Result<Evaluation> {
    let data = DataOptions { max_seq_len: options.max_seq_len, truncate: true, ..DataOptions::default() };
    let dataset = read_dataset(file, bytes, llm.tokenizer.as_ref(), &data)?;
    let pad = llm.model.config.pad_token_id();
    let batches = ordered_batches(&dataset.examples, options.batch_size.max(1), |rows| Batch::new(rows, pad));
    let mean_loss = trainer::evaluate(&llm.model, &batches).await?;
    let tokens = batches.iter().map(|b| b.trainable_tokens()).sum();

    let pairs = if options.max_new_tokens > 0 && is_jsonl(file) { reference_pairs(llm, file, bytes)? } else { vec![] };
    let mut generation = None;
    if !pairs.is_empty() {
        let context = llm.model.config.max_position_embeddings;
        let (mut exact, mut rouge, mut scored) = (0.0, 0.0, 0);
        for (prompt, reference) in pairs.iter().filter(|(prompt, _)| prompt.len() < context) {
            let max_new_tokens = options.max_new_tokens.min(context - prompt.len());
            let config = GenerationConfig { max_new_tokens, ..GenerationConfig::default() };
            let (_, answer) = llm.generate_text(prompt, &config, &mut |_| true).await?;
            exact += f64::from(u8::from(answer.trim() == reference.trim()));
            rouge += rouge_l(&answer, reference);
            scored += 1;
        }
        let n = scored.max(1) as f64;
        generation = Some(GenerationScores { pairs: scored, skipped: pairs.len() - scored, exact_match: exact / n, rouge_l: rouge / n });
    }
    Ok(Evaluation { examples: dataset.examples.len(), tokens, mean_loss, perplexity: mean_loss.exp(), generation })
}

/// The (prompt ids, reference text) of every line that has a reference.
fn reference_pairs(llm: &Llm, file: &str, bytes: &[u8]) -> Result<Vec<(Vec<u32>, String)>> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::file(file, format!("not UTF-8 text: {e}")))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = |e: &dyn std::fmt::Display| Error::file(file, format!("line {}: {e}", i + 1));
        let value: Value = serde_json::from_str(line).map_err(|e| at(&e))?;
        let text_of = |key: &str| value.get(key).and_then(Value::as_str);
        if let (Some(prompt), Some(completion)) = (text_of("prompt"), text_of("completion")) {
            pairs.push((llm.tokenizer()?.encode(prompt, false)?, completion.to_string()));
        } else if let Some(messages) = value.get("messages") {
            let messages = parse_messages(messages).map_err(|e| at(&e))?;
            if let Some((last, before)) = messages.split_last().filter(|(last, before)| last.role == "assistant" && !before.is_empty()) {
                pairs.push((llm.chat_ids(before)?, last.content.clone()));
            }
        }
    }
    Ok(pairs)
}

/// ROUGE-L's F-measure of `answer` against `reference` (0 when either has no tokens).
pub fn rouge_l(answer: &str, reference: &str) -> f64 {
    let (a, r) = (rouge_tokens(answer), rouge_tokens(reference));
    if a.is_empty() || r.is_empty() {
        return 0.0;
    }
    let lcs = lcs_length(&a, &r) as f64;
    let (precision, recall) = (lcs / a.len() as f64, lcs / r.len() as f64);
    if lcs == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) }
}

/// `rouge_score`'s default tokens: lowercase runs of ASCII letters and digits.
fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_ascii_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_string).collect()
}

/// The length of the longest common subsequence, one row of the table at a time.
fn lcs_length(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { above.max(row[j]) };
            diagonal = above;
        }
    }
    row[b.len()]
}
