//! The native command-line edge: parses arguments, picks the device, calls the core, prints.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::{Device, DeviceKind};
use clap::{Parser, Subcommand, ValueEnum};

use webgpu_lora::generate::read_f32;
use webgpu_lora::io::gguf::GgufFile;
use webgpu_lora::io::gguf_convert::HfModel;
use webgpu_lora::io::safetensors::write_safetensors;
use webgpu_lora::config::LoraConfig;
use webgpu_lora::io::model_files::write_files;
use webgpu_lora::io::{HostTensor, ModelFiles, StoreDtype};
use webgpu_lora::peft::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterSource};
use webgpu_lora::model::WeightDtype;
use webgpu_lora::{Error, GenerationConfig, Llm, Result};

#[derive(Parser)]
#[command(name = "webgpu-lora", version, about = "Run, convert and merge LoRA adapters into Llama-architecture models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// burn's CPU backend (flex)
    Cpu,
    /// burn's wgpu backend: the WGSL compute shaders the browser runs (Vulkan natively)
    Wgpu,
}

/// How the base model's matrices are stored (computed with in f32 either way).
#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    /// half the memory; the weights rounded to f16
    F16,
}

impl From<DtypeArg> for WeightDtype {
    fn from(dtype: DtypeArg) -> Self {
        match dtype {
            DtypeArg::F32 => WeightDtype::F32,
            DtypeArg::F16 => WeightDtype::F16,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Convert a llama GGUF file to a Hugging Face model directory.
    ConvertGguf {
        input: PathBuf,
        out_dir: PathBuf,
        /// Storage dtype of model.safetensors: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Generate text after a prompt, streamed to stdout.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter directory to run with; repeat to load several: the last one is active.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 = no top-k cut.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Storage of the base model's matrices.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
    },
    /// Write the f32 logits [seq, vocab] of one forward pass to a safetensors file (key `logits`).
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// A PEFT adapter directory; repeat to load several: the last one is active.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// Compute after merge_and_unload of the active adapter.
        #[arg(long, requires = "adapter")]
        merge: bool,
        /// Comma-separated token ids.
        #[arg(long, conflicts_with = "text", required_unless_present = "text")]
        ids: Option<String>,
        /// Text, tokenized with the model's tokenizer (special tokens added as it says).
        #[arg(long)]
        text: Option<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Storage of the base model's matrices.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
    },
    /// Merge a PEFT adapter into the base and write the merged model as a Hugging Face directory.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Refuse (and write nothing) if the merged weights hold NaN or Inf.
        #[arg(long)]
        safe: bool,
    },
    /// Train a LoRA adapter with SFT on JSONL data ({"messages"}, {"prompt","completion"} or
    /// {"text"} per line) or a plain text file; writes a PEFT adapter directory.
    Train(TrainArgs),
    /// Print an adapter's config summary and its parameter counts.
    AdapterInfo {
        adapter: PathBuf,
        /// The base model to count against (default: the config's base_model_name_or_path).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// The adapter directory to write (adapter_config.json, adapter_model.safetensors,
    /// training_summary.json; checkpoints in checkpoint-STEP/).
    #[arg(long)]
    out: PathBuf,
    /// A validation file (same formats as --data).
    #[arg(long, conflicts_with = "val_split")]
    val: Option<PathBuf>,
    /// Hold out this fraction of --data for validation.
    #[arg(long)]
    val_split: Option<f64>,
    #[arg(long, default_value_t = 8)]
    r: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// Comma-separated module names, or all-linear.
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    #[arg(long, default_value = "default", value_parser = ["default", "gaussian", "olora", "pissa"])]
    init: String,
    /// Scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    #[arg(long)]
    rslora: bool,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value = "cosine", value_parser = ["cosine", "linear", "constant"])]
    schedule: String,
    /// Clip gradients to this global norm (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 1, conflicts_with = "max_steps")]
    epochs: usize,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate on the validation set every N steps (and at the end).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after N evaluations without a better validation loss, keeping the best adapter.
    #[arg(long)]
    patience: Option<usize>,
    /// Save the adapter and the trainer state every N steps under OUT/checkpoint-STEP/.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Continue from a checkpoint directory written by --checkpoint-every.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Train on every token, not only assistant turns / completions.
    #[arg(long)]
    train_on_everything: bool,
    /// Cut examples longer than --max-seq-len (counted) instead of refusing them.
    #[arg(long)]
    truncate: bool,
    /// Skip malformed lines (counted) instead of refusing the file.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Concatenate examples into rows of up to --max-seq-len tokens.
    #[arg(long)]
    packing: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Storage of the base model's matrices.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Write every event (steps, evaluations, checkpoints) as JSON lines here.
    #[arg(long)]
    log: Option<PathBuf>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io { file: path.display().to_string(), source })
}

fn train(args: TrainArgs) -> Result<()> {
    use webgpu_lora::train::fine_tune::{STATE_FILE, SUMMARY_FILE, TrainOptions};
    use webgpu_lora::train::{Control, TrainEvent, fine_tune};
    let options = TrainOptions {
        adapter_name: "default".into(),
        r: args.r,
        lora_alpha: args.alpha,
        lora_dropout: args.dropout,
        target_modules: args.targets.split(',').map(|t| t.trim().to_string()).collect(),
        init_lora_weights: args.init.clone(),
        use_rslora: args.rslora,
        base_model_name_or_path: Some(args.model.display().to_string()),
        lr: args.lr,
        weight_decay: args.weight_decay,
        schedule: args.schedule.clone(),
        warmup_steps: args.warmup,
        max_grad_norm: args.max_grad_norm,
        epochs: args.epochs,
        max_steps: args.max_steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_seq_len: args.max_seq_len,
        seed: args.seed,
        eval_every: args.eval_every,
        patience: args.patience,
        checkpoint_every: args.checkpoint_every,
        val_split: args.val_split,
        packing: args.packing,
        train_on_everything: args.train_on_everything,
        truncate: args.truncate,
        skip_bad_lines: args.skip_bad_lines,
    };
    let mut spec = options.to_fine_tune()?;
    if let BackendArg::Cpu = args.backend {
        // the CPU backend's elementwise kernels are single-threaded: split micro-batches across the cores
        spec.train.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    let mut llm = load(&args.model, args.backend, args.dtype)?;
    let data = read(&args.data)?;
    let val = args.val.as_ref().map(|p| read(p).map(|b| (p.display().to_string(), b))).transpose()?;
    let resume = match &args.resume {
        Some(dir) => Some((AdapterSource::from_dir(dir)?, read(&dir.join(STATE_FILE))?)),
        None => None,
    };
    let mut log = match &args.log {
        Some(path) => Some(std::fs::File::create(path).map_err(|source| Error::Io { file: path.display().to_string(), source })?),
        None => None,
    };
    let started = std::time::Instant::now();
    let clock = move || started.elapsed().as_secs_f64();
    let mut failed: Option<Error> = None;
    let out = args.out.clone();
    let mut on_event = |event: TrainEvent| {
        if let Some(file) = log.as_mut() {
            let _ = writeln!(file, "{}", event.to_json());
        }
        match &event {
            TrainEvent::Step(m) => eprintln!(
                "step {}/{}  epoch {:.2}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.0} tokens/s  eta {:.0}s",
                m.step, m.total_steps, m.epoch, m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.eta_s
            ),
            TrainEvent::Eval { step, val_loss, best } => eprintln!("eval at step {step}: val_loss {val_loss:.4}{}", if *best { " (best)" } else { "" }),
            TrainEvent::Checkpoint { step, adapter, state } => {
                let dir = out.join(format!("checkpoint-{step}"));
                let written = write_files(&dir, vec![
                    (ADAPTER_CONFIG_FILE, adapter.config_json.clone().into_bytes()),
                    (ADAPTER_WEIGHTS_FILE, adapter.safetensors.clone()),
                    (STATE_FILE, state.clone()),
                ]);
                match written {
                    Ok(()) => eprintln!("checkpoint: {}", dir.display()),
                    Err(e) => {
                        failed = Some(e);
                        return Control::Stop;
                    }
                }
            }
        }
        Control::Continue
    };
    let data_name = args.data.display().to_string();
    let val_ref = val.as_ref().map(|(n, b)| (n.as_str(), b.as_slice()));
    let (report, files) = pollster::block_on(fine_tune(&mut llm, &spec, (&data_name, &data), val_ref, resume, &clock, &mut on_event))?;
    if let Some(e) = failed {
        return Err(e);
    }
    write_files(&args.out, vec![
        (ADAPTER_CONFIG_FILE, files.config_json.into_bytes()),
        (ADAPTER_WEIGHTS_FILE, files.safetensors),
        (SUMMARY_FILE, report.to_json().into_bytes()),
    ])?;
    let s = &report.summary;
    eprintln!(
        "wrote {}: {} steps, {} tokens, final loss {}, best val_loss {}, {:.1}s ({:?})",
        args.out.display(), s.steps, s.tokens,
        s.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.best_val_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.elapsed_s, s.end,
    );
    Ok(())
}

fn device(backend: BackendArg) -> Device {
    match backend {
        BackendArg::Cpu => Device::flex(),
        BackendArg::Wgpu => Device::wgpu(DeviceKind::DefaultDevice),
    }
}

fn load(dir: &PathBuf, backend: BackendArg, dtype: DtypeArg) -> Result<Llm> {
    let files = ModelFiles::from_dir(dir)?;
    let interactive = std::io::stderr().is_terminal();
    Llm::load_as(files, dtype.into(), &device(backend), &mut |stage, done, total| {
        if interactive {
            eprint!("\rloading {stage}: {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    })
}

fn parse_ids(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(|s| s.trim().parse::<u32>().map_err(|_| Error::invalid(format!("--ids: {s:?} is not a token id; give ids like 1,2,3"))))
        .collect()
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ConvertGguf { input, out_dir, dtype } => {
            let dtype = StoreDtype::parse(&dtype)?;
            let bytes = std::fs::read(&input).map_err(|source| Error::Io { file: input.display().to_string(), source })?;
            let gguf = GgufFile::parse(&bytes, &input.display().to_string())?;
            let model = HfModel::from_gguf(&gguf)?;
            model.write_dir(&out_dir, dtype)?;
            eprintln!("wrote {} ({} tensors, {})", out_dir.display(), model.tensors.len(), dtype.torch_name());
        }
        Command::Generate { model, adapter, prompt, chat, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, backend, dtype } => {
            let mut llm = load(&model, backend, dtype)?;
            load_adapters(&mut llm, &adapter)?;
            let ids = llm.prompt_ids(&prompt, chat)?;
            let config = GenerationConfig { max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, ..Default::default() };
            let mut stdout = std::io::stdout();
            pollster::block_on(llm.generate_text(&ids, &config, &mut |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
                true
            }))?;
            println!();
        }
        Command::Logits { model, adapter, merge, ids, text, out, backend, dtype } => {
            let mut llm = load(&model, backend, dtype)?;
            load_adapters(&mut llm, &adapter)?;
            if merge {
                pollster::block_on(llm.model.merge_and_unload(&[], false))?;
            }
            let ids = match (ids, text) {
                (Some(ids), _) => parse_ids(&ids)?,
                (None, Some(text)) => llm.tokenizer()?.encode(&text, true)?,
                (None, None) => unreachable!("clap requires one"),
            };
            llm.model.check_ids(&ids)?;
            let logits = llm.model.forward(llm.model.ids_tensor(&ids), None);
            let values = pollster::block_on(read_f32(logits))?;
            let tensors = BTreeMap::from([("logits".to_string(), HostTensor::new(vec![ids.len(), llm.model.config.vocab_size], values))]);
            let bytes = write_safetensors(&tensors, StoreDtype::F32, None)?;
            std::fs::write(&out, bytes).map_err(|source| Error::Io { file: out.display().to_string(), source })?;
        }
        Command::Merge { model, adapter, out, safe } => {
            let mut llm = Llm::load(ModelFiles::from_dir(&model)?, &Device::flex(), &mut |_, _, _| {})?;
            load_adapters(&mut llm, std::slice::from_ref(&adapter))?;
            pollster::block_on(llm.model.merge_and_unload(&[], safe))?;
            write_files(&out, pollster::block_on(llm.merged_files(None))?)?;
            eprintln!("wrote {} (merged {})", out.display(), adapter.display());
        }
        Command::Train(args) => train(args)?,
        Command::AdapterInfo { adapter, model } => {
            let config_path = adapter.join(ADAPTER_CONFIG_FILE);
            let bytes = std::fs::read(&config_path).map_err(|source| Error::Io { file: config_path.display().to_string(), source })?;
            let config = LoraConfig::from_json(&bytes, &config_path.display().to_string())?;
            println!("adapter: {}", adapter.display());
            println!("base model: {}", config.base_model_name_or_path.as_deref().unwrap_or("(not recorded)"));
            println!("r: {}  lora_alpha: {}  lora_dropout: {}  use_rslora: {}  init: {:?}", config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights);
            let base = model.or_else(|| config.base_model_name_or_path.as_ref().map(PathBuf::from).filter(|p| p.is_dir()));
            let Some(base) = base else {
                println!("(give --model DIR to count parameters against a base model)");
                return Ok(());
            };
            let mut llm = load(&base, BackendArg::Cpu, DtypeArg::F32)?;
            load_adapters(&mut llm, std::slice::from_ref(&adapter))?;
            let modules: Vec<String> = llm.model.config.linear_module_names().into_iter().filter(|m| config.targets(m, true)).collect();
            println!("target modules: {} layers, e.g. {}", modules.len(), modules.first().map_or("-", String::as_str));
            println!("{}", llm.model.trainable_parameters_line());
        }
    }
    Ok(())
}

/// Loads adapter directories in order; the last one becomes active.
fn load_adapters(llm: &mut Llm, dirs: &[PathBuf]) -> Result<()> {
    for (i, dir) in dirs.iter().enumerate() {
        let name = format!("adapter{i}");
        pollster::block_on(llm.model.load_adapter(&name, AdapterSource::from_dir(dir)?))?;
        llm.model.set_adapter(&name)?;
    }
    Ok(())
}


/// glibc hands large freed blocks back to the OS at once, so every training step page-faults its
/// activations in again (~13% of a step here); keep freed memory for reuse instead.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
