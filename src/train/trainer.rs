//! The training loop, for one LoRA adapter or for the whole model (full fine-tuning). Only the
//! trained tensors get gradients: an adapter's A and B, or every weight of the model, put on
//! autodiff as leaves for the step's passes (for an adapter the frozen base stays plain, so it
//! holds no gradient buffers and no optimizer state). Per optimizer step: `grad_accum`
//! micro-batches, loss = summed token loss / the step's trainable tokens, global-norm clipping,
//! AdamW with warmup + decay. Evaluation, early stopping with best-values restore, checkpoints
//! (handed to the caller as files), cancel, resume and a NaN/Inf guard that keeps the last good
//! values.

use std::collections::HashMap;

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::StoreDtype;
use crate::io::safetensors::{TensorEntry, decode, write_safetensors_reading};
use crate::lora::{AdapterFiles, AdapterWeights, DropoutMasks, LoraLayers, LoraModel, LoraRun, LoraWeights, PartDropout};
use crate::model::{Head, LlamaModel};
use crate::tensor::{HostTensor, read_host, read_scalar, upload};
use crate::train::TrainOptions;
use crate::train::data::{Batch, epoch_batches, ordered_batches};
use crate::train::dpo::{DpoStats, Rewards, check_dropout, dpo_gradients, dpo_stats};
use crate::train::loss::{HeadLoss, LOSS_ROWS, LossWeights, head_loss_backward, summed_token_loss};
use crate::train::memory::MemoryPart;
use crate::train::optimizer::{AdamW, clip_factor, global_norm};
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
    /// Full fine-tuning's memory estimate, before the first step: the parameters trained and
    /// what the memory goes to ([`crate::train::memory::full_memory`]).
    Memory {
        parameters: usize,
        parts: Vec<MemoryPart>,
    },
    /// What is trained (the adapter's files, or the model's) and the trainer state after
    /// `step`: save both to resume from here.
    Checkpoint {
        step: usize,
        files: Box<TrainedFiles>,
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
            TrainEvent::Memory { parameters, parts } => {
                let bytes: usize = parts.iter().map(|p| p.bytes).sum();
                serde_json::json!({"event": "memory", "parameters": parameters, "bytes": bytes, "parts": parts})
            }
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

/// The outcome, stored beside the adapter or model (training_summary.json).
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

/// What a checkpoint needs besides the trained files to continue exactly: the step reached, AdamW's
/// moments and the early-stopping bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateHeader {
    step: usize,
    tokens: usize,
    best_val_loss: Option<f64>,
    best_step: Option<usize>,
    evals_without_improvement: usize,
    /// Full fine-tuning: the global norm of the weights the state goes with (a resumed run must
    /// start from the checkpoint's model, not the base it began on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights_norm: Option<f64>,
}

/// What a run trains: an adapter of the model, or the model's own weights (full fine-tuning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Adapter(&'a str),
    Model,
}

/// What is being trained, held by the run (the model only sees its values between steps): the
/// adapter's modules (with their scaling) or the model's parameters (with their weight decay),
/// and AdamW's moments (m, v) of each trained matrix, in the order of [`values`](Self::values).
struct Trainee {
    trained: Trained,
    moments: Vec<(Tensor<2>, Tensor<2>)>,
}

enum Trained {
    /// An adapter's A then B of each module, in model order.
    Adapter { name: String, modules: Vec<(String, f64)> },
    /// Every parameter of the model ([`LlamaModel::parameters`]): whether each decays.
    Model { decays: Vec<bool> },
}

impl Trainee {
    /// `target` of `model`, with zero moments.
    fn new(model: &LlamaModel, target: Target) -> Result<Self> {
        let trainee = Self::of(model, target)?;
        let zeros = |t: &Tensor<2>| Tensor::zeros(t.dims(), &t.device());
        let moments = trainee.values(model)?.iter().map(|t| (zeros(t), zeros(t))).collect();
        Ok(Trainee { moments, ..trainee })
    }

    /// `target` of `model`, without moments.
    fn of(model: &LlamaModel, target: Target) -> Result<Self> {
        let trained = match target {
            Target::Adapter(adapter) => {
                let weights = model.adapter_weights(adapter)?;
                let modules = model.lora_linears().filter_map(|l| weights.get(&l.name).map(|w| (l.name.clone(), w.scaling))).collect();
                Trained::Adapter { name: adapter.to_string(), modules }
            }
            Target::Model => Trained::Model { decays: model.parameters()?.iter().map(|p| p.decays).collect() },
        };
        Ok(Trainee { trained, moments: Vec::new() })
    }

    /// The trained matrices' current values.
    fn values(&self, model: &LlamaModel) -> Result<Vec<Tensor<2>>> {
        Ok(match &self.trained {
            Trained::Adapter { name, modules } => {
                let weights = model.adapter_weights(name)?;
                modules.iter().flat_map(|(m, _)| [weights[m].a_t.clone(), weights[m].b_t.clone()]).collect()
            }
            Trained::Model { .. } => model.parameters()?.into_iter().map(|p| p.value).collect(),
        })
    }

    /// Puts `values` in the model.
    fn set_values(&self, model: &mut LlamaModel, values: Vec<Tensor<2>>) -> Result<()> {
        match &self.trained {
            Trained::Adapter { name, .. } => model.set_adapter_weights(name, &self.adapter_weights(values)),
            Trained::Model { .. } => {
                model.set_parameters(values);
                Ok(())
            }
        }
    }

    /// The adapter's matrices `flat` (in value order) by module (none when the model's weights train).
    fn adapter_weights(&self, flat: Vec<Tensor<2>>) -> AdapterWeights {
        let Trained::Adapter { modules, .. } = &self.trained else { return AdapterWeights::new() };
        let mut flat = flat.into_iter();
        let mut next = || flat.next().expect("one tensor per matrix");
        modules.iter().map(|(m, scaling)| (m.clone(), LoraWeights { a_t: next(), b_t: next(), scaling: *scaling })).collect()
    }

    /// What is trained, for messages: "adapter" or "model".
    fn what(&self) -> &'static str {
        match self.trained {
            Trained::Adapter { .. } => "adapter",
            Trained::Model { .. } => "model",
        }
    }

    /// Whether AdamW's weight decay applies to matrix `i`.
    fn decays(&self, i: usize) -> bool {
        match &self.trained {
            Trained::Adapter { .. } => true,
            Trained::Model { decays } => decays[i],
        }
    }

    /// The files of what is trained, as it is in the model now.
    async fn files(&self, model: &LlamaModel) -> Result<TrainedFiles> {
        Ok(match &self.trained {
            Trained::Adapter { name, .. } => TrainedFiles::Adapter(model.export_adapter(name).await?),
            Trained::Model { .. } => TrainedFiles::Model(model.hf_files(None, StoreDtype::F32).await?),
        })
    }
}

/// What a run produces: an adapter's PEFT files, or a fully fine-tuned model's Hugging Face files.
#[derive(Clone)]
pub enum TrainedFiles {
    Adapter(AdapterFiles),
    /// model.safetensors and config.json (the edges add the tokenizer's files).
    Model(Vec<(String, Vec<u8>)>),
}

impl TrainedFiles {
    /// The files under their names, for writing a directory.
    pub fn into_named(self) -> Vec<(String, Vec<u8>)> {
        match self {
            TrainedFiles::Adapter(files) => files.into_named().into_iter().map(|(n, b)| (n.to_string(), b)).collect(),
            TrainedFiles::Model(files) => files,
        }
    }
}

/// One optimizer step's summed loss and gradients (in value order) at `values`: a
/// forward/backward per micro-batch with the trained matrices as the only autodiff leaves, each
/// micro-batch's summed token loss divided by the whole group's trainable tokens, gradients
/// summed. With `options.threads` > 1 each micro-batch's rows are split into parts run in parallel on
/// rayon's pool (the one burn's CPU GEMM uses, so the parts share the cores rather than
/// oversubscribe them), each part with its own leaves (and so its own autodiff graph).
/// `dropout`: LoRA dropout's p (the masks the unsplit pass would draw, see `lora::dropout`).
/// The model is not changed.
#[allow(clippy::too_many_arguments)]
async fn group_gradients(
    model: &LlamaModel,
    trainee: &Trainee,
    values: &[Tensor<2>],
    group: &[Batch],
    seed: u64,
    dropout: f64,
    options: &TrainOptions,
) -> Result<(f64, Vec<Tensor<2>>)> {
    // no more parts than the largest micro-batch has rows to give them; full fine-tuning in one
    // (its products dominate and use every core; a part would hold a gradient of the whole model)
    let threads = match trainee.trained {
        Trained::Model { .. } => 1,
        Trained::Adapter { .. } => options.threads.unwrap_or(1).clamp(1, group.iter().map(|b| b.batch).max().unwrap_or(1).max(1)),
    };
    let checkpointing = options.gradient_checkpointing;
    let leaves: Vec<Vec<Tensor<2>>> = (0..threads).map(|_| autodiff_leaves(values)).collect();
    // an adapter's parts share one head (a quantized one dequantized once a step, not once a thread)
    let shared_head = matches!(trainee.trained, Trained::Adapter { .. }).then(|| model.head_for_slices());
    let adapters: Vec<AdapterWeights> = leaves.iter().map(|l| trainee.adapter_weights(l.clone())).collect();
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
        // full fine-tuning (one part): a copy of the model whose weights are the leaves, and its
        // head, made again for each micro-batch (what the copy derives from the leaves, a norm's
        // gain, is used up by a backward pass)
        let copy = matches!(trainee.trained, Trained::Model { .. }).then(|| {
            let copy = model.with_parameters(leaves[0].clone());
            let head = copy.head_for_slices();
            (copy, head)
        });
        let run = |k: usize, part: &Batch| {
            let dropout = masks.as_ref().map(|m| m.part(starts[k]..starts[k] + part.batch * part.seq));
            let (pass, head) = match (&trainee.trained, &copy) {
                (_, Some((copy, head))) => (LeafPass::Model(copy), head),
                (Trained::Adapter { name, .. }, None) => {
                    let run = LoraRun { adapter: name, weights: Some(&adapters[k]), dropout: dropout.as_ref() };
                    (LeafPass::Adapter(run), shared_head.as_ref().expect("an adapter's parts share a head"))
                }
                (Trained::Model { .. }, None) => unreachable!("the model's weights train on a copy"),
            };
            part_gradients(model, pass, head, &leaves[k], part, LossWeights::Uniform(scale), checkpointing)
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
    values: &[Tensor<2>],
    group: &[Batch],
    options: &TrainOptions,
) -> Result<(DpoStats, Vec<Tensor<2>>)> {
    let Trained::Adapter { name, .. } = &trainee.trained else {
        return Err(Error::invalid("DPO trains an adapter, not the whole model"));
    };
    let mut grads: Option<Vec<Tensor<2>>> = None;
    let mut stats = Vec::with_capacity(group.len());
    // one head for the step: a quantized one is dequantized once, not once a pass
    let head = model.head_for_slices();
    for batch in group {
        let leaves = autodiff_leaves(values);
        let weights = trainee.adapter_weights(leaves.clone());
        let run = LoraRun { adapter: name, weights: Some(&weights), dropout: None };
        let (these, g) = dpo_gradients(model, &head, run, &leaves, batch, options.beta, options.gradient_checkpointing).await?;
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

/// Copies of `values` as autodiff leaves that require a gradient (each copy has its own graph).
pub fn autodiff_leaves(values: &[Tensor<2>]) -> Vec<Tensor<2>> {
    values.iter().map(|t| t.clone().autodiff().require_grad()).collect()
}

/// Where a gradient pass reads its leaves.
#[derive(Clone, Copy)]
pub enum LeafPass<'a> {
    /// An adapter's: `run` reads the autodiff matrices.
    Adapter(LoraRun<'a>),
    /// The model's own weights: this copy of the model holds them ([`LlamaModel::with_parameters`]).
    Model(&'a LlamaModel),
}

/// The summed token loss of `batch` (each token's weighted by `loss_weights` in the gradient)
/// with the leaves `pass` reads, and the gradient of each of `leaves` (those autodiff matrices);
/// `head` is the model's ([`LlamaModel::head_for_slices`], of the copy when the model is trained).
/// With `checkpointing` (transformers' gradient checkpointing) the forward pass keeps only each
/// layer's input, and the backward pass runs the layers again one at a time, last first: one
/// layer's activations exist at a time instead of every layer's, for one more forward pass of compute.
pub fn part_gradients(
    model: &LlamaModel,
    pass: LeafPass,
    head: &Head,
    leaves: &[Tensor<2>],
    batch: &Batch,
    loss_weights: LossWeights,
    checkpointing: bool,
) -> (Tensor<1>, Vec<Tensor<2>>) {
    let ids = model.ids_batch(&batch.ids, batch.batch, batch.seq);
    let (recorded, run) = match pass {
        LeafPass::Adapter(run) => (model, Some(run)),
        LeafPass::Model(copy) => (copy, None),
    };
    let mut grads = LeafGrads { leaves, grads: vec![None; leaves.len()] };
    if !checkpointing {
        let hidden = recorded.hidden_states_with(ids, None, run);
        let HeadLoss { surrogate, loss, weight_grads } = head_loss_backward(head, hidden, batch, loss_weights, LOSS_ROWS);
        grads.collect(&surrogate.backward());
        if let (LeafPass::Model(copy), Some(dw)) = (pass, weight_grads) {
            grads.add_head(copy, dw);
        }
        return (loss, grads.into_vec());
    }
    // forward with plain values, so nothing is recorded (the adapter's as constants, the model's
    // own): each layer's input, and which dropout mask the layer starts at
    let constants = run.map(|run| constant_copies(run.weights.expect("training runs its own matrices")));
    let unrecorded = run.map(|run| LoraRun { weights: constants.as_ref(), ..run });
    let dropout = run.and_then(|run| run.dropout);
    let mask_at = || dropout.map_or(0, PartDropout::position);
    let (mut h, at) = model.decoder_input(ids.clone(), 0);
    let mut inputs = Vec::with_capacity(model.layers.len());
    for i in 0..model.layers.len() {
        inputs.push((h.clone(), mask_at()));
        h = model.layer_forward(i, h, &at, unrecorded);
    }
    // backward: the head's gradient of the last layer's output, then each layer again, recorded
    let out = h.autodiff().require_grad();
    let HeadLoss { surrogate, loss, weight_grads } =
        head_loss_backward(head, recorded.norm.forward(out.clone()), batch, loss_weights, LOSS_ROWS);
    let mut upstream = {
        let g = surrogate.backward();
        grads.collect(&g);
        out.grad(&g).expect("the loss depends on the last layer")
    }; // (the gradients given up: collected ones are then the only holders, to add into in place)
    if let (LeafPass::Model(copy), Some(dw)) = (pass, weight_grads) {
        grads.add_head(copy, dw);
    }
    for (i, (input, mask)) in inputs.into_iter().enumerate().rev() {
        dropout.inspect(|d| d.seek(mask));
        let x = input.autodiff().require_grad();
        let g = (recorded.layer_forward(i, x.clone(), &at, run) * upstream).sum().backward();
        upstream = x.grad(&g).expect("a layer's output depends on its input");
        grads.collect(&g);
    }
    if let LeafPass::Model(copy) = pass {
        grads.add_embedding(copy, ids, upstream);
    }
    (loss, grads.into_vec())
}

/// The gradients of a pass's leaves as they come in, each summed where several passes give one.
struct LeafGrads<'a> {
    leaves: &'a [Tensor<2>],
    grads: Vec<Option<Tensor<2>>>,
}

impl LeafGrads<'_> {
    /// Adds what a backward pass gave each leaf.
    fn collect(&mut self, g: &burn::tensor::Gradients) {
        for i in 0..self.leaves.len() {
            if let Some(g) = self.leaves[i].grad(g) {
                self.add(i, g);
            }
        }
    }

    /// Adds `g` to leaf `i`'s gradient (in place where nothing else holds that).
    fn add(&mut self, i: usize, g: Tensor<2>) {
        self.grads[i] = Some(match self.grads[i].take() {
            Some(sum) => sum + g,
            None => g,
        });
    }

    /// Adds a trained head's weight gradients `dw` (one per buffer of the weight as the head holds
    /// it), which the loss computed by hand, to its leaves: the untied head's, the last
    /// parameters, or the tied embedding's, the first (LlamaModel::parameters).
    fn add_head(&mut self, copy: &LlamaModel, dw: Vec<Tensor<2>>) {
        let first = copy.lm_head.as_ref().map_or(0, |head| self.leaves.len() - head.buffers());
        for (i, g) in (first..).zip(dw) {
            self.add(i, g);
        }
    }

    /// Adds the embedding's gradient from the first layer's input gradient `upstream`: each
    /// position's row added into its id's row (into the gradient the tied head gave, in place),
    /// rather than autodiff's lookup backward, which makes an embedding-sized gradient of its own.
    fn add_embedding(&mut self, copy: &LlamaModel, ids: Tensor<2, Int>, upstream: Tensor<3>) {
        let embedding = &copy.embed_tokens;
        if embedding.buffers() > 1 || embedding.is_transposed() {
            self.collect(&(copy.decoder_input(ids, 0).0 * upstream).sum().backward());
            return;
        }
        let [batch, seq, width] = upstream.dims();
        let upstream = upstream.reshape([batch * seq, width]);
        let upstream = match copy.config.embed_scale {
            Some(scale) => upstream * scale,
            None => upstream,
        };
        // the embedding is the first parameter
        let grad = self.grads[0].take().unwrap_or_else(|| Tensor::zeros(self.leaves[0].dims(), &upstream.device()));
        self.grads[0] = Some(grad.select_assign(0, ids.reshape([batch * seq]), upstream, IndexingUpdateOp::Add));
    }

    fn into_vec(self) -> Vec<Tensor<2>> {
        self.grads.into_iter().map(|g| g.expect("a trainable leaf has a gradient")).collect()
    }
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
    /// Optimizer step `t` (from 1) over `group`: what is trained moves only if the loss and the
    /// gradient norm are finite.
    async fn step(&mut self, t: usize, group: &[Batch]) -> Result<StepOutcome> {
        let options = self.options;
        let dropout = match &self.trainee.trained {
            Trained::Adapter { name, .. } => self.model.known_adapter(name)?.lora_dropout,
            Trained::Model { .. } => 0.0,
        };
        let values = self.trainee.values(self.model)?;
        let seed = options.seed ^ ((t as u64) << 8);
        let (loss, grads, rewards) = match options.method {
            Method::Sft | Method::Full => {
                let (loss, grads) = group_gradients(self.model, &self.trainee, &values, group, seed, dropout, options).await?;
                (loss, grads, None)
            }
            Method::Dpo => {
                check_dropout(dropout)?;
                let (stats, grads) = dpo_group_gradients(self.model, &self.trainee, &values, group, options).await?;
                (stats.loss, grads, Some(stats.rewards))
            }
        };
        self.header.tokens += group.iter().map(|b| b.tokens).sum::<usize>();
        let grad_norm = global_norm(&grads).await?;
        // a NaN or infinite loss or gradient would make every trained value NaN
        if let Some((what, value)) = [("loss", loss), ("gradient norm", grad_norm)].into_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "the {what} became {value} at step {t}: training stopped and the {} is as it was after step {} (lower the learning rate or check the data)",
                self.trainee.what(),
                t - 1
            )));
        }
        let factor = options.clip_norm().map_or(1.0, |max| clip_factor(grad_norm, max));
        let lr = options.lr * options.schedule.factor(t - 1, options.warmup_steps, self.total_steps);
        // no weight decay for norms and biases (full fine-tuning), as transformers' Trainer groups them
        let decayed = options.optimizer();
        let undecayed = AdamW { weight_decay: 0.0, ..decayed };
        // the moments given up to the update, which writes the new ones where they were
        let moments = std::mem::take(&mut self.trainee.moments);
        assert_eq!(moments.len(), grads.len(), "one (m, v) per trained matrix");
        let mut steps = grads.into_iter().zip(moments);
        let full = matches!(self.trainee.trained, Trained::Model { .. });
        let trainee = &mut self.trainee;
        let mut update = |i: usize, value: Tensor<2>| {
            let (g, (m, v)) = steps.next().expect("a gradient per trained matrix");
            let optimizer = if trainee.decays(i) { &decayed } else { &undecayed };
            let (new, m, v) = optimizer.update(value, g, m, v, t, lr, factor);
            trainee.moments.push((m, v));
            new
        };
        if full {
            // the model's own handles are the last on its weights: each is written in place
            drop(values);
            self.model.update_parameters(update);
        } else {
            let updated = values.into_iter().enumerate().map(|(i, value)| update(i, value)).collect();
            self.trainee.set_values(self.model, updated)?;
        }
        self.header.step = t;
        Ok(StepOutcome { loss, grad_norm, lr, rewards })
    }

    /// Evaluates after step `step`, updates the best-loss bookkeeping and reports it:
    /// Some(improved), or None when the caller asked to stop.
    async fn eval(&mut self, batches: &[Batch], step: usize, on_event: &mut dyn FnMut(TrainEvent) -> Control) -> Result<Option<bool>> {
        let val_loss = match self.options.method {
            Method::Sft | Method::Full => evaluate(self.model, batches).await?,
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

    /// The trained files and the trainer state after `step`, to continue from there.
    async fn checkpoint(&self, step: usize) -> Result<TrainEvent> {
        let files = self.trainee.files(self.model).await?;
        let mut header = self.header.clone();
        if let Trained::Model { .. } = self.trainee.trained {
            header.weights_norm = Some(global_norm(&self.trainee.values(self.model)?).await?);
        }
        let state = save_state(&header, &self.trainee.moments).await?;
        Ok(TrainEvent::Checkpoint { step, files: Box::new(files), state })
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

/// Trains `target` of `model` (an adapter, made active; or the model's own weights) over the
/// planned optimizer steps, evaluating on `val_batches`. `clock` gives seconds (any origin);
/// `resume` is the `state` of a checkpoint whose adapter (or model) is loaded. Events go to
/// `on_event`, which may stop the run. `steps_per_epoch` only labels events.
#[allow(clippy::too_many_arguments)]
pub async fn train_steps(
    model: &mut LlamaModel,
    target: Target<'_>,
    steps: &[Vec<Batch>],
    steps_per_epoch: usize,
    val_batches: Option<&[Batch]>,
    options: &TrainOptions,
    resume: Option<&[u8]>,
    clock: &dyn Fn() -> f64,
    on_event: &mut dyn FnMut(TrainEvent) -> Control,
) -> Result<TrainSummary> {
    options.check()?;
    if let Target::Adapter(adapter) = target {
        model.set_adapter(adapter)?;
    }
    let total_steps = steps.len();
    if total_steps == 0 {
        return Err(Error::invalid("nothing to do: 0 epochs or max_steps 0"));
    }
    let mut trainee = Trainee::new(model, target)?;
    let mut header =
        StateHeader { step: 0, tokens: 0, best_val_loss: None, best_step: None, evals_without_improvement: 0, weights_norm: None };
    if let Some(bytes) = resume {
        let what = trainee.what();
        header = restore_state(bytes, &mut trainee.moments, what, &model.device())?;
    }
    let started_at = (header.step, header.tokens);
    let mut run = Run { model, trainee, options, header, total_steps, steps_per_epoch, started_at };
    // the best values, kept only where early stopping may go back to them (for the whole
    // model they are a second copy of it)
    let mut best: Option<Vec<Tensor<2>>> = None;
    let keep_best = options.patience.is_some();
    let start = clock();
    let mut final_loss = None;
    let mut end = TrainEnd::Completed;
    // the starting point of the validation curve (and the values early stopping falls back to)
    if let (0, Some(batches)) = (run.header.step, val_batches) {
        match run.eval(batches, 0, on_event).await? {
            Some(_) if keep_best => best = Some(run.trainee.values(run.model)?),
            Some(_) => {}
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
                Some(true) if keep_best => best = Some(run.trainee.values(run.model)?),
                Some(_) => {}
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
    // early stopping keeps the best values, as load_best_model_at_end does
    if let (TrainEnd::EarlyStopped, Some(best)) = (end, best) {
        run.trainee.set_values(run.model, best)?;
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

/// The trainer state file: AdamW's moments (read into it one matrix at a time) and `header`.
async fn save_state(header: &StateHeader, moments: &[(Tensor<2>, Tensor<2>)]) -> Result<Vec<u8>> {
    let entry = |name: String, t: &Tensor<2>| TensorEntry { name, shape: t.dims().to_vec(), dtype: StoreDtype::F32, values: t.clone() };
    let tensors = moments.iter().enumerate().flat_map(|(i, (m, v))| [entry(format!("{i:05}.m"), m), entry(format!("{i:05}.v"), v)]);
    let metadata = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(header).expect("serializable"))]);
    write_safetensors_reading(tensors.collect(), Some(metadata), read_host).await
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

/// Checks that `bytes` hold AdamW's moments for every matrix of `target` of `model` (a state
/// saved from another adapter or model is refused) before a resumed run changes anything.
pub fn check_state_fits(model: &LlamaModel, target: Target, bytes: &[u8]) -> Result<()> {
    let trainee = Trainee::of(model, target)?;
    let dims: Vec<[usize; 2]> = trainee.values(model)?.iter().map(Tensor::dims).collect();
    moment_views(&state_tensors(bytes)?, &dims, trainee.what()).map(|_| ())
}

/// Checks that a full fine-tuning state goes with `model`'s weights as they are (a run resumes
/// on the model loaded from its checkpoint's files), by their norm.
pub async fn check_state_weights(model: &LlamaModel, bytes: &[u8]) -> Result<()> {
    let Some(saved) = state_header(bytes)?.weights_norm else { return Ok(()) };
    let ours = global_norm(&Trainee::of(model, Target::Model)?.values(model)?).await?;
    if (ours - saved).abs() <= 1e-5 * saved {
        return Ok(());
    }
    Err(Error::file(
        "trainer state",
        format!(
            "it goes with other weights (their norm is {saved}, this model's {ours}): resume on the model loaded from the checkpoint's own files"
        ),
    ))
}

/// The tensors of a trainer state file, read in place.
fn state_tensors(bytes: &[u8]) -> Result<safetensors::SafeTensors<'_>> {
    safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::file("trainer state", format!("not a trainer state file: {e}")))
}

/// The saved (m, v) of each matrix of shape `dims`, in their order, checked (count, shapes, f32)
/// without reading them; `what` ("adapter", "model") names what the state must belong to.
fn moment_views<'a>(
    tensors: &'a safetensors::SafeTensors<'a>,
    dims: &[[usize; 2]],
    what: &str,
) -> Result<Vec<(safetensors::tensor::TensorView<'a>, safetensors::tensor::TensorView<'a>)>> {
    let not_state = |why: String| Error::file("trainer state", why);
    let (saved, matrices) = (tensors.len() / 2, dims.len());
    if tensors.len() != 2 * matrices {
        return Err(not_state(format!("it holds {saved} moments but this {what} has {matrices} matrices: it belongs to another {what}")));
    }
    let view = |name: String, shape: [usize; 2]| {
        let view = tensors.tensor(&name).map_err(|e| not_state(format!("{name}: {e}")))?;
        if view.shape() != shape || view.dtype() != safetensors::Dtype::F32 {
            return Err(not_state(format!("moment shapes differ from this {what}'s: it belongs to another {what}")));
        }
        Ok(view)
    };
    dims.iter().enumerate().map(|(i, &shape)| Ok((view(format!("{i:05}.m"), shape)?, view(format!("{i:05}.v"), shape)?))).collect()
}

/// Puts the moments saved in the state file `bytes` in place of `moments` (one matrix on the
/// host at a time), and returns the run's bookkeeping.
fn restore_state(bytes: &[u8], moments: &mut [(Tensor<2>, Tensor<2>)], what: &str, device: &Device) -> Result<StateHeader> {
    let header = state_header(bytes)?;
    let tensors = state_tensors(bytes)?;
    let dims: Vec<[usize; 2]> = moments.iter().map(|(m, _)| m.dims()).collect();
    // the views are f32 (moment_views checks)
    let host = |view: &safetensors::tensor::TensorView| {
        HostTensor::new(view.shape().to_vec(), decode(view.dtype(), view.data()).expect("an f32 moment"))
    };
    for ((m, v), (saved_m, saved_v)) in moments.iter_mut().zip(moment_views(&tensors, &dims, what)?) {
        (*m, *v) = (upload(host(&saved_m), device), upload(host(&saved_v), device));
    }
    Ok(header)
}
