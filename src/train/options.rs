//! `TrainOptions`: every setting of a fine-tuning job, declared once with its default. The CLI's
//! `train` flags are derived from it (clap), JS passes it as an object in camelCase (serde; unknown
//! keys are refused by name, and transformers' `TrainingArguments` names are accepted as
//! aliases), and the core derives the LoRA config, the data options and AdamW from it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::train::data::DataOptions;
use crate::train::optimizer::{AdamW, Schedule};

/// The values `init_lora_weights` takes here (PEFT's `true` is "default").
pub const INIT_LORA_WEIGHTS: [&str; 4] = ["default", "gaussian", "olora", "pissa"];

/// What an adapter is trained for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Supervised fine-tuning on text (chat, prompt/completion, plain text).
    #[default]
    Sft,
    /// Direct preference optimisation on pairs (JSONL of {"prompt", "chosen", "rejected"}, text or messages),
    /// against the model without the adapter ([`crate::train::dpo`]).
    Dpo,
    /// Full fine-tuning: every weight of the model trained on text, as SFT trains an adapter
    /// (f32 weights; the LoRA options do not apply).
    Full,
}

/// The settings of a fine-tuning job. Defaults: r 8, alpha 16, dropout 0.05, q_proj + v_proj,
/// lr 2e-4, cosine, 1 epoch, batch 4, sequences of up to 512 tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TrainOptions {
    /// The name of the new adapter.
    #[arg(skip = defaults().adapter_name)]
    pub adapter_name: String,
    /// sft (an adapter on text), dpo (an adapter on preference pairs: JSONL of {"prompt", "chosen", "rejected"}; the adapter's dropout must be 0: --dropout 0) or full (every weight of the model on text; writes a model directory).
    #[arg(long, value_enum, default_value_t = defaults().method)]
    pub method: Method,
    /// DPO's beta: how strongly the adapter is held near the model without it.
    #[arg(long, default_value_t = defaults().beta)]
    pub beta: f64,

    /// LoRA rank.
    #[arg(long, default_value_t = defaults().r)]
    pub r: usize,
    /// LoRA alpha: the update is scaled by alpha / r.
    #[arg(long = "alpha", default_value_t = defaults().lora_alpha)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input.
    #[arg(long = "dropout", default_value_t = defaults().lora_dropout)]
    pub lora_dropout: f64,
    /// Module names (comma-separated on the command line), or all-linear.
    #[arg(long = "targets", value_delimiter = ',', default_values_t = defaults().target_modules)]
    pub target_modules: Vec<String>,
    /// Initial A and B: default (kaiming A, zero B), gaussian, olora or pissa.
    #[arg(long = "init", default_value_t = defaults().init_lora_weights, value_parser = INIT_LORA_WEIGHTS)]
    pub init_lora_weights: String,
    /// Scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    #[arg(long = "rslora")]
    pub use_rslora: bool,
    /// Recorded in adapter_config.json (the CLI records --model).
    #[arg(skip)]
    pub base_model_name_or_path: Option<String>,

    /// Peak learning rate.
    #[arg(long, default_value_t = defaults().lr)]
    #[serde(alias = "learningRate")]
    pub lr: f64,
    #[arg(long, default_value_t = defaults().weight_decay)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = defaults().adam_beta1)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = defaults().adam_beta2)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = defaults().adam_epsilon)]
    pub adam_epsilon: f64,
    /// How the learning rate decays after warmup.
    #[arg(long, value_enum, default_value_t = defaults().schedule)]
    #[serde(alias = "lrSchedulerType")]
    pub schedule: Schedule,
    /// Steps of linear warmup from 0.
    #[arg(long = "warmup", default_value_t = defaults().warmup_steps)]
    pub warmup_steps: usize,
    /// Clip gradients to this global norm (0 = no clipping).
    #[arg(long, default_value_t = defaults().max_grad_norm)]
    pub max_grad_norm: f64,

    #[arg(long, default_value_t = defaults().epochs, conflicts_with = "max_steps")]
    #[serde(alias = "numTrainEpochs")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (instead of whole epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = defaults().batch_size)]
    #[serde(alias = "perDeviceTrainBatchSize")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = defaults().grad_accum)]
    #[serde(alias = "gradientAccumulationSteps")]
    pub grad_accum: usize,
    /// Data order and LoRA dropout.
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// Shuffle the examples every epoch (with the seed); without, batches follow the file's order.
    #[arg(long = "no-shuffle", action = clap::ArgAction::SetFalse)]
    pub shuffle: bool,

    /// Evaluate on the validation set every N steps (and before the first and after the last).
    #[arg(long)]
    #[serde(alias = "evalSteps")]
    pub eval_every: Option<usize>,
    /// Stop after N evaluations without a better validation loss, keeping the best adapter.
    #[arg(long)]
    #[serde(alias = "earlyStoppingPatience")]
    pub patience: Option<usize>,
    /// Hand out the adapter and the trainer state every N steps (the CLI writes OUT/checkpoint-N/).
    #[arg(long)]
    #[serde(alias = "saveSteps")]
    pub checkpoint_every: Option<usize>,
    /// Hold out this fraction of the data for validation.
    #[arg(long)]
    pub val_split: Option<f64>,

    /// Longest example in tokens.
    #[arg(long, default_value_t = defaults().max_seq_len)]
    pub max_seq_len: usize,
    /// Concatenate examples into rows of up to max_seq_len tokens.
    #[arg(long)]
    pub packing: bool,
    /// Train on every token, not only assistant turns / completions.
    #[arg(long)]
    pub train_on_everything: bool,
    /// Cut examples longer than max_seq_len (counted) instead of refusing them.
    #[arg(long)]
    pub truncate: bool,
    /// Skip malformed lines (counted) instead of refusing the file.
    #[arg(long)]
    pub skip_bad_lines: bool,

    /// Keep only each decoder layer's input in the forward pass and run the layer again for its
    /// gradient (transformers' gradient_checkpointing): one layer's activations in memory at a
    /// time instead of every layer's, for one more forward pass of compute. The same gradients.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Full fine-tuning: refuse a run whose memory estimate is above this many MB (the CLI's
    /// default: the memory the system has available).
    #[arg(long)]
    pub memory_limit_mb: Option<f64>,

    /// Run each micro-batch as up to this many parts of its rows in parallel (for the CPU
    /// backend, whose elementwise kernels are single-threaded; the CLI's default there is one per
    /// core). Equal to the unsplit step up to float rounding, and as deterministic.
    #[arg(long)]
    #[serde(skip)]
    pub threads: Option<usize>,
}

fn defaults() -> TrainOptions {
    TrainOptions::default()
}

impl Default for TrainOptions {
    fn default() -> Self {
        let adam = AdamW::default();
        TrainOptions {
            adapter_name: "default".into(),
            method: Method::Sft,
            beta: 0.1,
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            init_lora_weights: "default".into(),
            use_rslora: false,
            base_model_name_or_path: None,
            lr: adam.lr,
            weight_decay: adam.weight_decay,
            adam_beta1: adam.beta1,
            adam_beta2: adam.beta2,
            adam_epsilon: adam.eps,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            seed: 42,
            shuffle: true,
            eval_every: None,
            patience: None,
            checkpoint_every: None,
            val_split: None,
            max_seq_len: 512,
            packing: false,
            train_on_everything: false,
            truncate: false,
            skip_bad_lines: false,
            gradient_checkpointing: false,
            memory_limit_mb: None,
            threads: None,
        }
    }
}

impl TrainOptions {
    /// Refuses settings that cannot train, naming the setting.
    pub fn check(&self) -> Result<()> {
        self.optimizer().check()?;
        if self.threads == Some(0) {
            return Err(Error::invalid("threads must be at least 1"));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::invalid(format!(
                "batch size {} and gradient accumulation {} must be at least 1",
                self.batch_size, self.grad_accum
            )));
        }
        if self.max_steps.unwrap_or(self.epochs) == 0 {
            return Err(Error::invalid("nothing to train: epochs and max_steps must be at least 1"));
        }
        if !(self.max_grad_norm >= 0.0) {
            return Err(Error::invalid("max_grad_norm must be positive (or 0 for no clipping)"));
        }
        if self.method == Method::Dpo {
            // lora_dropout is checked where the run's adapter is known (fine_tune, train_steps)
            let refused = [
                (self.packing, "packing does not apply to preference pairs"),
                (self.val_split.is_some(), "val_split is not supported: give a validation file of pairs"),
                (!(self.beta > 0.0), "beta must be positive"),
            ];
            if let Some((_, why)) = refused.iter().find(|(bad, _)| *bad) {
                return Err(Error::invalid(format!("DPO: {why}")));
            }
        }
        Ok(())
    }

    /// The adapter's config (adapter_config.json) these options describe.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let targets = match self.target_modules.as_slice() {
            [one] if one == "all-linear" => serde_json::json!("all-linear"),
            names => serde_json::json!(names),
        };
        let init = match self.init_lora_weights.as_str() {
            "default" | "true" => serde_json::json!(true),
            other if INIT_LORA_WEIGHTS.contains(&other) => serde_json::json!(other),
            other => return Err(Error::invalid(format!("initLoraWeights {other:?}: use one of {INIT_LORA_WEIGHTS:?}"))),
        };
        let config = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout, "target_modules": targets, "init_lora_weights": init,
            "use_rslora": self.use_rslora, "base_model_name_or_path": self.base_model_name_or_path,
        });
        LoraConfig::from_json(config.to_string().as_bytes(), "training options")
    }

    /// How examples are read.
    pub fn data_options(&self) -> DataOptions {
        DataOptions {
            max_seq_len: self.max_seq_len,
            train_on_everything: self.train_on_everything,
            truncate: self.truncate,
            skip_bad_lines: self.skip_bad_lines,
        }
    }

    pub fn optimizer(&self) -> AdamW {
        AdamW { lr: self.lr, beta1: self.adam_beta1, beta2: self.adam_beta2, eps: self.adam_epsilon, weight_decay: self.weight_decay }
    }

    /// The clipping norm, `None` for no clipping.
    pub fn clip_norm(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }
}
