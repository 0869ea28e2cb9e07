//! `cage.Engine`: the Rust decoding engine over a run config. `generate` and `sweep` run on a thread of their
//! own and stream one JSON object per finished row through a channel; the Python iterator waits on it with the
//! GIL released, so other Python threads run while Rust decodes. Dropping the iterator stops the decoding at
//! its next row.

use crate::errors::{to_py, value_error};
use cage::decode::cli::result_json;
use cage::decode::sweep::simplex_grid;
use cage::decode::{DecodeMethod, DecodeOptions, Engine as RustEngine, Event, RowRequest, RunConfig};
use cage::names::parse;
use cage::sampling::Choice;
use cage::{CageError, Result};
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A loaded engine and the config it was built from. The engine sits behind a lock only so that the `parm`
/// method can materialise adapters on it between runs (decoding threads share it read-only).
#[pyclass(frozen, module = "cage._cage", name = "_Engine")]
pub struct Engine {
    engine: Mutex<Arc<RustEngine>>,
    config: RunConfig,
}

/// Rows as JSON text, in the order they finish; ends with the decoding's error, if any.
#[pyclass(module = "cage._cage", name = "_Results")]
pub struct Results {
    rx: Mutex<Receiver<std::result::Result<String, CageError>>>,
}

#[pymethods]
impl Results {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        loop {
            // Locked and waited on without the GIL: a thread holding the GIL never waits for one that needs it.
            // The wait wakes up every 100 ms so that Ctrl-C (a pending signal) interrupts it.
            let next =
                py.detach(|| self.rx.lock().map(|rx| rx.recv_timeout(Duration::from_millis(100))).map_err(|_| ()));
            match next {
                Ok(Ok(Ok(line))) => return Ok(line),
                Ok(Ok(Err(e))) => return Err(to_py(e)),
                Ok(Err(RecvTimeoutError::Timeout)) => py.check_signals()?,
                Ok(Err(RecvTimeoutError::Disconnected)) => return Err(PyStopIteration::new_err(())),
                Err(()) => return Err(value_error("the results iterator is broken (a reader panicked)")),
            }
        }
    }
}

/// What a run decodes: rows, and per pass the method it runs with.
struct Job {
    rows: Vec<RowRequest>,
    passes: Vec<DecodeOptions>,
}

/// Runs `job` on a new thread, sending each finished row (with its index and token ids) as it is known.
fn spawn(engine: Arc<RustEngine>, job: Job) -> Results {
    // A small buffer: the decoding runs ahead of the reader by a few rows at most.
    let (tx, rx) = sync_channel(16);
    std::thread::spawn(move || {
        let names = engine.principal_names();
        let run = |tx: &SyncSender<std::result::Result<String, CageError>>| -> Result<()> {
            for opts in &job.passes {
                let method = opts.method;
                engine.decode_with(&job.rows, opts, &mut |ev| {
                    if let Event::RowDone { row, result } = ev {
                        let mut v = result_json(result, &names, method, None);
                        v["row"] = serde_json::json!(row);
                        v["token_ids"] = serde_json::json!(result.tokens);
                        // The reader has gone: stop decoding.
                        tx.send(Ok(v.to_string()))
                            .map_err(|_| CageError::InvalidArgument("the results iterator was dropped".into()))?;
                    }
                    Ok(())
                })?;
            }
            Ok(())
        };
        if let Err(e) = run(&tx) {
            let _ = tx.send(Err(e));
        }
    });
    Results { rx: Mutex::new(rx) }
}

/// The config with its `cpu_weights` replaced when the caller gave one (an unknown name is an error naming
/// `cpu_weights`).
fn with_cpu_weights(mut config: RunConfig, cpu_weights: Option<&str>) -> PyResult<RunConfig> {
    if let Some(s) = cpu_weights {
        config.cpu_weights = parse(s).map_err(to_py)?;
    }
    Ok(config)
}

impl Engine {
    /// Loads the models with the GIL released.
    fn build(py: Python<'_>, config: RunConfig) -> PyResult<Self> {
        // Its results carry the principals' implicit rewards only: a config's scorers would be silently unused.
        if !config.scorers.is_empty() {
            return Err(value_error(
                "scorers: the Python engine (and cage.ray) reports the principals' implicit rewards; reward-model \
                 scorers run in `cage generate` and `cage sweep` (or score the texts with cage score / \
                 scripts/hf_scorer.py)"
                    .to_string(),
            ));
        }
        let engine = py.detach(|| RustEngine::from_config(&config)).map_err(to_py)?;
        Ok(Engine { engine: Mutex::new(Arc::new(engine)), config })
    }

    fn options(
        &self,
        method: Option<&str>,
        max_new_tokens: Option<usize>,
        tau: Option<f64>,
        sampling: Option<&str>,
        seed: Option<u64>,
    ) -> PyResult<DecodeOptions> {
        let mut o = DecodeOptions::from_config(&self.config).map_err(to_py)?;
        if let Some(m) = method {
            o.method = parse::<DecodeMethod>(m).map_err(to_py)?;
        }
        if let Some(n) = max_new_tokens {
            o.max_new_tokens = n;
        }
        if let Some(t) = tau {
            o.tau = t;
        }
        if let Some(s) = sampling {
            o.choice = parse::<Choice>(s).map_err(to_py)?;
        }
        if let Some(s) = seed {
            o.seed = s;
        }
        Ok(o)
    }

    /// The engine, shared with a decoding thread.
    fn shared(&self) -> PyResult<Arc<RustEngine>> {
        self.engine.lock().map(|e| e.clone()).map_err(|_| value_error("the engine is broken (a thread panicked)"))
    }

    /// Decodes `job` on a thread of its own after materialising what its passes need: for `parm`, PARM's
    /// adapter at every row's preference (the engine must not be shared with a running decode then).
    fn start(&self, job: Job) -> PyResult<Results> {
        let mut guard = self.engine.lock().map_err(|_| value_error("the engine is broken (a thread panicked)"))?;
        for o in job.passes.iter().filter(|o| o.method == DecodeMethod::Parm) {
            let e = Arc::get_mut(&mut guard).ok_or_else(|| {
                value_error("method parm materialises adapters: finish (or drop) the previous results iterator first")
            })?;
            e.prepare(&job.rows, o.method).map_err(to_py)?;
        }
        Ok(spawn(guard.clone(), job))
    }
}

#[pymethods]
impl Engine {
    /// Loads the models of a config file; `cpu_weights` (`stored` or `f32`) overrides the config's.
    #[staticmethod]
    #[pyo3(signature = (path, cpu_weights=None))]
    fn from_path(py: Python<'_>, path: &str, cpu_weights: Option<&str>) -> PyResult<Self> {
        let config = RunConfig::load(Path::new(path)).map_err(to_py)?;
        Self::build(py, with_cpu_weights(config, cpu_weights)?)
    }

    /// Loads the models of a config given as JSON text; `cpu_weights` overrides the config's.
    #[staticmethod]
    #[pyo3(signature = (text, cpu_weights=None))]
    fn from_json(py: Python<'_>, text: &str, cpu_weights: Option<&str>) -> PyResult<Self> {
        let config = RunConfig::parse(text).map_err(to_py)?;
        Self::build(py, with_cpu_weights(config, cpu_weights)?)
    }

    /// The principals' names, in the config's order.
    fn principal_names(&self) -> PyResult<Vec<String>> {
        self.shared().map(|e| e.principal_names())
    }

    /// The config's weights (1 / J each when it has none).
    fn default_weights(&self) -> Vec<f64> {
        self.config.weights()
    }

    /// Decodes `prompts`, row i with `weights[i]`. `first_row`: the index of the first row within a larger run
    /// this is a shard of (rows are numbered and sampled from it).
    #[pyo3(signature = (prompts, weights, method=None, max_new_tokens=None, tau=None, sampling=None, seed=None,
                        first_row=0))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        prompts: Vec<String>,
        weights: Vec<Vec<f64>>,
        method: Option<&str>,
        max_new_tokens: Option<usize>,
        tau: Option<f64>,
        sampling: Option<&str>,
        seed: Option<u64>,
        first_row: usize,
    ) -> PyResult<Results> {
        if prompts.len() != weights.len() {
            return Err(value_error(format!("{} prompts but {} weight vectors", prompts.len(), weights.len())));
        }
        let mut opts = self.options(method, max_new_tokens, tau, sampling, seed)?;
        opts.first_row = first_row;
        let rows: Vec<RowRequest> =
            prompts.into_iter().zip(weights).map(|(prompt, weights)| RowRequest { prompt, weights }).collect();
        self.start(Job { rows, passes: vec![opts] })
    }

    /// The weight grid of a sweep over the simplex (as `cage sweep`: multiples of 1 / steps).
    #[staticmethod]
    fn grid(principals: usize, steps: usize) -> PyResult<Vec<Vec<f64>>> {
        simplex_grid(principals, steps).map_err(to_py)
    }

    /// Decodes every prompt at every weight vector of `grid`, once per method, in that order.
    #[pyo3(signature = (prompts, grid, methods, max_new_tokens=None))]
    fn sweep(
        &self,
        prompts: Vec<String>,
        grid: Vec<Vec<f64>>,
        methods: Vec<String>,
        max_new_tokens: Option<usize>,
    ) -> PyResult<Results> {
        if methods.is_empty() {
            return Err(value_error("a sweep needs at least one method"));
        }
        let passes: Vec<DecodeOptions> =
            methods.iter().map(|m| self.options(Some(m), max_new_tokens, None, None, None)).collect::<PyResult<_>>()?;
        let rows: Vec<RowRequest> = grid
            .iter()
            .flat_map(|w| prompts.iter().map(move |p| RowRequest { prompt: p.clone(), weights: w.clone() }))
            .collect();
        self.start(Job { rows, passes })
    }
}
