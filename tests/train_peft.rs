//! Training against PEFT itself (tests/fixtures/train, made by make_fixtures.py): the loss and
//! every LoRA gradient for one batch, and a 20-step AdamW trajectory, on the tiny model with the
//! all7-r4 adapter; plus the trainer's own contracts (base untouched, resume, cancel, NaN guard,
//! early stopping).

mod common;

use std::sync::{Mutex, MutexGuard, PoisonError};

use common::*;
use webgpu_lora::lora::AdapterSource;
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::train::trainer::{Target, TrainedFiles, train_steps};
use webgpu_lora::train::{Batch, Control, Schedule, TrainEnd, TrainEvent, TrainOptions};
use webgpu_lora::{LlamaModel, LoraModel};

fn tiny_with_adapter() -> LlamaModel {
    tiny_with_adapter_on(&cpu())
}

fn tiny_with_adapter_on(device: &burn::tensor::Device) -> LlamaModel {
    with_adapter(load(&fixture("tiny-llama"), device).model)
}

fn with_adapter(mut model: LlamaModel) -> LlamaModel {
    pollster::block_on(model.load_adapter("a", AdapterSource::from_dir(&fixture("peft/all7-r4")).unwrap())).unwrap();
    model.set_adapter("a").unwrap();
    model
}

fn trajectory() -> serde_json::Value {
    read_json(fixture("train/trajectory.json"))
}

/// The device's random stream is one per process: tests that seed it and draw from it (adapter
/// initialisation, dropout, every training step) take turns.
static DEVICE_RNG: Mutex<()> = Mutex::new(());

fn rng_turn() -> MutexGuard<'static, ()> {
    DEVICE_RNG.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `steps` and returns the losses the step events report, the result, the checkpoints and the
/// steps' gradient norms.
fn run(
    model: &mut LlamaModel,
    steps: &[Vec<Batch>],
    config: &TrainOptions,
    resume: Option<&[u8]>,
    stop_at: Option<usize>,
) -> (Vec<f64>, webgpu_lora::Result<webgpu_lora::train::TrainSummary>, Vec<(usize, Vec<u8>, webgpu_lora::lora::AdapterFiles)>, Vec<f64>) {
    let _turn = rng_turn();
    let (mut losses, mut grad_norms) = (Vec::new(), Vec::new());
    let mut checkpoints = Vec::new();
    let clock = || 0.0;
    let result =
        pollster::block_on(train_steps(model, Target::Adapter("a"), steps, steps.len(), None, config, resume, &clock, &mut |event| {
            match event {
                TrainEvent::Step(m) => {
                    losses.push(m.loss);
                    grad_norms.push(m.grad_norm);
                    if Some(m.step) == stop_at {
                        return Control::Stop;
                    }
                }
                TrainEvent::Checkpoint { step, files, state } => match *files {
                    TrainedFiles::Adapter(adapter) => checkpoints.push((step, state, adapter)),
                    TrainedFiles::Model(_) => panic!("an adapter's run checkpoints its adapter"),
                },
                TrainEvent::Eval { .. } | TrainEvent::Memory { .. } => {}
            }
            Control::Continue
        }));
    (losses, result, checkpoints, grad_norms)
}

/// PEFT's loss and the gradient of every lora_A / lora_B for one batch (1e-4 relative).
fn gradients_match_peft(device: &burn::tensor::Device) {
    assert_gradients_match_peft(&tiny_with_adapter_on(device));
}

on_cpu_and_wgpu!(gradients_match_peft);

/// The head loss (a few positions' logits at a time, the gradient taken as softmax - onehot without
/// autodiff, then the surrogate sum(h * dL/dh)) gives the loss and the gradient of the hidden
/// states that autodiff of transformers' formula (log_softmax, gather at the shifted labels,
/// ignoring -100) gives, whatever the slice size, with and without ignored positions.
#[test]
fn head_loss_equals_autodiff_of_the_plain_loss() {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Distribution, Int, Tensor, TensorData};
    use webgpu_lora::train::data::IGNORE;
    let _turn = rng_turn();
    use webgpu_lora::train::loss::{HeadLoss, LossWeights, head_loss_backward, summed_token_loss};
    let t = trajectory();
    let model = tiny_with_adapter();
    let mut batch = batch(&t["grad_batch"]);
    let host = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
    for masked in [false, true] {
        if masked {
            // ignore every third label and the whole second row's first half
            for (i, l) in batch.labels.iter_mut().enumerate() {
                if i % 3 == 0 || (i / batch.seq == 1 && i % batch.seq < batch.seq / 2) {
                    *l = IGNORE;
                }
            }
        }
        let (b, seq) = (batch.batch, batch.seq);
        let hidden = Tensor::<3>::random([b, seq, model.config.hidden_size], Distribution::Normal(0.0, 1.0), &cpu());
        // the reference: autodiff through log_softmax over every shifted position, masked
        let leaf = hidden.clone().autodiff().require_grad();
        let vocab = model.config.vocab_size;
        let logits = model.head(leaf.clone()).narrow(1, 0, seq - 1).reshape([b * (seq - 1), vocab]);
        let next: Vec<i32> = batch.labels.chunks(seq).flat_map(|row| row[1..].to_vec()).collect();
        let mask: Vec<f32> = next.iter().map(|&l| if l == IGNORE { 0.0 } else { 1.0 }).collect();
        let index: Vec<i32> = next.iter().map(|&l| l.max(0)).collect();
        let n = next.len();
        let index = Tensor::<2, Int>::from_data(TensorData::new(index, [n, 1]), &cpu());
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, 1]), &cpu());
        let plain = (log_softmax(logits, 1).gather(1, index) * mask).sum().neg();
        let g = plain.clone().mul_scalar(0.5).backward();
        let expected_grad = host(leaf.grad(&g).unwrap());
        let expected_loss = plain.inner().into_data().try_to_vec::<f32>().unwrap()[0] * 0.5;
        let (summed, count) = summed_token_loss(&model.head_for_slices(), hidden.clone(), &batch, 7);
        assert_eq!(count, batch.trainable_tokens());
        let summed = summed.into_data().try_to_vec::<f32>().unwrap()[0] * 0.5;
        assert!((summed - expected_loss).abs() < 1e-5 * expected_loss.abs(), "masked {masked}: loss {summed} vs {expected_loss}");
        for rows in [1, 5, 7, 1000] {
            let leaf = hidden.clone().autodiff().require_grad();
            let HeadLoss { surrogate, loss, .. } =
                head_loss_backward(&model.head_for_slices(), leaf.clone(), &batch, LossWeights::Uniform(0.5), rows);
            let g = surrogate.backward();
            let loss = loss.into_data().try_to_vec::<f32>().unwrap()[0];
            assert!(
                (loss - expected_loss).abs() < 1e-5 * expected_loss.abs(),
                "masked {masked}, {rows} rows: loss {loss} vs {expected_loss}"
            );
            let diff = max_abs_diff(&host(leaf.grad(&g).unwrap()), &expected_grad);
            assert!(diff < 1e-6, "masked {masked}, {rows} rows: max |dh - dh autodiff| = {diff}");
        }
    }
    // no position counts: zero loss, zero gradient, nothing through the head
    batch.labels.iter_mut().for_each(|l| *l = IGNORE);
    let leaf = Tensor::<3>::ones([batch.batch, batch.seq, model.config.hidden_size], &cpu()).autodiff().require_grad();
    let HeadLoss { surrogate, loss, .. } = head_loss_backward(&model.head_for_slices(), leaf.clone(), &batch, LossWeights::Uniform(0.5), 7);
    let g = surrogate.backward();
    assert_eq!(loss.into_data().try_to_vec::<f32>().unwrap(), vec![0.0]);
    assert!(host(leaf.grad(&g).unwrap()).iter().all(|&x| x == 0.0));
    assert_eq!(summed_token_loss(&model.head_for_slices(), leaf.inner(), &batch, 7).1, 0);
}

/// 20 AdamW steps (2 micro-batches each, clipping, cosine with warmup, weight decay 0.1): PEFT's
/// loss curve within 1e-4, each step's gradient norm (before clipping) within 1e-4 relative and the
/// LoRA tensors PEFT ends with within 1e-4, on the CPU and the wgpu backends; the base weights are
/// bit-identical afterwards.
fn trajectory_matches_peft_and_base_is_untouched(device: &burn::tensor::Device) {
    let t = trajectory();
    let mut model = tiny_with_adapter_on(device);
    let base_before = pollster::block_on(model.hf_tensors(None)).unwrap();
    let (losses, result, _, grad_norms) = run(&mut model, &trajectory_steps(&t), &reference_options(&t), None, None);
    let summary = result.unwrap();
    assert_eq!((summary.steps, summary.end), (20, TrainEnd::Completed));
    let expected: Vec<f64> = serde_json::from_value(t["losses"].clone()).unwrap();
    let peft_norms: Vec<f64> = serde_json::from_value(t["grad_norms"].clone()).unwrap();
    for (i, (ours, peft)) in losses.iter().zip(&expected).enumerate() {
        assert!((ours - peft).abs() < 1e-4, "step {}: loss {ours} vs PEFT {peft}", i + 1);
    }
    for (i, (ours, peft)) in grad_norms.iter().zip(&peft_norms).enumerate() {
        assert!((ours - peft).abs() < 1e-4 * peft, "step {}: gradient norm {ours} vs PEFT {peft}", i + 1);
    }
    assert_eq!((losses.len(), grad_norms.len()), (expected.len(), peft_norms.len()));
    assert_final_tensors_match_peft(&model, &t);
    pollster::block_on(model.disable_adapter()).unwrap();
    assert_eq!(pollster::block_on(model.hf_tensors(None)).unwrap(), base_before, "the base is bit-identical");
}

on_cpu_and_wgpu!(trajectory_matches_peft_and_base_is_untouched);

/// Every lora_A / lora_B of adapter "a" equals PEFT's after the trajectory (train/final.safetensors)
/// within 1e-4: a tolerance well below how far the run without weight decay ends from them.
fn assert_final_tensors_match_peft(model: &LlamaModel, t: &serde_json::Value) {
    let decay_shift = t["decay_shift_max_abs"].as_f64().unwrap();
    assert!(decay_shift > 1e-3, "the fixture's weight decay must show in the tensors (it moves them {decay_shift})");
    let files = pollster::block_on(model.export_adapter("a")).unwrap();
    let ours = webgpu_lora::io::SafetensorsWeights::new(vec![("ours".into(), files.safetensors)]).unwrap();
    let bytes = std::fs::read(fixture("train/final.safetensors")).unwrap();
    let peft = webgpu_lora::io::SafetensorsWeights::new(vec![("final".into(), bytes)]).unwrap();
    assert_eq!(ours.names().len(), peft.names().len());
    for name in peft.names() {
        let (theirs, ours) = (peft.tensor(name).unwrap(), ours.tensor(&format!("base_model.model.{name}")).unwrap());
        assert_eq!(ours.shape, theirs.shape, "{name}");
        let diff = max_abs_diff(&ours.data, &theirs.data);
        assert!(diff < 1e-4, "{name}: max diff {diff} from PEFT's tensor after the trajectory");
    }
}

/// Training on a base stored in f16 is training on the f16-rounded base: five of the trajectory's
/// steps on tiny-llama loaded as f16 give the losses of the same run on the model whose matrices
/// were rounded beforehand and loaded in f32 (1e-6), and the f16 base is bit-identical afterwards.
#[test]
fn training_on_an_f16_base() {
    let t = trajectory();
    let steps = &trajectory_steps(&t)[..5];
    let f16_files = webgpu_lora::io::ModelFiles::from_dir(&fixture("tiny-llama")).unwrap();
    let f16_model = webgpu_lora::Llm::load(f16_files, WeightDtype::F16, &cpu(), &mut |_, _, _| {}).unwrap().model;
    let mut f16 = with_adapter(f16_model);
    let rounded_files = rounded_to_f16_files(&fixture("tiny-llama"));
    let mut rounded = with_adapter(webgpu_lora::Llm::load(rounded_files, WeightDtype::F32, &cpu(), &mut |_, _, _| {}).unwrap().model);
    let base_before = pollster::block_on(f16.hf_tensors(None)).unwrap();
    let (ours, result, ..) = run(&mut f16, steps, &reference_options(&t), None, None);
    result.unwrap();
    let (reference, ..) = run(&mut rounded, steps, &reference_options(&t), None, None);
    assert_eq!(ours.len(), 5);
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {}: loss {a} on the f16 base vs {b}", i + 1);
    }
    pollster::block_on(f16.disable_adapter()).unwrap();
    assert_eq!(pollster::block_on(f16.hf_tensors(None)).unwrap(), base_before, "the f16 base is bit-identical");
}

/// Training on a quantized base (the tiny model as a Q4_0 GGUF, kept quantized) is training on its
/// dequantized values: the gradients of one batch and five of the trajectory's steps equal those
/// of the same GGUF loaded as f32 (1e-5 relative, 1e-6 absolute), the quantized matrices stay on
/// the device as they were (the products' backward dequantizes again: nothing f32 is kept), and
/// the base is bit-identical afterwards. Against PEFT training on transformers' dequantization of
/// that GGUF (tests/fixtures/quant): the same five losses (1e-4) and the same final LoRA tensors
/// (1e-4 relative), so the adapter trained here loads in PEFT on the dequantized base and gives
/// our logits.
#[test]
fn training_on_a_quantized_base() {
    let t = trajectory();
    let steps = &trajectory_steps(&t)[..5];
    let gguf = || webgpu_lora::io::ModelFiles::from_path(&fixture("quant/tiny-q4_0.gguf")).unwrap();
    let load = |dtype| with_adapter(webgpu_lora::Llm::load(gguf(), dtype, &cpu(), &mut |_, _, _| {}).unwrap().model);
    let (mut quantized, mut dequantized) = (load(WeightDtype::Auto), load(WeightDtype::F32));
    assert!(quantized.memory_footprint() * 2 < dequantized.memory_footprint(), "the Q4_0 base stays quantized");
    let batch = batch(&t["grad_batch"]);
    let ((loss_q, grads_q), (loss_f, grads_f)) =
        (adapter_gradients(&quantized, "a", &batch, false), adapter_gradients(&dequantized, "a", &batch, false));
    assert!((loss_q - loss_f).abs() < 1e-6, "loss {loss_q} on the Q4_0 base vs {loss_f} dequantized");
    for (name, q) in &grads_q {
        let f = &grads_f[name].data;
        let scale = f.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&q.data, f);
        assert!(diff <= 1e-5 * scale + 1e-7, "{name}: max diff {diff}, max |grad| {scale}");
    }
    let base_before = pollster::block_on(quantized.hf_tensors(None)).unwrap();
    let footprint = quantized.memory_footprint();
    let (ours, result, ..) = run(&mut quantized, steps, &reference_options(&t), None, None);
    result.unwrap();
    let (reference, ..) = run(&mut dequantized, steps, &reference_options(&t), None, None);
    assert_eq!(ours.len(), 5);
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {}: loss {a} on the Q4_0 base vs {b} dequantized", i + 1);
    }
    assert_eq!(quantized.memory_footprint(), footprint, "nothing was dequantized into the model");

    let bytes = std::fs::read(fixture("quant/expected.safetensors")).unwrap();
    let peft = webgpu_lora::io::SafetensorsWeights::new(vec![("expected".into(), bytes)]).unwrap();
    for (i, (ours, theirs)) in ours.iter().zip(&peft.tensor("Q4_0.train.losses").unwrap().data).enumerate() {
        assert!((ours - *theirs as f64).abs() < 1e-4, "step {}: loss {ours} on the Q4_0 base vs PEFT {theirs}", i + 1);
    }
    let files = pollster::block_on(quantized.export_adapter("a")).unwrap();
    let trained = webgpu_lora::io::SafetensorsWeights::new(vec![("ours".into(), files.safetensors)]).unwrap();
    for key in trained.names() {
        let theirs = peft.tensor(&format!("Q4_0.train.{}", key.strip_prefix("base_model.model.").unwrap())).unwrap();
        let scale = theirs.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&trained.tensor(key).unwrap().data, &theirs.data);
        assert!(diff <= 1e-4 * scale, "{key}: max |ours - PEFT| {diff}, max |value| {scale}");
    }
    pollster::block_on(quantized.disable_adapter()).unwrap();
    assert_eq!(pollster::block_on(quantized.hf_tensors(None)).unwrap(), base_before, "the Q4_0 base is bit-identical");
}

/// LoRA dropout as PEFT applies it (`lora_B(lora_A(dropout(x)))`, torch's inverted dropout): on
/// the LoRA branch's input only, each kept value scaled by 1/(1-p), about p of them dropped. With
/// A = B = I and scaling 1, the layer's output minus the base layer's is the dropped-out input.
#[test]
fn lora_dropout_is_on_the_branch_input_only() {
    use burn::tensor::{Tensor, TensorData};
    use webgpu_lora::lora::{DropoutMasks, LoraRun, LoraWeights};
    let _turn = rng_turn();
    let device = cpu();
    let mut model = load(&fixture("tiny-llama"), &device).model;
    let q = &mut model.layers[0].self_attn.q_proj;
    let d = 64;
    let eye: Vec<f32> = (0..d * d).map(|i| if i / d == i % d { 1.0 } else { 0.0 }).collect();
    let eye = Tensor::<2>::from_data(TensorData::new(eye, [d, d]), &device);
    q.adapters.insert("eye".into(), LoraWeights { a_t: eye.clone(), b_t: eye, scaling: 1.0 });
    let (batch, seq) = (4, 32);
    // none zero: a zero would count as dropped
    let values: Vec<f32> = (0..batch * seq * d).map(|i| 0.3 + (i % 13) as f32 * 0.25 - if i % 2 == 0 { 3.0 } else { 0.0 }).collect();
    let x = Tensor::<3>::from_data(TensorData::new(values.clone(), [batch, seq, d]), &device);
    let p = 0.25;
    let masks = DropoutMasks::new(p, batch * seq, 1, 1);
    let part = masks.part(0..batch * seq);
    let with_dropout = q.forward(x.clone(), Some(LoraRun { adapter: "eye", weights: None, dropout: Some(&part) }));
    let base = q.forward(x, None);
    let branch = pollster::block_on(webgpu_lora::tensor::read_f32(with_dropout - base)).unwrap();
    let mut dropped = 0;
    for (i, (&b, &x)) in branch.iter().zip(&values).enumerate() {
        if b == 0.0 {
            dropped += 1;
        } else {
            assert!((b - x / (1.0 - p as f32)).abs() < 1e-5 * x.abs().max(1.0), "element {i}: {b} is neither 0 nor {x} / (1 - p)");
        }
    }
    let fraction = dropped as f64 / values.len() as f64;
    assert!((fraction - p).abs() < 0.02, "{fraction} of the inputs dropped, p = {p}");
}

/// Micro-batches split across threads (`TrainOptions::threads`, what the CLI does on the CPU
/// backend) give the unsplit run's losses and adapter (1e-6: only the summation order differs);
/// the replicas the threads ran are gone afterwards.
#[test]
fn micro_batches_split_across_threads_train_the_same() {
    let t = trajectory();
    let steps = &trajectory_steps(&t)[..6];
    let mut config = reference_options(&t);
    let mut whole = tiny_with_adapter();
    let (expected, ..) = run(&mut whole, steps, &config, None, None);
    config.threads = Some(2);
    let mut split = tiny_with_adapter();
    let (losses, result, ..) = run(&mut split, steps, &config, None, None);
    result.unwrap();
    assert_eq!(losses.len(), expected.len());
    for (i, (a, b)) in losses.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {}: loss {a} split vs {b}", i + 1);
    }
    let adapter = |model: &LlamaModel| pollster::block_on(model.export_adapter("a")).unwrap();
    let (ours, theirs) = (adapter(&split), adapter(&whole));
    let read =
        |f: &webgpu_lora::lora::AdapterFiles| webgpu_lora::io::SafetensorsWeights::new(vec![("a".into(), f.safetensors.clone())]).unwrap();
    let (ours, theirs) = (read(&ours), read(&theirs));
    for name in theirs.names() {
        let diff = max_abs_diff(&ours.tensor(name).unwrap().data, &theirs.tensor(name).unwrap().data);
        assert!(diff < 1e-6, "{name}: {diff}");
    }
    assert_eq!(split.adapter_names(), vec!["a"]);
    assert!(split.layers.iter().all(|l| l.linears().iter().all(|linear| linear.adapters.len() == 1)), "no replica is left behind");
}

/// With LoRA dropout, a split micro-batch applies the masks the unsplit pass draws (each layer's
/// mask drawn once, in layer order, each part taking its rows): the same losses split or not,
/// checkpointed or not, and dropout does change them.
#[test]
fn dropout_masks_do_not_depend_on_the_split() {
    use webgpu_lora::lora::LoraConfig;
    let t = trajectory();
    let steps = &trajectory_steps(&t)[..4];
    let fresh = |dropout: f64| {
        let _turn = rng_turn();
        let mut model = load(&fixture("tiny-llama"), &cpu()).model;
        let json = format!(
            r#"{{"peft_type":"LORA","r":4,"lora_alpha":8,"lora_dropout":{dropout},"target_modules":"all-linear","init_lora_weights":"gaussian"}}"#
        );
        pollster::block_on(model.add_adapter("a", LoraConfig::from_json(json.as_bytes(), "test").unwrap(), 0)).unwrap();
        model
    };
    let mut config = reference_options(&t);
    let (unsplit, ..) = run(&mut fresh(0.3), steps, &config, None, None);
    let (no_dropout, ..) = run(&mut fresh(0.0), steps, &config, None, None);
    config.threads = Some(2);
    let (split, result, ..) = run(&mut fresh(0.3), steps, &config, None, None);
    result.unwrap();
    for (i, (a, b)) in split.iter().zip(&unsplit).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {}: loss {a} split vs {b}", i + 1);
    }
    // gradient checkpointing runs each layer again with the masks of its first run
    config.gradient_checkpointing = true;
    let (checkpointed, result, ..) = run(&mut fresh(0.3), steps, &config, None, None);
    result.unwrap();
    for (i, (a, b)) in checkpointed.iter().zip(&unsplit).enumerate() {
        assert!((a - b).abs() < 1e-6, "step {}: loss {a} split and checkpointed vs {b}", i + 1);
    }
    let effect = split.iter().zip(&no_dropout).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(effect > 1e-4, "dropout 0.3 changes the losses ({effect})");
}

/// A batch split by rows: consecutive rows, sizes differing by at most one, every row once, the
/// token count shared out exactly; never more parts than rows.
#[test]
fn split_rows_partitions_a_batch() {
    let b = Batch { ids: (0..5 * 3).collect(), labels: (0..5 * 3).map(|l| l as i32).collect(), batch: 5, seq: 3, tokens: 14 };
    let parts = b.split_rows(2);
    assert_eq!(parts.iter().map(|p| p.batch).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(parts.iter().flat_map(|p| p.ids.clone()).collect::<Vec<_>>(), b.ids);
    assert_eq!(parts.iter().flat_map(|p| p.labels.clone()).collect::<Vec<_>>(), b.labels);
    assert_eq!(parts.iter().map(|p| p.tokens).sum::<usize>(), 14);
    assert_eq!(b.split_rows(9).len(), 5);
    assert_eq!(b.split_rows(1)[0].ids, b.ids);
}

/// A run resumed from a checkpoint (its adapter + trainer state) gives the same losses as the
/// uninterrupted run; a cancelled run stops where asked.
#[test]
fn resume_and_cancel() {
    let t = trajectory();
    let steps = &trajectory_steps(&t)[..6];
    let config = TrainOptions { checkpoint_every: Some(3), ..reference_options(&t) };
    let (full, result, checkpoints, _) = run(&mut tiny_with_adapter(), steps, &config, None, None);
    result.unwrap();
    assert_eq!(checkpoints.len(), 1);
    let (step, state, adapter) = checkpoints.into_iter().next().unwrap();
    assert_eq!(step, 3);

    let mut resumed = load(&fixture("tiny-llama"), &cpu()).model;
    pollster::block_on(resumed.load_adapter("a", AdapterSource::from_files(adapter, "checkpoint"))).unwrap();
    let (rest, result, ..) = run(&mut resumed, steps, &config, Some(&state), None);
    assert_eq!(result.unwrap().steps, 6);
    assert_eq!(rest.len(), 3);
    for (a, b) in full[3..].iter().zip(&rest) {
        assert!((a - b).abs() < 1e-6, "resumed {b} vs uninterrupted {a}");
    }

    let (losses, result, ..) = run(&mut tiny_with_adapter(), steps, &config, None, Some(2));
    let summary = result.unwrap();
    assert_eq!((losses.len(), summary.steps, summary.end), (2, 2, TrainEnd::Cancelled));
}

/// A loss that becomes Inf/NaN stops training with a clear error; the adapter is the one of the
/// last good step (equal to a run of the same job cancelled after that step).
#[test]
fn a_diverging_loss_stops_training() {
    let t = trajectory();
    let mut model = tiny_with_adapter();
    // split across threads: the replicas must go on the error path too
    let config = TrainOptions { lr: 1e30, schedule: Schedule::Constant, max_grad_norm: 0.0, threads: Some(2), ..Default::default() };
    let (_, result, ..) = run(&mut model, &trajectory_steps(&t)[..5], &config, None, None);
    let err = result.unwrap_err().to_string();
    let last_good: usize = err
        .split("adapter is as it was after step ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("the error names the last good step: {err}"));
    assert!(err.contains("the loss became") && last_good < 5, "{err}");
    assert!(model.layers.iter().all(|l| l.linears().iter().all(|linear| linear.adapters.len() == 1)), "no replica is left behind");

    let mut reference = tiny_with_adapter();
    let (_, result, ..) = run(&mut reference, &trajectory_steps(&t)[..5], &config, None, Some(last_good));
    assert_eq!(result.unwrap().steps, last_good);
    let tensors = |model: &LlamaModel| {
        let files = pollster::block_on(model.export_adapter("a")).unwrap();
        let weights = webgpu_lora::io::SafetensorsWeights::new(vec![("a".into(), files.safetensors)]).unwrap();
        weights.names().iter().map(|n| (n.to_string(), weights.tensor(n).unwrap().data)).collect::<Vec<_>>()
    };
    let (kept, good) = (tensors(&model), tensors(&reference));
    assert!(kept.iter().all(|(_, values)| values.iter().all(|v| v.is_finite())));
    assert_eq!(kept, good, "the adapter is the one after step {last_good}");
}

/// Early stopping: with a validation set and patience 1, a run that gets worse stops and keeps the
/// adapter of the best evaluation (its validation loss is the reported best).
#[test]
fn early_stopping_restores_the_best_adapter() {
    let t = trajectory();
    let mut model = tiny_with_adapter();
    let steps = trajectory_steps(&t);
    let val: Vec<Batch> = steps[..2].iter().flatten().cloned().collect();
    let config = TrainOptions {
        lr: 0.5,
        schedule: Schedule::Constant,
        max_grad_norm: 0.0,
        eval_every: Some(1),
        patience: Some(1),
        ..Default::default()
    };
    let clock = || 0.0;
    let _turn = rng_turn();
    let summary = pollster::block_on(train_steps(
        &mut model,
        Target::Adapter("a"),
        &steps,
        steps.len(),
        Some(&val),
        &config,
        None,
        &clock,
        &mut |_| Control::Continue,
    ))
    .unwrap();
    assert_eq!(summary.end, TrainEnd::EarlyStopped, "{summary:?}");
    let now = pollster::block_on(webgpu_lora::train::evaluate(&model, &val)).unwrap();
    let best = summary.best_val_loss.unwrap();
    assert!((now - best).abs() < 1e-5, "restored adapter's val loss {now} vs best {best}");
}
