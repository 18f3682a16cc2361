//! The causal-LM loss as transformers computes it: logits at position t predict the label at
//! t + 1; labels of -100 are ignored; cross-entropy in f32.
//!
//! The head never runs under autodiff: the loss and its gradient with respect to the logits,
//! softmax(z) - onehot(label), come from one softmax, a slice of positions at a time, and only
//! positions whose label counts are put through the head at all. Where full fine-tuning trains
//! the head, its weight's gradient dLoss/dlogitsᵀ · h is summed over the same slices.

use burn::tensor::{Int, Tensor, TensorData};

use crate::error::Result;
use crate::model::Head;
use crate::nn::ops::cross_entropy;
use crate::tensor::read_f32;
use crate::train::data::{Batch, IGNORE};

/// How each trained token's loss weighs in a gradient.
#[derive(Debug, Clone, Copy)]
pub enum LossWeights<'a> {
    /// Every token alike (SFT: 1 / the step's trainable tokens, for the mean).
    Uniform(f64),
    /// Every token of row `b` of the batch by `weights[b]` (DPO: a sequence's log-probability is
    /// minus its tokens' summed loss, and the pair's loss weighs it; see [`crate::train::dpo`]).
    PerRow(&'a [f64]),
}

/// Positions whose logits exist at once: 128 x a 49152-word vocabulary is 25 MB (twice: the
/// logits and their softmax) instead of the 100 MB of a 4 x 128 batch's logits.
pub const LOSS_ROWS: usize = 128;

/// The positions of `batch` whose next token counts, as rows of the flattened
/// [batch * (seq - 1)] positions, and those next tokens.
fn counted_targets(batch: &Batch) -> (Vec<i32>, Vec<i32>) {
    let seq = batch.seq;
    let next = batch.labels.chunks(seq).flat_map(|row| row[1..].iter().copied());
    next.enumerate().filter(|&(_, t)| t != IGNORE).map(|(row, t)| (row as i32, t)).unzip()
}

/// The hidden states [batch, seq, hidden] of the positions that count, [rows, hidden], and their
/// targets [rows, 1]; `None` when no position counts.
fn counted_rows(hidden: Tensor<3>, batch: &Batch) -> Option<(Tensor<2>, Tensor<2, Int>)> {
    let [b, seq, width] = hidden.dims();
    let n = b * (seq - 1);
    let (rows, targets) = counted_targets(batch);
    if rows.is_empty() {
        return None;
    }
    let device = hidden.device();
    let hidden = hidden.narrow(1, 0, seq - 1).reshape([n, width]);
    let k = rows.len();
    let hidden = if k == n { hidden } else { hidden.select(0, Tensor::<1, Int>::from_data(TensorData::new(rows, [k]), &device)) };
    // the targets only meet the plain logits: on an autodiff device they would route the loss
    // through autodiff's composed operations
    Some((hidden, Tensor::from_data(TensorData::new(targets, [k, 1]), &device.inner())))
}

/// How the loss of each position weighs in the gradient of [`head_loss_slices`].
enum Scale {
    /// Every position alike.
    Uniform(f64),
    /// Position i by row i of this [rows, 1] tensor.
    Positions(Box<Tensor<2>>),
}

/// What [`head_loss_slices`] computes besides the loss.
struct HeadGrads {
    /// dLoss/dhidden, [rows, hidden].
    input: Tensor<2>,
    /// dLoss/dW of each buffer of the head's weight as it is held, when the head is trained.
    weight: Option<Vec<Tensor<2>>>,
}

/// The loss of `hidden` ([rows, hidden], plain) against `targets`, `rows_at_once` positions at a
/// time, and with `grad` (each position's loss weighted by it) also dLoss/dhidden: (softmax -
/// onehot) · W for the linear head W, and dLoss/dW where `head` is trained (full fine-tuning).
fn head_loss_slices(
    head: &Head,
    hidden: Tensor<2>,
    targets: Tensor<2, Int>,
    rows_at_once: usize,
    grad: Option<Scale>,
) -> (Tensor<1>, Option<HeadGrads>) {
    let n = hidden.dims()[0];
    let trained = grad.is_some() && head.is_trained();
    let constant = if trained { head.constant() } else { head.clone() };
    let mut loss: Option<Tensor<1>> = None;
    let mut grads = Vec::new();
    let mut weight_grads: Option<Vec<Tensor<2>>> = None;
    for start in (0..n).step_by(rows_at_once) {
        let len = rows_at_once.min(n - start);
        let h = hidden.clone().narrow(0, start, len);
        let targets = targets.clone().narrow(0, start, len);
        let (rows, dlogits) = cross_entropy(constant.logits(h.clone()), targets);
        let part = rows.sum();
        if let Some(scale) = &grad {
            // per-position weights scale the rows of what the gradients are made of ([rows,
            // hidden]), never the [rows, vocab] dlogits; a uniform one scales the sums at the end
            let weights = match scale {
                Scale::Positions(w) => Some((**w).clone().narrow(0, start, len)),
                Scale::Uniform(_) => None,
            };
            if trained {
                let h = weights.clone().map_or(h.clone(), |w| h * w);
                weight_grads = Some(constant.add_weight_grads(weight_grads.take(), h, dlogits.clone()));
            }
            let input = constant.input_grad(dlogits);
            grads.push(weights.map_or(input.clone(), |w| input * w));
        }
        loss = Some(match loss {
            None => part,
            Some(sum) => sum + part,
        });
    }
    let grads = grad.map(|scale| {
        let (input, weight) = (Tensor::cat(grads, 0), weight_grads);
        match scale {
            Scale::Uniform(s) => {
                HeadGrads { input: input.mul_scalar(s), weight: weight.map(|w| w.into_iter().map(|g| g.mul_scalar(s)).collect()) }
            }
            Scale::Positions(_) => HeadGrads { input, weight },
        }
    });
    (loss.expect("at least one row"), grads)
}

/// The summed token loss of `batch` ([1]) given its final hidden states [batch, seq, hidden]
/// (no gradients) and the model's `head` ([`LlamaModel::head_for_slices`](crate::LlamaModel::head_for_slices)),
/// and how many tokens it covers. Divide by the tokens for the mean.
pub fn summed_token_loss(head: &Head, hidden: Tensor<3>, batch: &Batch, rows_at_once: usize) -> (Tensor<1>, usize) {
    let device = hidden.device();
    match counted_rows(hidden, batch) {
        None => (Tensor::zeros([1], &device), 0),
        Some((rows, targets)) => {
            let count = rows.dims()[0];
            (head_loss_slices(head, rows, targets, rows_at_once, None).0, count)
        }
    }
}

/// The summed token loss of each row of `batch` (minus the row's log-probability of its
/// labelled tokens) from its final hidden states [batch, seq, hidden] (no gradients).
pub async fn row_losses(head: &Head, hidden: Tensor<3>, batch: &Batch, rows_at_once: usize) -> Result<Vec<f64>> {
    let mut sums = vec![0.0; batch.batch];
    let Some((rows, targets)) = counted_rows(hidden, batch) else { return Ok(sums) };
    let n = rows.dims()[0];
    let mut losses = Vec::with_capacity(n);
    for start in (0..n).step_by(rows_at_once) {
        let len = rows_at_once.min(n - start);
        let (loss, _) = cross_entropy(head.logits(rows.clone().narrow(0, start, len)), targets.clone().narrow(0, start, len));
        losses.extend(read_f32(loss).await?);
    }
    for (position, loss) in counted_targets(batch).0.into_iter().zip(losses) {
        sums[position as usize / (batch.seq - 1)] += loss as f64;
    }
    Ok(sums)
}

/// What [`head_loss_backward`] gives.
pub struct HeadLoss {
    /// sum(h * dLoss/dh): its backward gives every earlier parameter its true gradient.
    pub surrogate: Tensor<1>,
    /// The loss value ([1], plain; with per-row weights, the unweighted sum).
    pub loss: Tensor<1>,
    /// dLoss/dW of a trained head's weight (full fine-tuning), one per buffer the head holds it in.
    pub weight_grads: Option<Vec<Tensor<2>>>,
}

/// The loss of `batch` from its final hidden states [batch, seq, hidden] (autodiff) and the
/// model's `head`, each token's weighted by `weights` in the gradient.
pub fn head_loss_backward(head: &Head, hidden: Tensor<3>, batch: &Batch, weights: LossWeights, rows_at_once: usize) -> HeadLoss {
    let device = hidden.device();
    let Some((rows, targets)) = counted_rows(hidden.clone(), batch) else {
        // nothing counts: a zero loss whose gradient is zero everywhere
        let weight_grads = head.is_trained().then(|| head.zero_weight_grads());
        return HeadLoss { surrogate: hidden.sum().mul_scalar(0.0), loss: Tensor::zeros([1], &device.inner()), weight_grads };
    };
    let (scale, loss_scale) = match weights {
        LossWeights::Uniform(scale) => (Scale::Uniform(scale), scale),
        LossWeights::PerRow(per_row) => {
            let of_position: Vec<f32> = counted_targets(batch).0.iter().map(|&p| per_row[p as usize / (batch.seq - 1)] as f32).collect();
            let k = of_position.len();
            (Scale::Positions(Box::new(Tensor::from_data(TensorData::new(of_position, [k, 1]), &device.inner()))), 1.0)
        }
    };
    let (loss, grads) = head_loss_slices(head, rows.clone().inner(), targets, rows_at_once, Some(scale));
    let HeadGrads { input, weight } = grads.expect("asked for");
    HeadLoss { surrogate: (rows * input).sum(), loss: loss.mul_scalar(loss_scale), weight_grads: weight }
}
