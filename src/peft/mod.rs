//! The PEFT model-level API on the base model (PEFT's `PeftModel` / `LoraModel` vocabulary):
//! named LoRA adapters loaded from or saved to PEFT files, switched by name, disabled, merged,
//! unloaded, deleted and combined.

mod model;

pub use model::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterFiles, AdapterSource, AdapterState, Combination, MergeReport, lora_key};
