//! `cage.solve` on numpy arrays: one row ([N], [J, N], [J]) or a batch ([B, N], [B, J, N], [B, J]) in f32 or
//! f64, read in place (C-contiguous arrays only), validated by the library so that messages equal the CLI's,
//! solved with the GIL released. The results are numpy arrays that own the solver's buffers (no copy).

use crate::errors::{to_py, value_error};
use cage::backend::{Backend, solve_with};
use cage::names::parse;
use cage::solver::{Method, SolveOptions};
use cage::{Batch, BatchInput, Normalize, Real, Solution as RustSolution};
use numpy::{Element, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyFloat;
use std::cell::RefCell;
use std::time::Instant;

/// The result of `cage.solve`: numpy arrays shaped like the inputs' batch (no leading B for one row; then
/// `iterations`, `residual` and `converged` are Python scalars).
#[pyclass(frozen, get_all, module = "cage")]
pub struct Solution {
    /// [N] or [B, N]: the policy over the candidates.
    policy: Py<PyAny>,
    /// [J, N] or [B, J, N]: each principal's incentives.
    incentives: Py<PyAny>,
    /// [J] or [B, J]: each principal's payoff.
    payoffs: Py<PyAny>,
    /// [N] or [B, N]: the sum of the incentives.
    aggregate_incentive: Py<PyAny>,
    /// Solver iterations (per row).
    iterations: Py<PyAny>,
    /// Final residual relative to the row's value scale (per row).
    residual: Py<PyAny>,
    /// Whether the tolerance was reached (per row).
    converged: Py<PyAny>,
}

#[pymethods]
impl Solution {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Solution(policy={}, payoffs={}, iterations={}, converged={})",
            self.policy.bind(py).repr()?,
            self.payoffs.bind(py).repr()?,
            self.iterations.bind(py).repr()?,
            self.converged.bind(py).repr()?
        ))
    }
}

/// A precision the solver runs in, with this thread's reused input buffers (no allocation per call).
trait Precision: Real + Element {
    fn with_scratch<R>(f: impl FnOnce(&mut BatchInput<Self>) -> R) -> R;
}

thread_local! {
    static SCRATCH32: RefCell<BatchInput<f32>> = RefCell::new(BatchInput::default());
    static SCRATCH64: RefCell<BatchInput<f64>> = RefCell::new(BatchInput::default());
}

impl Precision for f32 {
    fn with_scratch<R>(f: impl FnOnce(&mut BatchInput<f32>) -> R) -> R {
        SCRATCH32.with(|s| f(&mut s.borrow_mut()))
    }
}

impl Precision for f64 {
    fn with_scratch<R>(f: impl FnOnce(&mut BatchInput<f64>) -> R) -> R {
        SCRATCH64.with(|s| f(&mut s.borrow_mut()))
    }
}

fn dtype_name(x: &Bound<'_, PyAny>) -> String {
    x.getattr("dtype").and_then(|d| d.str()).map(|s| s.to_string()).unwrap_or_else(|_| "none".into())
}

/// `x` as an array of `T`; the error names the argument, its type or dtype, and the precision asked for.
fn array_of<'py, T: Precision>(
    x: &Bound<'py, PyAny>,
    what: &str,
    base_dtype: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    match x.cast::<PyArrayDyn<T>>() {
        Ok(a) => Ok(a.clone()),
        Err(_) if x.cast::<numpy::PyUntypedArray>().is_ok() => Err(value_error(format!(
            "{what} has dtype {} but base_logprobs has dtype {base_dtype}: pass every array in the same precision \
             (float32 or float64)",
            dtype_name(x)
        ))),
        Err(_) => Err(value_error(format!(
            "{what} must be a numpy array (or an object with __dlpack__), got {}",
            x.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))),
    }
}

/// The array's elements in memory order; non-contiguous arrays are an error rather than a silent copy.
fn contiguous<'a, T: Element>(a: &'a numpy::PyReadonlyArrayDyn<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| {
        value_error(format!(
            "{what} is not C-contiguous (strides {:?}); pass numpy.ascontiguousarray({what})",
            a.strides()
        ))
    })
}

fn shape_error(what: &str, expected: &str, got: &[usize]) -> PyErr {
    value_error(format!("{what} must have shape {expected}, got {got:?}"))
}

/// The game's shape (batched, B, N, J) from the arrays' shapes, or an error naming the array that disagrees.
fn shape_of(base: &[usize], values: &[usize], weights: &[usize]) -> PyResult<(bool, usize, usize, usize)> {
    match *base {
        [n] => {
            let j = match *values {
                [j, vn] if vn == n => j,
                _ => return Err(shape_error("values", &format!("[J, N] = [J, {n}] for one row"), values)),
            };
            if weights != [j] {
                return Err(shape_error("weights", &format!("[J] = [{j}] for one row"), weights));
            }
            Ok((false, 1, n, j))
        }
        [b, n] => {
            let j = match *values {
                [vb, j, vn] if vb == b && vn == n => j,
                _ => return Err(shape_error("values", &format!("[B, J, N] = [{b}, J, {n}] for a batch"), values)),
            };
            if weights != [b, j] {
                return Err(shape_error("weights", &format!("[B, J] = [{b}, {j}] for a batch"), weights));
            }
            Ok((true, b, n, j))
        }
        _ => Err(shape_error("base_logprobs", "[N] (one row) or [B, N] (a batch)", base)),
    }
}

/// Solver options and backend from the Python strings, spelled as on the command line.
fn options(
    method: &str,
    normalize: &str,
    backend: &str,
    tol: Option<f64>,
    max_iter: Option<u32>,
) -> PyResult<(SolveOptions, Normalize, Backend)> {
    let method: Method = parse(method).map_err(to_py)?;
    let normalize: Normalize = parse(normalize).map_err(to_py)?;
    let backend: Backend = parse(backend).map_err(to_py)?;
    Ok((SolveOptions { method, tol, max_iter }, normalize, backend))
}

/// Reads the inputs into this thread's buffers, validates them and hands the batch to `run` (which gets the
/// batch back into the buffers when done).
#[allow(clippy::too_many_arguments)]
fn with_batch<T: Precision, R>(
    base: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    tau: &Bound<'_, PyAny>,
    normalize: Normalize,
    names: Option<Vec<String>>,
    run: impl FnOnce(&Batch<T>, bool) -> PyResult<R>,
) -> PyResult<R> {
    let base_dtype = if std::mem::size_of::<T>() == 4 { "float32" } else { "float64" };
    let base =
        base.cast::<PyArrayDyn<T>>().map_err(|_| value_error("base_logprobs: internal dtype mismatch"))?.readonly();
    let values = array_of::<T>(values, "values", base_dtype)?.readonly();
    let weights = array_of::<T>(weights, "weights", base_dtype)?.readonly();
    let (batched, rows, n, j) = shape_of(base.shape(), values.shape(), weights.shape())?;
    let (bs, vs, ws) =
        (contiguous(&base, "base_logprobs")?, contiguous(&values, "values")?, contiguous(&weights, "weights")?);
    let tau_arr;
    let tau_scalar: [T; 1];
    let ts: &[T] = if let Ok(t) = tau.cast::<PyFloat>() {
        tau_scalar = [T::of(t.value())];
        &tau_scalar
    } else if tau.cast::<numpy::PyUntypedArray>().is_ok() {
        tau_arr = array_of::<T>(tau, "tau", base_dtype)?.readonly();
        let ok = match tau_arr.shape() {
            [] => true,
            [b] => *b == rows,
            _ => false,
        };
        if !ok {
            return Err(shape_error("tau", &format!("[] or [B] = [{rows}]"), tau_arr.shape()));
        }
        contiguous(&tau_arr, "tau")?
    } else {
        tau_scalar = [T::of(tau.extract::<f64>().map_err(|_| {
            value_error(format!(
                "tau must be a number or an array of one per row, got {}",
                tau.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?)];
        &tau_scalar
    };
    let mut inp = T::with_scratch(std::mem::take);
    (inp.rows, inp.candidates, inp.principals) = (rows, n, j);
    for (dst, src) in [(&mut inp.base_logprobs, bs), (&mut inp.values, vs), (&mut inp.weights, ws), (&mut inp.tau, ts)]
    {
        dst.clear();
        dst.extend_from_slice(src);
    }
    inp.normalize = normalize;
    inp.names = names.unwrap_or_default();
    let batch = Batch::new(inp).map_err(to_py)?;
    let out = run(&batch, batched);
    T::with_scratch(|s| *s = batch.into_input());
    out
}

fn solution<T: Precision>(py: Python<'_>, s: RustSolution<T>, batched: bool) -> PyResult<Solution> {
    let (b, n, j) = (s.rows, s.candidates, s.principals);
    let arr = |v: Vec<T>, shape: &[usize]| -> PyResult<Py<PyAny>> {
        Ok(PyArray1::from_vec(py, v).reshape(shape)?.into_any().unbind())
    };
    Ok(if batched {
        Solution {
            policy: arr(s.policy, &[b, n])?,
            incentives: arr(s.incentives, &[b, j, n])?,
            payoffs: arr(s.payoffs, &[b, j])?,
            aggregate_incentive: arr(s.aggregate, &[b, n])?,
            iterations: PyArray1::from_vec(py, s.iterations).into_any().unbind(),
            residual: PyArray1::from_vec(py, s.residual).into_any().unbind(),
            converged: PyArray1::from_vec(py, s.converged).into_any().unbind(),
        }
    } else {
        Solution {
            policy: PyArray1::from_vec(py, s.policy).into_any().unbind(),
            incentives: arr(s.incentives, &[j, n])?,
            payoffs: PyArray1::from_vec(py, s.payoffs).into_any().unbind(),
            aggregate_incentive: PyArray1::from_vec(py, s.aggregate).into_any().unbind(),
            iterations: s.iterations[0].into_pyobject(py)?.into_any().unbind(),
            residual: s.residual[0].into_pyobject(py)?.into_any().unbind(),
            converged: pyo3::types::PyBool::new(py, s.converged[0]).to_owned().into_any().unbind(),
        }
    })
}

/// The precision of `base`: f32 or f64, else an error naming its dtype.
fn is_f32(base: &Bound<'_, PyAny>) -> PyResult<bool> {
    if base.cast::<PyArrayDyn<f32>>().is_ok() {
        Ok(true)
    } else if base.cast::<PyArrayDyn<f64>>().is_ok() {
        Ok(false)
    } else if base.cast::<numpy::PyUntypedArray>().is_ok() {
        Err(value_error(format!("base_logprobs must have dtype float32 or float64, got {}", dtype_name(base))))
    } else {
        Err(value_error(format!(
            "base_logprobs must be a numpy array (or an object with __dlpack__), got {}",
            base.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        )))
    }
}

/// Solves one game or a batch of games on numpy arrays (see the package's `cage.solve`).
#[pyfunction]
#[pyo3(signature = (base_logprobs, values, weights, tau, method, normalize, backend, tol=None, max_iter=None, names=None))]
#[allow(clippy::too_many_arguments)]
pub fn solve(
    py: Python<'_>,
    base_logprobs: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    tau: &Bound<'_, PyAny>,
    method: &str,
    normalize: &str,
    backend: &str,
    tol: Option<f64>,
    max_iter: Option<u32>,
    names: Option<Vec<String>>,
) -> PyResult<Solution> {
    let (opts, normalize, backend) = options(method, normalize, backend, tol, max_iter)?;
    fn go<T: Precision>(
        py: Python<'_>,
        args: (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
        normalize: Normalize,
        names: Option<Vec<String>>,
        opts: SolveOptions,
        backend: Backend,
    ) -> PyResult<Solution> {
        let (s, batched) = with_batch::<T, _>(args.0, args.1, args.2, args.3, normalize, names, |batch, batched| {
            Ok((py.detach(|| solve_with(backend, batch, &opts)).map_err(to_py)?, batched))
        })?;
        solution(py, s, batched)
    }
    let args = (base_logprobs, values, weights, tau);
    if is_f32(base_logprobs)? {
        go::<f32>(py, args, normalize, names, opts, backend)
    } else {
        go::<f64>(py, args, normalize, names, opts, backend)
    }
}

/// Seconds per direct Rust call (`Batch::new` from slices, then the CPU solver: what a Rust user writes)
/// on these inputs, the median over batches of 100 calls: the reference `python -m cage.bench` sets
/// `cage.solve` against.
#[pyfunction]
#[pyo3(signature = (base_logprobs, values, weights, tau, method, calls))]
pub fn rust_call_seconds(
    base_logprobs: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    tau: f64,
    method: &str,
    calls: usize,
) -> PyResult<f64> {
    let (opts, normalize, _) = options(method, "shift_min", "cpu", None, None)?;
    fn go<T: Precision>(
        a: (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
        tau: f64,
        normalize: Normalize,
        opts: SolveOptions,
        calls: usize,
    ) -> PyResult<f64> {
        let (base, values, weights) = (
            a.0.cast::<PyArrayDyn<T>>()?.readonly(),
            array_of::<T>(a.1, "values", "")?.readonly(),
            array_of::<T>(a.2, "weights", "")?.readonly(),
        );
        let (_, rows, n, j) = shape_of(base.shape(), values.shape(), weights.shape())?;
        let (bs, vs, ws) =
            (contiguous(&base, "base_logprobs")?, contiguous(&values, "values")?, contiguous(&weights, "weights")?);
        let call = || -> cage::Result<()> {
            let batch = Batch::new(BatchInput {
                rows,
                candidates: n,
                principals: j,
                base_logprobs: bs.to_vec(),
                values: vs.to_vec(),
                weights: ws.to_vec(),
                tau: vec![T::of(tau)],
                normalize,
                names: vec![],
            })?;
            std::hint::black_box(cage::solver::solve(&batch, &opts)?);
            Ok(())
        };
        let mut per_call = Vec::new();
        for _ in 0..(calls / 100).max(5) {
            let t = Instant::now();
            for _ in 0..100 {
                call().map_err(to_py)?;
            }
            per_call.push(t.elapsed().as_secs_f64() / 100.0);
        }
        per_call.sort_by(f64::total_cmp);
        Ok(per_call[per_call.len() / 2])
    }
    if is_f32(base_logprobs)? {
        go::<f32>((base_logprobs, values, weights), tau, normalize, opts, calls)
    } else {
        go::<f64>((base_logprobs, values, weights), tau, normalize, opts, calls)
    }
}
