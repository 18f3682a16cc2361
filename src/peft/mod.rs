//! The PEFT model-level API on the base model: named LoRA adapters loaded from PEFT files,
//! switched by name, disabled and enabled (PEFT's `PeftModel` / `LoraModel` vocabulary).

mod model;

pub use model::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterFiles, AdapterState, Combination, MergeReport, lora_key};
