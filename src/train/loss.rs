//! The causal-LM loss as transformers computes it: logits at position t predict the label at
//! t + 1; labels of -100 are ignored; cross-entropy in f32.
//!
//! The frozen head never runs under autodiff: the loss and its gradient with respect to the
//! logits, softmax(z) - onehot(label), come from one softmax, a slice of positions at a time, and
//! only positions whose label counts are put through the head at all.

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

/// The loss of `hidden` ([rows, hidden], plain) against `targets`, `rows_at_once` positions at a
/// time, and with `grad` also dLoss/dhidden: (softmax - onehot) · W for the linear head W.
fn head_loss_slices(
    head: &Head,
    hidden: Tensor<2>,
    targets: Tensor<2, Int>,
    rows_at_once: usize,
    grad: bool,
) -> (Tensor<1>, Option<Tensor<2>>) {
    let n = hidden.dims()[0];
    let mut loss: Option<Tensor<1>> = None;
    let mut grads = Vec::new();
    for start in (0..n).step_by(rows_at_once) {
        let len = rows_at_once.min(n - start);
        let h = hidden.clone().narrow(0, start, len);
        let targets = targets.clone().narrow(0, start, len);
        let (rows, dlogits) = cross_entropy(head.logits(h), targets);
        let part = rows.sum();
        if grad {
            grads.push(head.input_grad(dlogits));
        }
        loss = Some(match loss {
            None => part,
            Some(sum) => sum + part,
        });
    }
    (loss.expect("at least one row"), grad.then(|| Tensor::cat(grads, 0)))
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
            (head_loss_slices(head, rows, targets, rows_at_once, false).0, count)
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

/// The loss of `batch` from its final hidden states [batch, seq, hidden] (autodiff) and the
/// model's `head`, each token's weighted by `weights`: returns the surrogate sum(h * dLoss/dh),
/// whose backward gives every earlier parameter its true gradient, and the loss value ([1],
/// plain; with per-row weights, the unweighted sum).
pub fn head_loss_backward(
    head: &Head,
    hidden: Tensor<3>,
    batch: &Batch,
    weights: LossWeights,
    rows_at_once: usize,
) -> (Tensor<1>, Tensor<1>) {
    let device = hidden.device();
    let Some((rows, targets)) = counted_rows(hidden.clone(), batch) else {
        // nothing counts: a zero loss whose gradient is zero everywhere
        return (hidden.sum().mul_scalar(0.0), Tensor::zeros([1], &device.inner()));
    };
    let (loss, grad) = head_loss_slices(head, rows.clone().inner(), targets, rows_at_once, true);
    let grad = grad.expect("asked for");
    let (grad, loss) = match weights {
        LossWeights::Uniform(scale) => (grad.mul_scalar(scale), loss.mul_scalar(scale)),
        LossWeights::PerRow(per_row) => {
            let of_position: Vec<f32> = counted_targets(batch).0.iter().map(|&p| per_row[p as usize / (batch.seq - 1)] as f32).collect();
            let k = of_position.len();
            (grad * Tensor::<2>::from_data(TensorData::new(of_position, [k, 1]), &device.inner()), loss)
        }
    };
    ((rows * grad).sum(), loss)
}
