//! A whole fine-tuning job, as the CLI and the browser run it: read and tokenize the data, split
//! off validation, add (or resume) the adapter, train, and hand back the adapter as PEFT files
//! with the run's summary. The edges only supply bytes, a clock and somewhere to put the events.

use serde::Serialize;

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::llm::Llm;
use crate::peft::{AdapterFiles, AdapterSource};
use crate::train::data::{DataOptions, DataReport, Dataset, ordered_batches, read_dataset};
use crate::train::optimizer::{AdamW, Schedule};
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

/// The options of a job as the CLI flags and the JS API name them (camelCase in JSON), with the
/// CLI's defaults: r 8, alpha 16, dropout 0.05, q_proj + v_proj, lr 2e-4, cosine, 1 epoch, batch 4.
/// transformers' TrainingArguments names (camelCase) are accepted as aliases.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TrainOptions {
    pub adapter_name: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module names, or ["all-linear"].
    pub target_modules: Vec<String>,
    /// "default", "gaussian", "olora" or "pissa".
    pub init_lora_weights: String,
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
    #[serde(alias = "learningRate")]
    pub lr: f64,
    pub weight_decay: f64,
    #[serde(alias = "lrSchedulerType")]
    pub schedule: String,
    pub warmup_steps: usize,
    /// 0: no clipping.
    pub max_grad_norm: f64,
    #[serde(alias = "numTrainEpochs")]
    pub epochs: usize,
    pub max_steps: Option<usize>,
    #[serde(alias = "perDeviceTrainBatchSize")]
    pub batch_size: usize,
    #[serde(alias = "gradientAccumulationSteps")]
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub seed: u64,
    #[serde(alias = "evalSteps")]
    pub eval_every: Option<usize>,
    #[serde(alias = "earlyStoppingPatience")]
    pub patience: Option<usize>,
    #[serde(alias = "saveSteps")]
    pub checkpoint_every: Option<usize>,
    pub val_split: Option<f64>,
    pub packing: bool,
    pub train_on_everything: bool,
    pub truncate: bool,
    pub skip_bad_lines: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        let train = TrainConfig::default();
        TrainOptions {
            adapter_name: "default".into(),
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            init_lora_weights: "default".into(),
            use_rslora: false,
            base_model_name_or_path: None,
            lr: train.optimizer.lr,
            weight_decay: train.optimizer.weight_decay,
            schedule: "cosine".into(),
            warmup_steps: 0,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            batch_size: train.batch_size,
            grad_accum: 1,
            max_seq_len: DataOptions::default().max_seq_len,
            seed: train.seed,
            eval_every: None,
            patience: None,
            checkpoint_every: None,
            val_split: None,
            packing: false,
            train_on_everything: false,
            truncate: false,
            skip_bad_lines: false,
        }
    }
}

impl TrainOptions {
    /// The job these options describe; an unusable setting errors naming it.
    pub fn to_fine_tune(&self) -> Result<FineTune> {
        let targets = if self.target_modules.len() == 1 && self.target_modules[0] == "all-linear" {
            serde_json::json!("all-linear")
        } else {
            serde_json::json!(self.target_modules)
        };
        let init = match self.init_lora_weights.as_str() {
            "default" | "true" => serde_json::json!(true),
            "gaussian" | "olora" | "pissa" => serde_json::json!(self.init_lora_weights),
            other => return Err(Error::invalid(format!("initLoraWeights {other:?}: use \"default\", \"gaussian\", \"olora\" or \"pissa\""))),
        };
        let config = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout, "target_modules": targets, "init_lora_weights": init,
            "use_rslora": self.use_rslora, "base_model_name_or_path": self.base_model_name_or_path,
        });
        let spec = FineTune {
            adapter_name: self.adapter_name.clone(),
            lora: LoraConfig::from_json(config.to_string().as_bytes(), "training options")?,
            data: DataOptions { max_seq_len: self.max_seq_len, train_on_everything: self.train_on_everything, truncate: self.truncate, skip_bad_lines: self.skip_bad_lines },
            train: TrainConfig {
                optimizer: AdamW { lr: self.lr, weight_decay: self.weight_decay, ..Default::default() },
                schedule: Schedule::parse(&self.schedule)?,
                warmup_steps: self.warmup_steps,
                max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
                batch_size: self.batch_size,
                grad_accum: self.grad_accum,
                epochs: self.epochs,
                max_steps: self.max_steps,
                eval_every: self.eval_every,
                early_stopping_patience: self.patience,
                checkpoint_every: self.checkpoint_every,
                seed: self.seed,
                threads: 1,
            },
            val_split: self.val_split,
            packing: self.packing,
        };
        spec.train.check()?;
        Ok(spec)
    }
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
            let (t, v) = train.split(fraction, spec.train.seed)?;
            train = t;
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
    let (steps, steps_per_epoch) = plan_steps(&train, &spec.train, pad);
    let val_batches = val.as_ref().map(|v| ordered_batches(&v.examples, spec.train.batch_size, pad));
    let summary = train_steps(model, &spec.adapter_name, &steps, steps_per_epoch, val_batches.as_deref(), &spec.train, state.as_deref(), clock, on_event).await?;
    let files = model.save_adapter(&spec.adapter_name).await?;
    Ok((FineTuneReport { summary, train_data: train.report, val_data: val.map(|v| v.report) }, files))
}
