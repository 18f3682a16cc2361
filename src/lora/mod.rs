//! LoRA: low-rank adapters on the frozen linear layers of the base model.

mod init;
mod layer;

pub use init::init_lora;
pub use layer::{LoraLinear, LoraWeights};
