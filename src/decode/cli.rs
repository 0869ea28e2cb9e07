//! Bodies of `cage generate`, `cage sweep`, `cage bench decode` and `cage demo`; `main.rs` only parses.

use super::config::{DecodeMethod, FormatSetting, PrincipalKind, PrincipalSpec, RunConfig};
use super::engine::{DecodeOptions, Engine, Event, RowRequest, RowResult, Timings};
use super::plot::{pareto_png, pareto_svg};
use super::sweep::{MethodCurve, points_csv, simplex_grid, summarize, summary_csv};
use crate::error::{CageError, Result};
use crate::names::NameParser;
use crate::progress::Progress;
use crate::sampling::Choice;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options shared by the decoding commands: a config and what the command line overrides.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Run configuration (JSON; see examples/configs/).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Weights, comma-separated, one per principal (overrides the config).
    #[arg(long, value_delimiter = ',')]
    pub weights: Option<Vec<f64>>,
    /// Method (overrides the config).
    #[arg(long, value_parser = NameParser::<DecodeMethod>::new())]
    pub method: Option<DecodeMethod>,
    /// Token limit per prompt (overrides the config).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// tau (overrides the config).
    #[arg(long)]
    pub tau: Option<f64>,
}

impl RunArgs {
    /// The config with the overrides applied and checked.
    pub fn resolve(&self) -> Result<RunConfig> {
        let mut cfg = RunConfig::load(&self.config)?;
        if let Some(w) = &self.weights {
            cfg.weights = Some(w.clone());
        }
        if let Some(m) = self.method {
            cfg.method = m;
        }
        if let Some(n) = self.max_new_tokens {
            cfg.max_new_tokens = n;
        }
        if let Some(t) = self.tau {
            cfg.tau = t;
        }
        cfg.check()?;
        Ok(cfg)
    }
}

/// Prompts from a JSONL file: each line a JSON string or an object with a `prompt` field.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| CageError::Io { context: format!("reading prompts {}", path.display()), source })?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| CageError::InvalidArgument(format!("{} line {}: {e}", path.display(), i + 1)))?;
        let p = match &v {
            serde_json::Value::String(s) => s.clone(),
            _ => v.get("prompt").and_then(|p| p.as_str()).map(str::to_string).ok_or_else(|| {
                CageError::InvalidArgument(format!(
                    "{} line {}: expected a string or {{\"prompt\": ...}}",
                    path.display(),
                    i + 1
                ))
            })?,
        };
        out.push(p);
    }
    if out.is_empty() {
        return Err(CageError::InvalidArgument(format!("{} holds no prompts", path.display())));
    }
    Ok(out)
}

fn prompts_of(prompt: &Option<String>, prompts: &Option<PathBuf>) -> Result<Vec<String>> {
    match (prompt, prompts) {
        (Some(p), None) => Ok(vec![p.clone()]),
        (None, Some(f)) => read_prompts(f),
        _ => Err(CageError::InvalidArgument("give exactly one of --prompt and --prompts".into())),
    }
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> CageError {
    move |source| CageError::Io { context, source }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
}

/// One result as a JSON line with named scores.
pub fn result_json(r: &RowResult, names: &[String], method: DecodeMethod, extra: Option<&[f64]>) -> serde_json::Value {
    let mut scores: serde_json::Map<String, serde_json::Value> =
        names.iter().zip(&r.scores).map(|(n, s)| (n.clone(), serde_json::json!(s))).collect();
    if let Some(e) = extra {
        for (i, s) in e.iter().enumerate() {
            scores.insert(format!("external_{}", i + 1), serde_json::json!(s));
        }
    }
    serde_json::json!({
        "prompt": r.prompt, "method": method, "weights": r.weights, "text": r.text,
        "tokens": r.tokens.len(), "stop_reason": r.stop_reason, "scores": scores,
    })
}

/// Options of `cage generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Config and overrides.
    #[command(flatten)]
    pub run: RunArgs,
    /// One prompt (its text streams to the terminal).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A JSONL file of prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Write results as JSON lines here (default with --prompts: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write per-step diagnostics as JSON lines here.
    #[arg(long)]
    pub diagnostics: Option<PathBuf>,
    /// External scorer: a shell command reading the results as JSONL on stdin, writing one line of scores each.
    #[arg(long)]
    pub scorer: Option<String>,
}

/// `cage generate`.
pub fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    let cfg = a.run.resolve()?;
    let prompts = prompts_of(&a.prompt, &a.prompts)?;
    let engine = Engine::from_config(&cfg)?;
    let names = engine.principal_names();
    let mut opts = DecodeOptions::from_config(&cfg)?;
    opts.diagnostics = a.diagnostics.is_some();
    let rows: Vec<RowRequest> =
        prompts.iter().map(|p| RowRequest { prompt: p.clone(), weights: cfg.weights() }).collect();
    let mut diag = match &a.diagnostics {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(io_err(format!("creating {}", p.display())))?,
        )),
        None => None,
    };
    let single = rows.len() == 1;
    let mut progress = (!single).then(|| Progress::new("cage generate", rows.len()));
    let mut diag_err = None;
    let t0 = Instant::now();
    let (results, tm) = engine.decode(&rows, &opts, &mut |ev| match ev {
        Event::Text { text, .. } if single => {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
        Event::Step(d) => {
            if let Some(w) = diag.as_mut()
                && let Err(e) =
                    serde_json::to_writer(&mut *w, d).map_err(std::io::Error::other).and_then(|_| writeln!(w))
            {
                diag_err.get_or_insert(e);
            }
        }
        Event::RowDone { .. } => {
            if let Some(p) = progress.as_mut() {
                p.tick();
            }
        }
        _ => {}
    })?;
    if let Some(p) = &progress {
        p.finish();
    }
    if let Some(e) = diag_err {
        return Err(CageError::Io { context: "writing diagnostics".into(), source: e });
    }
    if let Some(mut w) = diag {
        w.flush().map_err(io_err("writing diagnostics".into()))?;
    }
    let extra = match &a.scorer {
        Some(cmd) => Some(external_scores(cmd, &results)?),
        None => None,
    };
    let lines: Vec<String> = results
        .iter()
        .enumerate()
        .map(|(i, r)| result_json(r, &names, cfg.method, extra.as_ref().map(|e| e[i].as_slice())).to_string())
        .collect();
    if single {
        println!();
        let sc: Vec<String> = names.iter().zip(&results[0].scores).map(|(n, s)| format!("{n} {s:.3}")).collect();
        eprintln!(
            "[{} weights {:?}; {} tokens, {}; {:.1} tok/s; implicit rewards: {}]",
            cfg.method,
            cfg.weights(),
            results[0].tokens.len(),
            results[0].stop_reason,
            tm.tokens as f64 / t0.elapsed().as_secs_f64(),
            sc.join(", ")
        );
    }
    match (&a.out, single) {
        (Some(p), _) => write_file(p, &(lines.join("\n") + "\n"))?,
        (None, false) => println!("{}", lines.join("\n")),
        (None, true) => {}
    }
    Ok(())
}

/// Runs an external scorer: the results go to its standard input as JSON lines `{"prompt", "text"}`; it
/// writes one line per result, a number, an array of numbers, or an object with a `scores` array.
pub fn external_scores(cmd: &str, results: &[RowResult]) -> Result<Vec<Vec<f64>>> {
    use std::process::{Command, Stdio};
    let input: String =
        results.iter().map(|r| serde_json::json!({"prompt": r.prompt, "text": r.text}).to_string() + "\n").collect();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("starting scorer {cmd:?}")))?;
    let mut stdin = child.stdin.take().ok_or_else(|| CageError::InvalidArgument("scorer has no stdin".into()))?;
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().map_err(io_err(format!("running scorer {cmd:?}")))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(CageError::InvalidArgument(format!("scorer {cmd:?} failed with {}", out.status)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != results.len() {
        return Err(CageError::InvalidArgument(format!(
            "scorer {cmd:?} wrote {} score lines for {} results",
            lines.len(),
            results.len()
        )));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| CageError::InvalidArgument(format!("scorer line {}: {e}", i + 1)))?;
            let arr = match &v {
                serde_json::Value::Number(_) => vec![v.clone()],
                serde_json::Value::Array(a) => a.clone(),
                _ => v.get("scores").and_then(|s| s.as_array()).cloned().unwrap_or_default(),
            };
            let xs: Vec<f64> = arr.iter().filter_map(|x| x.as_f64()).collect();
            if xs.is_empty() || xs.len() != arr.len() {
                return Err(CageError::InvalidArgument(format!("scorer line {}: expected numbers, got {l}", i + 1)));
            }
            Ok(xs)
        })
        .collect()
}

/// Options of `cage sweep`.
#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// Config and overrides (the weights are the grid's).
    #[command(flatten)]
    pub run: RunArgs,
    /// One prompt.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A JSONL file of prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Methods, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cage,genarm,linear",
        value_parser = NameParser::<DecodeMethod>::new()
    )]
    pub methods: Vec<DecodeMethod>,
    /// Grid resolution: weights are multiples of 1 / steps (default 10 for 2 principals, 4 for 3).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Output folder for sweep.csv, summary.csv, results.jsonl, pareto.svg and pareto.png.
    #[arg(long, default_value = "sweep-out")]
    pub out: PathBuf,
    /// External scorer command (see `cage generate --scorer`); its scores replace the implicit rewards.
    #[arg(long)]
    pub scorer: Option<String>,
}

/// `cage sweep`.
pub fn sweep_cmd(a: &SweepArgs) -> Result<()> {
    let cfg = a.run.resolve()?;
    let prompts = prompts_of(&a.prompt, &a.prompts)?;
    let j = cfg.principals.len();
    if !(2..=3).contains(&j) {
        return Err(CageError::InvalidArgument(format!("a sweep needs 2 or 3 principals, the config has {j}")));
    }
    let grid = simplex_grid(j, a.steps.unwrap_or(if j == 2 { 10 } else { 4 }))?;
    let engine = Engine::from_config(&cfg)?;
    let names = engine.principal_names();
    std::fs::create_dir_all(&a.out).map_err(io_err(format!("creating {}", a.out.display())))?;
    let rows: Vec<RowRequest> = grid
        .iter()
        .flat_map(|w| prompts.iter().map(move |p| RowRequest { prompt: p.clone(), weights: w.clone() }))
        .collect();
    let (mut curves, mut jsonl) = (vec![], String::new());
    for &m in &a.methods {
        let mut opts = DecodeOptions::from_config(&cfg)?;
        opts.method = m;
        let mut progress = Progress::new(&format!("cage sweep {m:>10}"), rows.len());
        let (res, _) = engine.decode(&rows, &opts, &mut |ev| {
            if let Event::RowDone { .. } = ev {
                progress.tick();
            }
        })?;
        progress.finish();
        let extra = match &a.scorer {
            Some(cmd) => Some(external_scores(cmd, &res)?),
            None => None,
        };
        for (i, r) in res.iter().enumerate() {
            jsonl += &(result_json(r, &engine.principal_names(), m, extra.as_ref().map(|e| e[i].as_slice()))
                .to_string()
                + "\n");
        }
        let per_row: Vec<Vec<f64>> = match &extra {
            Some(e) => e.clone(),
            None => res.iter().map(|r| r.scores.clone()).collect(),
        };
        let d = per_row[0].len();
        if per_row.iter().any(|s| s.len() != d) {
            return Err(CageError::InvalidArgument("the scorer wrote different numbers of scores per line".into()));
        }
        let np = prompts.len();
        let scores = (0..grid.len())
            .map(|g| {
                (0..d).map(|k| per_row[g * np..(g + 1) * np].iter().map(|s| s[k]).sum::<f64>() / np as f64).collect()
            })
            .collect();
        curves.push(MethodCurve { method: m.to_string(), weights: grid.clone(), scores });
    }
    let score_names: Vec<String> = match (a.scorer.is_some(), curves.first().and_then(|c| c.scores.first())) {
        (true, Some(e)) => (1..=e.len()).map(|i| format!("external_{i}")).collect(),
        _ => names.clone(),
    };
    let (sums, reference) = summarize(&curves)?;
    write_file(&a.out.join("sweep.csv"), &points_csv(&names, &score_names, &curves))?;
    write_file(&a.out.join("summary.csv"), &summary_csv(&sums))?;
    write_file(&a.out.join("results.jsonl"), &jsonl)?;
    let title = format!("{} prompt(s), tau {}, k {}", prompts.len(), cfg.tau, cfg.k);
    write_file(&a.out.join("pareto.svg"), &pareto_svg(&score_names, &curves, &title))?;
    let png = a.out.join("pareto.png");
    std::fs::write(&png, pareto_png(&score_names, &curves, &title)?)
        .map_err(io_err(format!("writing {}", png.display())))?;
    println!("reference point {reference:?}");
    println!("{:>12} {:>12} {:>8}", "method", "HV", "MIP");
    for s in &sums {
        println!("{:>12} {:>12.4} {:>8.4}", s.method, s.hv, s.mip);
    }
    eprintln!("wrote {}/{{sweep.csv, summary.csv, results.jsonl, pareto.svg, pareto.png}}", a.out.display());
    Ok(())
}

/// The demo's two prompted principals on one model.
pub fn demo_config(model: &Path, max_new_tokens: usize) -> RunConfig {
    let prompted = |name: &str, instruction: &str| PrincipalSpec {
        name: name.into(),
        kind: PrincipalKind::Prompted { model: None, instruction: instruction.into() },
    };
    RunConfig {
        base: model.to_path_buf(),
        tokenizer: None,
        principals: vec![
            prompted("concise", "Answer in one short sentence, with no extra detail."),
            prompted("enthusiastic", "Answer with lots of excitement and enthusiasm, using exclamation marks!"),
        ],
        weights: None,
        method: DecodeMethod::Cage,
        tau: 0.3,
        k: 50,
        normalize: Default::default(),
        sampling: Choice::Greedy,
        seed: 0,
        max_new_tokens,
        stop: vec![],
        prompt_format: FormatSetting::Auto,
        backend: crate::Backend::Auto,
        model_device: crate::Backend::Cpu,
        batch_size: 8,
    }
}

/// Options of `cage demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Models folder (default: $CAGE_MODELS or ./models); SmolLM2-135M-Instruct is fetched there if missing.
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// The prompt.
    #[arg(long, default_value = "Tell me about the Moon.")]
    pub prompt: String,
    /// Token limit per answer.
    #[arg(long, default_value_t = 60)]
    pub max_new_tokens: usize,
    /// Method for the weighted rows.
    #[arg(long, default_value_t = DecodeMethod::Cage, value_parser = NameParser::<DecodeMethod>::new())]
    pub method: DecodeMethod,
    /// The agent's temperature tau.
    #[arg(long, default_value_t = 0.3)]
    pub tau: f64,
}

/// `cage demo`: one prompt decoded by the base and under three weightings of two prompted principals.
pub fn demo_cmd(a: &DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let dir = a.models.clone().unwrap_or_else(crate::model::fetch::models_dir);
    let model = crate::model::fetch::fetch_default_model(&dir, &mut |l| eprintln!("cage fetch-model: {l}"))?;
    let mut cfg = demo_config(&model, a.max_new_tokens);
    cfg.method = a.method;
    cfg.tau = a.tau;
    cfg.check()?;
    let engine = Engine::from_config(&cfg)?;
    let names = engine.principal_names();
    let weights = [vec![0.0, 0.0], vec![1.0, 0.0], vec![0.5, 0.5], vec![0.0, 1.0]];
    let rows: Vec<RowRequest> =
        weights.iter().map(|w| RowRequest { prompt: a.prompt.clone(), weights: w.clone() }).collect();
    let opts = DecodeOptions::from_config(&cfg)?;
    println!("prompt: {}", a.prompt);
    println!("principals (prompted, on the same model):");
    for p in &cfg.principals {
        if let PrincipalKind::Prompted { instruction, .. } = &p.kind {
            println!("  {:<13} {instruction:?}", p.name);
        }
    }
    println!(
        "method {}, tau {}, top-{} candidates, greedy, {} tokens at most\n",
        cfg.method, cfg.tau, cfg.k, cfg.max_new_tokens
    );
    let mut progress = Progress::new("decoding 4 rows together", rows.len());
    let (res, tm) = engine.decode(&rows, &opts, &mut |ev| {
        if let Event::RowDone { .. } = ev {
            progress.tick();
        }
    })?;
    progress.finish();
    for r in &res {
        let label = if r.weights.iter().all(|w| *w == 0.0) {
            "base (all weights 0)".to_string()
        } else {
            format!("{} {:.1} / {} {:.1}", names[0], r.weights[0], names[1], r.weights[1])
        };
        let sc: Vec<String> = names.iter().zip(&r.scores).map(|(n, s)| format!("{n} {s:+.1}")).collect();
        println!("== {label}  [{} tokens; implicit rewards: {}]", r.tokens.len(), sc.join(", "));
        println!("{}\n", r.text.trim());
    }
    print_timings(&tm, t0.elapsed().as_secs_f64());
    Ok(())
}

fn print_timings(tm: &Timings, wall: f64) {
    let busy = tm.forward_s + tm.values_s + tm.policy_s + tm.sampling_s;
    eprintln!(
        "{} tokens in {:.1} s of decoding ({:.1} s in all): forwards {:.0}%, values {:.1}%, equilibrium {:.2}%, sampling {:.1}%",
        tm.tokens,
        busy,
        wall,
        100.0 * tm.forward_s / busy.max(1e-12),
        100.0 * tm.values_s / busy.max(1e-12),
        100.0 * tm.policy_s / busy.max(1e-12),
        100.0 * tm.sampling_s / busy.max(1e-12)
    );
}

/// Options of `cage bench decode`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchDecodeArgs {
    /// Config (default: the demo's two prompted principals on the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Methods, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "base,linear,genarm,mod,cage,cage-paper",
        value_parser = NameParser::<DecodeMethod>::new()
    )]
    pub methods: Vec<DecodeMethod>,
    /// Prompts decoded together (copies of the prompt).
    #[arg(long, default_value_t = 4)]
    pub rows: usize,
    /// Tokens per row (EOS is not a stop: every row decodes this many).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// The prompt.
    #[arg(long, default_value = "Tell me about the Moon.")]
    pub prompt: String,
    /// Runs per method, interleaved across methods; the fastest is kept (other load on the cores only slows).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `cage bench decode`: tokens per second of each method with the same forwards, and where a step's time goes.
pub fn bench_decode_cmd(a: &BenchDecodeArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => RunConfig::load(p)?,
        None => {
            let dir = crate::model::fetch::models_dir();
            demo_config(
                &crate::model::fetch::fetch_default_model(&dir, &mut |l| eprintln!("cage fetch-model: {l}"))?,
                a.tokens,
            )
        }
    };
    cfg.max_new_tokens = a.tokens;
    if a.rows == 0 || a.tokens == 0 {
        return Err(CageError::InvalidArgument("--rows and --tokens must be >= 1".into()));
    }
    cfg.batch_size = a.rows;
    let methods = &a.methods;
    let engine = Engine::from_config(&cfg)?;
    // Rows never stop early, so every method decodes the same number of steps.
    let mut opts = DecodeOptions::from_config(&cfg)?;
    opts.stop.clear();
    opts.ignore_eos = true;
    let rows: Vec<RowRequest> =
        (0..a.rows).map(|_| RowRequest { prompt: a.prompt.clone(), weights: cfg.weights() }).collect();
    let mut table: Vec<(DecodeMethod, Option<Timings>)> = methods.iter().map(|&m| (m, None)).collect();
    let mut progress = Progress::new("cage bench decode", methods.len() * a.repeats.max(1));
    for _ in 0..a.repeats.max(1) {
        for (m, best) in table.iter_mut() {
            opts.method = *m;
            let (_, tm) = engine.decode(&rows, &opts, &mut |_| {})?;
            progress.tick();
            let total = |t: &Timings| t.forward_s + t.values_s + t.policy_s + t.sampling_s;
            if best.as_ref().is_none_or(|b| total(&tm) < total(b)) {
                *best = Some(tm);
            }
        }
    }
    let table: Vec<(DecodeMethod, Timings)> = table.into_iter().map(|(m, t)| (m, t.unwrap_or_default())).collect();
    progress.finish();
    let threads = rayon::current_num_threads();
    if a.json {
        let v: Vec<serde_json::Value> = table
            .iter()
            .map(|(m, t)| {
                let busy = t.forward_s + t.values_s + t.policy_s + t.sampling_s;
                serde_json::json!({"method": m, "tokens": t.tokens, "tok_s": t.tokens as f64 / busy,
                    "step_ms": 1e3 * busy / t.steps.max(1) as f64, "timings": t})
            })
            .collect();
        println!("{}", serde_json::json!({"rows": a.rows, "tokens": a.tokens, "threads": threads, "methods": v}));
        return Ok(());
    }
    println!(
        "{} rows x {} tokens, {} principals, k {}, CPU {threads} threads; per decode step (all rows), prefill excluded:",
        a.rows,
        a.tokens,
        engine.principal_names().len(),
        cfg.k
    );
    println!(
        "{:>11} {:>9} {:>9} {:>11} {:>9} {:>12} {:>10} {:>9}",
        "method", "tok/s", "step ms", "forward ms", "values ms", "policy ms", "policy %", "sample ms"
    );
    for (m, t) in &table {
        let busy = t.forward_s + t.values_s + t.policy_s + t.sampling_s;
        let steps = t.steps.max(1) as f64;
        let dec = busy - t.prefill_s;
        let ds = (t.steps.max(2) - 1) as f64;
        println!(
            "{:>11} {:>9.1} {:>9.2} {:>11.2} {:>9.3} {:>12.4} {:>10.3} {:>9.3}",
            m,
            t.tokens as f64 / busy,
            1e3 * dec / ds,
            1e3 * (t.forward_s - t.prefill_s) / ds,
            1e3 * t.values_s / steps,
            1e3 * t.policy_s / steps,
            100.0 * t.policy_s / busy,
            1e3 * t.sampling_s / steps
        );
    }
    Ok(())
}
