//! A whole fine-tuning job, as the CLI and the browser run it: read and tokenize the data, split
//! off validation, check that a step's buffers fit the device, add the adapter (or continue one, or resume a checkpoint), train, and hand back the adapter as PEFT files
//! with the run's summary. The edges only supply bytes, a clock and somewhere to put the events.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::llm::Llm;
use crate::lora::{AdapterFiles, AdapterSource, LoraConfig, LoraModel};
use crate::nn::weight::max_buffer_bytes;
use crate::train::TrainOptions;
use crate::train::data::{DataReport, Dataset, ordered_batches, read_dataset};
use crate::train::memory::check_step_buffers;
use crate::train::trainer::{Control, TrainEvent, TrainSummary, check_state, check_state_fits, plan_steps, train_steps};

/// The summary file written beside a trained adapter.
pub const SUMMARY_FILE: &str = "training_summary.json";
/// The trainer-state file of a checkpoint.
pub const STATE_FILE: &str = "trainer_state.safetensors";

/// A file's name (for errors and format detection) and bytes.
pub type NamedBytes<'a> = (&'a str, &'a [u8]);

/// The result of [`fine_tune`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
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

/// Where a fine-tuning run's adapter comes from.
pub enum TrainStart {
    /// A new adapter, made from the run's LoRA options.
    New,
    /// An existing adapter trained further (PEFT's `from_pretrained(..., is_trainable=True)`): its
    /// adapter_config.json holds the LoRA settings, and a LoRA option set otherwise is refused.
    From(AdapterSource),
    /// A checkpoint of a run: its adapter and trainer state (trainer_state.safetensors).
    Resume(AdapterSource, Vec<u8>),
}

/// Runs the job on `llm`: the adapter (`start`) is loaded or added as `options.adapter_name`,
/// trained, and left loaded and active. On error the adapter keeps its last good values.
pub async fn fine_tune(
    llm: &mut Llm,
    options: &TrainOptions,
    train_file: NamedBytes<'_>,
    val_file: Option<NamedBytes<'_>>,
    start: TrainStart,
    clock: &dyn Fn() -> f64,
    on_event: &mut dyn FnMut(TrainEvent) -> Control,
) -> Result<(FineTuneReport, AdapterFiles)> {
    options.check()?;
    let lora = options.lora_config()?;
    let data = options.data_options();
    let tokenizer = llm.tokenizer.as_ref();
    let mut train = read_dataset(train_file.0, train_file.1, tokenizer, &data)?;
    let mut val = match (val_file, options.val_split) {
        (Some((name, bytes)), _) => Some(read_dataset(name, bytes, tokenizer, &data)?),
        (None, Some(fraction)) => {
            let (t, v) = train.split(fraction, options.seed)?;
            train = t;
            Some(v)
        }
        (None, None) => None,
    };
    if options.packing {
        let report = train.report.clone();
        train = Dataset { report, ..train.packed(data.max_seq_len) };
        val = val.map(|v| Dataset { report: v.report.clone(), ..v.packed(data.max_seq_len) });
    }
    let vocab = llm.model.config.vocab_size;
    let examples = || train.examples.iter().chain(val.iter().flat_map(|v| &v.examples));
    let ids = examples().flat_map(|e| &e.ids).map(|&id| id as usize);
    if let Some(bad) = ids.chain(examples().flat_map(|e| &e.labels).filter_map(|&l| usize::try_from(l).ok())).find(|&id| id >= vocab) {
        return Err(Error::invalid(format!(
            "token id {bad} is outside the model's vocabulary ({vocab}): the data was tokenized for another model (its tokenizer and this model do not match)"
        )));
    }

    let model = &mut llm.model;
    let pad = model.config.pad_token_id();
    let (steps, steps_per_epoch) = plan_steps(&train, options, pad);
    let val_batches = val.as_ref().map(|v| ordered_batches(&v.examples, options.batch_size, pad));
    let batches = steps.iter().flatten().chain(val_batches.iter().flatten());
    check_step_buffers(&model.config, batches, max_buffer_bytes())?;

    let name = &options.adapter_name;
    let state = match start {
        TrainStart::New => {
            model.add_adapter(name, lora, options.seed).await?;
            None
        }
        TrainStart::From(adapter) => {
            check_continues(options, &adapter)?;
            model.load_adapter(name, adapter).await?;
            None
        }
        TrainStart::Resume(adapter, state) => {
            check_state(&state)?; // a bad state file leaves no adapter behind
            model.load_adapter(name, adapter).await?;
            // nor does a state of another adapter
            if let Err(e) = check_state_fits(model, name, &state) {
                model.delete_adapter(name).await?;
                return Err(e);
            }
            Some(state)
        }
    };
    let summary =
        train_steps(model, name, &steps, steps_per_epoch, val_batches.as_deref(), options, state.as_deref(), clock, on_event).await?;
    let files = model.export_adapter(name).await?;
    Ok((FineTuneReport { summary, train_data: train.report, val_data: val.map(|v| v.report) }, files))
}

/// Refuses the LoRA options that a run continuing `adapter` sets otherwise than its
/// adapter_config.json, naming each (an option left at its default takes the adapter's value).
fn check_continues(options: &TrainOptions, adapter: &AdapterSource) -> Result<()> {
    let (file, json) = &adapter.config;
    let theirs = LoraConfig::from_json(json, file)?.training_settings();
    let (ours, defaults) = (options.lora_config()?.training_settings(), TrainOptions::default().lora_config()?.training_settings());
    let clashes: Vec<String> = ours
        .iter()
        .zip(&defaults)
        .zip(&theirs)
        .filter(|(((_, asked), (_, default)), (_, stored))| asked != default && asked != stored)
        .map(|(((name, asked), _), (_, stored))| format!("{name} {asked} (the adapter's is {stored})"))
        .collect();
    if clashes.is_empty() {
        return Ok(());
    }
    Err(Error::file(
        file,
        format!(
            "the run continues this adapter but asks for {}: leave those options out (the adapter's settings are used) or train a new adapter",
            clashes.join(", ")
        ),
    ))
}
