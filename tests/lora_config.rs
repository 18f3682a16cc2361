//! LoraConfig's targeting against PEFT itself: for each adapter_config.json in
//! tests/fixtures/peft/lora_targets.json, the modules PEFT wrapped on the tiny model, with the rank
//! and scaling PEFT gave each, are exactly ours.

mod common;

use std::collections::BTreeMap;

use common::*;
use webgpu_lora::LoraLayers;
use webgpu_lora::lora::LoraConfig;

#[test]
fn targets_ranks_and_scalings_equal_peft() {
    let model = load(&fixture("tiny-llama"), &cpu()).model;
    let cases = read_json(fixture("peft/lora_targets.json"));
    for case in cases.as_array().unwrap() {
        let config_json = serde_json::to_vec(&case["adapter_config"]).unwrap();
        let config = LoraConfig::from_json(&config_json, "adapter_config.json").unwrap();
        let ours: BTreeMap<String, (usize, f64)> = model
            .lora_linears()
            .map(|l| l.name.clone())
            .filter(|m| config.targets(m, true))
            .map(|m| {
                let value = (config.rank_for(&m), config.scaling_for(&m));
                (m, value)
            })
            .collect();
        let peft: BTreeMap<String, (usize, f64)> = case["modules"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(m, v)| (m.clone(), (v["r"].as_u64().unwrap() as usize, v["scaling"].as_f64().unwrap())))
            .collect();
        assert_eq!(ours, peft, "config {}", case["adapter_config"]);
    }
}
