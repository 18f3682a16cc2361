//! The causal-LM loss as transformers computes it: logits at position t predict the label at
//! t + 1; labels of -100 are ignored; cross-entropy in f32.

use burn::tensor::{Int, Tensor, TensorData};

use crate::model::LlamaModel;
use crate::train::data::{Batch, IGNORE};

/// The shifted targets of `batch` as gather indices [n, 1] and a mask [n, 1] (0 where ignored),
/// n = batch * (seq - 1), and how many tokens count.
fn targets(batch: &Batch, device: &burn::tensor::Device) -> (Tensor<2, Int>, Tensor<2>, usize) {
    let seq = batch.seq;
    let targets: Vec<i32> = batch.labels.chunks(seq).flat_map(|row| row[1..].iter().copied()).collect();
    let n = targets.len();
    let count = targets.iter().filter(|&&t| t != IGNORE).count();
    let mask: Vec<f32> = targets.iter().map(|&t| if t == IGNORE { 0.0 } else { 1.0 }).collect();
    let index: Vec<i32> = targets.iter().map(|&t| t.max(0)).collect();
    (Tensor::from_data(TensorData::new(index, [n, 1]), device), Tensor::from_data(TensorData::new(mask, [n, 1]), device), count)
}

/// -sum of the log-probabilities of the picked targets, over rows of logits [rows, vocab].
fn picked_loss(logits: Tensor<2>, index: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
    let log_probs = burn::tensor::activation::log_softmax(logits, 1);
    (log_probs.gather(1, index) * mask).sum().neg()
}

/// The summed token losses of `batch` ([1]) given its logits [batch, seq, vocab], and how many
/// tokens they cover. Divide by the tokens of the whole optimizer step for the mean.
pub fn summed_token_loss(logits: Tensor<3>, batch: &Batch) -> (Tensor<1>, usize) {
    let [b, seq, vocab] = logits.dims();
    let (index, mask, count) = targets(batch, &logits.device());
    let logits = logits.narrow(1, 0, seq - 1).reshape([b * (seq - 1), vocab]);
    (picked_loss(logits, index, mask), count)
}

/// Positions whose logits exist at once in [`head_loss_backward`] during training: 128 x a 49152-word vocabulary
/// is 25 MB instead of the 100 MB a 4 x 128 batch's logits take (three times over, with the
/// softmax and its gradient).
pub const LOSS_ROWS: usize = 128;

/// The loss of `batch` from its final hidden states [batch, seq, hidden] (autodiff), times
/// `scale`, without ever holding the whole [positions, vocab] logits: the frozen head and the
/// loss run `rows` positions at a time on a detached copy of the hidden rows, each slice
/// backpropagated at once to give dLoss/dh for its rows. Returns the surrogate sum(h * dLoss/dh),
/// whose backward gives every earlier parameter its true gradient, and the loss value ([1], plain).
pub fn head_loss_backward(model: &LlamaModel, hidden: Tensor<3>, batch: &Batch, scale: f64, rows_at_once: usize) -> (Tensor<1>, Tensor<1>) {
    let [b, seq, width] = hidden.dims();
    let n = b * (seq - 1);
    let (index, mask, _) = targets(batch, &hidden.device());
    let rows = hidden.narrow(1, 0, seq - 1).reshape([n, width]);
    let detached = rows.clone().inner();
    let mut grads = Vec::new();
    let mut loss: Option<Tensor<1>> = None;
    for start in (0..n).step_by(rows_at_once) {
        let len = rows_at_once.min(n - start);
        let h = detached.clone().narrow(0, start, len).autodiff().require_grad();
        let logits = model.lm_head(h.clone().reshape([1, len, width])).reshape([len, model.config.vocab_size]);
        let part = picked_loss(logits, index.clone().narrow(0, start, len), mask.clone().narrow(0, start, len)).mul_scalar(scale);
        let g = part.backward();
        grads.push(h.grad(&g).expect("the hidden rows are a leaf of this slice's loss"));
        let value = part.inner();
        loss = Some(match loss {
            None => value,
            Some(sum) => sum + value,
        });
    }
    let surrogate = (rows * Tensor::cat(grads, 0)).sum();
    (surrogate, loss.expect("a batch has a position"))
}
