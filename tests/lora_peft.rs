//! PEFT adapters (saved by PEFT itself, tests/fixtures/peft/*) on the tiny model: our logits with
//! the adapter active equal PEFT's within 1e-4 (f32) on the CPU backend and on native wgpu;
//! switching, disabling and bad adapters behave as PEFT's API says.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::*;
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::tensor::read_f32;
use webgpu_lora::{LlamaModel, LoraLayers, LoraModel};

const ADAPTERS: [&str; 4] = ["all7-r4", "qv-r8", "rslora", "rank-pattern"];
const TOLERANCE: f32 = 1e-4;

fn files(dir: &Path) -> (String, Vec<u8>, String, Vec<u8>) {
    let AdapterSource { config: (cf, c), weights: (wf, w) } = AdapterSource::from_dir(dir).unwrap();
    (cf, c, wf, w)
}

fn load_source(model: &mut LlamaModel, name: &str, config: (&str, &[u8]), weights: (&str, Vec<u8>)) -> webgpu_lora::Result<()> {
    let source = AdapterSource { config: (config.0.to_string(), config.1.to_vec()), weights: (weights.0.to_string(), weights.1) };
    pollster::block_on(model.load_adapter(name, source))
}

fn load_adapter(model: &mut LlamaModel, name: &str, adapter: &str) -> webgpu_lora::Result<()> {
    pollster::block_on(model.load_adapter(name, AdapterSource::from_dir(&fixture("peft").join(adapter)).unwrap()))
}

fn logits(model: &LlamaModel) -> Vec<f32> {
    logits_of(model, &tiny_ids())
}

/// The tiny model with the fixture adapter `adapter` loaded as "a" and active, and its logits.
fn tiny_with_active(adapter: &str) -> (LlamaModel, Vec<f32>) {
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    load_adapter(&mut model, "a", adapter).unwrap();
    model.set_adapter("a").unwrap();
    let logits = logits(&model);
    (model, logits)
}

fn adapter_logits_match_peft(device: &Device) {
    let base_logits = expected_logits(fixture("tiny-llama/expected.safetensors"));
    for adapter in ADAPTERS {
        let mut model = load(&fixture("tiny-llama"), device).model;
        load_adapter(&mut model, "a", adapter).unwrap();
        // loading does not activate (PEFT's load_adapter)
        assert_eq!(model.active_adapter(), None);
        assert!(max_abs_diff(&logits(&model), &base_logits) < TOLERANCE);
        model.set_adapter("a").unwrap();
        let expected = expected_logits(fixture("peft").join(adapter).join("expected_logits.safetensors"));
        let diff = max_abs_diff(&logits(&model), &expected);
        assert!(diff < TOLERANCE, "{adapter}: max |ours - PEFT| = {diff}");
        // a safe merge reads its finiteness check back from this device (WebGPU keeps booleans as u32)
        pollster::block_on(model.merge_adapter(&[], true)).unwrap();
        let diff = max_abs_diff(&logits(&model), &expected);
        assert!(diff < TOLERANCE, "{adapter} merged safely: max |ours - PEFT| = {diff}");
    }
}

on_cpu_and_wgpu!(adapter_logits_match_peft);

#[test]
fn switching_and_disabling_are_exact() {
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let base = logits(&model);
    load_adapter(&mut model, "first", "all7-r4").unwrap();
    load_adapter(&mut model, "second", "qv-r8").unwrap();
    assert_eq!(model.adapter_names(), vec!["first", "second"]);
    model.set_adapter("first").unwrap();
    let first = logits(&model);
    model.set_adapter("second").unwrap();
    let second = logits(&model);
    assert!(max_abs_diff(&first, &second) > 0.1, "two adapters must give different logits");
    model.set_adapter("first").unwrap();
    assert_eq!(logits(&model), first, "set_adapter back reproduces the first exactly");
    pollster::block_on(model.disable_adapter()).unwrap();
    assert_eq!(logits(&model), base, "disabled equals the base exactly");
    assert_eq!(model.active_adapter(), Some("first"));
    model.enable_adapter();
    assert_eq!(logits(&model), first);
    let err = model.set_adapter("third").unwrap_err().to_string();
    assert!(err.contains("no adapter named \"third\"") && err.contains("first"), "{err}");
    let err = load_adapter(&mut model, "first", "qv-r8").unwrap_err().to_string();
    assert!(err.contains("already loaded"), "{err}");
}

/// Bad adapters error clearly and leave the model unchanged.
#[test]
fn bad_adapters_leave_the_model_unchanged() {
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let base = logits(&model);
    let (cf, config, wf, weights) = files(&fixture("peft/all7-r4"));
    let mut attempt =
        |config: &[u8], weights: Vec<u8>| load_source(&mut model, "bad", (&cf, config), (&wf, weights)).unwrap_err().to_string();

    let truncated = attempt(&config, weights[..weights.len() / 2].to_vec());
    assert!(truncated.starts_with(&format!("{wf}: invalid safetensors")), "{truncated}");

    let dora = String::from_utf8(config.clone()).unwrap().replace("\"use_dora\": false", "\"use_dora\": true");
    let err = attempt(dora.as_bytes(), weights.clone());
    assert!(err.starts_with(&format!("{cf}: use_dora = true")), "{err}");

    // a rank the weights do not have: shapes that do not fit
    let rank = String::from_utf8(config.clone()).unwrap().replace("\"r\": 4", "\"r\": 3");
    let err = attempt(rank.as_bytes(), weights.clone());
    assert!(err.contains("does not fit this model") && err.contains("[3, 64]"), "{err}");

    // an adapter made for a deeper model: a module this base does not have
    let header_end = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(weights[8..header_end].to_vec()).unwrap().replace("layers.1.", "layers.7.");
    let renamed = [&weights[..8], header.as_bytes(), &weights[header_end..]].concat();
    let err = attempt(&config, renamed);
    assert!(err.contains("model.layers.7.") && err.contains("another model"), "{err}");

    assert!(model.adapter_names().is_empty());
    assert_eq!(logits(&model), base);
}

/// PEFT's testing_common checks: logits before merge, after merge_adapter, after unmerge and
/// after merge_and_unload agree (1e-4), and equal PEFT's merge_and_unload logits.
#[test]
fn merge_unmerge_and_merge_and_unload_agree_with_peft() {
    for adapter in ADAPTERS {
        let (mut model, before) = tiny_with_active(adapter);
        let report = pollster::block_on(model.merge_adapter(&[], true)).unwrap();
        assert_eq!(report.merged, vec!["a"]);
        let merged = logits(&model);
        assert!(max_abs_diff(&before, &merged) < TOLERANCE, "{adapter}: merged");
        // merging twice is a no-op, reported as skipped (PEFT warns)
        let again = pollster::block_on(model.merge_adapter(&["a"], true)).unwrap();
        assert_eq!((again.merged.len(), again.skipped), (0, vec!["a".to_string()]));
        assert_eq!(logits(&model), merged);
        pollster::block_on(model.unmerge_adapter()).unwrap();
        assert!(max_abs_diff(&before, &logits(&model)) < TOLERANCE, "{adapter}: unmerged");
        pollster::block_on(model.merge_and_unload(&["a"], true)).unwrap();
        assert!(model.adapter_names().is_empty() && model.active_adapter().is_none());
        let unloaded = logits(&model);
        assert!(max_abs_diff(&before, &unloaded) < TOLERANCE, "{adapter}: merge_and_unload");
        let peft = expected_logits(fixture("peft").join(adapter).join("expected_merged_logits.safetensors"));
        assert!(max_abs_diff(&unloaded, &peft) < TOLERANCE, "{adapter}: against PEFT's merge_and_unload");
    }
}

#[test]
fn unload_and_delete() {
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let base = logits(&model);
    load_adapter(&mut model, "a", "all7-r4").unwrap();
    load_adapter(&mut model, "b", "qv-r8").unwrap();
    model.set_adapter("b").unwrap();
    pollster::block_on(model.unload()).unwrap();
    assert!(model.adapter_names().is_empty());
    assert_eq!(logits(&model), base, "unload is the exact base");

    load_adapter(&mut model, "a", "all7-r4").unwrap();
    load_adapter(&mut model, "b", "qv-r8").unwrap();
    model.set_adapter("a").unwrap();
    pollster::block_on(model.merge_adapter(&[], false)).unwrap();
    let err = pollster::block_on(model.delete_adapter("a")).unwrap_err().to_string();
    assert!(err.contains("merged"), "{err}");
    assert!(pollster::block_on(model.delete_adapter("zzz")).unwrap_err().to_string().contains("no adapter named \"zzz\""));
    pollster::block_on(model.unmerge_adapter()).unwrap();
    pollster::block_on(model.delete_adapter("a")).unwrap();
    assert_eq!(model.adapter_names(), vec!["b"]);
    assert_eq!(model.active_adapter(), Some("b"), "the first remaining adapter becomes active");
    assert!(model.layers.iter().all(|l| !l.self_attn.q_proj.adapters.contains_key("a")), "removed everywhere");
    pollster::block_on(model.delete_adapter("b")).unwrap();
    assert!(max_abs_diff(&logits(&model), &base) < 1e-5);
}

/// NaN or Inf in A or B: safe merge refuses with PEFT's message and changes nothing.
#[test]
fn safe_merge_refuses_broken_adapters() {
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let (cf, config, wf, weights) = files(&fixture("peft/qv-r8"));
    // make every value of the first tensor's data NaN: f32 0x7fc00000
    let header_end = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let mut broken = weights.clone();
    for chunk in broken[header_end..header_end + 64].chunks_exact_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    load_source(&mut model, "broken", (&cf, &config), (&wf, broken)).unwrap();
    model.set_adapter("broken").unwrap();
    pollster::block_on(model.disable_adapter()).unwrap();
    let base = logits(&model);
    model.enable_adapter();
    let err = pollster::block_on(model.merge_adapter(&[], true)).unwrap_err().to_string();
    assert_eq!(err, "NaNs detected in the merged weights. The adapter broken seems to be broken");
    pollster::block_on(model.disable_adapter()).unwrap();
    assert_eq!(logits(&model), base, "a refused merge changes nothing");
}

#[test]
fn trainable_parameters_as_peft_counts_them() {
    for adapter in ADAPTERS {
        let mut model = load(&fixture("tiny-llama"), &cpu()).model;
        // counted from the config alone, before the adapter exists (PEFT's counts once added)
        let config = webgpu_lora::lora::LoraConfig::from_json(
            &std::fs::read(fixture("peft").join(adapter).join("adapter_config.json")).unwrap(),
            "config",
        )
        .unwrap();
        let predicted = model.count_new_adapter(&config).unwrap();
        load_adapter(&mut model, "a", adapter).unwrap();
        model.set_adapter("a").unwrap();
        let expected = read_json(fixture("peft").join(adapter).join("expected.json"));
        let (trainable, all) = model.trainable_parameters();
        assert_eq!(trainable as u64, expected["trainable_params"].as_u64().unwrap(), "{adapter}");
        assert_eq!(all as u64, expected["all_params"].as_u64().unwrap(), "{adapter}");
        assert_eq!(predicted, (trainable, all), "{adapter}: counted before it was added");
    }
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    load_adapter(&mut model, "a", "all7-r4").unwrap();
    model.set_adapter("a").unwrap();
    assert_eq!(model.trainable_parameters_line(), "trainable params: 8,192 || all params: 98,624 || trainable%: 8.3063");
}

/// export_adapter -> load_adapter round trip gives the same logits (PEFT's check: 1e-5), and the
/// files carry PEFT's keys, shapes and metadata.
#[test]
fn save_and_load_round_trip() {
    for adapter in ADAPTERS {
        let (mut model, before) = tiny_with_active(adapter);
        let saved = pollster::block_on(model.export_adapter("a")).unwrap();
        // same tensors, names and shapes as the file PEFT wrote
        let ours = webgpu_lora::io::SafetensorsWeights::new(vec![("ours".into(), saved.safetensors.clone())]).unwrap();
        let (_, _, wf, peft_bytes) = files(&fixture("peft").join(adapter));
        let peft = webgpu_lora::io::SafetensorsWeights::new(vec![(wf, peft_bytes)]).unwrap();
        assert_eq!(ours.names(), peft.names());
        for name in peft.names() {
            assert_eq!(ours.tensor(name).unwrap(), peft.tensor(name).unwrap(), "{adapter}: {name}");
        }
        assert!(saved.safetensors.windows(15).any(|w| w == br#"{"format":"pt"}"#), "metadata format pt");
        pollster::block_on(model.load_adapter("b", AdapterSource::from_files(saved, "saved"))).unwrap();
        model.set_adapter("b").unwrap();
        assert!(max_abs_diff(&before, &logits(&model)) < 1e-5, "{adapter}");
    }
}

/// A new adapter with PEFT's default init (B = 0) leaves the logits exactly as the base's; with
/// init false it changes them; the same seed gives the same adapter.
#[test]
fn add_adapter_initialisations() {
    use webgpu_lora::lora::{LoraConfig, TargetModules};
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let base = logits(&model);
    let targets = TargetModules::AllLinear;
    pollster::block_on(model.add_adapter("zero", LoraConfig::new(8, 16.0, targets.clone()).unwrap(), 1)).unwrap();
    model.set_adapter("zero").unwrap();
    assert_eq!(logits(&model), base, "B = 0: the adapter starts as a no-op");
    assert_eq!(model.trainable_parameters().0, 2 * (8 * (64 + 64) * 2 + 8 * (64 + 32) * 2 + 8 * (64 + 128) * 3));

    let random: LoraConfig =
        LoraConfig::from_json(br#"{"peft_type":"LORA","r":4,"target_modules":["q_proj","v_proj"],"init_lora_weights":false}"#, "c")
            .unwrap();
    pollster::block_on(model.add_adapter("r1", random.clone(), 7)).unwrap();
    pollster::block_on(model.add_adapter("r2", random.clone(), 7)).unwrap();
    pollster::block_on(model.add_adapter("r3", random, 8)).unwrap();
    let run = |model: &mut LlamaModel, name: &str| {
        model.set_adapter(name).unwrap();
        logits(model)
    };
    let (r1, r2, r3) = (run(&mut model, "r1"), run(&mut model, "r2"), run(&mut model, "r3"));
    assert!(max_abs_diff(&r1, &base) > 1e-3, "init false changes the output");
    assert_eq!(r1, r2, "same seed, same adapter");
    assert_ne!(r1, r3);
}

/// OLoRA (QR init): A and B come from the base weight and the base is shifted by -scaling B A,
/// so the model's output is unchanged at init (1e-5, PEFT's check); B has orthonormal columns.
#[test]
fn olora_init_leaves_the_output_unchanged() {
    use webgpu_lora::lora::LoraConfig;
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let base = logits(&model);
    let config = LoraConfig::from_json(
        br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":"all-linear","init_lora_weights":"olora"}"#,
        "c",
    )
    .unwrap();
    pollster::block_on(model.add_adapter("olora", config, 0)).unwrap();
    model.set_adapter("olora").unwrap();
    assert!(max_abs_diff(&logits(&model), &base) < 1e-5);
    pollster::block_on(model.disable_adapter()).unwrap();
    assert!(max_abs_diff(&logits(&model), &base) > 1e-3, "the residual base alone differs");
    let b_t = model.layers[0].self_attn.q_proj.adapters["olora"].b_t.clone(); // [r, out]
    let gram = pollster::block_on(read_f32(b_t.clone().matmul(b_t.transpose()))).unwrap();
    for i in 0..4 {
        for j in 0..4 {
            let expected = if i == j { 1.0 } else { 0.0 };
            assert!((gram[i * 4 + j] - expected).abs() < 1e-4, "B^T B = I: [{i},{j}] = {}", gram[i * 4 + j]);
        }
    }
}

/// add_weighted_adapter: weight -1 negates the delta; "cat" adds deltas exactly; "linear" of two
/// equal-rank adapters is PEFT's (sum of scaled A) x (sum of scaled B).
#[test]
fn weighted_adapters() {
    use webgpu_lora::lora::Combination;
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let base = logits(&model);
    load_adapter(&mut model, "a", "all7-r4").unwrap();
    load_adapter(&mut model, "b", "qv-r8").unwrap();
    pollster::block_on(model.add_weighted_adapter(&["a"], &[-1.0], "neg", Combination::Cat)).unwrap();
    let delta = |model: &LlamaModel, name: &str| {
        let layer = &model.layers[0].self_attn.q_proj;
        pollster::block_on(read_f32(layer.delta_t(name).unwrap())).unwrap()
    };
    let (da, dneg) = (delta(&model, "a"), delta(&model, "neg"));
    assert!(da.iter().zip(&dneg).all(|(x, y)| (x + y).abs() < 1e-6), "weight -1 negates the delta");

    pollster::block_on(model.add_weighted_adapter(&["a", "b"], &[0.5, 2.0], "cat", Combination::Cat)).unwrap();
    let (db, dcat) = (delta(&model, "b"), delta(&model, "cat"));
    assert!(da.iter().zip(&db).zip(&dcat).all(|((x, y), z)| (0.5 * x + 2.0 * y - z).abs() < 1e-5), "cat sums the deltas");
    assert_eq!(model.adapter_config("cat").unwrap().r, 12);
    assert_eq!(model.layers[0].mlp.up_proj.adapters["cat"].rank(), 12, "a module only one adapter has is zero-padded");
    let err = pollster::block_on(model.add_weighted_adapter(&["a", "b"], &[1.0, 1.0], "lin", Combination::Linear)).unwrap_err().to_string();
    assert!(err.contains("equal ranks"), "{err}");
    model.set_adapter("cat").unwrap();
    assert!(max_abs_diff(&logits(&model), &base) > 1e-3);
}

/// Our add_weighted_adapter against PEFT's logits (tests/fixtures/peft/weighted_logits.safetensors).
#[test]
fn weighted_adapters_match_peft() {
    use webgpu_lora::lora::Combination;
    let bytes = std::fs::read(fixture("peft/weighted_logits.safetensors")).unwrap();
    let expected = webgpu_lora::io::SafetensorsWeights::new(vec![("weighted_logits".into(), bytes)]).unwrap();
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    load_adapter(&mut model, "a", "all7-r4").unwrap();
    load_adapter(&mut model, "b", "qv-r8").unwrap();
    load_adapter(&mut model, "c", "rank-pattern").unwrap();
    pollster::block_on(model.add_weighted_adapter(&["a"], &[0.7], "linear", Combination::Linear)).unwrap();
    pollster::block_on(model.add_weighted_adapter(&["a", "b"], &[0.5, 2.0], "cat", Combination::Cat)).unwrap();
    pollster::block_on(model.add_weighted_adapter(&["a", "b"], &[0.5, 2.0], "svd", Combination::Svd { rank: None })).unwrap();
    pollster::block_on(model.add_weighted_adapter(&["a", "b"], &[1.5, -0.5], "svd-r3", Combination::Svd { rank: Some(3) })).unwrap();
    assert_eq!(
        (model.adapter_config("svd").unwrap().r, model.adapter_config("svd-r3").unwrap().r),
        (8, 3),
        "svd: the largest rank, or the one asked for"
    );
    for name in ["linear", "cat", "svd", "svd-r3"] {
        model.set_adapter(name).unwrap();
        let diff = max_abs_diff(&logits(&model), &expected.tensor(name).unwrap().data);
        assert!(diff < TOLERANCE, "{name}: max |ours - PEFT| = {diff}");
    }
    // PEFT refuses a linear combination whose per-module ranks differ; so do we, changing nothing
    let err =
        pollster::block_on(model.add_weighted_adapter(&["b", "c"], &[0.6, -0.3], "bad", Combination::Linear)).unwrap_err().to_string();
    assert!(err.contains("ranks differ"), "{err}");
    assert!(!model.adapter_names().contains(&"bad"));
}

/// OLoRA and PiSSA adapters saved by PEFT (tests/fixtures/peft/{olora,pissa}[-as-lora]), after a
/// perturbation standing in for training: loaded on the original base they give PEFT's logits,
/// as they are (the residual base is derived again on load, as PEFT does) and converted to a
/// plain LoRA of rank 2r. Unloading gives the original base back.
fn olora_and_pissa_adapters_match_peft(device: &Device) {
    let base_logits = expected_logits(fixture("tiny-llama/expected.safetensors"));
    for adapter in ["olora", "olora-as-lora", "pissa", "pissa-as-lora"] {
        let mut model = load(&fixture("tiny-llama"), device).model;
        load_adapter(&mut model, "a", adapter).unwrap();
        model.set_adapter("a").unwrap();
        let diff = max_abs_diff(&logits(&model), &expected_logits(fixture("peft").join(adapter).join("expected_logits.safetensors")));
        assert!(diff < TOLERANCE, "{adapter}: max |ours - PEFT| = {diff}");
        pollster::block_on(model.unload()).unwrap();
        assert!(max_abs_diff(&logits(&model), &base_logits) < 1e-5, "{adapter}: unload restores the base");
    }
}

on_cpu_and_wgpu!(olora_and_pissa_adapters_match_peft);

/// Adds `step` times a fixed pattern to every A and B of adapter `name`: a stand-in for training.
fn perturb(model: &mut LlamaModel, name: &str, step: f32) {
    for linear in model.lora_linears_mut() {
        if let Some(lora) = linear.adapters.get_mut(name) {
            for t in [&mut lora.a_t, &mut lora.b_t] {
                let [rows, cols] = t.dims();
                let pattern: Vec<f32> = (0..rows * cols).map(|i| step * ((i * 7919 % 101) as f32 / 50.0 - 1.0)).collect();
                *t = t.clone() + burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(pattern, [rows, cols]), &t.device());
            }
        }
    }
}

/// Our own OLoRA and PiSSA: the output is unchanged at init (1e-5); after "training", the adapter
/// saved as it is and saved converted to rank 2r both reproduce the trained model on a fresh
/// original base; deleting the adapter gives the base back; PiSSA's B A is the top-r SVD part.
#[test]
fn olora_and_pissa_init_and_conversion() {
    use webgpu_lora::lora::LoraConfig;
    for init in ["olora", "pissa"] {
        let mut model = load(&fixture("tiny-llama"), &cpu()).model;
        let base = logits(&model);
        let json = format!(
            r#"{{"peft_type":"LORA","r":4,"lora_alpha":16,"target_modules":["q_proj","v_proj","down_proj"],"init_lora_weights":"{init}"}}"#
        );
        pollster::block_on(model.add_adapter("x", LoraConfig::from_json(json.as_bytes(), "c").unwrap(), 0)).unwrap();
        model.set_adapter("x").unwrap();
        assert!(max_abs_diff(&logits(&model), &base) < 1e-5, "{init}: unchanged at init");
        perturb(&mut model, "x", 0.05);
        let trained = logits(&model);
        assert!(max_abs_diff(&trained, &base) > 1e-3, "{init}: the perturbation matters");

        let plain = pollster::block_on(model.export_adapter("x")).unwrap();
        let converted = pollster::block_on(model.export_adapter_as_lora("x")).unwrap();
        let config = LoraConfig::from_json(converted.config_json.as_bytes(), "converted").unwrap();
        assert_eq!((config.r, config.lora_alpha, config.init_lora_weights), (8, 32.0, webgpu_lora::lora::LoraInit::Default));
        for (how, files) in [("as it is", plain), ("converted", converted)] {
            let mut fresh = load(&fixture("tiny-llama"), &cpu()).model;
            pollster::block_on(fresh.load_adapter("x", AdapterSource::from_files(files, how))).unwrap();
            fresh.set_adapter("x").unwrap();
            let diff = max_abs_diff(&logits(&fresh), &trained);
            assert!(diff < TOLERANCE, "{init} {how}: max |loaded - trained| = {diff}");
        }
        pollster::block_on(model.delete_adapter("x")).unwrap();
        assert!(max_abs_diff(&logits(&model), &base) < 1e-5, "{init}: delete restores the base");
    }
    // a plain LoRA has nothing to convert
    let (model, _) = tiny_with_active("qv-r8");
    let err = pollster::block_on(model.export_adapter_as_lora("a")).err().unwrap().to_string();
    assert!(err.contains("already a plain LoRA"), "{err}");
}

/// PiSSA's A and B: B A is the top-r part of W's SVD divided by scaling, so W - scaling B A has
/// the remaining singular values (checked through the residual's Frobenius norm^2 = sum of the
/// rest of S^2).
#[test]
fn pissa_takes_the_principal_singular_part() {
    use webgpu_lora::lora::LoraConfig;
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let w = model.layers[0].self_attn.q_proj.base.weight_t.value();
    let [d_in, d_out] = w.dims();
    let host = webgpu_lora::tensor::HostTensor::new(vec![d_in, d_out], pollster::block_on(read_f32(w)).unwrap());
    let s = webgpu_lora::linalg::thin_svd(&host).unwrap().s;
    let config =
        LoraConfig::from_json(br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"init_lora_weights":"pissa"}"#, "c")
            .unwrap();
    pollster::block_on(model.add_adapter("p", config, 0)).unwrap();
    let residual = model.layers[0].self_attn.q_proj.base.weight_t.value();
    let norm2: f32 = pollster::block_on(read_f32(residual.clone().mul(residual).sum())).unwrap()[0];
    let rest: f32 = s[4..].iter().map(|v| v * v).sum();
    assert!((norm2 - rest).abs() < 1e-4 * rest, "|W_res|^2 = {norm2}, sum of the other S^2 = {rest}");
}

/// An adapter made for another base (other shapes; base_model_name_or_path names it) is refused,
/// the error says which base it was made for, and the model is unchanged.
#[test]
fn adapter_for_another_base_is_refused() {
    use webgpu_lora::io::{StoreDtype, safetensors::write_safetensors};
    use webgpu_lora::tensor::HostTensor;
    let mut model = load(&fixture("tiny-llama"), &cpu()).model;
    let base = logits(&model);
    let (r, wide) = (8, 2 * model.config.hidden_size);
    let mut tensors = std::collections::BTreeMap::new();
    for layer in 0..model.config.num_hidden_layers {
        for proj in ["q_proj", "v_proj"] {
            let module = format!("model.layers.{layer}.self_attn.{proj}");
            tensors.insert(webgpu_lora::lora::lora_key(&module, "lora_A"), HostTensor::new(vec![r, wide], vec![0.01; r * wide]));
            tensors.insert(webgpu_lora::lora::lora_key(&module, "lora_B"), HostTensor::new(vec![wide, r], vec![0.01; r * wide]));
        }
    }
    let weights = write_safetensors(&tensors, StoreDtype::F32, None).unwrap();
    let config = br#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],"base_model_name_or_path":"HuggingFaceTB/SmolLM2-360M-Instruct"}"#;
    let err = load_source(&mut model, "other", ("other/adapter_config.json", config), ("other/adapter_model.safetensors", weights))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("other/adapter_model.safetensors: "), "{err}");
    assert!(err.contains("does not fit this model") && err.contains("made for HuggingFaceTB/SmolLM2-360M-Instruct"), "{err}");
    assert!(model.adapter_names().is_empty());
    assert_eq!(logits(&model), base);
}

/// PEFT's `PeftModel.from_pretrained(base, adapter)`: loaded as "default" and active.
#[test]
fn from_pretrained_activates_the_adapter() {
    let files = webgpu_lora::io::ModelFiles::from_dir(&fixture("tiny-llama")).unwrap();
    let adapter = AdapterSource::from_dir(&fixture("peft/qv-r8")).unwrap();
    let llm = pollster::block_on(webgpu_lora::Llm::from_pretrained(files, adapter, &cpu(), &mut |_, _, _| {})).unwrap();
    assert_eq!((llm.model.active_adapter(), llm.model.adapter_names()), (Some("default"), vec!["default"]));
    let diff = max_abs_diff(&logits(&llm.model), &expected_logits(fixture("peft/qv-r8/expected_logits.safetensors")));
    assert!(diff < TOLERANCE, "{diff}");
}

/// The merged model's files (adapter folded in on the way out, the model untouched) load back as a
/// model whose logits are PEFT's merge_and_unload logits; an unknown adapter name is refused.
#[test]
fn merged_files_load_as_peft_merged_model() {
    let mut llm = load(&fixture("tiny-llama"), &cpu());
    load_adapter(&mut llm.model, "a", "qv-r8").unwrap();
    llm.model.set_adapter("a").unwrap();
    let err = pollster::block_on(llm.merged_files(Some("nope"))).unwrap_err().to_string();
    assert!(err.contains("no adapter named \"nope\"") && err.contains("\"a\""), "{err}");
    let files = pollster::block_on(llm.merged_files(Some("a"))).unwrap();
    assert_eq!(llm.model.merged_adapters(), Vec::<String>::new(), "the model is not changed");
    let mut model_files = webgpu_lora::io::ModelFiles::new("merged");
    files.into_iter().for_each(|(name, bytes)| model_files.insert(name, bytes));
    let merged = webgpu_lora::Llm::load(model_files, webgpu_lora::nn::WeightDtype::F32, &cpu(), &mut |_, _, _| {}).unwrap();
    let expected = expected_logits(fixture("peft").join("qv-r8").join("expected_merged_logits.safetensors"));
    let diff = max_abs_diff(&logits(&merged.model), &expected);
    assert!(diff < TOLERANCE, "merged export: max |ours - PEFT merged| = {diff}");
}
