//! Training data: JSONL in four shapes, detected per line, or plain text; tokenized into
//! (ids, labels) with PEFT/TRL's conventions:
//!
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the model's chat template; by
//!   default only the assistant turns (their text and end-of-turn token) are trained on.
//! - `{"prompt", "completion"}`: prompt + completion + eos; by default only completion + eos count.
//! - `{"text"}`: text + eos, every token counts.
//! - `{"input_ids", "labels"}`: already tokenized, as transformers' `Trainer` takes a dataset:
//!   the ids as they are, `labels` optional (every token counts without them; -100 = not trained
//!   on). No tokenizer needed.
//! - a plain text file (anything not ending in `.jsonl`): the whole text, cut into blocks of
//!   `max_seq_len` tokens, every token counts.
//!
//! Labels are aligned with ids (-100 = not trained on); the loss shifts them, as transformers does.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::{ChatMessage, TextTokenizer};

/// The label of a token that is not trained on (PyTorch's ignore_index).
pub const IGNORE: i32 = -100;

/// How examples are made from the file (a part of [`TrainOptions`](crate::train::TrainOptions)).
#[derive(Debug, Clone)]
pub struct DataOptions {
    pub max_seq_len: usize,
    /// Train on every token, not only the assistant / completion part.
    pub train_on_everything: bool,
    /// Cut examples longer than max_seq_len (counted in the report) instead of refusing them.
    pub truncate: bool,
    /// Skip bad lines (counted in the report) instead of refusing the file.
    pub skip_bad_lines: bool,
}

impl Default for DataOptions {
    /// [`TrainOptions`](crate::train::TrainOptions)' defaults.
    fn default() -> Self {
        crate::train::TrainOptions::default().data_options()
    }
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Example {
    /// Tokens whose label is trained on (the first token never is: nothing predicts it).
    pub fn trainable_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// What reading a file did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DataReport {
    pub examples: usize,
    /// (line number, problem) of lines skipped with `skip_bad_lines`.
    pub skipped: Vec<(usize, String)>,
    /// Examples cut to max_seq_len (with `truncate`).
    pub truncated: usize,
    pub tokens: usize,
    pub trainable_tokens: usize,
}

/// The examples of one file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub report: DataReport,
}

/// The model's tokenizer and eos id, which every shape but `input_ids` needs.
#[derive(Clone, Copy)]
struct Text<'a>(Option<&'a TextTokenizer>);

impl<'a> Text<'a> {
    fn needed(self) -> std::result::Result<(&'a TextTokenizer, u32), String> {
        let tokenizer = self.0.ok_or(
            "text needs the model's tokenizer (tokenizer.json), and this model has none: give token ids as {\"input_ids\", \"labels\"} lines",
        )?;
        let eos = tokenizer.eos_token_id().ok_or("the tokenizer names no eos_token (tokenizer_config.json): cannot end examples")?;
        Ok((tokenizer, eos))
    }
}

/// Reads a training file: JSONL when `file` ends in `.jsonl` (or `.json`), plain text otherwise.
/// `tokenizer` is the model's, if it has one.
/// Whether `file` is read as JSONL (one example per line) rather than plain text: by its name.
pub fn is_jsonl(file: &str) -> bool {
    file.ends_with(".jsonl") || file.ends_with(".json")
}

pub fn read_dataset(file: &str, bytes: &[u8], tokenizer: Option<&TextTokenizer>, options: &DataOptions) -> Result<Dataset> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::file(file, format!("not UTF-8 text: {e}")))?;
    if text.trim().is_empty() {
        return Err(Error::file(file, "the file is empty: give at least one example"));
    }
    if options.max_seq_len < 2 {
        return Err(Error::invalid(format!("max_seq_len = {}: needs at least 2 tokens", options.max_seq_len)));
    }
    let examples = if is_jsonl(file) {
        read_jsonl(file, text, Text(tokenizer), options)?
    } else {
        let (tokenizer, eos) = Text(tokenizer).needed().map_err(|problem| Error::file(file, problem))?;
        let mut ids = tokenizer.encode(text, false)?;
        ids.push(eos);
        let examples: Vec<Example> = ids
            .chunks(options.max_seq_len)
            .filter(|c| c.len() >= 2)
            .map(|c| Example { ids: c.to_vec(), labels: c.iter().map(|&i| i as i32).collect() })
            .collect();
        (examples, DataReport::default())
    };
    let (examples, mut report) = examples;
    report.examples = examples.len();
    report.tokens = examples.iter().map(|e| e.ids.len()).sum();
    report.trainable_tokens = examples.iter().map(Example::trainable_tokens).sum();
    if report.trainable_tokens == 0 {
        return Err(Error::file(
            file,
            "no trainable tokens: every label is masked (no assistant turn or completion?); add them, or train on everything",
        ));
    }
    Ok(Dataset { examples, report })
}

fn read_jsonl(file: &str, text: &str, tokenizer: Text, options: &DataOptions) -> Result<(Vec<Example>, DataReport)> {
    let mut report = DataReport::default();
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        let parsed = serde_json::from_str::<Value>(line)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|value| tokenize_line(&value, tokenizer, options));
        let example = match parsed {
            Ok(example) => example,
            Err(problem) if options.skip_bad_lines => {
                report.skipped.push((number, problem));
                continue;
            }
            Err(problem) => {
                return Err(Error::file(
                    format!("{file}:{number}"),
                    format!(
                        "{problem}, or remove the line (training can leave such lines out: skip_bad_lines; CLI --skip-bad-lines, JS skipBadLines)"
                    ),
                ));
            }
        };
        let example = if example.ids.len() > options.max_seq_len {
            if !options.truncate {
                return Err(Error::file(
                    format!("{file}:{number}"),
                    format!(
                        "the example has {} tokens, more than max_seq_len = {}: raise max_seq_len or allow truncation",
                        example.ids.len(),
                        options.max_seq_len
                    ),
                ));
            }
            report.truncated += 1;
            Example { ids: example.ids[..options.max_seq_len].to_vec(), labels: example.labels[..options.max_seq_len].to_vec() }
        } else {
            example
        };
        examples.push(example);
    }
    Ok((examples, report))
}

/// One line's example, or what is wrong with it.
fn tokenize_line(value: &Value, text: Text, options: &DataOptions) -> std::result::Result<Example, String> {
    if let Some(ids) = value.get("input_ids") {
        return tokenized_line(ids, value.get("labels"));
    }
    let (tokenizer, eos) = text.needed()?;
    let text_of = |key: &str| value.get(key).map(|v| v.as_str().map(str::to_string).ok_or_else(|| format!("\"{key}\" must be a string")));
    let encode = |text: &str| tokenizer.encode(text, false).map_err(|e| e.to_string());
    let labelled = |ids: &[u32], trained: bool| -> Vec<i32> {
        ids.iter().map(|&i| if trained || options.train_on_everything { i as i32 } else { IGNORE }).collect()
    };
    if let Some(messages) = value.get("messages") {
        let messages = parse_messages(messages)?;
        if !tokenizer.has_chat_template() {
            return Err(
                "\"messages\" needs the model's chat template, and this model has none: use \"prompt\"/\"completion\" or \"text\"".into()
            );
        }
        // each assistant turn is what the template adds after the conversation so far plus the
        // generation prompt; everything else is context
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for end in 0..messages.len() {
            let before = if messages[end].role == "assistant" {
                tokenizer.encode_chat(&messages[..end], true).map_err(|e| e.to_string())?
            } else {
                ids.clone()
            };
            let upto = tokenizer.encode_chat(&messages[..=end], false).map_err(|e| e.to_string())?;
            if !upto.starts_with(&ids) || !upto.starts_with(&before) {
                return Err("the chat template does not render the conversation as a growing prefix: train on \"text\" instead".into());
            }
            labels.extend(labelled(&upto[ids.len()..before.len().max(ids.len())], false));
            labels.extend(labelled(&upto[before.len().max(ids.len())..], messages[end].role == "assistant"));
            ids = upto;
        }
        if !messages.iter().any(|m| m.role == "assistant") && !options.train_on_everything {
            return Err("the conversation has no assistant message to train on".into());
        }
        return Ok(Example { ids, labels });
    }
    match (text_of("prompt"), text_of("completion"), text_of("text")) {
        (Some(prompt), Some(completion), None) => {
            let (prompt, completion) = (encode(&prompt?)?, encode(&completion?)?);
            let mut ids = prompt.clone();
            ids.extend(&completion);
            ids.push(eos);
            let mut labels = labelled(&prompt, false);
            labels.extend(labelled(&ids[prompt.len()..], true));
            Ok(Example { ids, labels })
        }
        (None, None, Some(text)) => {
            let mut ids = encode(&text?)?;
            ids.push(eos);
            let labels = labelled(&ids, true);
            Ok(Example { ids, labels })
        }
        _ => Err("expected {\"messages\": [...]}, {\"prompt\", \"completion\"}, {\"text\"} or {\"input_ids\"}".into()),
    }
}

/// An already tokenized line: `input_ids`, and `labels` of the same length (-100 or an id) or
/// none (every token trained on).
fn tokenized_line(ids: &Value, labels: Option<&Value>) -> std::result::Result<Example, String> {
    // token ids as i32 (what a label holds), or -100 where `label`
    let list = |key: &str, value: &Value, label: bool| -> std::result::Result<Vec<i32>, String> {
        let items = value.as_array().filter(|l| !l.is_empty()).ok_or(format!("\"{key}\" must be a non-empty list of token ids"))?;
        let id = |(i, v): (usize, &Value)| {
            let n = v.as_i64().and_then(|n| i32::try_from(n).ok()).filter(|&n| n >= 0 || (label && n == IGNORE));
            n.ok_or(format!("\"{key}\"[{i}] = {v} is not a token id{}", if label { " or -100 (not trained on)" } else { "" }))
        };
        items.iter().enumerate().map(id).collect()
    };
    let ids = list("input_ids", ids, false)?;
    let labels = match labels {
        None => ids.clone(),
        Some(value) => list("labels", value, true)?,
    };
    if labels.len() != ids.len() {
        return Err(format!("\"labels\" has {} entries and \"input_ids\" {}: give one label per token", labels.len(), ids.len()));
    }
    Ok(Example { ids: ids.into_iter().map(|i| i as u32).collect(), labels })
}

/// A `"messages"` list: each a {role, content} of a known role.
pub(crate) fn parse_messages(value: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let list = value.as_array().filter(|l| !l.is_empty()).ok_or("\"messages\" must be a non-empty list")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or(format!("message {i} has no \"role\" string"))?;
            let content = m.get("content").and_then(Value::as_str).ok_or(format!("message {i} has no \"content\" string"))?;
            if !["system", "user", "assistant"].contains(&role) {
                return Err(format!("message {i} has role {role:?}; use \"system\", \"user\" or \"assistant\""));
            }
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

impl Dataset {
    /// Splits off a validation set: `fraction` of the examples (at least one), chosen with `seed`.
    /// The training part keeps what reading the file reported (skipped lines, truncations).
    pub fn split(mut self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::invalid(format!("validation split {fraction}: must be between 0 and 1")));
        }
        let n = self.examples.len();
        let n_val = ((n as f64 * fraction).round() as usize).max(1);
        if n_val >= n {
            return Err(Error::invalid(format!("validation split {fraction} of {n} examples leaves none to train on")));
        }
        self.examples.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let val = self.examples.split_off(n - n_val);
        let mut train = Dataset::from_examples(self.examples);
        (train.report.skipped, train.report.truncated) = (self.report.skipped, self.report.truncated);
        Ok((train, Dataset::from_examples(val)))
    }

    pub fn from_examples(examples: Vec<Example>) -> Self {
        let report = DataReport {
            examples: examples.len(),
            tokens: examples.iter().map(|e| e.ids.len()).sum(),
            trainable_tokens: examples.iter().map(Example::trainable_tokens).sum(),
            ..Default::default()
        };
        Dataset { examples, report }
    }

    /// Concatenates examples into sequences of up to `max_seq_len` tokens (fewer, shorter
    /// sequences). Tokens of one example can attend to the previous example in the same row, but
    /// no label crosses the boundary: an example's first token is not trained on (as it is not
    /// alone), so the trainable tokens are the unpacked examples' own.
    pub fn packed(&self, max_seq_len: usize) -> Dataset {
        let mut out: Vec<Example> = Vec::new();
        let mut current = Example { ids: Vec::new(), labels: Vec::new() };
        for e in &self.examples {
            if !current.ids.is_empty() && current.ids.len() + e.ids.len() > max_seq_len {
                out.push(std::mem::replace(&mut current, Example { ids: Vec::new(), labels: Vec::new() }));
            }
            current.ids.extend(&e.ids);
            current.labels.push(IGNORE);
            current.labels.extend(e.labels.iter().skip(1));
        }
        if !current.ids.is_empty() {
            out.push(current);
        }
        Dataset::from_examples(out)
    }
}

/// A batch padded on the right: ids [batch, seq] (padding = `pad`), labels with IGNORE on padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub batch: usize,
    pub seq: usize,
    /// Tokens that are not padding.
    pub tokens: usize,
}

impl Batch {
    pub fn new(examples: &[&Example], pad: u32) -> Batch {
        let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let (mut ids, mut labels) = (Vec::with_capacity(examples.len() * seq), Vec::with_capacity(examples.len() * seq));
        for e in examples {
            ids.extend(&e.ids);
            ids.extend(std::iter::repeat_n(pad, seq - e.ids.len()));
            labels.extend(&e.labels);
            labels.extend(std::iter::repeat_n(IGNORE, seq - e.ids.len()));
        }
        Batch { ids, labels, batch: examples.len(), seq, tokens: examples.iter().map(|e| e.ids.len()).sum() }
    }

    /// The rows split into up to `parts` batches of consecutive rows (sizes differing by at most
    /// one; fewer parts when there are fewer rows), for running parts of one micro-batch on
    /// separate threads. A part's `tokens` is its rows' share of the batch's, rounded: only whole
    /// batches' counts are reported.
    pub fn split_rows(&self, parts: usize) -> Vec<Batch> {
        let parts = parts.clamp(1, self.batch.max(1));
        let mut start = 0;
        (0..parts)
            .map(|k| {
                let rows = self.batch / parts + usize::from(k < self.batch % parts);
                let span = start * self.seq..(start + rows) * self.seq;
                let tokens = (self.tokens * (start + rows)) / self.batch - (self.tokens * start) / self.batch;
                start += rows;
                Batch { ids: self.ids[span.clone()].to_vec(), labels: self.labels[span].to_vec(), batch: rows, seq: self.seq, tokens }
            })
            .collect()
    }

    /// Tokens that are trained on (labels after the shift).
    pub fn trainable_tokens(&self) -> usize {
        self.labels.chunks(self.seq).map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE).count()).sum()
    }
}

/// The batches of one epoch: examples shuffled with (seed, epoch), `batch_size` at a time (the
/// last batch may be smaller).
pub fn epoch_batches<T>(items: &[T], batch_size: usize, seed: u64, epoch: usize, batch: impl Fn(&[&T]) -> Batch) -> Vec<Batch> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64 * 0x9E37_79B9)));
    order.chunks(batch_size).map(|chunk| batch(&chunk.iter().map(|&i| &items[i]).collect::<Vec<_>>())).collect()
}

/// Batches in file order (for evaluation).
pub fn ordered_batches<T>(items: &[T], batch_size: usize, batch: impl Fn(&[&T]) -> Batch) -> Vec<Batch> {
    items.chunks(batch_size).map(|chunk| batch(&chunk.iter().collect::<Vec<_>>())).collect()
}
