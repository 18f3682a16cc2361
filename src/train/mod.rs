//! Supervised fine-tuning of a LoRA adapter, or of every weight (full fine-tuning): its settings
//! ([`TrainOptions`]), the data ([`data`]), the loss ([`loss`]), AdamW and schedules
//! ([`optimizer`]), the loop with its events ([`trainer`]), the memory a step needs ([`memory`])
//! and a whole job from files ([`fine_tune`]); and preference tuning's step ([`dpo`]: DPO's loss,
//! rewards and gradients). The same code runs natively and in the browser; the caller supplies
//! the clock and receives checkpoints as files.

pub mod data;
pub mod dpo;
pub mod fine_tune;
pub mod loss;
pub mod memory;
pub mod optimizer;
mod options;
pub mod trainer;

pub use data::{Batch, DataOptions, DataReport, Dataset, Example, read_dataset};
pub use fine_tune::{FineTuneReport, TrainStart, fine_tune};
pub use optimizer::{AdamW, Schedule};
pub use options::{INIT_LORA_WEIGHTS, Method, TrainOptions};
pub use trainer::{Control, StepMetrics, TrainEnd, TrainEvent, TrainSummary, evaluate, train_steps};
