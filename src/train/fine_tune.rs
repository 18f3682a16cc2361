//! A whole fine-tuning job, as the CLI and the browser run it: read and tokenize the data, split
//! off validation, check that a step's buffers fit the device, add the adapter (or continue one,
//! or resume a checkpoint), train, and hand back the adapter as PEFT files with the run's
//! summary; or, for full fine-tuning, estimate the memory, train every weight and hand back the
//! model as a Hugging Face directory. The edges only supply bytes, a clock and somewhere to put
//! the events.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::io::StoreDtype;
use crate::llm::Llm;
use crate::lora::{AdapterSource, LoraConfig, LoraModel};
use crate::nn::weight::max_buffer_bytes;
use crate::train::Method;
use crate::train::TrainOptions;
use crate::train::data::{Batch, DataReport, Dataset, Example, ordered_batches, read_dataset};
use crate::train::dpo::{PreferencePair, check_dropout, preference_batch, read_preferences};
use crate::train::memory::{check_full_memory, check_step_buffers, full_memory};
use crate::train::trainer::{
    Control, Target, TrainEvent, TrainSummary, TrainedFiles, check_state, check_state_fits, check_state_weights, plan_steps, train_steps,
};

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
    /// A checkpoint of a full fine-tuning run: the model was loaded from its files, and this is
    /// its trainer state.
    ResumeModel(Vec<u8>),
}

/// Runs the job on `llm`: the adapter (`start`) is loaded or added as `options.adapter_name`,
/// trained, and left loaded and active; or (`Method::Full`) the model's own weights are trained
/// in place. On error the adapter (or the model) keeps its last good values. Full fine-tuning
/// first reports its memory estimate ([`TrainEvent::Memory`]).
pub async fn fine_tune(
    llm: &mut Llm,
    options: &TrainOptions,
    train_file: NamedBytes<'_>,
    val_file: Option<NamedBytes<'_>>,
    start: TrainStart,
    clock: &dyn Fn() -> f64,
    on_event: &mut dyn FnMut(TrainEvent) -> Control,
) -> Result<(FineTuneReport, TrainedFiles)> {
    options.check()?;
    let lora = options.lora_config()?;
    let planned = match options.method {
        Method::Sft | Method::Full => plan_sft(llm, options, train_file, val_file)?,
        Method::Dpo => plan_dpo(llm, options, train_file, val_file)?,
    };
    let Planned { steps, steps_per_epoch, val_batches, train_report, val_report } = planned;
    let text_files = llm.text_files.clone();
    let model = &mut llm.model;
    let batches = || steps.iter().flatten().chain(val_batches.iter().flatten());
    check_step_buffers(&model.config, batches(), max_buffer_bytes())?;
    let report = |summary| FineTuneReport { summary, train_data: train_report, val_data: val_report };

    if options.method == Method::Full {
        let state = match start {
            TrainStart::New => None,
            TrainStart::ResumeModel(state) => Some(state),
            TrainStart::From(_) | TrainStart::Resume(..) => {
                return Err(Error::invalid(
                    "full fine-tuning trains the model itself, not an adapter: give the model to train (a checkpoint's directory to resume) as the model",
                ));
            }
        };
        check_full_options(options)?;
        let parameters = model.parameters()?.iter().map(|p| p.value.dims().iter().product::<usize>()).sum();
        let (rows, seq) = batches().fold((0, 0), |(r, s), b| (r.max(b.batch), s.max(b.seq)));
        let parts = full_memory(&model.config, parameters, rows, seq, options);
        check_full_memory(&parts, options.memory_limit_mb.map(|mb| (mb * 1e6) as usize))?;
        if let Some(state) = &state {
            check_state(state)?;
            check_state_fits(model, Target::Model, state)?;
            check_state_weights(model, state).await?;
        }
        if on_event(TrainEvent::Memory { parameters, parts }) == Control::Stop {
            return Err(Error::invalid("full fine-tuning cancelled before it started"));
        }
        // checkpoints and the result are whole model directories: the tokenizer's files join the weights
        let directory = |mut files: Vec<(String, Vec<u8>)>| {
            files.extend(text_files.iter().cloned());
            TrainedFiles::Model(files)
        };
        let mut on_event = |event| match event {
            TrainEvent::Checkpoint { step, files, state } => {
                let files = match *files {
                    TrainedFiles::Model(model) => directory(model),
                    adapter => adapter,
                };
                on_event(TrainEvent::Checkpoint { step, files: Box::new(files), state })
            }
            other => on_event(other),
        };
        let summary = train_steps(
            model,
            Target::Model,
            &steps,
            steps_per_epoch,
            val_batches.as_deref(),
            options,
            state.as_deref(),
            clock,
            &mut on_event,
        )
        .await?;
        return Ok((report(summary), directory(model.hf_files(None, StoreDtype::F32).await?)));
    }

    let name = &options.adapter_name;
    check_dpo_dropout(options, &start)?;
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
            if let Err(e) = check_state_fits(model, Target::Adapter(name), &state) {
                model.delete_adapter(name).await?;
                return Err(e);
            }
            Some(state)
        }
        TrainStart::ResumeModel(_) => {
            return Err(Error::invalid("a model's trainer state resumes full fine-tuning only (method full)"));
        }
    };
    let target = Target::Adapter(name);
    let summary =
        train_steps(model, target, &steps, steps_per_epoch, val_batches.as_deref(), options, state.as_deref(), clock, on_event).await?;
    let files = model.export_adapter(name).await?;
    Ok((report(summary), TrainedFiles::Adapter(files)))
}

/// Full fine-tuning has no adapter: LoRA options set otherwise than their defaults are refused,
/// naming each.
fn check_full_options(options: &TrainOptions) -> Result<()> {
    let defaults = TrainOptions::default();
    let (ours, theirs) = (options.lora_config()?.training_settings(), defaults.lora_config()?.training_settings());
    let set: Vec<String> = ours.iter().zip(&theirs).filter(|(a, b)| a != b).map(|((name, value), _)| format!("{name} {value}")).collect();
    if set.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "full fine-tuning trains every weight, so the LoRA options do not apply, and {} set: leave them out (or train an adapter: method sft)",
        set.join(", ")
    )))
}

/// A run's optimizer steps (and how many make an epoch), its validation batches and what reading
/// the files did.
struct Planned {
    steps: Vec<Vec<Batch>>,
    steps_per_epoch: usize,
    val_batches: Option<Vec<Batch>>,
    train_report: DataReport,
    val_report: Option<DataReport>,
}

/// SFT's: examples read (split off validation, packed) and checked against the vocabulary.
fn plan_sft(llm: &Llm, options: &TrainOptions, train_file: NamedBytes<'_>, val_file: Option<NamedBytes<'_>>) -> Result<Planned> {
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
    let examples = || train.examples.iter().chain(val.iter().flat_map(|v| &v.examples));
    let ids = examples().flat_map(|e| &e.ids).map(|&id| id as usize);
    check_vocabulary(llm, ids.chain(examples().flat_map(|e| &e.labels).filter_map(|&l| usize::try_from(l).ok())))?;
    let pad = llm.model.config.pad_token_id();
    let batch = |rows: &[&Example]| Batch::new(rows, pad);
    let (steps, steps_per_epoch) = plan_steps(&train.examples, options, batch);
    let val_batches = val.as_ref().map(|v| ordered_batches(&v.examples, options.batch_size, batch));
    Ok(Planned { steps, steps_per_epoch, val_batches, train_report: train.report, val_report: val.map(|v| v.report) })
}

/// DPO's: preference pairs read, `batch_size` pairs a micro-batch.
fn plan_dpo(llm: &Llm, options: &TrainOptions, train_file: NamedBytes<'_>, val_file: Option<NamedBytes<'_>>) -> Result<Planned> {
    let tokenizer = llm.tokenizer().map_err(|_| Error::invalid("DPO reads text pairs, and this model has no tokenizer.json"))?;
    let train = read_preferences(train_file.0, train_file.1, tokenizer)?;
    let val = val_file.map(|(name, bytes)| read_preferences(name, bytes, tokenizer)).transpose()?;
    let all = || train.iter().chain(val.iter().flatten());
    check_vocabulary(llm, all().flat_map(|p| p.prompt.iter().chain(&p.chosen).chain(&p.rejected)).map(|&id| id as usize))?;
    let too_long = all().position(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()) > options.max_seq_len);
    if let Some(i) = too_long {
        return Err(Error::invalid(format!(
            "preference pair {} is longer than max_seq_len = {}: raise max_seq_len",
            i + 1,
            options.max_seq_len
        )));
    }
    let pad = llm.model.config.pad_token_id();
    let batch = |pairs: &[&PreferencePair]| preference_batch(pairs, pad);
    let (steps, steps_per_epoch) = plan_steps(&train, options, batch);
    let report = |pairs: &[PreferencePair]| DataReport {
        examples: pairs.len(),
        tokens: pairs.iter().map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len()).sum(),
        trainable_tokens: pairs.iter().map(|p| p.chosen.len() + p.rejected.len()).sum(),
        ..DataReport::default()
    };
    let val_batches = val.as_ref().map(|v| ordered_batches(v, options.batch_size, batch));
    Ok(Planned { steps, steps_per_epoch, val_batches, train_report: report(&train), val_report: val.as_deref().map(report) })
}

/// The dropout of the adapter DPO trains (the new one's, or the one continued) must be 0
/// ([`check_dropout`]), checked before an adapter is added.
fn check_dpo_dropout(options: &TrainOptions, start: &TrainStart) -> Result<()> {
    if options.method != Method::Dpo {
        return Ok(());
    }
    let dropout = match start {
        TrainStart::New => options.lora_dropout,
        TrainStart::From(adapter) | TrainStart::Resume(adapter, _) => {
            LoraConfig::from_json(&adapter.config.1, &adapter.config.0)?.lora_dropout
        }
        TrainStart::ResumeModel(_) => return Ok(()),
    };
    check_dropout(dropout)
}

/// Refuses token ids past the model's vocabulary.
fn check_vocabulary(llm: &Llm, mut ids: impl Iterator<Item = usize>) -> Result<()> {
    let vocab = llm.model.config.vocab_size;
    match ids.find(|&id| id >= vocab) {
        Some(bad) => Err(Error::invalid(format!(
            "token id {bad} is outside the model's vocabulary ({vocab}): the data was tokenized for another model (its tokenizer and this model do not match)"
        ))),
        None => Ok(()),
    }
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
