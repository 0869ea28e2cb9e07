//! Bodies of `cage generate`, `cage sweep`, `cage bench decode` and `cage demo`; `main.rs` only parses.

use super::config::{DecodeMethod, FormatSetting, PrincipalKind, PrincipalSpec, RunConfig, check_weights};
use super::engine::{DecodeOptions, Engine, Event, RowRequest, RowResult, Timings};
use super::plot::{pareto_png, pareto_svg};
use super::report::{MANIFEST, RunManifest};
use super::scorers::{Scorers, with_scores};
use super::sweep::{
    MethodCurve, Summary, WeightsList, parse_weights_list, points_csv, simplex_grid, summarize, summary_csv,
};
use crate::error::{CageError, Result};
use crate::model::weight::WeightStorage;
use crate::names::NameParser;
use crate::progress::Progress;
use crate::sampling::Choice;
use std::io::Write;
use std::ops::Range;
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
    /// Candidates per step, the base's top-k; 0 = the whole vocabulary (overrides the config).
    #[arg(long)]
    pub k: Option<usize>,
    /// How the models' matrices are held in memory: `stored` (as the files hold them) or `f32` (overrides the
    /// config's `cpu_weights`).
    #[arg(long, value_parser = NameParser::<WeightStorage>::new())]
    pub cpu_weights: Option<WeightStorage>,
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
        if let Some(k) = self.k {
            cfg.k = k;
        }
        if let Some(s) = self.cpu_weights {
            cfg.cpu_weights = s;
        }
        cfg.check()?;
        Ok(cfg)
    }
}

pub use super::prompts::read_prompts;

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

/// Where result lines go: a file or standard output.
enum Dest {
    File(PathBuf, std::io::BufWriter<std::fs::File>),
    Stdout,
}

/// Writes result lines as rows finish, in row order (a row waits only for the rows before it in its batch), so
/// that a late failure (a crash, a failing scorer, a full disk) keeps every row decoded before it.
struct RowWriter {
    dest: Dest,
    pending: std::collections::BTreeMap<usize, String>,
    next: usize,
    /// Lines written so far, for a rewrite with the scorer's scores.
    written: usize,
}

impl RowWriter {
    /// Creates (truncates) `path`, so that an unwritable output fails before any decoding.
    fn create(path: &Path) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(Self::new(Dest::File(path.to_path_buf(), std::io::BufWriter::new(f))))
    }

    fn new(dest: Dest) -> Self {
        RowWriter { dest, pending: Default::default(), next: 0, written: 0 }
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        match &mut self.dest {
            Dest::Stdout => crate::outln!("{line}"),
            Dest::File(p, w) => {
                writeln!(w, "{line}").and_then(|_| w.flush()).map_err(io_err(format!("writing {}", p.display())))
            }
        }?;
        self.written += 1;
        Ok(())
    }

    /// Row `row` finished with JSON line `line`: writes it and every waiting row after it.
    fn row_done(&mut self, row: usize, line: String) -> Result<()> {
        self.pending.insert(row, line);
        while let Some(l) = self.pending.remove(&self.next) {
            self.write_line(&l)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Replaces everything written so far by `lines` (the rows with the scorer's scores): a new file renamed
    /// over the old one, so that a failure here still leaves the unscored rows. Standard output is not
    /// rewritten (the caller holds its lines back instead).
    fn rewrite(&mut self, lines: &[String]) -> Result<()> {
        let Dest::File(p, w) = &mut self.dest else { return Ok(()) };
        w.flush().map_err(io_err(format!("writing {}", p.display())))?;
        let mut tmp = p.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_file(&tmp, &lines.iter().map(|l| format!("{l}\n")).collect::<String>())?;
        std::fs::rename(&tmp, &*p).map_err(io_err(format!("replacing {}", p.display())))?;
        let f =
            std::fs::OpenOptions::new().append(true).open(&*p).map_err(io_err(format!("opening {}", p.display())))?;
        *w = std::io::BufWriter::new(f);
        self.written = lines.len();
        Ok(())
    }

    fn describe(&self) -> String {
        match &self.dest {
            Dest::File(p, _) => p.display().to_string(),
            Dest::Stdout => "standard output".into(),
        }
    }
}

/// The error of a failed scorer, saying where the decoded rows are and which lack the scorer's scores.
fn scorer_failed(e: CageError, rows: Range<usize>, kept: &str) -> CageError {
    CageError::InvalidArgument(format!(
        "{e}; the decoded texts are kept in {kept}, rows {}..{} without external scores",
        rows.start, rows.end
    ))
}

/// `cage generate`.
pub fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    let cfg = a.run.resolve()?;
    let prompts = prompts_of(&a.prompt, &a.prompts)?;
    let single = prompts.len() == 1;
    // Outputs first: an unwritable --out or --diagnostics fails before models load and decoding starts.
    let mut writer = match (&a.out, single) {
        (Some(p), _) => Some(RowWriter::create(p)?),
        // With a scorer, lines on standard output wait for its scores.
        (None, false) if a.scorer.is_none() => Some(RowWriter::new(Dest::Stdout)),
        (None, _) => None,
    };
    let mut diag = match &a.diagnostics {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(io_err(format!("creating {}", p.display())))?,
        )),
        None => None,
    };
    // Reward models before the decoder: a bad scorer fails before decoding.
    let mut scorers = Scorers::load(&cfg.scorers, cfg.model_device)?;
    let scorer_names = scorers.names();
    let mut scored = std::collections::BTreeMap::new();
    let mut engine = Engine::from_config(&cfg)?;
    let names = engine.principal_names();
    let mut opts = DecodeOptions::from_config(&cfg)?;
    opts.diagnostics = a.diagnostics.is_some();
    let rows: Vec<RowRequest> =
        prompts.iter().map(|p| RowRequest { prompt: p.clone(), weights: cfg.weights() }).collect();
    engine.prepare(&rows, opts.method)?;
    let mut progress = (!single).then(|| Progress::new("cage generate", rows.len()));
    let diag_ctx = || format!("writing diagnostics {}", a.diagnostics.as_deref().unwrap_or(Path::new("")).display());
    let t0 = Instant::now();
    let (results, tm) = engine.decode_with(&rows, &opts, &mut |ev| {
        match ev {
            Event::Text { text, .. } if single => crate::out!("{text}")?,
            Event::Step(d) => {
                if let Some(w) = diag.as_mut() {
                    serde_json::to_writer(&mut *w, d)
                        .map_err(std::io::Error::other)
                        .and_then(|_| writeln!(w))
                        .map_err(io_err(diag_ctx()))?;
                }
            }
            Event::RowDone { row, result } => {
                let mut line = result_json(result, &names, cfg.method, None);
                if !scorers.is_empty() {
                    let s = scorers.score(&result.prompt, &result.text)?;
                    line = with_scores(line, &scorer_names, &s);
                    scored.insert(row, s);
                }
                if let Some(w) = writer.as_mut() {
                    w.row_done(row, line.to_string())?;
                }
                if let Some(p) = progress.as_mut() {
                    p.tick();
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    if let Some(p) = &progress {
        p.finish();
    }
    if let Some(mut w) = diag {
        w.flush().map_err(io_err(diag_ctx()))?;
    }
    if single {
        crate::outln!()?;
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
        if let Some(s) = scored.get(&0) {
            let sc: Vec<String> = scorer_names.iter().zip(s).map(|(n, s)| format!("{n} {s:.4}")).collect();
            eprintln!("[reward models: {}]", sc.join(", "));
        }
        let p = &tm.paths;
        if p.graph + p.plain > 0 {
            eprintln!("[device steps: {} from {} CUDA graph(s), {} plain]", p.graph, p.captures, p.plain);
        }
    }
    if let Some(why) = &tm.paths.fallback {
        eprintln!("[CUDA graph capture failed, the decode steps ran plain launches: {why}]");
    }
    let Some(cmd) = &a.scorer else { return Ok(()) };
    let lines = |extra: Option<&[Vec<f64>]>| -> Vec<String> {
        results
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let line = result_json(r, &names, cfg.method, extra.map(|e| e[i].as_slice()));
                scored.get(&i).map_or(line.clone(), |s| with_scores(line, &scorer_names, s)).to_string()
            })
            .collect()
    };
    match (external_scores(cmd, &results), writer.as_mut()) {
        (Ok(extra), Some(w)) => w.rewrite(&lines(Some(&extra))),
        (Ok(extra), None) if !single => crate::outln!("{}", lines(Some(&extra)).join("\n")),
        (Ok(_), None) => Ok(()),
        (Err(e), Some(w)) => Err(scorer_failed(e, 0..results.len(), &w.describe())),
        (Err(e), None) if !single => {
            crate::outln!("{}", lines(None).join("\n"))?;
            Err(scorer_failed(e, 0..results.len(), "standard output"))
        }
        (Err(e), None) => Err(scorer_failed(e, 0..1, "the text above")),
    }
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
    /// Methods, comma-separated (default: the config's method, so that one config per method serves
    /// `cage report`).
    #[arg(long, value_delimiter = ',', value_parser = NameParser::<DecodeMethod>::new())]
    pub methods: Option<Vec<DecodeMethod>>,
    /// Grid resolution: weights are multiples of 1 / steps (default 10 for 2 principals, 4 for 3).
    #[arg(long, conflicts_with = "weights_list")]
    pub steps: Option<usize>,
    /// Explicit weight vectors instead of the grid: `"0.1,0.9;0.5,0.5;0.9,0.1"`, one weight per principal each.
    #[arg(long, value_parser = parse_weights_list)]
    pub weights_list: Option<WeightsList>,
    /// Output folder for run.json, sweep.csv, summary.csv, results.jsonl, pareto.svg and pareto.png.
    #[arg(long, default_value = "sweep-out")]
    pub out: PathBuf,
    /// External scorer command (see `cage generate --scorer`); its scores replace the implicit rewards (not
    /// together with the config's `scorers`).
    #[arg(long)]
    pub scorer: Option<String>,
}

/// `cage sweep`.
pub fn sweep_cmd(a: &SweepArgs) -> Result<()> {
    let cfg = a.run.resolve()?;
    let prompts = prompts_of(&a.prompt, &a.prompts)?;
    let j = cfg.principals.len();
    let grid = match &a.weights_list {
        Some(WeightsList(list)) => {
            let names: Vec<String> = cfg.principals.iter().map(|p| p.name.clone()).collect();
            for (i, w) in list.iter().enumerate() {
                check_weights(w, &names)
                    .map_err(|e| CageError::InvalidArgument(format!("--weights-list vector {} ({w:?}): {e}", i + 1)))?;
            }
            list.clone()
        }
        None if !(2..=3).contains(&j) => {
            return Err(CageError::InvalidArgument(format!(
                "a grid sweep needs 2 or 3 principals, the config has {j} (--weights-list takes any number)"
            )));
        }
        None => simplex_grid(j, a.steps.unwrap_or(if j == 2 { 10 } else { 4 }))?,
    };
    let methods = a.methods.clone().unwrap_or_else(|| vec![cfg.method]);
    if methods.is_empty() {
        return Err(CageError::InvalidArgument("--methods names no method".into()));
    }
    if a.scorer.is_some() && !cfg.scorers.is_empty() {
        return Err(CageError::InvalidArgument(
            "give either --scorer or scorers in the config: HV and MIP are computed on one set of scores".into(),
        ));
    }
    // The output folder and results.jsonl first: an unwritable --out fails before models load.
    std::fs::create_dir_all(&a.out).map_err(io_err(format!("creating {}", a.out.display())))?;
    let mut writer = RowWriter::create(&a.out.join("results.jsonl"))?;
    // Reward models before the decoder: a bad scorer fails before decoding.
    let mut scorers = Scorers::load(&cfg.scorers, cfg.model_device)?;
    let scorer_names = scorers.names();
    let mut engine = Engine::from_config(&cfg)?;
    let names = engine.principal_names();
    let rows: Vec<RowRequest> = grid
        .iter()
        .flat_map(|w| prompts.iter().map(move |p| RowRequest { prompt: p.clone(), weights: w.clone() }))
        .collect();
    for &m in &methods {
        engine.prepare(&rows, m)?;
    }
    // results.jsonl grows row by row; with a scorer it is rewritten with the scores after each method.
    let (mut curves, mut scored) = (vec![], vec![]);
    for &m in &methods {
        let mut opts = DecodeOptions::from_config(&cfg)?;
        opts.method = m;
        let mut progress = Progress::new(&format!("cage sweep {m:>10}"), rows.len());
        let first = writer.written;
        writer.next = 0;
        let mut raw = vec![vec![]; rows.len()];
        let (res, _) = engine.decode_with(&rows, &opts, &mut |ev| {
            if let Event::RowDone { row, result } = ev {
                let mut line = result_json(result, &names, m, None);
                if !scorers.is_empty() {
                    raw[row] = scorers.score(&result.prompt, &result.text)?;
                    line = with_scores(line, &scorer_names, &raw[row]);
                }
                writer.row_done(row, line.to_string())?;
                progress.tick();
            }
            Ok(())
        })?;
        progress.finish();
        let extra = match &a.scorer {
            Some(cmd) => Some(
                external_scores(cmd, &res)
                    .map_err(|e| scorer_failed(e, first..first + res.len(), &writer.describe()))?,
            ),
            None => None,
        };
        if let Some(e) = &extra {
            scored.extend(res.iter().zip(e).map(|(r, x)| result_json(r, &names, m, Some(x)).to_string()));
            writer.rewrite(&scored)?;
        }
        let per_row: Vec<Vec<f64>> = match &extra {
            Some(e) if e.iter().any(|s| s.len() != e[0].len()) => {
                return Err(CageError::InvalidArgument("the scorer wrote different numbers of scores per line".into()));
            }
            Some(e) => e.clone(),
            None if !scorers.is_empty() => raw.iter().map(|s| scorers.oriented(s)).collect(),
            None => res.iter().map(|r| r.scores.clone()).collect(),
        };
        curves.push(MethodCurve::from_rows(&m.to_string(), &grid, &per_row)?);
    }
    let score_names: Vec<String> = match (a.scorer.is_some(), curves.first().and_then(|c| c.scores.first())) {
        (true, Some(e)) => (1..=e.len()).map(|i| format!("external_{i}")).collect(),
        _ if !scorers.is_empty() => scorers.oriented_names(),
        _ => names.clone(),
    };
    let manifest = RunManifest {
        principals: names.clone(),
        scores: score_names.clone(),
        methods: methods.clone(),
        prompts: prompts.len(),
        tau: cfg.tau,
        k: cfg.k,
        config: a.run.config.clone(),
    };
    let title = sweep_title(&cfg, prompts.len());
    let (sums, reference) = write_sweep_files(&a.out, &manifest, &curves, &title)?;
    crate::outln!("reference point {reference:?}")?;
    crate::outln!("{:>12} {:>12} {:>8}", "method", "HV", "MIP")?;
    for s in &sums {
        crate::outln!("{:>12} {:>12.4} {:>8.4}", s.method, s.hv, s.mip)?;
    }
    eprintln!("wrote {}/{{run.json, sweep.csv, summary.csv, results.jsonl, pareto.svg, pareto.png}}", a.out.display());
    Ok(())
}

/// The title of a sweep's plot.
pub fn sweep_title(cfg: &RunConfig, prompts: usize) -> String {
    format!("{prompts} prompt(s), tau {}, k {}", cfg.tau, cfg.k)
}

/// Writes a finished sweep's run.json (`manifest`, what `cage report` reads), sweep.csv, summary.csv,
/// pareto.svg and pareto.png into `out` (which exists) and returns HV and MIP per method with the shared
/// reference point: `cage sweep` and the sharded sweep of `cage.ray` (through the Python binding) both end
/// here, so that both write the same files.
pub fn write_sweep_files(
    out: &Path,
    manifest: &RunManifest,
    curves: &[MethodCurve],
    title: &str,
) -> Result<(Vec<Summary>, Vec<f64>)> {
    let (principals, score_names) = (&manifest.principals, &manifest.scores);
    let (sums, reference) = summarize(curves)?;
    write_file(&out.join(MANIFEST), &serde_json::to_string_pretty(manifest)?)?;
    write_file(&out.join("sweep.csv"), &points_csv(principals, score_names, curves))?;
    write_file(&out.join("summary.csv"), &summary_csv(&sums))?;
    write_file(&out.join("pareto.svg"), &pareto_svg(score_names, curves, title))?;
    let png = out.join("pareto.png");
    std::fs::write(&png, pareto_png(score_names, curves, title)?)
        .map_err(io_err(format!("writing {}", png.display())))?;
    Ok((sums, reference))
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
        parm_beta: 1.0,
        k: 50,
        normalize: Default::default(),
        sampling: Choice::Greedy,
        seed: 0,
        max_new_tokens,
        stop: vec![],
        prompt_format: FormatSetting::Auto,
        prompt_template: None,
        tokenizer_mismatch: Default::default(),
        backend: crate::Backend::Auto,
        model_device: crate::Backend::Cpu,
        kv_cache: Default::default(),
        gpu_weights: Default::default(),
        cpu_weights: Default::default(),
        batch_size: 8,
        scorers: vec![],
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
    let mut engine = Engine::from_config(&cfg)?;
    let names = engine.principal_names();
    let weights = [vec![0.0, 0.0], vec![1.0, 0.0], vec![0.5, 0.5], vec![0.0, 1.0]];
    let rows: Vec<RowRequest> =
        weights.iter().map(|w| RowRequest { prompt: a.prompt.clone(), weights: w.clone() }).collect();
    let opts = DecodeOptions::from_config(&cfg)?;
    engine.prepare(&rows, opts.method)?;
    crate::outln!("prompt: {}", a.prompt)?;
    crate::outln!("principals (prompted, on the same model):")?;
    for p in &cfg.principals {
        if let PrincipalKind::Prompted { instruction, .. } = &p.kind {
            crate::outln!("  {:<13} {instruction:?}", p.name)?;
        }
    }
    crate::outln!(
        "method {}, tau {}, top-{} candidates, greedy, {} tokens at most\n",
        cfg.method,
        cfg.tau,
        cfg.k,
        cfg.max_new_tokens
    )?;
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
        crate::outln!("== {label}  [{} tokens; implicit rewards: {}]", r.tokens.len(), sc.join(", "))?;
        crate::outln!("{}\n", r.text.trim())?;
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
    // Arguments before any model download or load.
    if a.rows == 0 || a.tokens == 0 {
        return Err(CageError::InvalidArgument("--rows and --tokens must be >= 1".into()));
    }
    if a.methods.is_empty() {
        return Err(CageError::InvalidArgument("--methods names no method".into()));
    }
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
    cfg.batch_size = a.rows;
    let methods = &a.methods;
    let mut engine = Engine::from_config(&cfg)?;
    // Rows never stop early, so every method decodes the same number of steps.
    let mut opts = DecodeOptions::from_config(&cfg)?;
    opts.stop.clear();
    opts.ignore_eos = true;
    let rows: Vec<RowRequest> =
        (0..a.rows).map(|_| RowRequest { prompt: a.prompt.clone(), weights: cfg.weights() }).collect();
    for &m in methods {
        engine.prepare(&rows, m)?;
    }
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
                let per_step = |bytes: u64| bytes as f64 / t.transfer_steps.max(1) as f64;
                serde_json::json!({"method": m, "tokens": t.tokens, "tok_s": t.tokens as f64 / busy,
                    "step_ms": 1e3 * busy / t.steps.max(1) as f64,
                    "d2h_bytes_per_step": per_step(t.step_transfers.device_to_host),
                    "h2d_bytes_per_step": per_step(t.step_transfers.host_to_device),
                    "waits_per_step": per_step(t.step_transfers.waits), "path": t.paths.path(), "timings": t})
            })
            .collect();
        crate::outln!("{}", serde_json::json!({"rows": a.rows, "tokens": a.tokens, "threads": threads, "methods": v}))?;
        return Ok(());
    }
    crate::outln!(
        "{} rows x {} tokens, {} principals, k {}, CPU {threads} threads; per decode step (all rows), prefill excluded:",
        a.rows,
        a.tokens,
        engine.principal_names().len(),
        cfg.k
    )?;
    crate::outln!(
        "{:>11} {:>9} {:>9} {:>11} {:>9} {:>12} {:>10} {:>9}",
        "method",
        "tok/s",
        "step ms",
        "forward ms",
        "values ms",
        "policy ms",
        "policy %",
        "sample ms"
    )?;
    for (m, t) in &table {
        let busy = t.forward_s + t.values_s + t.policy_s + t.sampling_s;
        let steps = t.steps.max(1) as f64;
        let dec = busy - t.prefill_s;
        let ds = (t.steps.max(2) - 1) as f64;
        crate::outln!(
            "{:>11} {:>9.1} {:>9.2} {:>11.2} {:>9.3} {:>12.4} {:>10.3} {:>9.3}",
            m,
            t.tokens as f64 / busy,
            1e3 * dec / ds,
            1e3 * (t.forward_s - t.prefill_s) / ds,
            1e3 * t.values_s / steps,
            1e3 * t.policy_s / steps,
            100.0 * t.policy_s / busy,
            1e3 * t.sampling_s / steps
        )?;
    }
    if table.iter().any(|(_, t)| t.step_transfers != Default::default()) {
        crate::outln!("host-device traffic per decode step (prefill excluded), counted by the device:")?;
        for (m, t) in &table {
            let s = t.transfer_steps.max(1) as u64;
            let x = &t.step_transfers;
            crate::outln!(
                "{:>11} device-to-host {:>10} B in {:>3} copies, host-to-device {:>10} B in {:>3} copies, {:>3} waits \
                 ({:?} steps)",
                m,
                x.device_to_host / s,
                x.downloads / s,
                x.host_to_device / s,
                x.uploads / s,
                x.waits / s,
                t.paths.path()
            )?;
        }
    }
    Ok(())
}
