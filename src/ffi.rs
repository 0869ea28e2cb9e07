//! The C ABI (`include/cage.h`, generated from this file by cbindgen): create a solver with options, solve a
//! batch from host pointers into caller-owned outputs, choose tokens on the result.
//!
//! Conventions, stated in the header too:
//! - every function returns a [`CageStatus`]; on failure [`cage_last_error`] gives a message naming the
//!   problem, kept per thread until that thread's next failing call;
//! - no panic crosses the boundary (each body runs under `catch_unwind`; a caught panic is `CAGE_ERR_INTERNAL`);
//! - null pointers, zero sizes and B x J x N products that overflow are rejected before anything is read;
//! - a `CageSolver` holds scratch buffers: use one from one thread at a time (distinct solvers are independent
//!   and may be used concurrently).

use crate::backend::Backend;
use crate::error::CageError;
use crate::problem::{Batch, BatchInput, Normalize};
use crate::real::Real;
use crate::sampling::{Choice, choose_row};
use crate::solver::{Method, SolveOptions};
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

pub mod bench;

/// Major version of the C ABI: incompatible changes increase it.
pub const CAGE_VERSION_MAJOR: u32 = 0;
/// Minor version of the C ABI: additions increase it.
pub const CAGE_VERSION_MINOR: u32 = 1;
/// Patch version.
pub const CAGE_VERSION_PATCH: u32 = 0;

/// Result of every C call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CageStatus {
    /// Success.
    CageOk = 0,
    /// A required pointer was null.
    CageErrNull = 1,
    /// A size was zero, a product of sizes overflowed, or a buffer length disagrees with the shape.
    CageErrShape = 2,
    /// An input value is out of its domain: NaN, infinity, tau <= 0, a negative weight or policy entry, an
    /// unknown enum value, more principals than the method supports (32 on the host, 8 on the device).
    CageErrInvalid = 3,
    /// The CUDA backend was requested but no usable GPU, driver or context is available.
    CageErrNoGpu = 4,
    /// A CUDA call failed.
    CageErrCuda = 5,
    /// A bug in cage (a caught panic): please report it with `cage_last_error()`.
    CageErrInternal = 6,
}

/// Which policy a solver computes (see docs/model.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CageMethod {
    /// The exact equilibrium.
    CageMethodExact = 0,
    /// The paper's Algorithm 1 run to convergence.
    CageMethodJacobi = 1,
    /// The authors' truncated solver (an approximation; on the CUDA backend a look-alike truncation).
    CageMethodPaper = 2,
    /// The base policy pi0.
    CageMethodBase = 3,
    /// The linear tilt softmax(log pi0 + sum_j v_j / tau).
    CageMethodLinear = 4,
}

/// Value preprocessing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CageNormalize {
    /// v = (q - min q) * w.
    CageNormalizeShiftMin = 0,
    /// v = q * w (q must be >= 0).
    CageNormalizeNone = 1,
}

/// Where a solver runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CageBackend {
    /// The CPU solvers.
    CageBackendCpu = 0,
    /// The CUDA kernels (an error when no GPU is usable).
    CageBackendCuda = 1,
    /// The GPU when usable, else the CPU.
    CageBackendAuto = 2,
    /// Host solves on the CPU and device solves on the host emulation of the CUDA kernels, where "device"
    /// pointers are host pointers: slow, for testing the device entry point on machines without a GPU.
    CageBackendEmulated = 3,
}

/// How [`cage_choose_tokens`] picks a token.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CageChoice {
    /// argmax pi.
    CageChoiceGreedy = 0,
    /// A sample by Gumbel-max with Philox keyed by (seed, row, step).
    CageChoiceGumbel = 1,
    /// A sample by exponential race with the same draws.
    CageChoiceRace = 2,
}

/// Solver options; start from [`cage_options_default`]. The enum-valued fields are plain `int32_t` so that an
/// out-of-range value coming from C is an error rather than undefined behaviour.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CageOptions {
    /// A `CageMethod`.
    pub method: i32,
    /// Agent temperature (> 0), used when a solve passes no per-row tau.
    pub tau: f64,
    /// A `CageNormalize`.
    pub normalize: i32,
    /// Tolerance relative to each row's value scale; 0 = the precision's default.
    pub tol: f64,
    /// Iteration limit; 0 = the method's default.
    pub max_iter: u32,
    /// A `CageBackend`.
    pub backend: i32,
    /// CUDA device ordinal (only 0 is supported by this version).
    pub device: i32,
}

/// The options of a solver, with the enums checked.
#[derive(Clone, Copy, Debug)]
struct Checked {
    method: Method,
    tau: f64,
    normalize: Normalize,
    tol: f64,
    max_iter: u32,
    backend: Backend,
    emulated: bool,
}

/// An opaque solver: options plus reused scratch buffers.
pub struct CageSolver {
    options: Checked,
    input: BatchInput<f32>,
    input64: BatchInput<f64>,
    /// The device of the copy-free entry point, opened on first use.
    gpu: Option<crate::gpu::Gpu>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &CageError) -> CageStatus {
    match e {
        CageError::Shape { .. } | CageError::EmptyCandidates { .. } => CageStatus::CageErrShape,
        CageError::NoGpu(_) => CageStatus::CageErrNoGpu,
        CageError::Cuda(_) => CageStatus::CageErrCuda,
        _ => CageStatus::CageErrInvalid,
    }
}

/// Runs `f`, turning errors and panics into a status and a thread-local message.
fn guard(f: impl FnOnce() -> Result<(), (CageStatus, String)>) -> CageStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CageStatus::CageOk,
        Ok(Err((status, msg))) => {
            set_error(&msg);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error (please report): {what}"));
            CageStatus::CageErrInternal
        }
    }
}

fn err(e: CageError) -> (CageStatus, String) {
    (status_of(&e), e.to_string())
}

fn null(what: &str) -> (CageStatus, String) {
    (CageStatus::CageErrNull, format!("{what} is a null pointer"))
}

/// Checks B, N, J and returns (B x N, B x J x N, B x J) without overflow.
fn sizes(rows: usize, n: usize, j: usize) -> Result<(usize, usize, usize), (CageStatus, String)> {
    if rows == 0 || n == 0 {
        return Err((CageStatus::CageErrShape, format!("rows ({rows}) and candidates ({n}) must be > 0")));
    }
    let overflow = || (CageStatus::CageErrShape, format!("B x J x N overflows ({rows} x {j} x {n})"));
    let bn = rows.checked_mul(n).ok_or_else(overflow)?;
    let bjn = bn.checked_mul(j).ok_or_else(overflow)?;
    let bj = rows.checked_mul(j).ok_or_else(overflow)?;
    // Slices may not exceed isize::MAX bytes.
    if bjn.checked_mul(8).is_none_or(|b| b > isize::MAX as usize) {
        return Err(overflow());
    }
    Ok((bn, bjn, bj))
}

/// # Safety
/// `p` must be null or point to `len` readable values.
unsafe fn input<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], (CageStatus, String)> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, and the caller promises `len` readable values.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// # Safety
/// `p` must be null or point to `len` writable values.
unsafe fn output<'a, T>(p: *mut T, len: usize) -> Option<&'a mut [T]> {
    // SAFETY: non-null, and the caller promises `len` writable values.
    (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// Version of the library as `major << 16 | minor << 8 | patch`; compare with the header's macros.
#[unsafe(no_mangle)]
pub extern "C" fn cage_version() -> u32 {
    CAGE_VERSION_MAJOR << 16 | CAGE_VERSION_MINOR << 8 | CAGE_VERSION_PATCH
}

/// The last error message of the calling thread ("" when none). Valid until the thread's next failing call.
#[unsafe(no_mangle)]
pub extern "C" fn cage_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Default options: exact method, tau 0.1, shift_min, default tolerance and limit, CPU backend, device 0.
#[unsafe(no_mangle)]
pub extern "C" fn cage_options_default() -> CageOptions {
    CageOptions {
        method: CageMethod::CageMethodExact as i32,
        tau: 0.1,
        normalize: CageNormalize::CageNormalizeShiftMin as i32,
        tol: 0.0,
        max_iter: 0,
        backend: CageBackend::CageBackendCpu as i32,
        device: 0,
    }
}

/// Creates a solver. On success `*out` owns it; release it with [`cage_solver_destroy`].
///
/// # Safety
/// `options` must be null or point to a valid `CageOptions`; `out` must be null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cage_solver_create(options: *const CageOptions, out: *mut *mut CageSolver) -> CageStatus {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        if options.is_null() {
            return Err(null("options"));
        }
        // SAFETY: checked non-null; the caller promises a valid CageOptions.
        let o = unsafe { *options };
        let bad = |what: &str, v: i32| (CageStatus::CageErrInvalid, format!("unknown {what} {v}"));
        // CageMethod's discriminants follow Method::ALL's order.
        let method = usize::try_from(o.method)
            .ok()
            .and_then(|i| Method::ALL.get(i).copied())
            .ok_or_else(|| bad("method", o.method))?;
        let normalize = match o.normalize {
            0 => Normalize::ShiftMin,
            1 => Normalize::None,
            v => return Err(bad("normalize", v)),
        };
        let (backend, emulated) = match o.backend {
            0 => (Backend::Cpu, false),
            1 => (Backend::Cuda, false),
            2 => (Backend::Auto, false),
            3 => (Backend::Cpu, true),
            v => return Err(bad("backend", v)),
        };
        if !crate::problem::valid_tau(o.tau) {
            return Err(err(CageError::BadTau(o.tau)));
        }
        if !(o.tol.is_finite() && o.tol >= 0.0) {
            return Err((CageStatus::CageErrInvalid, format!("tol must be a finite number >= 0, got {}", o.tol)));
        }
        if o.device != 0 {
            return Err((CageStatus::CageErrInvalid, format!("device {} is not supported (only 0)", o.device)));
        }
        if backend == Backend::Cuda {
            crate::gpu::cuda::probe().map_err(|e| (CageStatus::CageErrNoGpu, e.to_string()))?;
        }
        let options = Checked { method, tau: o.tau, normalize, tol: o.tol, max_iter: o.max_iter, backend, emulated };
        let solver =
            Box::new(CageSolver { options, input: BatchInput::default(), input64: BatchInput::default(), gpu: None });
        // SAFETY: checked non-null above.
        unsafe { *out = Box::into_raw(solver) };
        Ok(())
    })
}

/// Destroys a solver (null is ignored).
///
/// # Safety
/// `solver` must be null or a pointer from [`cage_solver_create`] not yet destroyed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cage_solver_destroy(solver: *mut CageSolver) {
    if !solver.is_null() {
        // SAFETY: the caller passes a pointer from Box::into_raw, once.
        drop(unsafe { Box::from_raw(solver) });
    }
}

/// Reuses `dst`'s allocation for a copy of `src`.
fn refill<T: Copy>(dst: &mut Vec<T>, src: &[T]) {
    dst.clear();
    dst.extend_from_slice(src);
}

trait Scratch<T> {
    fn scratch(&mut self) -> &mut BatchInput<T>;
}
impl Scratch<f32> for CageSolver {
    fn scratch(&mut self) -> &mut BatchInput<f32> {
        &mut self.input
    }
}
impl Scratch<f64> for CageSolver {
    fn scratch(&mut self) -> &mut BatchInput<f64> {
        &mut self.input64
    }
}

/// The body shared by the f32 and f64 entry points.
///
/// # Safety
/// As for [`cage_solve_f32`].
#[allow(clippy::too_many_arguments)]
unsafe fn solve_host<T: Real>(
    solver: *mut CageSolver,
    rows: usize,
    n: usize,
    j: usize,
    base: *const T,
    values: *const T,
    weights: *const T,
    tau: *const T,
    policy: *mut T,
    payoffs: *mut T,
    iterations: *mut u32,
    converged: *mut u8,
) -> CageStatus
where
    CageSolver: Scratch<T>,
{
    guard(|| {
        if solver.is_null() {
            return Err(null("solver"));
        }
        // SAFETY: non-null pointer from cage_solver_create, used by one thread at a time (documented).
        let s = unsafe { &mut *solver };
        let (bn, bjn, bj) = sizes(rows, n, j)?;
        // SAFETY (all four): the caller promises buffers of the documented lengths.
        let base = unsafe { input(base, bn, "base_logprobs") }?;
        let values = if j == 0 { &[][..] } else { unsafe { input(values, bjn, "values") }? };
        let weights = if j == 0 { &[][..] } else { unsafe { input(weights, bj, "weights") }? };
        let tau_in = if tau.is_null() { None } else { Some(unsafe { input(tau, rows, "tau") }?) };
        let policy = unsafe { output(policy, bn) }.ok_or_else(|| null("policy"))?;
        let o = s.options;
        let mut inp = std::mem::take(s.scratch());
        (inp.rows, inp.candidates, inp.principals) = (rows, n, j);
        refill(&mut inp.base_logprobs, base);
        refill(&mut inp.values, values);
        refill(&mut inp.weights, weights);
        match tau_in {
            Some(t) => refill(&mut inp.tau, t),
            None => refill(&mut inp.tau, &[T::of(o.tau)]),
        }
        inp.normalize = o.normalize;
        let batch = Batch::new(inp).map_err(err)?;
        let opts = SolveOptions {
            method: o.method,
            tol: (o.tol > 0.0).then_some(o.tol),
            max_iter: (o.max_iter > 0).then_some(o.max_iter),
        };
        let sol = crate::backend::solve_with(o.backend, &batch, &opts);
        *s.scratch() = batch.into_input();
        let sol = sol.map_err(err)?;
        policy.copy_from_slice(&sol.policy);
        // SAFETY (all three): optional outputs, null or of the documented lengths.
        if let Some(p) = unsafe { output(payoffs, bj) } {
            p.copy_from_slice(&sol.payoffs);
        }
        if let Some(it) = unsafe { output(iterations, rows) } {
            it.copy_from_slice(&sol.iterations);
        }
        if let Some(c) = unsafe { output(converged, rows) } {
            for (d, &ok) in c.iter_mut().zip(&sol.converged) {
                *d = ok as u8;
            }
        }
        Ok(())
    })
}

/// Solves a batch of B rows, N candidates, J principals from host memory (row-major, as in docs/model.md):
/// `base_logprobs` B x N (need not be normalised; -INFINITY excludes a candidate), `values` B x J x N raw
/// principal values q, `weights` B x J, `tau` B per-row temperatures or NULL for the solver's tau. Writes
/// `policy` B x N and, where not NULL, `payoffs` B x J, `iterations` B and `converged` B (0 or 1).
/// `values` and `weights` may be NULL when J = 0.
///
/// # Safety
/// Every non-null pointer must point to a buffer of the stated length; `solver` must come from
/// [`cage_solver_create`] and not be used by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cage_solve_f32(
    solver: *mut CageSolver,
    rows: usize,
    candidates: usize,
    principals: usize,
    base_logprobs: *const f32,
    values: *const f32,
    weights: *const f32,
    tau: *const f32,
    policy: *mut f32,
    payoffs: *mut f32,
    iterations: *mut u32,
    converged: *mut u8,
) -> CageStatus {
    // SAFETY: forwarded contract.
    unsafe {
        solve_host(
            solver,
            rows,
            candidates,
            principals,
            base_logprobs,
            values,
            weights,
            tau,
            policy,
            payoffs,
            iterations,
            converged,
        )
    }
}

/// [`cage_solve_f32`] in double precision.
///
/// # Safety
/// As for [`cage_solve_f32`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cage_solve_f64(
    solver: *mut CageSolver,
    rows: usize,
    candidates: usize,
    principals: usize,
    base_logprobs: *const f64,
    values: *const f64,
    weights: *const f64,
    tau: *const f64,
    policy: *mut f64,
    payoffs: *mut f64,
    iterations: *mut u32,
    converged: *mut u8,
) -> CageStatus {
    // SAFETY: forwarded contract.
    unsafe {
        solve_host(
            solver,
            rows,
            candidates,
            principals,
            base_logprobs,
            values,
            weights,
            tau,
            policy,
            payoffs,
            iterations,
            converged,
        )
    }
}

/// A `CageChoice` value from C; out-of-range values are errors.
fn choice_of(code: i32) -> Result<Choice, (CageStatus, String)> {
    match code {
        0 => Ok(Choice::Greedy),
        1 => Ok(Choice::Gumbel),
        2 => Ok(Choice::Race),
        c => Err((CageStatus::CageErrInvalid, format!("unknown token choice {c}"))),
    }
}

/// The solver's device, opened on first use: device pointers need a solver with backend CUDA or AUTO (or the
/// emulation, for tests).
fn solver_gpu(s: &mut CageSolver) -> Result<&mut crate::gpu::Gpu, (CageStatus, String)> {
    if s.gpu.is_none() {
        let gpu = match (s.options.emulated, s.options.backend) {
            (true, _) => crate::gpu::Gpu::emulated(),
            (false, Backend::Cpu) => {
                return Err((
                    CageStatus::CageErrInvalid,
                    "device pointers need a solver with backend CUDA or AUTO (this one is CPU)".into(),
                ));
            }
            (false, _) => crate::gpu::Gpu::cuda(0).map_err(err)?,
        };
        s.gpu = Some(gpu);
    }
    s.gpu.as_mut().ok_or_else(|| (CageStatus::CageErrInternal, "no device".into()))
}

/// Solves a batch whose buffers are already on the GPU, on the caller's CUDA stream, copying nothing: the exact
/// method only, f32. `d_values` B x J x N are the game values v >= 0 with the preprocessing and weights already
/// applied (v = (q - min q) w for shift_min), `d_tau` B per-row temperatures, `d_base_logprobs` B x N. Writes
/// `d_policy` B x N and, where not NULL, `d_payoffs` B x J and `d_stats` B x 3 (iterations, relative residual,
/// converged as 0 or 1, all f32). Returns once the kernel is queued: synchronise `stream` before reading the
/// outputs. `stream` may be NULL (the solver's own stream) and must belong to the device's primary context
/// (the CUDA runtime's default context). J must be 1..8. Needs a solver created with backend CUDA or AUTO on a
/// machine with a GPU (EMULATED for tests).
/// The device inputs are not validated before the launch (that would cost a pass over device memory and a
/// copy back on every call); instead the kernel flags them itself: a row with a value that is NaN, infinite or
/// negative, a tau that is NaN, infinite or <= 0, or a base log-probability that is NaN or +INFINITY gets NaN
/// payoffs and a NaN policy (0 at excluded candidates), and its stats say residual NaN, converged 0. A row
/// whose candidates are all excluded gets policy 0 and converged 0. Other rows are unaffected. Check the
/// stats: converged 1 means the row's inputs were valid and the tolerance was met.
///
/// # Safety
/// Every non-null pointer must be device memory of the stated length, valid until the kernel has finished.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cage_solve_device_f32(
    solver: *mut CageSolver,
    rows: usize,
    candidates: usize,
    principals: usize,
    d_base_logprobs: *const f32,
    d_values: *const f32,
    d_tau: *const f32,
    d_policy: *mut f32,
    d_payoffs: *mut f32,
    d_stats: *mut f32,
    stream: *mut std::ffi::c_void,
) -> CageStatus {
    guard(|| {
        if solver.is_null() {
            return Err(null("solver"));
        }
        // SAFETY: non-null pointer from cage_solver_create, used by one thread at a time (documented).
        let s = unsafe { &mut *solver };
        sizes(rows, candidates, principals)?;
        for (what, null_ptr) in [
            ("d_base_logprobs", d_base_logprobs.is_null()),
            ("d_values", d_values.is_null()),
            ("d_tau", d_tau.is_null()),
            ("d_policy", d_policy.is_null()),
        ] {
            if null_ptr {
                return Err(null(what));
            }
        }
        if s.options.method != Method::Exact {
            return Err((CageStatus::CageErrInvalid, "the device entry point runs the exact method only".into()));
        }
        let mut opts = crate::gpu::EqOptions::default();
        if s.options.tol > 0.0 {
            opts.tol = s.options.tol;
        }
        if s.options.max_iter > 0 {
            opts.max_iter = s.options.max_iter;
        }
        let job = crate::gpu::DeviceEquilibrium {
            rows,
            candidates,
            principals,
            base: d_base_logprobs as u64,
            values: d_values as u64,
            tau: d_tau as u64,
            policy: d_policy as u64,
            payoffs: d_payoffs as u64,
            stats: d_stats as u64,
            stream: stream as usize,
        };
        let gpu = solver_gpu(s)?;
        // SAFETY: the caller promises device buffers of the documented sizes on this device's context.
        unsafe { gpu.equilibrium_device(&job, &opts) }.map_err(err)
    })
}

/// One decoding step on logits that are already on the GPU, copying back only the tokens: top-k candidates of
/// the base logits, each principal's value q = log pi_ARM - log pi_ref at them (`shift_min`, then the weight),
/// the exact equilibrium at the solver's tau (or `tau`, B per-row values on the host, where not NULL), and the
/// token choice (`choice`: a `CageChoice`; sampled draws keyed by (seed, row, step)). `d_logits` is B x V,
/// `d_arm` B x J x V and `d_reference` B x V, all f32 device memory of the solver's GPU (unused when J = 0);
/// `weights` B x J on the host. Writes B token ids to `tokens` and, where not NULL, B flags (1: the row's
/// equilibrium converged) to `converged`. Runs on the solver's own stream: the stream that produced the logits
/// must be synchronised first. Returns after the tokens are on the host. A row with NaN in its logits, ARM
/// logits or reference logits is an error (CAGE_ERR_INVALID) that names it. J must be 0..8 and
/// 1 <= k <= min(1024, V).
///
/// # Safety
/// The device pointers must hold the stated number of floats on the solver's device; `weights`, `tau`,
/// `tokens` and `converged` the stated lengths on the host.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cage_decode_step_device_f32(
    solver: *mut CageSolver,
    rows: usize,
    vocab: usize,
    principals: usize,
    k: usize,
    d_logits: *const f32,
    d_arm: *const f32,
    d_reference: *const f32,
    weights: *const f32,
    tau: *const f32,
    choice: i32,
    seed: u64,
    step: u32,
    tokens: *mut u32,
    converged: *mut u8,
) -> CageStatus {
    guard(|| {
        if solver.is_null() {
            return Err(null("solver"));
        }
        // SAFETY: non-null pointer from cage_solver_create, used by one thread at a time (documented).
        let s = unsafe { &mut *solver };
        // Checks B, V > 0 and that B x J x V fits.
        let (_, _, bj) = sizes(rows, vocab, principals)?;
        let w: &[f32] = if principals == 0 {
            &[]
        } else {
            // SAFETY: the caller promises B x J floats.
            unsafe { input(weights, bj, "weights") }?
        };
        let taus: Vec<f32> = if tau.is_null() {
            vec![s.options.tau as f32; rows]
        } else {
            // SAFETY: the caller promises B floats.
            unsafe { input(tau, rows, "tau") }?.to_vec()
        };
        let choice = choice_of(choice)?;
        // SAFETY: the caller promises B writable values.
        let t = unsafe { output(tokens, rows) }.ok_or_else(|| null("tokens"))?;
        let gpu = solver_gpu(s)?;
        let req = crate::gpu::DeviceStep {
            rows,
            vocab,
            principals,
            k,
            logits: d_logits as u64,
            arm: d_arm as u64,
            reference: d_reference as u64,
            weights: w,
            tau: &taus,
            choice,
            seed,
            step,
        };
        // SAFETY: the caller promises device buffers of the documented sizes on this device.
        let out = unsafe { gpu.decode_step_device(&req) }.map_err(err)?;
        t.copy_from_slice(&out.tokens);
        // SAFETY: as above, where given.
        if let Some(c) = unsafe { output(converged, rows) } {
            for (c, &ok) in c.iter_mut().zip(&out.converged) {
                *c = u8::from(ok);
            }
        }
        Ok(())
    })
}

/// Chooses one token per row of a B x N policy: greedy, or sampled with Philox keyed by (seed, row, step),
/// the same draws as the CUDA kernel. Writes the candidate index of each row to `tokens` (B values). Rows need
/// not sum to 1 (sampling is proportional to the entries). Checked before anything is written: every entry is
/// finite and >= 0, else CAGE_ERR_INVALID naming the row and candidate; every row has an entry > 0, else
/// CAGE_ERR_INVALID naming the row; B and N are at most 2^32 - 1 (row indices key the draws and tokens are
/// 32-bit), else CAGE_ERR_SHAPE.
///
/// # Safety
/// `policy` must hold B x N floats and `tokens` B writable values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cage_choose_tokens(
    policy: *const f32,
    rows: usize,
    candidates: usize,
    choice: i32,
    seed: u64,
    step: u32,
    tokens: *mut u32,
) -> CageStatus {
    guard(|| {
        let (bn, _, _) = sizes(rows, candidates, 0)?;
        if u32::try_from(rows).is_err() || u32::try_from(candidates).is_err() {
            return Err((
                CageStatus::CageErrShape,
                format!("rows ({rows}) and candidates ({candidates}) must be below 2^32 (32-bit row keys and tokens)"),
            ));
        }
        // SAFETY: the caller promises the documented lengths.
        let pi = unsafe { input(policy, bn, "policy") }?;
        let out = unsafe { output(tokens, rows) }.ok_or_else(|| null("tokens"))?;
        let choice = choice_of(choice)?;
        // The whole policy first, so that a bad row writes no token. A pass of comparisons: the choice itself
        // costs more.
        for (r, row) in pi.chunks_exact(candidates).enumerate() {
            if let Some(a) = row.iter().position(|p| !(p.is_finite() && *p >= 0.0)) {
                return Err((
                    CageStatus::CageErrInvalid,
                    format!("policy row {r} candidate {a} is {}: entries must be finite and >= 0", row[a]),
                ));
            }
            if !row.iter().any(|p| *p > 0.0) {
                return Err((
                    CageStatus::CageErrInvalid,
                    format!("policy row {r} has no candidate with probability > 0"),
                ));
            }
        }
        for ((r, row), t) in pi.chunks_exact(candidates).enumerate().zip(out.iter_mut()) {
            *t = choose_row(row, choice, seed, r as u32, step).map_err(err)? as u32;
        }
        Ok(())
    })
}
