//! Memory a training run needs, checked before a run changes anything.
//!
//! **Buffers.** The largest buffers a training step allocates on the device, checked against
//! the device's largest buffer. WebGPU refuses a buffer above `maxBufferSize` /
//! `maxStorageBufferBindingSize`, and the engine cannot survive that failure mid-step; here it is
//! an error that names the buffer, its size and the setting to lower.
//!
//! Per micro-batch of `rows` x `seq` positions (f32, 4 bytes each):
//!
//! ```text
//! attention scores  rows * heads * seq * seq        (softmax(q k^T) of a layer, kept for backward)
//! MLP activations   rows * seq * intermediate       (gate, up and their product, each this size)
//! logits            LOSS_ROWS * vocab               (the loss takes a slice of positions at a time)
//! ```
//!
//! **Full fine-tuning's total.** Every weight trains, so the model is held four times over and
//! more (P parameters, f32):
//!
//! ```text
//! weights           4 P   (AdamW writes each in place)
//! gradients         4 P   (a micro-batch runs unsplit: a part would need a gradient of its own)
//! AdamW moments     8 P   (m and v)
//! activations       per layer: rows * seq * (10 hidden + 4 intermediate) + rows * heads * seq^2,
//!                   times the layers (with gradient checkpointing: one layer's, plus every layer's input)
//! and where asked:  4 P   the gradients' sum over micro-batches (gradient accumulation)
//!                   4 P   the best weights (early stopping)
//!                  12 P   a checkpoint: the files of the weights and of the moments, each read into its file a matrix at a time
//! ```
//!
//! An estimate, stated before the run and refused above the memory the caller says there is.

use std::collections::BTreeSet;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::train::TrainOptions;
use crate::train::data::Batch;
use crate::train::loss::LOSS_ROWS;

/// One buffer a step allocates: what it holds, how its size is made up, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepBuffer {
    pub what: &'static str,
    pub dims: String,
    pub bytes: usize,
}

/// The largest buffers a step of a `rows` x `seq` micro-batch allocates, largest first.
pub fn step_buffers(config: &LlamaConfig, rows: usize, seq: usize) -> Vec<StepBuffer> {
    let (heads, inter, vocab) = (config.num_attention_heads, config.intermediate_size, config.vocab_size);
    let logit_rows = LOSS_ROWS.min(rows * seq);
    let mut buffers = vec![
        StepBuffer {
            what: "attention scores",
            dims: format!("{rows} rows x {heads} heads x {seq} x {seq} positions x 4 bytes"),
            bytes: 4 * rows * heads * seq * seq,
        },
        StepBuffer {
            what: "MLP activations",
            dims: format!("{rows} rows x {seq} positions x {inter} x 4 bytes"),
            bytes: 4 * rows * seq * inter,
        },
        StepBuffer { what: "logits", dims: format!("{logit_rows} positions x {vocab} words x 4 bytes"), bytes: 4 * logit_rows * vocab },
    ];
    buffers.sort_by(|a, b| b.bytes.cmp(&a.bytes));
    buffers
}

/// Refuses a run with a micro-batch (of `batches`) that needs a buffer above `limit` bytes (0:
/// no limit known), before anything is allocated. Each shape is checked: the batch with the
/// largest attention scores (rows x seq^2) need not be the one with the largest MLP activations
/// (rows x seq).
pub fn check_step_buffers<'a>(config: &LlamaConfig, batches: impl IntoIterator<Item = &'a Batch>, limit: usize) -> Result<()> {
    if limit == 0 {
        return Ok(());
    }
    let shapes: BTreeSet<(usize, usize)> = batches.into_iter().map(|b| (b.batch, b.seq)).collect();
    let over = shapes
        .into_iter()
        .find_map(|(rows, seq)| step_buffers(config, rows, seq).into_iter().find(|b| b.bytes > limit).map(|b| (rows, seq, b)));
    let Some((rows, seq, over)) = over else { return Ok(()) };
    Err(Error::invalid(format!(
        "a training step of {} x {} tokens needs {} in one GPU buffer for its {} ({}), more than this GPU's largest buffer, {} \
         (WebGPU's maxStorageBufferBindingSize / maxBufferSize): lower the batch size (batchSize, --batch-size; \
         gradientAccumulationSteps, --grad-accum, keeps the effective batch size) or the longest sequence (maxSeqLen, --max-seq-len)",
        rows,
        seq,
        megabytes(over.bytes),
        over.what,
        over.dims,
        megabytes(limit)
    )))
}

/// One part of [`full_memory`]'s estimate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPart {
    pub what: &'static str,
    pub bytes: usize,
}

/// Full fine-tuning's memory estimate for a model of `parameters` weights (`config`'s shapes),
/// micro-batches of up to `rows` x `seq`, trained as `options` say (see the module doc).
pub fn full_memory(config: &LlamaConfig, parameters: usize, rows: usize, seq: usize, options: &TrainOptions) -> Vec<MemoryPart> {
    let (hidden, inter, heads, layers) =
        (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers);
    let per_layer = 4 * (rows * seq * (10 * hidden + 4 * inter) + rows * heads * seq * seq);
    let activations = match options.gradient_checkpointing {
        true => per_layer + 4 * layers * rows * seq * hidden,
        false => layers * per_layer,
    };
    let logits = 2 * 4 * LOSS_ROWS.min(rows * seq) * config.vocab_size;
    let copy = 4 * parameters;
    let optional = [
        (options.grad_accum > 1, "the gradients' sum over micro-batches", copy),
        (options.patience.is_some(), "the best weights (early stopping)", copy),
        (options.checkpoint_every.is_some(), "a checkpoint (the files of the weights and the moments)", 3 * copy),
    ];
    let mut parts = vec![
        MemoryPart { what: "weights", bytes: copy },
        MemoryPart { what: "gradients", bytes: copy },
        MemoryPart { what: "AdamW moments", bytes: 2 * copy },
        MemoryPart { what: "activations", bytes: activations + logits },
    ];
    parts.extend(optional.into_iter().filter(|(on, ..)| *on).map(|(_, what, bytes)| MemoryPart { what, bytes }));
    parts
}

/// Refuses a full fine-tuning run whose estimate (`parts`) is above `limit` bytes, naming the sizes.
pub fn check_full_memory(parts: &[MemoryPart], limit: Option<usize>) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.bytes).sum();
    match limit {
        Some(limit) if total > limit => Err(Error::invalid(format!(
            "full fine-tuning of this model needs about {} ({}), more than the {} available (memory_limit_mb; CLI --memory-limit-mb, JS memoryLimitMb): \
             train a LoRA adapter instead (method sft), or lower the batch size or the longest sequence, \
             or turn on gradient checkpointing",
            megabytes(total),
            list(parts),
            megabytes(limit)
        ))),
        _ => Ok(()),
    }
}

/// An estimate's parts for people: "weights 538.1 MB, gradients 538.1 MB, ...".
pub fn list(parts: &[MemoryPart]) -> String {
    parts.iter().map(|p| format!("{} {:.1} MB", p.what, p.bytes as f64 / 1e6)).collect::<Vec<_>>().join(", ")
}

/// `bytes` for people: "1074.8 MB (1073741824 bytes)".
pub fn megabytes(bytes: usize) -> String {
    format!("{:.1} MB ({bytes} bytes)", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, inter: usize, vocab: usize) -> LlamaConfig {
        let hidden = 64 * heads;
        let json = format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": {vocab}, "hidden_size": {hidden}, "intermediate_size": {inter},
                "num_hidden_layers": 2, "num_attention_heads": {heads}, "num_key_value_heads": {heads}, "max_position_embeddings": 4096}}"#
        );
        LlamaConfig::from_json(json.as_bytes(), "config.json").unwrap()
    }

    fn batch(rows: usize, seq: usize) -> Batch {
        Batch { ids: vec![0; rows * seq], labels: vec![0; rows * seq], batch: rows, seq, tokens: rows * seq }
    }

    #[test]
    fn sizes_are_the_products_of_the_shapes() {
        // SmolLM2-135M's shapes, a batch of 4 x 128
        let buffers = step_buffers(&config(9, 1536, 49152), 4, 128);
        let bytes = |what| buffers.iter().find(|b| b.what == what).unwrap().bytes;
        assert_eq!(bytes("attention scores"), 4 * 4 * 9 * 128 * 128);
        assert_eq!(bytes("MLP activations"), 4 * 4 * 128 * 1536);
        assert_eq!(bytes("logits"), 4 * 128 * 49152);
        assert!(buffers.windows(2).all(|w| w[0].bytes >= w[1].bytes), "largest first");
    }

    #[test]
    fn full_fine_tuning_counts_what_the_options_add() {
        let c = config(9, 1536, 49152);
        let total = |parts: &[MemoryPart]| parts.iter().map(|p| p.bytes).sum::<usize>();
        let plain = full_memory(&c, 1000, 4, 128, &TrainOptions::default());
        assert_eq!(plain.iter().map(|p| p.what).collect::<Vec<_>>(), ["weights", "gradients", "AdamW moments", "activations"]);
        assert_eq!(plain[2].bytes, 8000);
        let options = TrainOptions { grad_accum: 2, patience: Some(3), checkpoint_every: Some(10), ..Default::default() };
        let all = full_memory(&c, 1000, 4, 128, &options);
        assert_eq!(total(&all) - total(&plain), 4000 + 4000 + 12000, "a gradient sum, the best weights, a checkpoint");
        let checkpointed = full_memory(&c, 1000, 4, 128, &TrainOptions { gradient_checkpointing: true, ..Default::default() });
        assert!(total(&checkpointed) < total(&plain), "gradient checkpointing keeps one layer's activations");
        let e = check_full_memory(&plain, Some(1000)).unwrap_err().to_string();
        assert!(e.contains("more than the 0.0 MB (1000 bytes) available") && e.contains("AdamW moments 0.0 MB"), "{e}");
    }

    #[test]
    fn a_step_over_the_limit_is_refused_naming_the_buffer_and_the_setting() {
        let c = config(4, 128, 256);
        let limit = 1 << 30;
        // 4096 x 4 x 128 x 128 x 4 bytes is exactly the limit: it fits; one row more does not
        check_step_buffers(&c, &[batch(4096, 128), batch(2, 16)], limit).unwrap();
        let e = check_step_buffers(&c, &[batch(2, 16), batch(4097, 128)], limit).unwrap_err().to_string();
        assert!(
            e.contains(
                "a training step of 4097 x 128 tokens needs 1074.0 MB (1074003968 bytes) in one GPU buffer for its attention scores"
            ),
            "{e}"
        );
        assert!(e.contains("4097 rows x 4 heads x 128 x 128 positions x 4 bytes"), "{e}");
        assert!(e.contains("batchSize, --batch-size") && e.contains("maxSeqLen, --max-seq-len"), "{e}");
        check_step_buffers(&c, &[batch(4097, 128)], 0).expect("no limit known: nothing refused");
        // the batch with the most attention scores (4 x 128 x 128 against 8192 x 2 x 2) is not the
        // one whose MLP activations (8192 x 2 x 128 x 4 bytes = 8.4 MB) are over a 4 MiB limit
        let (long, wide) = (batch(4, 128), batch(8192, 2));
        check_step_buffers(&c, &[long.clone()], 1 << 22).expect("the long batch fits");
        let e = check_step_buffers(&c, &[long, wide], 1 << 22).unwrap_err().to_string();
        assert!(
            e.contains("a training step of 8192 x 2 tokens needs 8.4 MB (8388608 bytes) in one GPU buffer for its MLP activations"),
            "{e}"
        );
    }
}
