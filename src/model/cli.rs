//! Bodies of the model subcommands of the `cage` binary (`import-gguf`, `fetch-model`, `logits`, `score`), kept here
//! so that `main.rs` only parses arguments.

use super::devquant::GpuWeights;
use super::fetch::{fetch_default_model, models_dir};
use super::forward::{LogitsAt, Seq};
use super::llama::Model;
use super::lora::Adapter;
use super::score::RewardModel;
use super::synthetic::{SyntheticFormat, SyntheticShape, SyntheticSpec};
use super::tokenizer::{PromptFormat, Tokenizer};
use super::weight::WeightStorage;
use crate::backend::Backend;
use crate::error::{CageError, Result};
use crate::gpu::KvCacheType;
use crate::names::NameParser;
use crate::progress::Progress;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `cage import-gguf FILE --out DIR`.
pub fn import_cmd(file: &Path, out: &Path, keep_quantized: bool) -> Result<()> {
    let mut bar = Progress::new("cage import-gguf: tensors", 0);
    let s = super::import::import_gguf_as(file, out, keep_quantized, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    eprintln!(
        "imported {} tensors ({} parameters, vocabulary {}, chat template: {}) into {}",
        s.tensors,
        s.parameters,
        s.vocab,
        if s.chat_template { "yes" } else { "no" },
        out.display()
    );
    Ok(())
}

/// `cage fetch-model [--models DIR]`: prints the model folder on stdout.
pub fn fetch_cmd(models: Option<PathBuf>) -> Result<()> {
    let dir = models.unwrap_or_else(models_dir);
    let out = fetch_default_model(&dir, &mut |line| eprintln!("cage fetch-model: {line}"))?;
    crate::outln!("{}", out.display())?;
    Ok(())
}

/// Loads a model and merges adapters (in the order given).
pub fn load_model(dir: &Path, merge: &[PathBuf]) -> Result<Model> {
    let mut m = Model::load(dir)?;
    for a in merge {
        let ad = Adapter::load(a, &m)?;
        m.merge_adapter(&ad)?;
    }
    Ok(m)
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    let k = k.min(order.len());
    if k == 0 {
        return vec![];
    }
    let cmp = |i: &usize, j: &usize| row[*j].total_cmp(&row[*i]).then(i.cmp(j));
    order.select_nth_unstable_by(k - 1, cmp);
    order.truncate(k);
    order.sort_by(cmp);
    order
}

/// What `cage logits` reads: a prompt for the tokenizer, or token ids.
pub enum LogitsInput {
    /// Text, rendered in the chosen format and tokenized.
    Prompt(String),
    /// Sequences of token ids as given (checked against the vocabulary), each scored on its own.
    Ids(Vec<Vec<u32>>),
}

/// Options of `cage logits`.
pub struct LogitsArgs {
    /// Model folder.
    pub model: PathBuf,
    /// The input.
    pub input: LogitsInput,
    /// Where the forward pass runs.
    pub device: Backend,
    /// Render the prompt with the chat template.
    pub chat: bool,
    /// Alpaca format instead of plain.
    pub alpaca: bool,
    /// Number of top tokens.
    pub top: usize,
    /// Adapters to merge.
    pub adapters: Vec<PathBuf>,
    /// JSON output.
    pub json: bool,
}

/// `cage logits`: the next-token distribution at the last prompt position.
pub fn logits_cmd(a: &LogitsArgs) -> Result<()> {
    if a.top == 0 {
        return Err(CageError::InvalidArgument("--top must be at least 1".into()));
    }
    // Token ids need no tokenizer; one that is present still names the top tokens.
    let tok = match &a.input {
        LogitsInput::Prompt(_) => Some(Tokenizer::load(&a.model)?),
        LogitsInput::Ids(_) => Tokenizer::load(&a.model).ok(),
    };
    let format = match (a.chat, a.alpaca) {
        (true, true) => return Err(CageError::InvalidArgument("--chat and --alpaca exclude each other".into())),
        (true, false) => PromptFormat::Chat,
        (false, true) => PromptFormat::Alpaca,
        _ => PromptFormat::Plain,
    };
    let seqs: Vec<Vec<u32>> = match &a.input {
        LogitsInput::Prompt(p) => vec![tok.as_ref().map_or(Ok(vec![]), |t| t.prompt_ids(p, format))?],
        LogitsInput::Ids(ids) => ids.clone(),
    };
    if seqs.iter().any(Vec::is_empty) {
        return Err(CageError::InvalidArgument("the input holds no tokens".into()));
    }
    let model = Arc::new(load_model(&a.model, &a.adapters)?);
    let vocab = model.config.vocab_size;
    if let Some(bad) = seqs.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(CageError::InvalidArgument(format!(
            "--ids: token {bad} is outside the vocabulary of model {} ({vocab} tokens)",
            a.model.display()
        )));
    }
    if a.device != Backend::Cpu && !a.adapters.is_empty() {
        // The GPU decoder takes adapters unmerged; merging them into f32 weights and then rounding to bf16 is
        // another model than the one a user would compare with.
        return Err(CageError::InvalidArgument("--adapter is supported with --device cpu only".into()));
    }
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(1);
    let mut dec = super::gpu::new_decoder(a.device, model, 1, longest, longest)?;
    for ids in &seqs {
        dec.reset(0);
        let logits = dec.forward(&[Seq { slot: 0, tokens: ids, adapter: None }], LogitsAt::Last)?;
        let lse = crate::softmax::logsumexp(logits);
        let top: Vec<_> = top_k(logits, a.top)
            .into_iter()
            .map(|i| {
                let text = tok.as_ref().and_then(|t| t.decode(&[i as u32], false).ok()).unwrap_or_default();
                json!({"id": i, "token": text, "logit": logits[i]})
            })
            .collect();
        if a.json {
            crate::outln!("{}", json!({"input_ids": ids, "device": a.device, "top": top, "logsumexp": lse}))?;
            continue;
        }
        crate::outln!("{} input tokens; logsumexp {lse:.4}", ids.len())?;
        for t in &top {
            let l = t["logit"].as_f64().unwrap_or(0.0);
            crate::outln!(
                "{:>8} {:>10.4} {:>8.4} {:?}",
                t["id"],
                l,
                (l - lse).exp(),
                t["token"].as_str().unwrap_or("")
            )?;
        }
    }
    Ok(())
}

/// Options of `cage score`.
#[derive(clap::Args, Debug, Clone)]
pub struct ScoreArgs {
    /// Reward model folder (config.json, safetensors weights with a score head, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// One text, scored as given (tokenized with the tokenizer's special tokens, as `tokenizer(text)` does).
    #[arg(long)]
    pub text: Option<String>,
    /// A JSONL file of texts (`{"text": ...}` per line); one JSON line of scores per text on standard output.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Texts scored together in one forward call (with --input).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// JSON output for --text.
    #[arg(long)]
    pub json: bool,
    /// Where the forward passes run: `cpu`, `cuda` (bf16 weights), `emulation` (the GPU code on the host
    /// emulation: tiny models and tests) or `auto` (the GPU when usable).
    #[arg(long, default_value_t = crate::Backend::Cpu, value_parser = crate::names::NameParser::<crate::Backend>::new())]
    pub device: crate::Backend,
}

/// Texts of a JSONL file of `{"text": ...}` objects.
fn read_texts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CageError::Io { context: format!("reading {}", path.display()), source })?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| CageError::InvalidArgument(format!("{} line {}: {e}", path.display(), i + 1)))?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            CageError::InvalidArgument(format!("{} line {}: expected {{\"text\": \"...\"}}", path.display(), i + 1))
        })?;
        out.push(t.to_string());
    }
    Ok(out)
}

/// `cage score`: the reward model's scores of raw texts.
pub fn score_cmd(a: &ScoreArgs) -> Result<()> {
    let texts = match (&a.text, &a.input) {
        (Some(t), None) => vec![t.clone()],
        (None, Some(f)) => read_texts(f)?,
        _ => return Err(CageError::InvalidArgument("give exactly one of --text and --input".into())),
    };
    if a.batch_size == 0 {
        return Err(CageError::InvalidArgument("--batch-size must be at least 1".into()));
    }
    let mut rm = RewardModel::load(&a.model)?.on(a.device);
    let tok = Tokenizer::load(&a.model)?;
    let ids = texts
        .iter()
        .enumerate()
        .map(|(i, t)| match tok.encode(t, true)? {
            v if v.is_empty() => Err(CageError::InvalidArgument(format!("text {} encodes to no tokens", i + 1))),
            v => Ok(v),
        })
        .collect::<Result<Vec<_>>>()?;
    for chunk in ids.chunks(a.batch_size) {
        let seqs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        for (i, s) in chunk.iter().zip(rm.scores(&seqs)?) {
            if a.json || a.input.is_some() {
                crate::outln!("{}", json!({"input_ids": i, "scores": s}))?;
            } else {
                let s: Vec<String> = s.iter().map(|x| format!("{x:.6}")).collect();
                crate::outln!("{} input tokens; scores: {}", i.len(), s.join(", "))?;
            }
        }
    }
    Ok(())
}

/// Which weights `cage bench forward` decodes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardWeights {
    /// The lossless Q4_1 / Q8_0 copies the loader builds where every block round-trips.
    Packed,
    /// The f32 matrices.
    F32,
    /// Both, one after the other.
    Both,
}

crate::spelled!(ForwardWeights, "weights");

/// Options of `cage bench forward`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchForwardArgs {
    /// Model folder (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Instead of --model: a model of this shape with random weights, generated in memory (`tiny`,
    /// `llama-1b`, `llama-7b`, `llama-13b`, `llama-65b`, `llama-3.1-8b`; no tokenizer, no file).
    #[arg(long, value_parser = NameParser::<SyntheticShape>::new())]
    pub synthetic: Option<SyntheticShape>,
    /// How the synthetic model holds its matrices: `q4_k`, `q8_0` or `bf16`.
    #[arg(long, default_value_t = SyntheticFormat::Q4K, value_parser = NameParser::<SyntheticFormat>::new())]
    pub synthetic_format: SyntheticFormat,
    /// LoRA ARMs attached to the synthetic model, decoded in the same batch as the backbone's rows.
    #[arg(long, default_value_t = 0, requires = "synthetic")]
    pub synthetic_arms: usize,
    /// Seed of the synthetic model's weights.
    #[arg(long, default_value_t = super::synthetic::SEED)]
    pub synthetic_seed: u64,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,4,8,32", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Which weights decode reads: `packed` (the lossless Q4_1 / Q8_0 copies), `f32`, or `both`.
    #[arg(long, default_value_t = ForwardWeights::Both, value_parser = NameParser::<ForwardWeights>::new())]
    pub weights: ForwardWeights,
    /// How the model's matrices are held once loaded: `stored` (as the files hold them: measured, then
    /// the same model as f32) or `f32` (expanded at load: the f32 and packed rows only).
    #[arg(long, default_value_t = WeightStorage::Stored, value_parser = NameParser::<WeightStorage>::new())]
    pub cpu_weights: WeightStorage,
    /// Where to measure: `cpu`, `cuda`, `emulation`, or `auto` (the default: the CPU, and the GPU when one
    /// is usable). A big model on a GPU machine is measured with `cuda` alone.
    #[arg(long, default_value_t = Backend::Auto, value_parser = NameParser::<Backend>::new())]
    pub device: Backend,
    /// The GPU decoder's KV cache: `f32` (exact keys and values) or `bf16` (half the bytes).
    #[arg(long, default_value_t = KvCacheType::F32, value_parser = NameParser::<KvCacheType>::new())]
    pub kv_cache: KvCacheType,
    /// How the GPU decoder holds the linear layers: `bf16` (the default), `int8` or `int4` (weight-only,
    /// quantized at upload), or `stored` (GGUF blocks and GPTQ / AWQ codes as loaded, other formats bf16); GPU
    /// devices only.
    #[arg(long, default_value_t = GpuWeights::Bf16, value_parser = NameParser::<GpuWeights>::new())]
    pub gpu_weights: GpuWeights,
    /// Prompt tokens per row.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Decode steps per repeat.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Repeats (the best counts; the first warms caches).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
}

impl BenchForwardArgs {
    /// The synthetic model `--synthetic` asks for, if any.
    pub fn synthetic_spec(&self) -> Option<SyntheticSpec> {
        self.synthetic.map(|shape| SyntheticSpec {
            shape,
            format: self.synthetic_format,
            arms: self.synthetic_arms,
            seed: self.synthetic_seed,
        })
    }
}

fn print_rows(rows: &[super::bench::ForwardBench]) -> Result<()> {
    crate::outln!("{:>6} {:>14} {:>14} {:>16}", "batch", "prefill tok/s", "decode tok/s", "decode ms/step")?;
    for r in rows {
        crate::outln!("{:>6} {:>14.1} {:>14.1} {:>16.2}", r.batch, r.prefill_tok_s, r.decode_tok_s, r.decode_step_ms)?;
    }
    Ok(())
}

/// `cage bench forward`: prints a table (or JSON) of prefill / decode tokens per second.
pub fn bench_forward_cmd(a: &BenchForwardArgs) -> Result<()> {
    let (batches, prompt_len, steps, repeats) = (&a.batches[..], a.prompt_len, a.steps, a.repeats);
    let opts = super::gpu::GpuOptions { kv_cache: a.kv_cache, weights: a.gpu_weights };
    use super::bench::bench_forward_on;
    let (dir, mut m, synthetic) = match (&a.synthetic_spec(), &a.model) {
        (Some(_), Some(_)) => {
            return Err(CageError::InvalidArgument("--model and --synthetic exclude each other".into()));
        }
        (Some(spec), None) => {
            let (m, info) = synthetic_model(spec, a)?;
            (PathBuf::from(spec.name()), m, Some(info))
        }
        (None, d) => {
            let dir = match d {
                Some(d) => d.clone(),
                None => fetch_default_model(&models_dir(), &mut |line| eprintln!("cage fetch-model: {line}"))?,
            };
            let m = Model::load_as(&dir, a.cpu_weights)?;
            (dir, m, None)
        }
    };
    let threads = rayon::current_num_threads();
    let packed = m.embed_packed.is_some() || m.layers.iter().any(|l| l.q.packed.is_some());
    let on_cpu = matches!(a.device, Backend::Auto | Backend::Cpu);
    if on_cpu && a.weights == ForwardWeights::Packed && !packed {
        // The packed copies are built only for f32 imports; a model kept as stored holds its own format.
        let held = m.layers.first().map_or_else(|| "f32".to_string(), |l| l.q.w.label());
        return Err(CageError::InvalidArgument(format!(
            "--weights packed: model {} has no packed (Q4_1 / Q8_0) copies, its matrices are held as {held}; use \
             --weights f32 (which measures them as held, then as f32)",
            dir.display()
        )));
    }
    let mut variants = vec![];
    if on_cpu && packed && a.weights != ForwardWeights::F32 {
        variants.push((
            "packed".to_string(),
            super::bench::bench_forward(Arc::new(m.clone()), batches, prompt_len, steps, repeats)?,
        ));
    }
    m.unpack_weights();
    // Shared, not cloned, by the rows below: a copy of a 7B model's weights would double the RSS measured.
    let mut m = Arc::new(m);
    // Matrices kept in their stored format (bf16, f16, GGUF blocks) are measured as loaded, then as f32.
    let stored =
        m.layers.first().map(|l| &l.q.w).filter(|w| w.format() != Some(super::gguf::GgmlType::F32)).map(|w| w.label());
    if let Some(f) = stored.as_ref().filter(|_| on_cpu && a.weights != ForwardWeights::Packed) {
        let rows = super::bench::bench_forward(m.clone(), batches, prompt_len, steps, repeats)?;
        variants.push((f.clone(), rows));
    }
    // The f32 row needs the f32 copy beside the loaded model (a 7B bf16 model: 27 GB more, 4 bytes a parameter:
    // to_f32_weights converts from the loaded matrices without cloning them): measured only when that fits the
    // host's memory, otherwise said and left out.
    let mut f32_row = on_cpu && (a.weights != ForwardWeights::Packed || !packed);
    if stored.is_some() && f32_row {
        let need = super::memory::parameters(&m.config) * 4;
        let (model, what) = (dir.display().to_string(), "its f32 copy beside the loaded one");
        match super::memory::check_fits(&model, what, need, "host memory", super::memory::host_available()) {
            Ok(()) => m = Arc::new(m.to_f32_weights()),
            Err(e) => {
                eprintln!("cage bench forward: no f32 row: {e}");
                f32_row = false;
            }
        }
    }
    if f32_row {
        variants
            .push(("f32".to_string(), super::bench::bench_forward(m.clone(), batches, prompt_len, steps, repeats)?));
    }
    // The GPU decoder: with `auto` when a GPU is usable (no GPU is a line in the report, not a failure; a GPU
    // that is present but fails is an error); with `cuda` or `emulation` always, at the batch sizes given.
    let gpu = match a.device {
        Backend::Cpu => None,
        Backend::Auto => {
            Some(match bench_forward_on(Backend::Cuda, m, GPU_BATCHES, prompt_len, steps, repeats, opts) {
                Ok(rows) => Ok((Backend::Cuda, rows)),
                Err(CageError::NoGpu(why)) => Err(why),
                Err(e) => return Err(e),
            })
        }
        d => Some(Ok((d, bench_forward_on(d, m, batches, prompt_len, steps, repeats, opts)?))),
    };
    let device_name = |d: Backend| if d == Backend::Cuda { gpu_name() } else { "host emulation".to_string() };
    if a.json {
        let v: serde_json::Map<String, serde_json::Value> =
            variants.iter().map(|(k, r)| (k.to_string(), serde_json::to_value(r).unwrap_or_default())).collect();
        let g = match &gpu {
            None => json!({"skipped": "not asked (--device cpu)"}),
            Some(Ok((d, rows))) => json!({"device": device_name(*d), "gpu_weights": a.gpu_weights, "results": rows}),
            Some(Err(why)) => json!({"skipped": format!("no GPU: {why}")}),
        };
        crate::outln!(
            "{}",
            json!({"model": dir.display().to_string(), "synthetic": synthetic, "threads": threads, "prompt_len": prompt_len, "decode_steps": steps, "weights": v, "gpu": g})
        )?;
        return Ok(());
    }
    crate::outln!("model {}, prompt {prompt_len} tokens per row, {steps} decode steps", dir.display())?;
    if let Some(s) = &synthetic {
        crate::outln!(
            "{} parameters, {:.2} GB of weights in host memory, generated in {:.1} s",
            s["parameters"],
            s["weight_bytes"].as_f64().unwrap_or(0.0) / 1e9,
            s["generate_s"].as_f64().unwrap_or(0.0)
        )?;
    }
    for (name, rows) in &variants {
        crate::outln!("CPU decoder ({threads} threads, f32 compute), weights read by decode: {name}")?;
        print_rows(rows)?;
    }
    match &gpu {
        None => {}
        Some(Ok((d, rows))) => {
            crate::outln!(
                "GPU decoder on {} ({} weights, cuBLAS, {} KV cache; logits copied back)",
                device_name(*d),
                a.gpu_weights,
                a.kv_cache
            )?;
            print_rows(rows)?;
            if let Some(r) = rows.first() {
                let mem = r.device_bytes.map_or("unknown".to_string(), |b| format!("{:.2} GB", b as f64 / 1e9));
                crate::outln!("decoder built in {:.1} s; device memory it took: {mem}", r.load_s)?;
            }
        }
        Some(Err(why)) => crate::outln!("GPU decoder: not measured, no GPU ({why})")?,
    }
    Ok(())
}

/// Generates the synthetic model of `bench forward --synthetic` after checking, before any large allocation,
/// that it fits the host's memory and (on a GPU device) that its weights and KV cache fit the device's free
/// memory as `a.gpu_weights` holds them. Returns the model and its description for the report.
fn synthetic_model(spec: &SyntheticSpec, a: &BenchForwardArgs) -> Result<(Model, serde_json::Value)> {
    // Before generating: a synthetic model holds its stored format, never the packed copies.
    if matches!(a.device, Backend::Auto | Backend::Cpu) && a.weights == ForwardWeights::Packed {
        return Err(CageError::InvalidArgument(format!(
            "--weights packed: {} holds {} matrices, no packed (Q4_1 / Q8_0) copies; use --weights f32 (its \
             stored format, then f32 where that fits)",
            spec.name(),
            spec.format
        )));
    }
    spec.check_host()?;
    if matches!(a.device, Backend::Cuda | Backend::Emulation) {
        let slots = a.batches.iter().copied().max().unwrap_or(1);
        super::synthetic::check_device(spec, a.device, a.gpu_weights, a.kv_cache, slots, a.prompt_len + a.steps)?;
    }
    let t0 = std::time::Instant::now();
    let m = spec.generate()?;
    let generate_s = t0.elapsed().as_secs_f64();
    let info = json!({
        "shape": spec.shape, "format": spec.format, "arms": spec.arms, "seed": spec.seed,
        "dims": spec.shape.dims(), "parameters": super::memory::parameters(&m.config) as u64,
        "weight_bytes": m.weight_bytes() as u64, "arm_parameters": m.lora_parameters() as u64,
        "generate_s": generate_s,
    });
    Ok((m, info))
}

/// Batch sizes of the GPU forward benchmark.
const GPU_BATCHES: &[usize] = &[1, 8, 32];

fn gpu_name() -> String {
    crate::gpu::Gpu::cuda(0).map(|g| g.describe()).unwrap_or_else(|e| e.to_string())
}
