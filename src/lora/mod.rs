//! LoRA, shaped like PEFT's `tuners/lora/`: the adapter's configuration ([`LoraConfig`],
//! `adapter_config.json`), the adapted layer ([`LoraLinear`]), initial values (`init`, incl.
//! OLoRA/PiSSA), LoRA dropout, PEFT's files, what a model shows of its layers ([`LoraLayers`]),
//! the model-level verbs ([`LoraModel`]) and `add_weighted_adapter`'s combinations.
//!
//! Everything here sits below the model: the verbs work on any model that shows its layers
//! ([`LoraLayers`]), as PEFT's tuners work on any `nn.Module`.

mod combine;
mod config;
mod dropout;
mod files;
mod init;
mod layer;
mod layers;
mod model;

pub use combine::Combination;
pub use config::{LoraConfig, LoraInit, TargetModules};
pub use dropout::{DropoutMasks, PartDropout};
pub use files::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterContents, AdapterFiles, AdapterSource, lora_key};
pub use init::{init_from_weight, init_lora};
pub use layer::{AdapterWeights, LoraLinear, LoraRun, LoraWeights};
pub use layers::{AdapterState, LoraLayers};
pub use model::{LoraModel, MergeReport};
