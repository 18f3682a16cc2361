//! The SFT loop for one LoRA adapter: only its A and B get gradients (they are the only tensors
//! put on autodiff; the frozen base stays plain, so it holds no gradient buffers and no optimizer
//! state). Per optimizer step: `grad_accum` micro-batches, loss = summed token loss / the step's
//! trainable tokens, global-norm clipping, AdamW with warmup + decay. Evaluation, early stopping
//! with best-adapter restore, checkpoints (handed to the caller as files), cancel, resume and a
//! NaN/Inf guard that keeps the last good adapter.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generate::{read_f32, read_host};
use crate::io::HostTensor;
use crate::lora::{DropoutMasks, LoraRun};
use crate::model::LlamaModel;
use crate::peft::AdapterFiles;
use crate::train::data::{Batch, Dataset, epoch_batches};
use crate::train::loss::{LOSS_ROWS, head_loss_backward, summed_token_loss};
use crate::train::optimizer::{AdamW, Schedule, clip_factor, global_norm};

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub optimizer: AdamW,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Clip gradients to this global L2 norm (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    /// Stop after this many optimizer steps (wins over `epochs`).
    pub max_steps: Option<usize>,
    /// Evaluate on the validation set every N steps (and before the first step and at the end).
    pub eval_every: Option<usize>,
    /// Stop after this many evaluations without a better validation loss; the best adapter is
    /// restored.
    pub early_stopping_patience: Option<usize>,
    pub checkpoint_every: Option<usize>,
    /// Data order and LoRA dropout.
    pub seed: u64,
    /// Run each micro-batch as up to this many parts of its rows in parallel on rayon's pool
    /// (the one burn's CPU GEMM uses, so the parts' matrix products share the cores rather than
    /// oversubscribe them), each part with its own copy of the adapter's leaves (and so its own
    /// autodiff graph); gradients are summed. For the CPU backend, whose elementwise kernels are
    /// single-threaded; 1 (the default) elsewhere. Equal to the unsplit step up to float
    /// rounding, and as deterministic.
    pub threads: usize,
}

impl TrainConfig {
    /// Refuses settings that cannot train, naming the setting.
    pub fn check(&self) -> Result<()> {
        self.optimizer.check()?;
        if self.threads == 0 {
            return Err(Error::invalid("threads must be at least 1"));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::invalid(format!("batch size {} and gradient accumulation {} must be at least 1", self.batch_size, self.grad_accum)));
        }
        if self.max_steps.unwrap_or(self.epochs) == 0 {
            return Err(Error::invalid("nothing to train: epochs and max_steps must be at least 1"));
        }
        if self.max_grad_norm.is_some_and(|n| !(n > 0.0)) {
            return Err(Error::invalid("max_grad_norm must be positive (or none for no clipping)"));
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: AdamW::default(),
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            batch_size: 4,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            eval_every: None,
            early_stopping_patience: None,
            checkpoint_every: None,
            seed: 42,
            threads: 1,
        }
    }
}

/// Metrics of one optimizer step.
#[derive(Debug, Clone, Serialize)]
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
}

/// What the trainer reports as it goes.
#[derive(Clone)]
pub enum TrainEvent {
    Step(StepMetrics),
    Eval { step: usize, val_loss: f64, best: bool },
    /// The adapter and the trainer state after `step`: save both to resume from here.
    Checkpoint { step: usize, adapter: Box<AdapterFiles>, state: Vec<u8> },
}

impl TrainEvent {
    /// The event as one JSON object (checkpoints by step only), e.g. for a JSONL log.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            TrainEvent::Step(m) => serde_json::json!({"event": "step", "metrics": m}),
            TrainEvent::Eval { step, val_loss, best } => serde_json::json!({"event": "eval", "step": step, "val_loss": val_loss, "best": best}),
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
#[serde(rename_all = "snake_case")]
pub enum TrainEnd {
    Completed,
    EarlyStopped,
    Cancelled,
}

/// The outcome, stored beside the adapter (training_summary.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// One trainable matrix: where it lives in the model and its AdamW moments.
struct Param {
    layer: usize,
    projection: &'static str,
    is_a: bool,
    m: Tensor<2>,
    v: Tensor<2>,
}

fn tensor_of<'m>(model: &'m mut LlamaModel, p: &Param, adapter: &str) -> &'m mut Tensor<2> {
    let (_, linear) = model.layers[p.layer].linears_mut().into_iter().find(|(n, _)| *n == p.projection).expect("a projection");
    let lora = linear.adapters.get_mut(adapter).expect("the trained adapter");
    if p.is_a { &mut lora.a_t } else { &mut lora.b_t }
}

/// The adapter's current matrices, in `params` order.
fn adapter_values(model: &mut LlamaModel, params: &[Param], adapter: &str) -> Vec<Tensor<2>> {
    params.iter().map(|p| tensor_of(model, p, adapter).clone()).collect()
}

/// Puts `values` (in `params` order) in place of the adapter's matrices.
fn set_adapter_values(model: &mut LlamaModel, params: &[Param], adapter: &str, values: &[Tensor<2>]) {
    for (p, v) in params.iter().zip(values) {
        *tensor_of(model, p, adapter) = v.clone();
    }
}

async fn read_scalar(t: Tensor<1>) -> Result<f64> {
    Ok(read_f32(t).await?[0] as f64)
}

/// One optimizer step's loss and gradients (in `params` order) at the adapter's current values:
/// a forward/backward per micro-batch with the adapter's matrices as the only autodiff leaves,
/// each micro-batch's summed token loss divided by the whole group's trainable tokens, gradients
/// summed. With `threads` > 1 each micro-batch's rows are split into parts run in parallel,
/// part k running its own leaves as adapter replica k. `dropout`: apply the adapter's lora_dropout (the masks
/// the unsplit pass would draw, see `lora::dropout`). The adapter is left as it was.
async fn group_gradients(model: &mut LlamaModel, adapter: &str, params: &[Param], group: &[Batch], seed: u64, dropout: bool, threads: usize) -> Result<(f64, Vec<Tensor<2>>)> {
    let values = adapter_values(model, params, adapter);
    let p = if dropout { model.adapter_config(adapter).map_or(0.0, |c| c.lora_dropout) } else { 0.0 };
    // no more replicas than the largest micro-batch has rows to give them
    let threads = threads.clamp(1, group.iter().map(|b| b.batch).max().unwrap_or(1).max(1));
    let names: Vec<String> = (0..threads).map(|k| if k == 0 { adapter.to_string() } else { format!("{adapter}\u{0}replica {k}") }).collect();
    let mut leaves = Vec::with_capacity(threads);
    for name in &names {
        if name != adapter {
            add_replica(model, adapter, name);
        }
        let these: Vec<Tensor<2>> = values.iter().map(|v| v.clone().autodiff().require_grad()).collect();
        set_adapter_values(model, params, name, &these);
        leaves.push(these);
    }
    let step_count = group.iter().map(Batch::trainable_tokens).sum::<usize>().max(1);
    let scale = 1.0 / step_count as f64;
    let mut grads: Option<Vec<Tensor<2>>> = None;
    let mut loss_sum = 0.0;
    let mut outcome = Ok(());
    'batches: for (i, batch) in group.iter().enumerate() {
        model.device().seed(seed ^ i as u64);
        let parts = batch.split_rows(threads);
        let starts: Vec<usize> = parts.iter().scan(0, |start, part| Some(std::mem::replace(start, *start + part.batch * part.seq))).collect();
        let masks = (p > 0.0).then(|| DropoutMasks::new(p, batch.batch * batch.seq, parts.len()));
        let model: &LlamaModel = model;
        let run = |k: usize, part: &Batch| {
            let dropout = masks.as_ref().map(|m| m.part(starts[k]..starts[k] + part.batch * part.seq));
            part_gradients(model, LoraRun { adapter: &names[k], dropout: dropout.as_ref() }, &leaves[k], part, scale)
        };
        let results: Vec<(Tensor<1>, Vec<Tensor<2>>)> = if parts.len() == 1 {
            vec![run(0, &parts[0])]
        } else {
            use rayon::prelude::*;
            parts.par_iter().enumerate().map(|(k, part)| run(k, part)).collect()
        };
        for (loss, these) in results {
            match read_scalar(loss).await {
                Ok(v) => loss_sum += v,
                Err(e) => {
                    outcome = Err(e);
                    break 'batches;
                }
            }
            grads = Some(match grads {
                None => these,
                Some(acc) => acc.into_iter().zip(these).map(|(a, b)| a + b).collect(),
            });
        }
    }
    for name in names.iter().filter(|name| *name != adapter) {
        remove_replica(model, name);
    }
    set_adapter_values(model, params, adapter, &values);
    outcome?;
    Ok((loss_sum, grads.expect("a step has a batch")))
}

/// The summed token loss of `batch` (times `scale` in the gradient) and the gradient of each of
/// `leaves`, which `run` reads.
fn part_gradients(model: &LlamaModel, run: LoraRun, leaves: &[Tensor<2>], batch: &Batch, scale: f64) -> (Tensor<1>, Vec<Tensor<2>>) {
    let hidden = model.hidden_states_with(model.ids_batch(&batch.ids, batch.batch, batch.seq), None, Some(run));
    let (surrogate, loss) = head_loss_backward(model, hidden, batch, scale, LOSS_ROWS);
    let g = surrogate.backward();
    (loss, leaves.iter().map(|l| l.grad(&g).expect("a trainable leaf has a gradient")).collect())
}

/// A copy of `adapter`'s matrices in every layer under the name `replica`.
fn add_replica(model: &mut LlamaModel, adapter: &str, replica: &str) {
    for layer in &mut model.layers {
        for (_, linear) in layer.linears_mut() {
            if let Some(lora) = linear.adapters.get(adapter).cloned() {
                linear.adapters.insert(replica.to_string(), lora);
            }
        }
    }
}

fn remove_replica(model: &mut LlamaModel, replica: &str) {
    for layer in &mut model.layers {
        for (_, linear) in layer.linears_mut() {
            linear.adapters.remove(replica);
        }
    }
}

/// The adapter's params in model order, with zero moments.
fn adapter_params(model: &LlamaModel, adapter: &str) -> Vec<Param> {
    let mut params = Vec::new();
    for (layer, block) in model.layers.iter().enumerate() {
        for (projection, linear) in block.linears() {
            if let Some(lora) = linear.adapters.get(adapter) {
                for (is_a, t) in [(true, &lora.a_t), (false, &lora.b_t)] {
                    let zeros = Tensor::zeros(t.dims(), &t.device());
                    params.push(Param { layer, projection, is_a, m: zeros.clone(), v: zeros });
                }
            }
        }
    }
    params
}

/// The mean token loss of `batch` and its gradient for every lora_A / lora_B of `adapter`, under
/// PEFT's names and layout (`model.layers.0.self_attn.q_proj.lora_A.weight`, [r, in]): what PEFT
/// computes with `loss.backward()` (no dropout).
pub async fn adapter_gradients(model: &mut LlamaModel, adapter: &str, batch: &Batch) -> Result<(f64, std::collections::BTreeMap<String, HostTensor>)> {
    model.check_known(adapter)?;
    let params = adapter_params(model, adapter);
    let active = model.active_adapter().map(str::to_string);
    model.set_adapter(adapter)?;
    let outcome = group_gradients(model, adapter, &params, std::slice::from_ref(batch), 0, false, 1).await;
    if let Some(active) = active {
        model.set_adapter(&active)?;
    }
    let (loss, grads) = outcome?;
    let mut out = std::collections::BTreeMap::new();
    for (p, g) in params.iter().zip(grads) {
        let module = format!("model.layers.{}.{}", p.layer, p.projection);
        let key = format!("{module}.{}.weight", if p.is_a { "lora_A" } else { "lora_B" });
        out.insert(key, crate::model::transpose(&read_host(g).await?));
    }
    Ok((loss, out))
}

/// Evaluates, updates the best-loss bookkeeping and reports it: Some(improved), or None when the
/// caller asked to stop.
async fn record_eval(model: &LlamaModel, batches: &[Batch], header: &mut StateHeader, step: usize, on_event: &mut dyn FnMut(TrainEvent) -> Control) -> Result<Option<bool>> {
    let val_loss = evaluate(model, batches).await?;
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

/// The mean token loss of `batches` under the model as it is (no dropout, no gradients).
pub async fn evaluate(model: &LlamaModel, batches: &[Batch]) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0);
    for batch in batches {
        let hidden = model.hidden_states(model.ids_batch(&batch.ids, batch.batch, batch.seq), None);
        let (loss, n) = summed_token_loss(model, hidden, batch, LOSS_ROWS);
        sum += read_scalar(loss).await?;
        count += n;
    }
    if count == 0 {
        return Err(Error::invalid("the validation set has no trainable tokens"));
    }
    Ok(sum / count as f64)
}

/// The run's optimizer steps, each a group of up to `grad_accum` micro-batches: epochs of
/// shuffled batches (seeded), cut at `max_steps`; and how many steps make an epoch.
pub fn plan_steps(train: &Dataset, config: &TrainConfig, pad: u32) -> (Vec<Vec<Batch>>, usize) {
    let micro_per_epoch = train.examples.len().div_ceil(config.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(config.grad_accum);
    let total = config.max_steps.unwrap_or(config.epochs * steps_per_epoch);
    let mut steps = Vec::with_capacity(total);
    for epoch in 0.. {
        if steps.len() >= total || steps_per_epoch == 0 {
            break;
        }
        let batches = epoch_batches(&train.examples, config.batch_size, config.seed, epoch, pad);
        steps.extend(batches.chunks(config.grad_accum).map(<[Batch]>::to_vec).take(total - steps.len()));
    }
    (steps, steps_per_epoch)
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
    config: &TrainConfig,
    resume: Option<&[u8]>,
    clock: &dyn Fn() -> f64,
    on_event: &mut dyn FnMut(TrainEvent) -> Control,
) -> Result<TrainSummary> {
    config.check()?;
    model.set_adapter(adapter)?;
    let total_steps = steps.len();
    if total_steps == 0 {
        return Err(Error::invalid("nothing to do: 0 epochs or max_steps 0"));
    }
    let mut params = adapter_params(model, adapter);
    let mut header = StateHeader { step: 0, tokens: 0, best_val_loss: None, best_step: None, evals_without_improvement: 0 };
    if let Some(bytes) = resume {
        header = restore_state(bytes, &mut params, &model.device())?;
    }
    let mut best: Option<Vec<Tensor<2>>> = None;
    let start = clock();
    let (start_tokens, first_step) = (header.tokens, header.step);
    let mut final_loss = None;
    let mut end = TrainEnd::Completed;
    // the starting point of the validation curve (and the adapter early stopping falls back to)
    if let (0, Some(batches)) = (header.step, val_batches) {
        match record_eval(model, batches, &mut header, 0, on_event).await? {
            Some(_) => best = Some(adapter_values(model, &params, adapter)),
            None => end = TrainEnd::Cancelled,
        }
    }

    // a resumed run skips the steps its checkpoint has done; a run cancelled at the first
    // evaluation skips them all
    let done = if end == TrainEnd::Cancelled { total_steps } else { header.step };
    'steps: for (index, group) in steps.iter().enumerate().skip(done) {
        let t = index + 1;
        let before = adapter_values(model, &params, adapter);
        let (loss_sum, grads) = group_gradients(model, adapter, &params, group, config.seed ^ ((t as u64) << 8), true, config.threads).await?;
        header.tokens += group.iter().map(|b| b.tokens).sum::<usize>();
        if !loss_sum.is_finite() {
            return Err(Error::invalid(format!(
                "the loss became {loss_sum} at step {t}: training stopped and the adapter is as it was after step {} (lower the learning rate or check the data)",
                t - 1
            )));
        }
        let grad_norm = read_scalar(global_norm(&grads)).await?;
        let factor = config.max_grad_norm.map_or(1.0, |max| clip_factor(grad_norm, max));
        let lr = config.optimizer.lr * config.schedule.factor(t - 1, config.warmup_steps, total_steps);
        let mut updated = Vec::with_capacity(params.len());
        for ((p, value), g) in params.iter_mut().zip(before).zip(grads) {
            let g = if factor < 1.0 { g.mul_scalar(factor) } else { g };
            let (new, m, v) = config.optimizer.update(value, g, p.m.clone(), p.v.clone(), t, lr);
            (p.m, p.v) = (m, v);
            updated.push(new);
        }
        set_adapter_values(model, &params, adapter, &updated);
        final_loss = Some(loss_sum);
        header.step = t;

        let elapsed = clock() - start;
        let steps_this_run = t - first_step;
        let metrics = StepMetrics {
            step: t,
            total_steps,
            epoch: t as f64 / steps_per_epoch.max(1) as f64,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_s: (header.tokens - start_tokens) as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            eta_s: elapsed / steps_this_run.max(1) as f64 * (total_steps - t) as f64,
        };
        if on_event(TrainEvent::Step(metrics)) == Control::Stop {
            end = TrainEnd::Cancelled;
            break 'steps;
        }
        let eval_now = config.eval_every.is_some_and(|n| t % n == 0) || t == total_steps;
        if let (true, Some(batches)) = (eval_now, val_batches) {
            let improved = record_eval(model, batches, &mut header, t, on_event).await?;
            if improved.is_some_and(|better| better) {
                best = Some(adapter_values(model, &params, adapter));
            }
            if improved.is_none() {
                end = TrainEnd::Cancelled;
                break 'steps;
            }
            if config.early_stopping_patience.is_some_and(|p| header.evals_without_improvement >= p) {
                end = TrainEnd::EarlyStopped;
                break 'steps;
            }
        }
        if config.checkpoint_every.is_some_and(|n| t % n == 0) && t < total_steps {
            let files = model.save_adapter(adapter).await?;
            let state = save_state(&header, &params).await?;
            if on_event(TrainEvent::Checkpoint { step: t, adapter: Box::new(files), state }) == Control::Stop {
                end = TrainEnd::Cancelled;
                break 'steps;
            }
        }
    }
    // early stopping keeps the best adapter, as load_best_model_at_end does
    if let (TrainEnd::EarlyStopped, Some(best)) = (end, best) {
        set_adapter_values(model, &params, adapter, &best);
    }
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

async fn save_state(header: &StateHeader, params: &[Param]) -> Result<Vec<u8>> {
    let mut tensors = std::collections::BTreeMap::new();
    for (i, p) in params.iter().enumerate() {
        tensors.insert(format!("{i:05}.m"), read_host(p.m.clone()).await?);
        tensors.insert(format!("{i:05}.v"), read_host(p.v.clone()).await?);
    }
    let metadata = std::collections::HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(header).expect("serializable"))]);
    crate::io::safetensors::write_safetensors(&tensors, crate::io::StoreDtype::F32, Some(metadata))
}

fn state_header(bytes: &[u8]) -> Result<StateHeader> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::file("trainer state", format!("not a trainer state file: {e}")))?;
    let text = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| Error::file("trainer state", "not a trainer state file (no step information)"))?;
    serde_json::from_str(text).map_err(|e| Error::file("trainer state", format!("unreadable step information: {e}")))
}

fn restore_state(bytes: &[u8], params: &mut [Param], device: &burn::tensor::Device) -> Result<StateHeader> {
    let header = state_header(bytes)?;
    let weights = crate::io::SafetensorsWeights::new(vec![("trainer state".into(), bytes.to_vec())])?;
    if weights.names().len() != 2 * params.len() {
        return Err(Error::file("trainer state", format!("it holds {} moments but this adapter has {} matrices: it belongs to another adapter", weights.names().len() / 2, params.len())));
    }
    for (i, p) in params.iter_mut().enumerate() {
        let (m, v) = (weights.tensor(&format!("{i:05}.m"))?, weights.tensor(&format!("{i:05}.v"))?);
        if m.shape != p.m.dims().to_vec() || v.shape != p.v.dims().to_vec() {
            return Err(Error::file("trainer state", "moment shapes differ from this adapter's: it belongs to another adapter"));
        }
        p.m = crate::lora::upload(m, device);
        p.v = crate::lora::upload(v, device);
    }
    Ok(header)
}
