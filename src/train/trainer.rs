//! The SFT loop for one LoRA adapter: only its A and B get gradients (they are the only tensors
//! put on autodiff; the frozen base stays plain, so it holds no gradient buffers and no optimizer
//! state). Per optimizer step: `grad_accum` micro-batches, loss = summed token loss / the step's
//! trainable tokens, global-norm clipping, AdamW with warmup + decay. Evaluation, early stopping
//! with best-adapter restore, checkpoints (handed to the caller as files), cancel, resume and a
//! NaN/Inf guard that keeps the last good adapter.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::safetensors::write_safetensors;
use crate::io::{SafetensorsWeights, StoreDtype};
use crate::lora::{AdapterFiles, AdapterWeights, DropoutMasks, LoraLayers, LoraModel, LoraRun, LoraWeights, PartDropout};
use crate::model::{Head, LlamaModel};
use crate::tensor::{HostTensor, read_host, read_scalar, upload};
use crate::train::TrainOptions;
use crate::train::data::{Batch, epoch_batches, ordered_batches};
use crate::train::dpo::{DpoStats, Rewards, dpo_gradients, dpo_stats};
use crate::train::loss::{LOSS_ROWS, LossWeights, head_loss_backward, summed_token_loss};
use crate::train::optimizer::{clip_factor, global_norm};
use crate::train::options::Method;

/// Metrics of one optimizer step.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    /// Before clipping.
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
    /// DPO's reward metrics of the step (`loss` is then DPO's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewards: Option<Rewards>,
}

/// What an optimizer step gives: the loss, the gradient norm before clipping, the learning rate
/// and, for DPO, the reward metrics.
struct StepOutcome {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    rewards: Option<Rewards>,
}

/// What the trainer reports as it goes.
#[derive(Clone)]
pub enum TrainEvent {
    Step(StepMetrics),
    Eval {
        step: usize,
        val_loss: f64,
        best: bool,
    },
    /// The adapter and the trainer state after `step`: save both to resume from here.
    Checkpoint {
        step: usize,
        adapter: Box<AdapterFiles>,
        state: Vec<u8>,
    },
}

impl TrainEvent {
    /// The event as one JSON object (checkpoints by step only), e.g. for a JSONL log.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            TrainEvent::Step(m) => serde_json::json!({"event": "step", "metrics": m}),
            TrainEvent::Eval { step, val_loss, best } => {
                serde_json::json!({"event": "eval", "step": step, "valLoss": val_loss, "best": best})
            }
            TrainEvent::Checkpoint { step, .. } => serde_json::json!({"event": "checkpoint", "step": step}),
        }
    }
}

/// Whether to go on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Why training ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TrainEnd {
    Completed,
    EarlyStopped,
    Cancelled,
}

/// The outcome, stored beside the adapter (training_summary.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainSummary {
    pub steps: usize,
    pub tokens: usize,
    pub final_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub elapsed_s: f64,
    pub end: TrainEnd,
}

/// What a checkpoint needs besides the adapter to continue exactly: the step reached, AdamW's
/// moments and the early-stopping bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateHeader {
    step: usize,
    tokens: usize,
    best_val_loss: Option<f64>,
    best_step: Option<usize>,
    evals_without_improvement: usize,
}

/// The adapter being trained, held by the run (the model only sees its values between steps):
/// its modules in model order and AdamW's moments (m, v) of each matrix, A then B per module.
struct Trainee {
    adapter: String,
    modules: Vec<String>,
    moments: Vec<(Tensor<2>, Tensor<2>)>,
}

impl Trainee {
    /// Adapter `adapter` of `model`, with zero moments.
    fn new(model: &LlamaModel, adapter: &str) -> Result<Self> {
        let weights = model.adapter_weights(adapter)?;
        let modules: Vec<String> = model.lora_linears().filter(|l| weights.contains_key(&l.name)).map(|l| l.name.clone()).collect();
        let zeros = |t: &Tensor<2>| Tensor::zeros(t.dims(), &t.device());
        let moments = modules.iter().flat_map(|m| [&weights[m].a_t, &weights[m].b_t]).map(|t| (zeros(t), zeros(t))).collect();
        Ok(Trainee { adapter: adapter.to_string(), modules, moments })
    }

    /// The adapter's matrices in moment order.
    fn flat(&self, weights: &AdapterWeights) -> Vec<Tensor<2>> {
        self.modules.iter().flat_map(|m| [weights[m].a_t.clone(), weights[m].b_t.clone()]).collect()
    }

    /// `weights` with its matrices replaced by `flat` (in moment order).
    fn unflat(&self, weights: &AdapterWeights, flat: Vec<Tensor<2>>) -> AdapterWeights {
        let mut flat = flat.into_iter();
        let mut next = || flat.next().expect("one tensor per matrix");
        self.modules.iter().map(|m| (m.clone(), LoraWeights { a_t: next(), b_t: next(), scaling: weights[m].scaling })).collect()
    }
}

/// One optimizer step's summed loss and gradients (in moment order) at `weights`: a
/// forward/backward per micro-batch with the adapter's matrices as the only autodiff leaves, each
/// micro-batch's summed token loss divided by the whole group's trainable tokens, gradients
/// summed. With `options.threads` > 1 each micro-batch's rows are split into parts run in parallel on
/// rayon's pool (the one burn's CPU GEMM uses, so the parts share the cores rather than
/// oversubscribe them), each part with its own leaves (and so its own autodiff graph).
/// `dropout`: LoRA dropout's p (the masks the unsplit pass would draw, see `lora::dropout`).
/// The model is not changed.
async fn group_gradients(
    model: &LlamaModel,
    trainee: &Trainee,
    weights: &AdapterWeights,
    group: &[Batch],
    seed: u64,
    dropout: f64,
    options: &TrainOptions,
) -> Result<(f64, Vec<Tensor<2>>)> {
    // no more parts than the largest micro-batch has rows to give them
    let threads = options.threads.unwrap_or(1).clamp(1, group.iter().map(|b| b.batch).max().unwrap_or(1).max(1));
    let checkpointing = options.gradient_checkpointing;
    // one head for all parts: a quantized one is dequantized once a step, not once a thread
    let head = model.head_for_slices();
    let leaves: Vec<AdapterWeights> = (0..threads).map(|_| autodiff_leaves(weights)).collect();
    let scale = 1.0 / group.iter().map(Batch::trainable_tokens).sum::<usize>().max(1) as f64;
    let mut grads: Option<Vec<Tensor<2>>> = None;
    let mut loss_sum = 0.0;
    for (i, batch) in group.iter().enumerate() {
        model.device().seed(seed ^ i as u64);
        let parts = batch.split_rows(threads);
        let starts: Vec<usize> =
            parts.iter().scan(0, |start, part| Some(std::mem::replace(start, *start + part.batch * part.seq))).collect();
        let masks =
            (dropout > 0.0).then(|| DropoutMasks::new(dropout, batch.batch * batch.seq, parts.len(), 1 + usize::from(checkpointing)));
        let run = |k: usize, part: &Batch| {
            let dropout = masks.as_ref().map(|m| m.part(starts[k]..starts[k] + part.batch * part.seq));
            let run = LoraRun { adapter: &trainee.adapter, weights: Some(&leaves[k]), dropout: dropout.as_ref() };
            part_gradients(model, &head, run, &trainee.flat(&leaves[k]), part, LossWeights::Uniform(scale), checkpointing)
        };
        let results: Vec<(Tensor<1>, Vec<Tensor<2>>)> = if parts.len() == 1 {
            vec![run(0, &parts[0])]
        } else {
            use rayon::prelude::*;
            parts.par_iter().enumerate().map(|(k, part)| run(k, part)).collect()
        };
        for (loss, these) in results {
            loss_sum += read_scalar(loss).await?;
            grads = Some(match grads {
                None => these,
                Some(acc) => acc.into_iter().zip(these).map(|(a, b)| a + b).collect(),
            });
        }
    }
    Ok((loss_sum, grads.expect("a step has a batch")))
}

/// DPO's [`group_gradients`]: each micro-batch of pairs' loss and gradients
/// ([`dpo_gradients`]), averaged over the group, with the stats.
async fn dpo_group_gradients(
    model: &LlamaModel,
    trainee: &Trainee,
    weights: &AdapterWeights,
    group: &[Batch],
    options: &TrainOptions,
) -> Result<(DpoStats, Vec<Tensor<2>>)> {
    let mut grads: Option<Vec<Tensor<2>>> = None;
    let mut stats = Vec::with_capacity(group.len());
    // one head for the step: a quantized one is dequantized once, not once a pass
    let head = model.head_for_slices();
    for batch in group {
        let leaves = autodiff_leaves(weights);
        let run = LoraRun { adapter: &trainee.adapter, weights: Some(&leaves), dropout: None };
        let (these, g) =
            dpo_gradients(model, &head, run, &trainee.flat(&leaves), batch, options.beta, options.gradient_checkpointing).await?;
        stats.push(these);
        let g: Vec<Tensor<2>> = g.into_iter().map(|g| g.div_scalar(group.len() as f64)).collect();
        grads = Some(match grads {
            None => g,
            Some(acc) => acc.into_iter().zip(g).map(|(a, b)| a + b).collect(),
        });
    }
    Ok((DpoStats::mean(&stats), grads.expect("a step has a batch")))
}

/// DPO's loss and rewards of `batches` of pairs under the model as it is (no gradients).
pub async fn dpo_evaluate(model: &LlamaModel, batches: &[Batch], beta: f64) -> Result<DpoStats> {
    let mut stats = Vec::with_capacity(batches.len());
    let head = model.head_for_slices();
    for batch in batches {
        stats.push(dpo_stats(model, &head, model.adapters.running(), batch, beta).await?.0);
    }
    Ok(DpoStats::mean(&stats))
}

/// The plain values of an adapter's autodiff matrices: a pass with them records nothing.
pub fn constant_copies(weights: &AdapterWeights) -> AdapterWeights {
    weights.iter().map(|(m, w)| (m.clone(), w.map(|t| t.clone().inner()))).collect()
}

/// A copy of an adapter's matrices as autodiff leaves that require a gradient (each copy has its
/// own graph), to run through [`LoraRun::weights`].
pub fn autodiff_leaves(weights: &AdapterWeights) -> AdapterWeights {
    let leaf = |t: &Tensor<2>| t.clone().autodiff().require_grad();
    weights.iter().map(|(m, w)| (m.clone(), w.map(leaf))).collect()
}

/// The summed token loss of `batch` (each token's weighted by `loss_weights` in the gradient) under
/// `run`, and the gradient of each of `leaves` (the autodiff matrices `run` reads); `head` is the model's
/// ([`LlamaModel::head_for_slices`], shared by the parts of a step). With `checkpointing`
/// (transformers' gradient checkpointing) the forward pass keeps only each layer's input, and
/// the backward pass runs the layers again one at a time, last first: one layer's activations
/// exist at a time instead of every layer's, for one more forward pass of compute.
pub fn part_gradients(
    model: &LlamaModel,
    head: &Head,
    run: LoraRun,
    leaves: &[Tensor<2>],
    batch: &Batch,
    loss_weights: LossWeights,
    checkpointing: bool,
) -> (Tensor<1>, Vec<Tensor<2>>) {
    let ids = model.ids_batch(&batch.ids, batch.batch, batch.seq);
    if !checkpointing {
        let hidden = model.hidden_states_with(ids, None, Some(run));
        let (surrogate, loss) = head_loss_backward(head, hidden, batch, loss_weights, LOSS_ROWS);
        let g = surrogate.backward();
        return (loss, leaves.iter().map(|l| l.grad(&g).expect("a trainable leaf has a gradient")).collect());
    }
    // forward with the adapter's values as constants, so nothing is recorded: each layer's input,
    // and which dropout mask the layer starts at
    let constants = constant_copies(run.weights.expect("training runs its own matrices"));
    let unrecorded = LoraRun { weights: Some(&constants), ..run };
    let mask_at = || run.dropout.map_or(0, PartDropout::position);
    let (mut h, at) = model.decoder_input(ids, 0);
    let mut inputs = Vec::with_capacity(model.layers.len());
    for i in 0..model.layers.len() {
        inputs.push((h.clone(), mask_at()));
        h = model.layer_forward(i, h, &at, Some(unrecorded));
    }
    // backward: the head's gradient of the last layer's output, then each layer again, recorded
    let out = h.autodiff().require_grad();
    let (surrogate, loss) = head_loss_backward(head, model.norm.forward(out.clone()), batch, loss_weights, LOSS_ROWS);
    let mut upstream = out.grad(&surrogate.backward()).expect("the loss depends on the last layer");
    let mut grads: Vec<Option<Tensor<2>>> = vec![None; leaves.len()];
    for (i, (input, mask)) in inputs.into_iter().enumerate().rev() {
        run.dropout.inspect(|d| d.seek(mask));
        let x = input.autodiff().require_grad();
        let g = (model.layer_forward(i, x.clone(), &at, Some(run)) * upstream).sum().backward();
        upstream = x.grad(&g).expect("a layer's output depends on its input");
        for (leaf, grad) in leaves.iter().zip(&mut grads) {
            if let Some(g) = leaf.grad(&g) {
                *grad = Some(grad.take().map_or(g.clone(), |sum| sum + g));
            }
        }
    }
    (loss, grads.into_iter().map(|g| g.expect("a trainable leaf has a gradient")).collect())
}

/// The mean token loss of `batches` under the model as it is (no dropout, no gradients).
pub async fn evaluate(model: &LlamaModel, batches: &[Batch]) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0);
    let head = model.head_for_slices();
    for batch in batches {
        let hidden = model.hidden_states(model.ids_batch(&batch.ids, batch.batch, batch.seq), None);
        let (loss, n) = summed_token_loss(&head, hidden, batch, LOSS_ROWS);
        sum += read_scalar(loss).await?;
        count += n;
    }
    if count == 0 {
        return Err(Error::invalid("the validation set has no trainable tokens"));
    }
    Ok(sum / count as f64)
}

/// The run's optimizer steps, each a group of up to `grad_accum` micro-batches: epochs of
/// shuffled batches (seeded; in file order without `shuffle`), cut at `max_steps`; and how many
/// steps make an epoch.
pub fn plan_steps<T>(items: &[T], options: &TrainOptions, batch: impl Fn(&[&T]) -> Batch) -> (Vec<Vec<Batch>>, usize) {
    let micro_per_epoch = items.len().div_ceil(options.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(options.grad_accum);
    let total = options.max_steps.unwrap_or(options.epochs * steps_per_epoch);
    let mut steps = Vec::with_capacity(total);
    for epoch in 0.. {
        if steps.len() >= total || steps_per_epoch == 0 {
            break;
        }
        let batches = if options.shuffle {
            epoch_batches(items, options.batch_size, options.seed, epoch, &batch)
        } else {
            ordered_batches(items, options.batch_size, &batch)
        };
        steps.extend(batches.chunks(options.grad_accum).map(<[Batch]>::to_vec).take(total - steps.len()));
    }
    (steps, steps_per_epoch)
}

/// A training run in progress: the model, the adapter, the settings and the bookkeeping a
/// checkpoint saves.
struct Run<'a> {
    model: &'a mut LlamaModel,
    trainee: Trainee,
    options: &'a TrainOptions,
    header: StateHeader,
    total_steps: usize,
    /// Only labels events.
    steps_per_epoch: usize,
    /// Where this run (re)started: (step, tokens).
    started_at: (usize, usize),
}

impl Run<'_> {
    /// Optimizer step `t` (from 1) over `group`: the adapter moves only if the loss is finite.
    async fn step(&mut self, t: usize, group: &[Batch]) -> Result<StepOutcome> {
        let options = self.options;
        let adapter = &self.trainee.adapter;
        let dropout = self.model.known_adapter(adapter)?.lora_dropout;
        let weights = self.model.adapter_weights(adapter)?;
        let seed = options.seed ^ ((t as u64) << 8);
        let (loss, grads, rewards) = match options.method {
            Method::Sft => {
                let (loss, grads) = group_gradients(self.model, &self.trainee, &weights, group, seed, dropout, options).await?;
                (loss, grads, None)
            }
            Method::Dpo if dropout != 0.0 => {
                return Err(Error::invalid(format!(
                    "DPO: the adapter's lora_dropout must be 0 (--dropout 0, loraDropout: 0), not {dropout}"
                )));
            }
            Method::Dpo => {
                let (stats, grads) = dpo_group_gradients(self.model, &self.trainee, &weights, group, options).await?;
                (stats.loss, grads, Some(stats.rewards))
            }
        };
        self.header.tokens += group.iter().map(|b| b.tokens).sum::<usize>();
        if !loss.is_finite() {
            return Err(Error::invalid(format!(
                "the loss became {loss} at step {t}: training stopped and the adapter is as it was after step {} (lower the learning rate or check the data)",
                t - 1
            )));
        }
        let grad_norm = global_norm(&grads).await?;
        let factor = options.clip_norm().map_or(1.0, |max| clip_factor(grad_norm, max));
        let lr = options.lr * options.schedule.factor(t - 1, options.warmup_steps, self.total_steps);
        let optimizer = options.optimizer();
        let mut updated = Vec::with_capacity(grads.len());
        // the moments given up to the update, which writes the new ones where they were
        let moments = std::mem::take(&mut self.trainee.moments);
        assert_eq!(moments.len(), grads.len(), "one (m, v) per trained matrix");
        for ((value, g), (m, v)) in self.trainee.flat(&weights).into_iter().zip(grads).zip(moments) {
            let (new, new_m, new_v) = optimizer.update(value, g, m, v, t, lr, factor);
            self.trainee.moments.push((new_m, new_v));
            updated.push(new);
        }
        let updated = self.trainee.unflat(&weights, updated);
        self.model.set_adapter_weights(&self.trainee.adapter, &updated)?;
        self.header.step = t;
        Ok(StepOutcome { loss, grad_norm, lr, rewards })
    }

    /// Evaluates after step `step`, updates the best-loss bookkeeping and reports it:
    /// Some(improved), or None when the caller asked to stop.
    async fn eval(&mut self, batches: &[Batch], step: usize, on_event: &mut dyn FnMut(TrainEvent) -> Control) -> Result<Option<bool>> {
        let val_loss = match self.options.method {
            Method::Sft => evaluate(self.model, batches).await?,
            Method::Dpo => dpo_evaluate(self.model, batches, self.options.beta).await?.loss,
        };
        let header = &mut self.header;
        let improved = header.best_val_loss.is_none_or(|b| val_loss < b);
        if improved {
            header.best_val_loss = Some(val_loss);
            header.best_step = Some(step);
            header.evals_without_improvement = 0;
        } else {
            header.evals_without_improvement += 1;
        }
        Ok((on_event(TrainEvent::Eval { step, val_loss, best: improved }) == Control::Continue).then_some(improved))
    }

    /// The adapter's files and the trainer state after `step`, to continue from there.
    async fn checkpoint(&self, step: usize) -> Result<TrainEvent> {
        let adapter = self.model.export_adapter(&self.trainee.adapter).await?;
        let state = save_state(&self.header, &self.trainee.moments).await?;
        Ok(TrainEvent::Checkpoint { step, adapter: Box::new(adapter), state })
    }

    /// The metrics of the step just done, `elapsed` seconds after the run (re)started.
    fn metrics(&self, StepOutcome { loss, grad_norm, lr, rewards }: StepOutcome, elapsed: f64) -> StepMetrics {
        let (t, (first_step, first_tokens)) = (self.header.step, self.started_at);
        StepMetrics {
            step: t,
            total_steps: self.total_steps,
            epoch: t as f64 / self.steps_per_epoch.max(1) as f64,
            loss,
            lr,
            grad_norm,
            tokens_per_s: (self.header.tokens - first_tokens) as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            eta_s: elapsed / (t - first_step).max(1) as f64 * (self.total_steps - t) as f64,
            rewards,
        }
    }
}

/// Trains adapter `adapter` of `model` (made active) over the planned optimizer steps,
/// evaluating on `val_batches`. `clock` gives seconds (any origin); `resume` is the `state` of a
/// checkpoint whose adapter is loaded. Events go to `on_event`, which may stop the run.
/// `steps_per_epoch` only labels events.
#[allow(clippy::too_many_arguments)]
pub async fn train_steps(
    model: &mut LlamaModel,
    adapter: &str,
    steps: &[Vec<Batch>],
    steps_per_epoch: usize,
    val_batches: Option<&[Batch]>,
    options: &TrainOptions,
    resume: Option<&[u8]>,
    clock: &dyn Fn() -> f64,
    on_event: &mut dyn FnMut(TrainEvent) -> Control,
) -> Result<TrainSummary> {
    options.check()?;
    model.set_adapter(adapter)?;
    let total_steps = steps.len();
    if total_steps == 0 {
        return Err(Error::invalid("nothing to do: 0 epochs or max_steps 0"));
    }
    let mut trainee = Trainee::new(model, adapter)?;
    let mut header = StateHeader { step: 0, tokens: 0, best_val_loss: None, best_step: None, evals_without_improvement: 0 };
    if let Some(bytes) = resume {
        header = restore_state(bytes, &mut trainee.moments, &model.device())?;
    }
    let started_at = (header.step, header.tokens);
    let mut run = Run { model, trainee, options, header, total_steps, steps_per_epoch, started_at };
    let mut best: Option<AdapterWeights> = None;
    let start = clock();
    let mut final_loss = None;
    let mut end = TrainEnd::Completed;
    // the starting point of the validation curve (and the adapter early stopping falls back to)
    if let (0, Some(batches)) = (run.header.step, val_batches) {
        match run.eval(batches, 0, on_event).await? {
            Some(_) => best = Some(run.model.adapter_weights(adapter)?),
            None => end = TrainEnd::Cancelled,
        }
    }

    // a resumed run skips the steps its checkpoint has done; a run cancelled at the first
    // evaluation skips them all
    let done = if end == TrainEnd::Cancelled { total_steps } else { run.header.step };
    for (index, group) in steps.iter().enumerate().skip(done) {
        let t = index + 1;
        let outcome = run.step(t, group).await?;
        final_loss = Some(outcome.loss);
        if on_event(TrainEvent::Step(run.metrics(outcome, clock() - start))) == Control::Stop {
            end = TrainEnd::Cancelled;
            break;
        }
        let eval_now = options.eval_every.is_some_and(|n| t % n == 0) || t == total_steps;
        if let (true, Some(batches)) = (eval_now, val_batches) {
            match run.eval(batches, t, on_event).await? {
                None => {
                    end = TrainEnd::Cancelled;
                    break;
                }
                Some(true) => best = Some(run.model.adapter_weights(adapter)?),
                Some(false) => {}
            }
            if options.patience.is_some_and(|p| run.header.evals_without_improvement >= p) {
                end = TrainEnd::EarlyStopped;
                break;
            }
        }
        let checkpoint_now = options.checkpoint_every.is_some_and(|n| t % n == 0) && t < total_steps;
        if checkpoint_now && on_event(run.checkpoint(t).await?) == Control::Stop {
            end = TrainEnd::Cancelled;
            break;
        }
    }
    // early stopping keeps the best adapter, as load_best_model_at_end does
    if let (TrainEnd::EarlyStopped, Some(best)) = (end, best) {
        run.model.set_adapter_weights(adapter, &best)?;
    }
    let header = run.header;
    Ok(TrainSummary {
        steps: header.step,
        tokens: header.tokens,
        final_loss,
        best_val_loss: header.best_val_loss,
        best_step: header.best_step,
        elapsed_s: clock() - start,
        end,
    })
}

const STATE_KEY: &str = "webgpu_lora_train_state";

async fn save_state(header: &StateHeader, moments: &[(Tensor<2>, Tensor<2>)]) -> Result<Vec<u8>> {
    let mut tensors = BTreeMap::new();
    for (i, (m, v)) in moments.iter().enumerate() {
        tensors.insert(format!("{i:05}.m"), read_host(m.clone()).await?);
        tensors.insert(format!("{i:05}.v"), read_host(v.clone()).await?);
    }
    let metadata = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(header).expect("serializable"))]);
    write_safetensors(&tensors, StoreDtype::F32, Some(metadata))
}

/// Checks that `bytes` are a trainer state file (its step information readable), before a
/// resumed run changes the model.
pub fn check_state(bytes: &[u8]) -> Result<()> {
    state_header(bytes).map(|_| ())
}

fn state_header(bytes: &[u8]) -> Result<StateHeader> {
    let not_state = |why: String| Error::file("trainer state", why);
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| not_state(format!("not a trainer state file: {e}")))?;
    let text = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| not_state("not a trainer state file (no step information)".into()))?;
    serde_json::from_str(text).map_err(|e| not_state(format!("unreadable step information: {e}")))
}

/// Checks that `bytes` hold AdamW's moments for every matrix of `adapter` of `model` (a state
/// saved from another adapter is refused) before a resumed run changes anything.
pub fn check_state_fits(model: &LlamaModel, adapter: &str, bytes: &[u8]) -> Result<()> {
    saved_moments(bytes, &Trainee::new(model, adapter)?.moments).map(|_| ())
}

/// The run's bookkeeping and the saved (m, v) of each of `moments`' matrices, in their order.
fn saved_moments(bytes: &[u8], moments: &[(Tensor<2>, Tensor<2>)]) -> Result<(StateHeader, Vec<(HostTensor, HostTensor)>)> {
    let header = state_header(bytes)?;
    let weights = SafetensorsWeights::new(vec![("trainer state".into(), bytes.to_vec())])?;
    let (saved, matrices) = (weights.names().len() / 2, moments.len());
    if weights.names().len() != 2 * matrices {
        let why = format!("it holds {saved} moments but this adapter has {matrices} matrices: it belongs to another adapter");
        return Err(Error::file("trainer state", why));
    }
    let mut out = Vec::with_capacity(matrices);
    for (i, (m, v)) in moments.iter().enumerate() {
        let (saved_m, saved_v) = (weights.tensor(&format!("{i:05}.m"))?, weights.tensor(&format!("{i:05}.v"))?);
        if saved_m.shape != m.dims().to_vec() || saved_v.shape != v.dims().to_vec() {
            return Err(Error::file("trainer state", "moment shapes differ from this adapter's: it belongs to another adapter"));
        }
        out.push((saved_m, saved_v));
    }
    Ok((header, out))
}

fn restore_state(bytes: &[u8], moments: &mut [(Tensor<2>, Tensor<2>)], device: &Device) -> Result<StateHeader> {
    let (header, saved) = saved_moments(bytes, moments)?;
    for ((m, v), (saved_m, saved_v)) in moments.iter_mut().zip(saved) {
        (*m, *v) = (upload(saved_m, device), upload(saved_v, device));
    }
    Ok(header)
}
