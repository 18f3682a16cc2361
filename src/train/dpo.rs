//! Direct preference optimisation of a LoRA adapter, as TRL's `DPOTrainer` computes it with PEFT
//! (sigmoid loss): for a pair of completions of one prompt, chosen `c` and rejected `r`,
//!
//! ```text
//! loss = -log sigmoid(beta ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
//! ```
//!
//! where log pi is the completion's summed token log-probability with the adapter and log ref
//! the same with the adapter disabled (the reference model, without a second copy of it), the
//! loss averaged over the batch's pairs. TRL's metrics: rewards/chosen = beta (log pi(c) - log
//! ref(c)), rewards/rejected likewise, their margin and how often chosen wins.
//!
//! The gradient is SFT's with a weight per sequence: a completion's log-probability is minus its
//! tokens' summed loss, so dLoss/d(token loss) = beta sigmoid(-beta delta) / pairs for the
//! chosen completion's tokens and its negative for the rejected one's. A step computes both
//! log-probabilities without gradients first, then runs the trainer's weighted backward pass
//! ([`LossWeights::PerRow`]). The two passes see the same adapter, so LoRA dropout must be 0.

use burn::tensor::Tensor;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::{ChatMessage, TextTokenizer};
use crate::lora::LoraRun;
use crate::model::{Head, LlamaModel};
use crate::train::data::{Batch, Example, IGNORE, parse_messages};
use crate::train::loss::{LOSS_ROWS, LossWeights, row_losses};
use crate::train::trainer::{LeafPass, constant_copies, part_gradients};

/// A preference pair as token ids: the prompt, and each completion after it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// The pairs of a JSONL file of `{"prompt", "chosen", "rejected"}` lines, tokenized as TRL
/// tokenizes them. As text: the end-of-sequence token appended to each completion that lacks it,
/// the prompt and each prompt + completion tokenized with the tokenizer's special tokens. As
/// conversations (TRL's conversational form: the prompt as messages, each completion as the
/// messages that follow): the prompt rendered by the chat template with the generation prompt,
/// each prompt + completion without it. Either way the prompt is cut where it stops being a
/// prefix of both. `file` names the file in errors.
pub fn read_preferences(file: &str, bytes: &[u8], tokenizer: &TextTokenizer) -> Result<Vec<PreferencePair>> {
    let text = std::str::from_utf8(bytes).map_err(|_| Error::file(file, "not UTF-8 text"))?;
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{file}:{}", index + 1);
        let value: Value = serde_json::from_str(line).map_err(|e| Error::file(&at, format!("invalid JSON: {e}")))?;
        let sides = ["prompt", "chosen", "rejected"].map(|key| match value.get(key) {
            Some(Value::String(s)) => Ok(Side::Text(s.clone())),
            Some(list @ Value::Array(_)) => {
                parse_messages(list).map(Side::Messages).map_err(|e| Error::file(&at, format!("\"{key}\": {e}")))
            }
            _ => Err(Error::file(
                &at,
                format!("missing \"{key}\": each line needs \"prompt\", \"chosen\" and \"rejected\" (text, or messages)"),
            )),
        });
        let [prompt, chosen, rejected] = sides;
        let (prompt, chosen, rejected) = (prompt?, chosen?, rejected?);
        if chosen == rejected {
            return Err(Error::file(&at, "\"chosen\" and \"rejected\" are the same: a pair needs two different completions"));
        }
        let tokenized = |prompt: &Side, completion: &Side| -> Result<[Vec<u32>; 2]> {
            let failed = |e: Error| Error::file(&at, e.to_string());
            match (prompt, completion) {
                (Side::Text(p), Side::Text(c)) => {
                    let eos = tokenizer.eos_token().unwrap_or("");
                    let c = if c.ends_with(eos) { c.clone() } else { format!("{c}{eos}") };
                    Ok([tokenizer.encode(p, true).map_err(failed)?, tokenizer.encode(&format!("{p}{c}"), true).map_err(failed)?])
                }
                (Side::Messages(p), Side::Messages(c)) => {
                    if !tokenizer.has_chat_template() {
                        return Err(Error::file(&at, "conversations need the model's chat template, and this model has none: give text"));
                    }
                    let whole: Vec<ChatMessage> = p.iter().chain(c).cloned().collect();
                    Ok([tokenizer.encode_chat(p, true).map_err(failed)?, tokenizer.encode_chat(&whole, false).map_err(failed)?])
                }
                _ => Err(Error::file(&at, "\"prompt\", \"chosen\" and \"rejected\" must all be text or all be messages")),
            }
        };
        let ([prompt_ids, with_chosen], [_, with_rejected]) = (tokenized(&prompt, &chosen)?, tokenized(&prompt, &rejected)?);
        let common = |ids: &[u32]| prompt_ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        let prompt_len = common(&with_chosen).min(common(&with_rejected));
        pairs.push(PreferencePair {
            prompt: prompt_ids[..prompt_len].to_vec(),
            chosen: with_chosen[prompt_len..].to_vec(),
            rejected: with_rejected[prompt_len..].to_vec(),
        });
    }
    if pairs.is_empty() {
        return Err(Error::file(file, "no preference pairs: give JSONL lines of {\"prompt\", \"chosen\", \"rejected\"}"));
    }
    Ok(pairs)
}

/// One side of a pair as the file gives it.
#[derive(PartialEq)]
enum Side {
    Text(String),
    Messages(Vec<ChatMessage>),
}

/// The batch of `pairs` as TRL lays it out: every chosen sequence (prompt + completion), then
/// every rejected one, right-padded with `pad`; only the completions' tokens are labelled.
pub fn preference_batch(pairs: &[&PreferencePair], pad: u32) -> Batch {
    let example = |prompt: &[u32], completion: &[u32]| {
        let ids = [prompt, completion].concat();
        let labels = prompt.iter().map(|_| IGNORE).chain(completion.iter().map(|&t| t as i32)).collect();
        Example { ids, labels }
    };
    let rows: Vec<Example> =
        pairs.iter().map(|p| example(&p.prompt, &p.chosen)).chain(pairs.iter().map(|p| example(&p.prompt, &p.rejected))).collect();
    Batch::new(&rows.iter().collect::<Vec<_>>(), pad)
}

/// TRL's reward metrics (means over pairs): rewards/chosen, /rejected, /accuracies, /margins.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Rewards {
    /// beta (log pi(c) - log ref(c)).
    pub chosen: f64,
    /// beta (log pi(r) - log ref(r)).
    pub rejected: f64,
    /// The fraction of pairs whose chosen reward is the larger.
    pub accuracies: f64,
    /// chosen minus rejected.
    pub margins: f64,
}

/// What a DPO step reports, as TRL logs it (means over the batch's pairs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DpoStats {
    pub loss: f64,
    pub rewards: Rewards,
}

impl DpoStats {
    /// The mean of several batches' stats (gradient accumulation, evaluation).
    pub fn mean(all: &[DpoStats]) -> DpoStats {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&DpoStats) -> f64| all.iter().map(f).sum::<f64>() / n;
        DpoStats {
            loss: sum(|s| s.loss),
            rewards: Rewards {
                chosen: sum(|s| s.rewards.chosen),
                rejected: sum(|s| s.rewards.rejected),
                accuracies: sum(|s| s.rewards.accuracies),
                margins: sum(|s| s.rewards.margins),
            },
        }
    }
}

/// DPO's loss and metrics for `batch` (a [`preference_batch`]) with the adapter `policy` (no
/// gradients), and the weight of each row's token losses in the loss's gradient; the reference
/// is the model with no adapter. `head` is the model's ([`LlamaModel::head_for_slices`], made
/// once for all of a step's or an evaluation's batches).
pub async fn dpo_stats(
    model: &LlamaModel,
    head: &Head,
    policy: Option<LoraRun<'_>>,
    batch: &Batch,
    beta: f64,
) -> Result<(DpoStats, Vec<f64>)> {
    let ids = || model.ids_batch(&batch.ids, batch.batch, batch.seq);
    let policy = row_losses(head, model.hidden_states_with(ids(), None, policy), batch, LOSS_ROWS).await?;
    let reference = row_losses(head, model.hidden_states_with(ids(), None, None), batch, LOSS_ROWS).await?;
    let pairs = batch.batch / 2;
    // log-ratio of each sequence: log pi - log ref, the losses' difference turned around
    let ratio: Vec<f64> = policy.iter().zip(&reference).map(|(p, r)| r - p).collect();
    let mut stats = DpoStats::default();
    let mut row_weights = vec![0.0; batch.batch];
    for i in 0..pairs {
        let (chosen, rejected) = (beta * ratio[i], beta * ratio[pairs + i]);
        let z = chosen - rejected;
        // -log sigmoid(z) = log(1 + e^-z), and sigmoid(-z), computed without overflow
        stats.loss += (-z).max(0.0) + (-z.abs()).exp().ln_1p();
        let pull = 1.0 / (1.0 + z.exp());
        row_weights[i] = beta * pull / pairs as f64;
        row_weights[pairs + i] = -beta * pull / pairs as f64;
        let r = &mut stats.rewards;
        r.chosen += chosen;
        r.rejected += rejected;
        r.accuracies += f64::from(u8::from(chosen > rejected));
        r.margins += z;
    }
    let r = &mut stats.rewards;
    for value in [&mut stats.loss, &mut r.chosen, &mut r.rejected, &mut r.accuracies, &mut r.margins] {
        *value /= pairs as f64;
    }
    Ok((stats, row_weights))
}

/// Refuses an adapter whose LoRA dropout `p` is not 0: DPO's two passes over a batch (the
/// log-probabilities, then the gradient) must see one adapter.
pub fn check_dropout(p: f64) -> Result<()> {
    match p {
        0.0 => Ok(()),
        p => Err(Error::invalid(format!("DPO: the adapter's lora_dropout must be 0 (--dropout 0, loraDropout: 0), not {p}"))),
    }
}

/// [`dpo_stats`] for `batch` under `run` (the adapter's own autodiff copies, no dropout), and the
/// gradient of each of `leaves`.
pub async fn dpo_gradients(
    model: &LlamaModel,
    head: &Head,
    run: LoraRun<'_>,
    leaves: &[Tensor<2>],
    batch: &Batch,
    beta: f64,
    checkpointing: bool,
) -> Result<(DpoStats, Vec<Tensor<2>>)> {
    if run.dropout.is_some() {
        return Err(Error::invalid("DPO needs lora_dropout = 0: its two passes over a batch must see the same adapter"));
    }
    // the log-probabilities without gradients: the adapter's values as constants
    let weights = run.weights.ok_or_else(|| Error::invalid("DPO trains the adapter's own copies"))?;
    let constants = constant_copies(weights);
    let (stats, row_weights) = dpo_stats(model, head, Some(LoraRun { weights: Some(&constants), ..run }), batch, beta).await?;
    let (_, grads) = part_gradients(model, LeafPass::Adapter(run), head, leaves, batch, LossWeights::PerRow(&row_weights), checkpointing);
    Ok((stats, grads))
}
