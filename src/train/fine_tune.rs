//! A whole fine-tuning job, as the CLI and the browser run it: read and tokenize the data, split
//! off validation, add (or resume) the adapter, train, and hand back the adapter as PEFT files
//! with the run's summary. The edges only supply bytes, a clock and somewhere to put the events.

use serde::Serialize;

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::llm::Llm;
use crate::peft::{AdapterFiles, AdapterSource};
use crate::train::data::{DataOptions, DataReport, Dataset, ordered_batches, read_dataset};
use crate::train::trainer::{Control, TrainConfig, TrainEvent, TrainSummary, plan_steps, train_steps};

/// The summary file written beside a trained adapter.
pub const SUMMARY_FILE: &str = "training_summary.json";
/// The trainer-state file of a checkpoint.
pub const STATE_FILE: &str = "trainer_state.safetensors";

/// What to train.
#[derive(Debug, Clone)]
pub struct FineTune {
    pub adapter_name: String,
    pub lora: LoraConfig,
    pub data: DataOptions,
    pub train: TrainConfig,
    /// Fraction of the training file held out for validation when no validation file is given.
    pub val_split: Option<f64>,
    /// Concatenate examples into rows of up to max_seq_len tokens.
    pub packing: bool,
}

/// A file's name (for errors and format detection) and bytes.
pub type NamedBytes<'a> = (&'a str, &'a [u8]);

/// The result of [`fine_tune`].
#[derive(Debug, Clone, Serialize)]
pub struct FineTuneReport {
    pub summary: TrainSummary,
    pub train_data: DataReport,
    pub val_data: Option<DataReport>,
}

impl FineTuneReport {
    /// training_summary.json.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("serializable")
    }
}

/// Runs the job on `llm`: the adapter is added as `spec.adapter_name` (or, with `resume`, loaded
/// from a checkpoint's adapter with its trainer state) and left loaded and active. On error the
/// adapter keeps its last good values.
pub async fn fine_tune(
    llm: &mut Llm,
    spec: &FineTune,
    train_file: NamedBytes<'_>,
    val_file: Option<NamedBytes<'_>>,
    resume: Option<(AdapterSource, Vec<u8>)>,
    clock: &dyn Fn() -> f64,
    on_event: &mut dyn FnMut(TrainEvent) -> Control,
) -> Result<(FineTuneReport, AdapterFiles)> {
    spec.train.check()?;
    let tokenizer = llm.tokenizer()?;
    let mut train = read_dataset(train_file.0, train_file.1, tokenizer, &spec.data)?;
    let mut val = match (val_file, spec.val_split) {
        (Some((name, bytes)), _) => Some(read_dataset(name, bytes, tokenizer, &spec.data)?),
        (None, Some(fraction)) => {
            let report = train.report.clone();
            let (t, v) = train.split(fraction, spec.train.seed)?;
            train = Dataset { report: DataReport { examples: t.examples.len(), tokens: t.report.tokens, trainable_tokens: t.report.trainable_tokens, ..report }, ..t };
            Some(v)
        }
        (None, None) => None,
    };
    if spec.packing {
        let report = train.report.clone();
        train = Dataset { report, ..train.packed(spec.data.max_seq_len) };
        val = val.map(|v| Dataset { report: v.report.clone(), ..v.packed(spec.data.max_seq_len) });
    }
    let vocab = llm.model.config.vocab_size;
    if let Some(bad) = train.examples.iter().chain(val.iter().flat_map(|v| &v.examples)).flat_map(|e| &e.ids).find(|&&id| id as usize >= vocab) {
        return Err(Error::invalid(format!("the tokenizer produced id {bad}, outside the model's vocabulary ({vocab}): tokenizer and model do not match")));
    }

    let model = &mut llm.model;
    let state = match resume {
        Some((adapter, state)) => {
            model.load_adapter(&spec.adapter_name, adapter).await?;
            Some(state)
        }
        None => {
            model.add_adapter(&spec.adapter_name, spec.lora.clone(), spec.train.seed).await?;
            None
        }
    };
    let pad = model.config.eos_token_ids.first().copied().unwrap_or(0);
    let steps = plan_steps(&train, &spec.train, pad);
    let steps_per_epoch = train.examples.len().div_ceil(spec.train.batch_size).div_ceil(spec.train.grad_accum);
    let val_batches = val.as_ref().map(|v| ordered_batches(&v.examples, spec.train.batch_size, pad));
    let summary = train_steps(model, &spec.adapter_name, &steps, steps_per_epoch, val_batches.as_deref(), &spec.train, state.as_deref(), clock, on_event).await?;
    let files = model.save_adapter(&spec.adapter_name).await?;
    Ok((FineTuneReport { summary, train_data: train.report, val_data: val.map(|v| v.report) }, files))
}
