//! The merge of a sharded sweep (`cage.ray`): the shards' per-row scores go through the same Rust code as
//! `cage sweep` (mean per weight vector, HV, MIP, CSV files and plot), so that both write the same files.

use crate::errors::{to_py, value_error};
use cage::decode::cli::{sweep_title, write_sweep_files};
use cage::decode::config::check_weights;
use cage::decode::report::RunManifest;
use cage::decode::sweep::MethodCurve;
use cage::decode::{DecodeMethod, RunConfig};
use cage::names::parse;
use pyo3::prelude::*;
use std::path::{Path, PathBuf};

/// Checks a sharded sweep before any worker starts, as `cage sweep` would: the config (JSON text), 2 or 3
/// principals, the methods' names and every weight vector (`grid`, empty: not given yet). Returns the
/// principals' names and the config's batch size.
#[pyfunction]
pub fn sweep_check(config_json: &str, methods: Vec<String>, grid: Vec<Vec<f64>>) -> PyResult<(Vec<String>, usize)> {
    let cfg = RunConfig::parse(config_json).map_err(to_py)?;
    cfg.check().map_err(to_py)?;
    let j = cfg.principals.len();
    if !(2..=3).contains(&j) {
        return Err(value_error(format!("a sweep needs 2 or 3 principals, the config has {j}")));
    }
    let names: Vec<String> = cfg.principals.iter().map(|p| p.name.clone()).collect();
    for m in &methods {
        parse::<DecodeMethod>(m).map_err(to_py)?;
    }
    for w in &grid {
        check_weights(w, &names).map_err(to_py)?;
    }
    Ok((names, cfg.batch_size))
}

/// The prompts of a JSONL file, read as `cage sweep --prompts` reads them.
#[pyfunction]
pub fn read_prompts(path: &str) -> PyResult<Vec<String>> {
    cage::decode::cli::read_prompts(Path::new(path)).map_err(to_py)
}

/// (method, HV, MIP) of one method.
type MethodSummary = (String, f64, f64);

/// Writes run.json, sweep.csv, summary.csv, pareto.svg and pareto.png into `out` from `scores[m][row]`
/// (method `m`'s scores of row g * prompts + p); returns (method, HV, MIP) per method and the reference point.
/// `config_path` is what run.json names as the config (the file the sweep was given, when it was one).
#[pyfunction]
#[pyo3(signature = (out, config_json, grid, prompts, methods, scores, config_path=None))]
#[allow(clippy::too_many_arguments)]
pub fn write_sweep(
    py: Python<'_>,
    out: &str,
    config_json: &str,
    grid: Vec<Vec<f64>>,
    prompts: usize,
    methods: Vec<String>,
    scores: Vec<Vec<Vec<f64>>>,
    config_path: Option<String>,
) -> PyResult<(Vec<MethodSummary>, Vec<f64>)> {
    let (names, _) = sweep_check(config_json, methods.clone(), vec![])?;
    let cfg = RunConfig::parse(config_json).map_err(to_py)?;
    if methods.is_empty() || methods.len() != scores.len() {
        return Err(value_error(format!("{} methods but {} score tables", methods.len(), scores.len())));
    }
    if let Some((m, s)) = methods.iter().zip(&scores).find(|(_, s)| s.len() != grid.len() * prompts) {
        return Err(value_error(format!(
            "method {m}: {} rows of scores, expected {} weight vectors x {prompts} prompts",
            s.len(),
            grid.len()
        )));
    }
    let curves = methods
        .iter()
        .zip(&scores)
        .map(|(m, s)| MethodCurve::from_rows(m, &grid, s))
        .collect::<cage::Result<Vec<_>>>()
        .map_err(to_py)?;
    let title = sweep_title(&cfg, prompts);
    let manifest = RunManifest {
        principals: names.clone(),
        scores: names,
        methods: methods.iter().map(|m| parse::<DecodeMethod>(m)).collect::<cage::Result<_>>().map_err(to_py)?,
        prompts,
        tau: cfg.tau,
        k: cfg.k,
        config: config_path.map(PathBuf::from).unwrap_or_else(|| PathBuf::from("(given as JSON)")),
    };
    let (sums, reference) =
        py.detach(|| write_sweep_files(Path::new(out), &manifest, &curves, &title)).map_err(to_py)?;
    Ok((sums.into_iter().map(|s| (s.method, s.hv, s.mip)).collect(), reference))
}
