//! LoRA: low-rank adapters on the frozen linear layers of the base model.

mod dropout;
mod init;
mod layer;

pub use dropout::{DropoutMasks, PartDropout};
pub use init::{init_from_weight, init_lora, upload, upload_all};
pub use layer::{LoraLinear, LoraRun, LoraWeights};
