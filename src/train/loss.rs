//! The causal-LM loss as transformers computes it: logits at position t predict the label at
//! t + 1; labels of -100 are ignored; cross-entropy in f32.

use burn::tensor::{Int, Tensor, TensorData};

use crate::train::data::{Batch, IGNORE};

/// The summed token losses of `batch` ([1]) given its logits [batch, seq, vocab], and how many
/// tokens they cover. Divide by the tokens of the whole optimizer step for the mean.
pub fn summed_token_loss(logits: Tensor<3>, batch: &Batch) -> (Tensor<1>, usize) {
    let [b, seq, vocab] = logits.dims();
    let device = logits.device();
    let n = b * (seq - 1);
    let targets: Vec<i32> = batch.labels.chunks(seq).flat_map(|row| row[1..].iter().copied()).collect();
    let count = targets.iter().filter(|&&t| t != IGNORE).count();
    let mask: Vec<f32> = targets.iter().map(|&t| if t == IGNORE { 0.0 } else { 1.0 }).collect();
    let index: Vec<i32> = targets.iter().map(|&t| t.max(0)).collect();
    let index = Tensor::<2, Int>::from_data(TensorData::new(index, [n, 1]), &device);
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, 1]), &device);

    let logits = logits.narrow(1, 0, seq - 1).reshape([n, vocab]);
    let log_probs = burn::tensor::activation::log_softmax(logits, 1);
    let picked = log_probs.gather(1, index);
    ((picked * mask).sum().neg(), count)
}
