//! `cage report`: the run folders of `cage sweep` (one config per method, as the paper runs them, or several
//! methods in one folder) merged into one table: hypervolume and MIP of every method with one shared reference
//! point, as Markdown and CSV, and one Pareto plot.

use super::config::DecodeMethod;
use super::plot::{pareto_png, pareto_svg};
use super::sweep::{MethodCurve, ScoreScale, Summary, points_csv, summarize_with};
use crate::error::{CageError, Result};
use crate::names::NameParser;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The file of a run folder that says what its CSV's columns are.
pub const MANIFEST: &str = "run.json";

/// What `cage sweep` ran, written beside its CSVs so that `cage report` can read and merge run folders.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunManifest {
    /// The principals, in the order of the weight columns.
    pub principals: Vec<String>,
    /// The score axes, in the order of the score columns (the principals' implicit rewards, or a scorer's).
    pub scores: Vec<String>,
    /// The methods decoded.
    pub methods: Vec<DecodeMethod>,
    /// Prompts per weight vector (each point is their mean).
    pub prompts: usize,
    /// The agent's temperature.
    pub tau: f64,
    /// Candidates per step.
    pub k: usize,
    /// The run config.
    pub config: PathBuf,
}

/// One run folder: its manifest and one curve per method.
#[derive(Clone, Debug)]
pub struct RunDir {
    /// The folder.
    pub dir: PathBuf,
    /// Its run.json.
    pub manifest: RunManifest,
    /// Its methods' points, from sweep.csv.
    pub curves: Vec<MethodCurve>,
}

fn bad(m: String) -> CageError {
    CageError::InvalidArgument(m)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|source| CageError::Io { context: format!("reading {}", path.display()), source })
}

/// Reads a folder written by `cage sweep`: run.json and sweep.csv.
pub fn read_run(dir: &Path) -> Result<RunDir> {
    let mpath = dir.join(MANIFEST);
    if !mpath.is_file() {
        return Err(bad(format!("{}: no {MANIFEST} here; give folders written by `cage sweep --out`", dir.display())));
    }
    let manifest: RunManifest = serde_json::from_str(&read(&mpath)?)
        .map_err(|e| CageError::Format { what: mpath.display().to_string(), msg: e.to_string() })?;
    let cpath = dir.join("sweep.csv");
    let text = read(&cpath)?;
    let (j, d) = (manifest.principals.len(), manifest.scores.len());
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = points_csv(&manifest.principals, &manifest.scores, &[]);
    if lines.next() != Some(header.trim_end()) {
        return Err(bad(format!(
            "{}: its header is not the one {MANIFEST} describes ({})",
            cpath.display(),
            header.trim()
        )));
    }
    let mut curves: Vec<MethodCurve> = vec![];
    for (i, l) in lines.enumerate() {
        let f: Vec<&str> = l.split(',').collect();
        let nums: Option<Vec<f64>> = f.get(1..).map(|x| x.iter().filter_map(|x| x.parse().ok()).collect());
        let nums = nums.filter(|n| f.len() == 1 + j + d && n.len() == j + d && n.iter().all(|x| x.is_finite()));
        let Some(nums) = nums else {
            return Err(bad(format!(
                "{} line {}: expected a method, {j} weights and {d} finite scores, got {l:?}",
                cpath.display(),
                i + 2
            )));
        };
        let (w, s) = nums.split_at(j);
        match curves.iter_mut().find(|c| c.method == f[0]) {
            Some(c) => {
                c.weights.push(w.to_vec());
                c.scores.push(s.to_vec());
            }
            None => {
                curves.push(MethodCurve { method: f[0].into(), weights: vec![w.to_vec()], scores: vec![s.to_vec()] })
            }
        }
    }
    if curves.is_empty() {
        return Err(bad(format!("{} holds no points", cpath.display())));
    }
    Ok(RunDir { dir: dir.to_path_buf(), manifest, curves })
}

/// The curves of several run folders as one set: every folder must score the same axes, and a method may come
/// from one folder only (two would be two different curves under one name).
pub fn merge(runs: &[RunDir]) -> Result<Vec<(MethodCurve, PathBuf)>> {
    let first = runs.first().ok_or_else(|| bad("cage report needs at least one run folder".into()))?;
    let mut out: Vec<(MethodCurve, PathBuf)> = vec![];
    for r in runs {
        if r.manifest.scores != first.manifest.scores {
            return Err(bad(format!(
                "run folders score different axes: {} has {:?}, {} has {:?}; a report compares methods on the same objectives",
                first.dir.display(),
                first.manifest.scores,
                r.dir.display(),
                r.manifest.scores
            )));
        }
        for c in &r.curves {
            if let Some((_, other)) = out.iter().find(|(o, _)| o.method == c.method) {
                return Err(bad(format!(
                    "method {} is in both {} and {}; give each method once",
                    c.method,
                    other.display(),
                    r.dir.display()
                )));
            }
            out.push((c.clone(), r.dir.clone()));
        }
    }
    Ok(out)
}

/// Options of `cage report`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// Run folders written by `cage sweep --out` (each with run.json and sweep.csv).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The reference point is the per-axis minimum over every method minus this margin: one value, or one per
    /// score axis (`1,1,0.1`). The paper uses 1.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub margin: Vec<f64>,
    /// `none` (the paper's tables) or `minmax` (each axis to [0, 1] over every method before the HV; the
    /// authors' normalised HV takes `--margin 0`).
    #[arg(long, default_value_t = ScoreScale::None, value_parser = NameParser::<ScoreScale>::new())]
    pub normalize: ScoreScale,
    /// Output folder for report.md, report.csv, pareto.svg and pareto.png.
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

/// The table as Markdown: one row per method, then the reference point and how it was taken.
pub fn markdown(rows: &[(Summary, usize, PathBuf)], reference: &[f64], a: &ReportArgs, axes: &[String]) -> String {
    let mut s = String::from("| method | points | HV | MIP | run |\n|---|---:|---:|---:|---|\n");
    for (x, n, dir) in rows {
        let _ = writeln!(s, "| {} | {n} | {:.4} | {:.4} | {} |", x.method, x.hv, x.mip, dir.display());
    }
    let _ = writeln!(
        s,
        "\nScore axes {axes:?}; normalisation {}; reference point {reference:?} (per-axis minimum over every method minus margin {:?}).",
        a.normalize, a.margin
    );
    s
}

/// The table as CSV: `method,points,hv,mip,run`.
pub fn csv(rows: &[(Summary, usize, PathBuf)]) -> String {
    let mut s = String::from("method,points,hv,mip,run\n");
    for (x, n, dir) in rows {
        let _ = writeln!(s, "{},{n},{},{},{}", x.method, x.hv, x.mip, dir.display());
    }
    s
}

/// `cage report`.
pub fn report_cmd(a: &ReportArgs) -> Result<()> {
    let runs: Vec<RunDir> = a.runs.iter().map(|d| read_run(d)).collect::<Result<_>>()?;
    let merged = merge(&runs)?;
    let curves: Vec<MethodCurve> = merged.iter().map(|(c, _)| c.clone()).collect();
    let (sums, reference) = summarize_with(&curves, &a.margin, a.normalize)?;
    let rows: Vec<(Summary, usize, PathBuf)> =
        sums.into_iter().zip(&merged).map(|(s, (c, d))| (s, c.scores.len(), d.clone())).collect();
    let axes = &runs[0].manifest.scores;
    let io = |p: &Path| {
        let context = format!("writing {}", p.display());
        move |source| CageError::Io { context, source }
    };
    std::fs::create_dir_all(&a.out).map_err(io(&a.out))?;
    let md = markdown(&rows, &reference, a, axes);
    for (name, text) in [("report.md", md.clone()), ("report.csv", csv(&rows))] {
        let p = a.out.join(name);
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    let title = format!("{} method(s) from {} run folder(s)", curves.len(), runs.len());
    let p = a.out.join("pareto.svg");
    std::fs::write(&p, pareto_svg(axes, &curves, &title)).map_err(io(&p))?;
    let p = a.out.join("pareto.png");
    std::fs::write(&p, pareto_png(axes, &curves, &title)?).map_err(io(&p))?;
    crate::outln!("{md}")?;
    eprintln!("wrote {}/{{report.md, report.csv, pareto.svg, pareto.png}}", a.out.display());
    Ok(())
}
