//! The native command-line edge: parses arguments, picks the device, calls the core, prints.
//! The generation and training flags are the core's own option types (clap derives them there).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::{Device, DeviceKind};
use clap::{Parser, Subcommand, ValueEnum};

use webgpu_lora::evaluate::{EvalOptions, Evaluation, evaluate};
use webgpu_lora::io::gguf_convert::GgufModel;
use webgpu_lora::io::safetensors::write_safetensors;
use webgpu_lora::io::{ModelFiles, StoreDtype, is_gguf, read_file, write_file, write_files};
use webgpu_lora::lora::{ADAPTER_CONFIG_FILE, AdapterSource, LoraConfig, LoraLayers, LoraModel};
use webgpu_lora::nn::WeightDtype;
use webgpu_lora::tensor::HostTensor;
use webgpu_lora::train::fine_tune::{STATE_FILE, SUMMARY_FILE};
use webgpu_lora::train::{Control, Method, TrainEvent, TrainOptions, TrainStart, fine_tune, memory};
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

/// Which model, on which backend, stored how.
#[derive(clap::Args)]
struct ModelArgs {
    /// A Hugging Face model directory, or a .gguf file (loaded as it is).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Storage of the base model's matrices (computed with in f32 either way): auto (as the
    /// file stores them: a GGUF stays quantized, safetensors load as f32), f32, f16 (half the
    /// memory), or q8_0, q4_0, q4_1, q5_0 (the decoder layers' linear weights quantized on load).
    #[arg(long, default_value = "auto", value_parser = |s: &str| WeightDtype::parse(s).map_err(|e| e.to_string()))]
    dtype: WeightDtype,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a llama GGUF file to a Hugging Face model directory.
    ConvertGguf {
        input: PathBuf,
        out_dir: PathBuf,
        /// Storage dtype of model.safetensors: auto (each tensor as the GGUF stores it: F16 and
        /// BF16 kept, F32 and quantized blocks in f32, nothing rounded), f32, f16 or bf16.
        #[arg(long, default_value = "auto")]
        dtype: String,
    },
    /// Generate text after a prompt, streamed to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// A PEFT adapter directory to run with; repeat to load several: the last one is active.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        generation: GenerationConfig,
    },
    /// Write the f32 logits [seq, vocab] of one forward pass to a safetensors file (key `logits`).
    Logits {
        #[command(flatten)]
        model: ModelArgs,
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
    },
    /// Merge a PEFT adapter into the base and write the merged model as a Hugging Face directory
    /// (dequantized plus the update, exactly, for a quantized base).
    /// With --out FILE.gguf, write a GGUF for llama.cpp, Ollama, LM Studio and wllama instead
    /// (a .gguf base's metadata is copied; a Hugging Face directory's is written from its
    /// config and tokenizer files as llama.cpp's converter writes it).
    Merge {
        #[command(flatten)]
        files: AdapterOnBase,
        /// Refuse (and write nothing) if the merged weights hold NaN or Inf.
        #[arg(long)]
        safe: bool,
        /// The GGUF's matrix type: auto (each matrix as the base stores it, a quantized one
        /// requantized after the merge), f32, f16, q8_0, q4_0, q4_1 or q5_0.
        #[arg(long, value_parser = |s: &str| WeightDtype::parse(s).map_err(|e| e.to_string()))]
        out_type: Option<WeightDtype>,
    },
    /// Write a PEFT adapter as a GGUF LoRA adapter for llama.cpp (`--lora FILE.gguf`), Ollama
    /// (`ADAPTER`) and wllama, as llama.cpp's convert_lora_to_gguf.py does.
    AdapterToGguf(AdapterOnBase),
    /// Train a LoRA adapter with SFT on JSONL data ({"messages"}, {"prompt","completion"} or
    /// {"text"} per line) or a plain text file; writes a PEFT adapter directory.
    Train(TrainArgs),
    /// Write an OLoRA/PiSSA adapter as a plain LoRA of rank 2r that loads on the unmodified base
    /// beside other adapters (PEFT's path_initial_model_for_weight_conversion).
    ConvertToLora(AdapterOnBase),
    /// Evaluate on held-out data (JSONL or text): mean token loss and perplexity, and, for lines
    /// with a reference ({"prompt","completion"}, or "messages" ending with the assistant's),
    /// exact match and ROUGE-L of greedy answers. One row for the base, one per --adapter, one
    /// for the last adapter merged (merge_and_unload) and one per --other-model, side by side;
    /// --json writes them.
    Evaluate {
        #[command(flatten)]
        model: ModelArgs,
        /// A PEFT adapter directory to evaluate; repeat for several.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// Another model to evaluate beside them (a fully fine-tuned one: train --method full),
        /// loaded as --model is; repeat for several.
        #[arg(long)]
        other_model: Vec<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        /// The longest greedy answer; 0 skips exact match and ROUGE-L.
        #[arg(long, default_value_t = EvalOptions::default().max_new_tokens)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = EvalOptions::default().batch_size)]
        batch_size: usize,
        #[arg(long, default_value_t = EvalOptions::default().max_seq_len)]
        max_seq_len: usize,
        /// Write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print an adapter's config summary and its parameter counts.
    AdapterInfo {
        adapter: PathBuf,
        /// The base model to count against (default: the config's base_model_name_or_path).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

/// An adapter directory, the base model it was made for, and where to write the result.
#[derive(clap::Args)]
struct AdapterOnBase {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

/// The `train` command: where things are and which backend runs, plus every training option.
#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    data: PathBuf,
    /// The adapter directory to write (adapter_config.json, adapter_model.safetensors,
    /// training_summary.json; checkpoints in checkpoint-STEP/); with --method full, the model
    /// directory (config.json, model.safetensors in f32, the tokenizer's files).
    #[arg(long)]
    out: PathBuf,
    /// A validation file (same formats as --data).
    #[arg(long, conflicts_with = "val_split")]
    val: Option<PathBuf>,
    /// Continue from a checkpoint directory written by --checkpoint-every (with --method full,
    /// the model is loaded from it instead of --model).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Train this PEFT adapter further (its adapter_config.json sets r, alpha, targets, ...)
    /// instead of a new one.
    #[arg(long, conflicts_with = "resume")]
    init_from: Option<PathBuf>,
    /// Write every event (steps, evaluations, checkpoints) as JSON lines here.
    #[arg(long)]
    log: Option<PathBuf>,
    #[command(flatten)]
    options: TrainOptions,
}

fn train(args: TrainArgs) -> Result<()> {
    let mut options = args.options;
    let full = options.method == Method::Full;
    if !full {
        options.base_model_name_or_path = Some(args.model.model.display().to_string());
    }
    if let (None, BackendArg::Cpu) = (options.threads, args.model.backend) {
        // the CPU backend's elementwise kernels are single-threaded: split micro-batches across the cores
        options.threads = Some(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    if full && options.memory_limit_mb.is_none() {
        options.memory_limit_mb = available_memory_mb();
    }
    options.check()?;
    // a full fine-tuning checkpoint is the model itself
    let model = match (&args.resume, full) {
        (Some(dir), true) => ModelArgs { model: dir.clone(), ..args.model },
        _ => args.model,
    };
    let mut llm = load(&model)?;
    let data = read_file(&args.data)?;
    let val = args.val.as_ref().map(|p| read_file(p).map(|b| (p.display().to_string(), b))).transpose()?;
    let start = match (&args.resume, &args.init_from) {
        (Some(dir), _) if full => TrainStart::ResumeModel(read_file(&dir.join(STATE_FILE))?),
        (Some(dir), _) => TrainStart::Resume(AdapterSource::from_dir(dir)?, read_file(&dir.join(STATE_FILE))?),
        (None, Some(dir)) => TrainStart::From(AdapterSource::from_dir(dir)?),
        (None, None) => TrainStart::New,
    };
    let mut log = match &args.log {
        Some(path) => Some(std::fs::File::create(path).map_err(|source| Error::io(path.display(), source))?),
        None => None,
    };
    let started = std::time::Instant::now();
    let clock = move || started.elapsed().as_secs_f64();
    let mut failed: Option<Error> = None;
    let mut on_event = |event: TrainEvent| {
        if let Some(file) = log.as_mut() {
            let _ = writeln!(file, "{}", event.to_json());
        }
        match show_event(event, &args.out) {
            Ok(()) => Control::Continue,
            Err(e) => {
                failed = Some(e);
                Control::Stop
            }
        }
    };
    let data_name = args.data.display().to_string();
    let val_ref = val.as_ref().map(|(n, b)| (n.as_str(), b.as_slice()));
    let job = fine_tune(&mut llm, &options, (&data_name, &data), val_ref, start, &clock, &mut on_event);
    let (report, files) = pollster::block_on(job)?;
    if let Some(e) = failed {
        return Err(e);
    }
    let mut out = files.into_named();
    out.push((SUMMARY_FILE.to_string(), report.to_json().into_bytes()));
    write_files(&args.out, out)?;
    let s = &report.summary;
    let loss = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.4}"));
    eprintln!(
        "wrote {}: {} steps, {} tokens, final loss {}, best val_loss {}, {:.1}s ({:?})",
        args.out.display(),
        s.steps,
        s.tokens,
        loss(s.final_loss),
        loss(s.best_val_loss),
        s.elapsed_s,
        s.end,
    );
    Ok(())
}

/// Shows a training event on stderr; a checkpoint is written to `out`/checkpoint-STEP/.
fn show_event(event: TrainEvent, out: &Path) -> Result<()> {
    match event {
        TrainEvent::Step(m) => {
            // DPO's rewards, as TRL logs them
            let rewards = m.rewards.map_or(String::new(), |r| {
                format!("  rewards: chosen {:.3} rejected {:.3} margin {:.3} accuracy {:.2}", r.chosen, r.rejected, r.margins, r.accuracies)
            });
            eprintln!(
                "step {}/{}  epoch {:.2}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.0} tokens/s  eta {:.0}s{rewards}",
                m.step, m.total_steps, m.epoch, m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.eta_s
            )
        }
        TrainEvent::Memory { parameters, parts } => {
            let total: usize = parts.iter().map(|p| p.bytes).sum();
            eprintln!("full fine-tuning of {parameters} parameters: about {:.1} MB ({})", total as f64 / 1e6, memory::list(&parts));
        }
        TrainEvent::Eval { step, val_loss, best } => {
            eprintln!("eval at step {step}: val_loss {val_loss:.4}{}", if best { " (best)" } else { "" })
        }
        TrainEvent::Checkpoint { step, files, state } => {
            let dir = out.join(format!("checkpoint-{step}"));
            let mut files = files.into_named();
            files.push((STATE_FILE.to_string(), state));
            write_files(&dir, files)?;
            eprintln!("checkpoint: {}", dir.display());
        }
    }
    Ok(())
}

/// MemAvailable of /proc/meminfo in MB (Linux; None elsewhere).
fn available_memory_mb() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0 / 1e6)
}

fn device(backend: BackendArg) -> Device {
    match backend {
        BackendArg::Cpu => Device::flex(),
        BackendArg::Wgpu => Device::wgpu(DeviceKind::DefaultDevice),
    }
}

fn load(args: &ModelArgs) -> Result<Llm> {
    let files = ModelFiles::from_path(&args.model)?;
    let interactive = std::io::stderr().is_terminal();
    Llm::load(files, args.dtype, &device(args.backend), &mut |stage, done, total| {
        if interactive {
            eprint!("\rloading {stage}: {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    })
}

/// The base model in f32 on the CPU backend (for merging and converting).
fn load_f32(model: &Path) -> Result<Llm> {
    load(&ModelArgs { model: model.to_path_buf(), backend: BackendArg::Cpu, dtype: WeightDtype::F32 })
}

fn parse_ids(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(|s| s.trim().parse::<u32>().map_err(|_| Error::invalid(format!("--ids: {s:?} is not a token id; give ids like 1,2,3"))))
        .collect()
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ConvertGguf { input, out_dir, dtype } => {
            let model = GgufModel::parse(&input.display().to_string(), read_file(&input)?)?;
            let dtype = if dtype == "auto" { None } else { Some(StoreDtype::parse(&dtype)?) };
            model.write_dir(&out_dir, dtype)?;
            let stored = dtype.unwrap_or_else(|| model.stored_dtype()).torch_name();
            eprintln!("wrote {} ({} tensors, {stored})", out_dir.display(), model.weights.names().count());
        }
        Command::Generate { model, adapter, prompt, chat, generation } => {
            let mut llm = load(&model)?;
            load_adapters(&mut llm, &adapter)?;
            let ids = llm.prompt_ids(&prompt, chat)?;
            let mut stdout = std::io::stdout();
            pollster::block_on(llm.generate_text(&ids, &generation, &mut |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
                true
            }))?;
            println!();
        }
        Command::Evaluate { model, adapter, other_model, data, max_new_tokens, batch_size, max_seq_len, json } => {
            let options = EvalOptions { max_new_tokens, batch_size, max_seq_len };
            evaluate_models(&model, &adapter, &other_model, &data, &options, json.as_deref())?;
        }
        Command::Logits { model, adapter, merge, ids, text, out } => {
            let mut llm = load(&model)?;
            load_adapters(&mut llm, &adapter)?;
            if merge {
                pollster::block_on(llm.model.merge_and_unload(&[], false))?;
            }
            let ids = match (ids, text) {
                (Some(ids), _) => parse_ids(&ids)?,
                (None, Some(text)) => llm.tokenizer()?.encode(&text, true)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let values = pollster::block_on(llm.model.logits(&ids))?;
            let logits = HostTensor::new(vec![ids.len(), llm.model.config.vocab_size], values);
            let bytes = write_safetensors(&BTreeMap::from([("logits".to_string(), logits)]), StoreDtype::F32, None)?;
            write_file(&out, bytes)?;
        }
        Command::Merge { files: AdapterOnBase { model, adapter, out }, safe, out_type } => {
            let gguf = is_gguf(&out.display().to_string());
            if out_type.is_some() && !gguf {
                return Err(Error::invalid("--out-type is the type of a GGUF's matrices: give --out FILE.gguf"));
            }
            // a GGUF keeps the base's storage (requantized); a Hugging Face directory is exact f32
            let dtype = if gguf { WeightDtype::Auto } else { WeightDtype::F32 };
            let mut llm = load(&ModelArgs { model, backend: BackendArg::Cpu, dtype })?;
            load_adapters(&mut llm, std::slice::from_ref(&adapter))?;
            pollster::block_on(llm.model.merge_and_unload(&[], safe))?;
            if gguf {
                write_file(&out, pollster::block_on(llm.merged_gguf(None, out_type.unwrap_or_default()))?)?;
            } else {
                write_files(&out, pollster::block_on(llm.merged_files(None))?)?;
            }
            eprintln!("wrote {} (merged {})", out.display(), adapter.display());
        }
        Command::AdapterToGguf(AdapterOnBase { model, adapter, out }) => {
            let mut llm = load(&ModelArgs { model, backend: BackendArg::Cpu, dtype: WeightDtype::Auto })?;
            load_adapters(&mut llm, std::slice::from_ref(&adapter))?;
            write_file(&out, pollster::block_on(llm.adapter_gguf("adapter0"))?)?;
            eprintln!("wrote {} (a llama.cpp LoRA adapter)", out.display());
        }
        Command::Train(args) => train(args)?,
        Command::ConvertToLora(AdapterOnBase { model, adapter, out }) => {
            let mut llm = load_f32(&model)?;
            load_adapters(&mut llm, std::slice::from_ref(&adapter))?;
            let files = pollster::block_on(llm.model.export_adapter_as_lora("adapter0"))?;
            write_files(&out, files.into_named())?;
            eprintln!("wrote {} (a plain LoRA of rank 2r for the original base)", out.display());
        }
        Command::AdapterInfo { adapter, model } => adapter_info(&adapter, model)?,
    }
    Ok(())
}

fn adapter_info(adapter: &Path, model: Option<PathBuf>) -> Result<()> {
    let config_path = adapter.join(ADAPTER_CONFIG_FILE);
    let config = LoraConfig::from_json(&read_file(&config_path)?, &config_path.display().to_string())?;
    println!("adapter: {}", adapter.display());
    println!("base model: {}", config.base_model_name_or_path.as_deref().unwrap_or("(not recorded)"));
    println!(
        "r: {}  lora_alpha: {}  lora_dropout: {}  use_rslora: {}  init: {:?}",
        config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights
    );
    let base = model.or_else(|| config.base_model_name_or_path.as_ref().map(PathBuf::from).filter(|p| p.is_dir()));
    let Some(base) = base else {
        println!("(give --model DIR to count parameters against a base model)");
        return Ok(());
    };
    let mut llm = load_f32(&base)?;
    load_adapters(&mut llm, &[adapter.to_path_buf()])?;
    let modules: Vec<&str> = llm.model.lora_linears().map(|l| l.name.as_str()).filter(|m| config.targets(m, true)).collect();
    println!("target modules: {} layers, e.g. {}", modules.len(), modules.first().unwrap_or(&"-"));
    println!("{}", llm.model.trainable_parameters_line());
    Ok(())
}

/// The `evaluate` command: the base, each adapter, the last one merged and each other model, as a
/// table on stdout.
fn evaluate_models(
    model: &ModelArgs,
    adapters: &[PathBuf],
    others: &[PathBuf],
    data: &Path,
    options: &EvalOptions,
    json: Option<&Path>,
) -> Result<()> {
    let mut llm = load(model)?;
    load_adapters(&mut llm, adapters)?;
    let bytes = read_file(data)?;
    let name = data.display().to_string();
    let mut rows: Vec<(String, Evaluation)> = Vec::new();
    let mut run = |label: String, llm: &Llm| -> Result<()> {
        eprintln!("evaluating {label} ...");
        rows.push((label, pollster::block_on(evaluate(llm, &name, &bytes, options))?));
        Ok(())
    };
    if !adapters.is_empty() {
        pollster::block_on(llm.model.disable_adapter())?;
    }
    run("base".into(), &llm)?;
    llm.model.enable_adapter();
    for (i, dir) in adapters.iter().enumerate() {
        llm.model.set_adapter(&format!("adapter{i}"))?;
        run(dir.display().to_string(), &llm)?;
    }
    if let Some(last) = adapters.last() {
        pollster::block_on(llm.model.merge_and_unload(&[], false))?;
        run(format!("{} (merged)", last.display()), &llm)?;
    }
    drop(llm);
    for dir in others {
        let other = load(&ModelArgs { model: dir.clone(), ..*model })?;
        run(dir.display().to_string(), &other)?;
    }
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(5).max(5);
    println!(
        "{:width$}  {:>8}  {:>7}  {:>9}  {:>10}  {:>11}  {:>7}",
        "model", "examples", "tokens", "mean_loss", "perplexity", "exact_match", "rouge_l"
    );
    for (label, e) in &rows {
        let (exact, rouge) =
            e.generation.as_ref().map_or(("-".into(), "-".into()), |g| (format!("{:.3}", g.exact_match), format!("{:.4}", g.rouge_l)));
        println!(
            "{label:width$}  {:>8}  {:>7}  {:>9.4}  {:>10.3}  {exact:>11}  {rouge:>7}",
            e.examples, e.tokens, e.mean_loss, e.perplexity
        );
    }
    if let Some(path) = json {
        let rows: Vec<_> = rows.iter().map(|(label, e)| serde_json::json!({"model": label, "evaluation": e})).collect();
        write_file(path, serde_json::to_string_pretty(&rows).expect("serializable").into_bytes())?;
    }
    Ok(())
}

/// Loads adapter directories in order as adapter0, adapter1, ...; the last one becomes active.
fn load_adapters(llm: &mut Llm, dirs: &[PathBuf]) -> Result<()> {
    for (i, dir) in dirs.iter().enumerate() {
        let name = format!("adapter{i}");
        pollster::block_on(llm.model.load_adapter(&name, AdapterSource::from_dir(dir)?))?;
        llm.model.set_adapter(&name)?;
    }
    Ok(())
}

/// glibc hands large freed blocks back to the OS at once, so every training step page-faults its
/// activations in again (~13% of a step here); keep freed memory for reuse instead. Not for
/// gradient checkpointing, which asks for memory over speed: a step's transients are small there,
/// and memory kept for reuse raised a quantized base's peak by ~10% without a faster step.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(&cli.command, Command::Train(args) if args.options.gradient_checkpointing) {
        keep_freed_memory();
    }
    webgpu_lora::error::show_warnings(|w| eprintln!("{w}"));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
