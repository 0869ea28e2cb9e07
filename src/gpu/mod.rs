//! CUDA backend: the kernels of `kernels/` (compiled and embedded by build.rs), driven through a thin host
//! layer that is the same for a real GPU ([`cuda::Cuda`]) and for the host emulation ([`emu::Emulator`]) that
//! runs the unchanged kernel sources on the CPU in tests.
//!
//! - [`Gpu`]: one device, its kernels loaded on first use, and device buffers allocated once per shape and
//!   reused (a decoding loop calls the same shapes every step, so steady state allocates nothing).
//! - [`Backend`] and [`solve_with`]: the solver API with a choice of `cpu`, `cuda` or `auto` (the GPU when one
//!   is usable, else the CPU). No GPU, no driver or a failed context is an ordinary [`CageError`], never a panic.
//!
//! Kernels: [`Gpu::equilibrium`] (the batched exact equilibrium, also replayable as a CUDA graph),
//! [`Gpu::jacobi`] (Algorithm 1: the `jacobi` and `paper` methods), [`Gpu::candidates`] (fused log-softmax and
//! top-k), [`Gpu::principal_values`] (ARM values at the candidates with the preprocessing) and [`Gpu::choose`]
//! (greedy or sampled token choice with a counter-based RNG); [`Gpu::decode_step_device`] chains them on
//! device-resident logits. See docs/architecture.md.

pub mod bench;
pub mod cuda;
pub mod device;
pub mod emu;
pub mod step;

use crate::error::{CageError, Result};
use crate::problem::{Batch, Normalize};
use crate::solution::Solution;
use crate::solver::jacobi::{Inner, JacobiOptions};
use device::{DevPtr, Device};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

/// One compiled kernel source file (`kernels/NAME.cu`) as embedded by build.rs.
#[derive(Debug)]
pub struct KernelModule {
    /// File stem of the source.
    pub name: &'static str,
    /// Its `extern "C"` entry points.
    pub kernels: &'static [&'static str],
    /// compute_80 PTX from nvcc (None when the build had no nvcc).
    pub ptx: Option<&'static str>,
    /// sm_90a cubin from nvcc, used on Hopper GPUs.
    pub cubin_sm90a: Option<&'static [u8]>,
    /// The source with the project's headers inlined, for NVRTC.
    pub source: &'static str,
}

mod images {
    use super::KernelModule;
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
pub use images::{MODULES, NVCC};
pub use step::{DeviceStep, StepOutput};

/// Storage type of the principals' values on the device (the kernels always compute in f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueType {
    /// 4 bytes per value.
    #[default]
    F32,
    /// 2 bytes per value: halves the traffic of full-vocabulary rows; values are rounded to 8 bits of mantissa.
    Bf16,
}

impl ValueType {
    fn tag(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }
}

/// Options of [`Gpu::equilibrium`].
#[derive(Clone, Copy, Debug)]
pub struct EqOptions {
    /// Tolerance on max_j |T(u)_j - u_j| relative to the row's value scale max(max v, tau).
    pub tol: f64,
    /// Limit on passes over a row.
    pub max_iter: u32,
    /// Storage type of the values on the device.
    pub values: ValueType,
    /// Whether to write the per-principal incentives y_j (B x J x N; costs one more write of that size).
    pub incentives: bool,
    /// Stage rows in shared memory: `None` when they fit, `Some(false)` never (every pass reads global memory),
    /// `Some(true)` always (an error when a row does not fit).
    pub stage: Option<bool>,
    /// Rows too large for one block's shared memory are split across a thread-block cluster (sm_90, J <= 4):
    /// `None` picks the smallest cluster of 2, 4 or 8 blocks whose slices fit where the device supports it,
    /// `Some(1)` never splits, `Some(c)` always splits into `c` blocks (an error where that cannot run).
    pub cluster: Option<u32>,
}

impl Default for EqOptions {
    fn default() -> Self {
        Self {
            tol: 1e-5,
            max_iter: crate::solver::EXACT_MAX_ITER,
            values: ValueType::F32,
            incentives: true,
            stage: None,
            cluster: None,
        }
    }
}

/// Full-vocabulary logits of B rows in one of the types language models emit.
#[derive(Clone, Copy, Debug)]
pub enum Logits<'a> {
    /// f32.
    F32(&'a [f32]),
    /// bf16.
    Bf16(&'a [half::bf16]),
    /// f16.
    F16(&'a [half::f16]),
}

impl Logits<'_> {
    fn len(&self) -> usize {
        match self {
            Logits::F32(x) => x.len(),
            Logits::Bf16(x) => x.len(),
            Logits::F16(x) => x.len(),
        }
    }
    fn tag(&self) -> &'static str {
        match self {
            Logits::F32(_) => "f32",
            Logits::Bf16(_) => "bf16",
            Logits::F16(_) => "f16",
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Logits::F32(x) => bytemuck::cast_slice(x),
            Logits::Bf16(x) => bytemuck::cast_slice(x),
            Logits::F16(x) => bytemuck::cast_slice(x),
        }
    }
    /// Entry `i` as f32.
    fn get(&self, i: usize) -> f32 {
        match self {
            Logits::F32(x) => x[i],
            Logits::Bf16(x) => x[i].to_f32(),
            Logits::F16(x) => x[i].to_f32(),
        }
    }
}

/// The candidates of every row: ids and log pi0 (normalised over the full row), B x k, plus each row's
/// log-sum-exp.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates {
    /// Candidates per row.
    pub k: usize,
    /// B x k token ids (top-k: most likely first, ties by lower id; all tokens: in id order).
    pub ids: Vec<u32>,
    /// B x k log pi0.
    pub logp: Vec<f32>,
    /// B log-sum-exp of the logits.
    pub lse: Vec<f32>,
}

/// How [`Gpu::choose`] picks the token from the final policy: the CPU's choices, with the same draws.
pub use crate::sampling::Choice;

/// The mode code of kernels/choose.cu (CHOOSE_GREEDY, CHOOSE_GUMBEL, CHOOSE_RACE).
fn choice_code(c: Choice) -> i32 {
    match c {
        Choice::Greedy => 0,
        Choice::Gumbel => 1,
        Choice::Race => 2,
    }
}

/// Largest J the equilibrium kernels are instantiated for.
pub const MAX_PRINCIPALS: usize = 8;
/// Largest k of the top-k kernel (larger candidate sets use the whole vocabulary).
pub const MAX_TOP_K: usize = 1024;

/// Caller-owned device buffers of [`Gpu::equilibrium_device`] (addresses as integers; 0 = not given).
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceEquilibrium {
    /// B.
    pub rows: usize,
    /// N.
    pub candidates: usize,
    /// J (1 to [`MAX_PRINCIPALS`]).
    pub principals: usize,
    /// B x N log pi0 (f32).
    pub base: DevPtr,
    /// B x J x N game values v >= 0 (f32): preprocessing and weights already applied.
    pub values: DevPtr,
    /// B temperatures (f32).
    pub tau: DevPtr,
    /// B x N output policy (f32).
    pub policy: DevPtr,
    /// B x J output payoffs (f32), or 0.
    pub payoffs: DevPtr,
    /// B x 3 output stats (iterations, residual, converged; f32), or 0.
    pub stats: DevPtr,
    /// The caller's `CUstream`, or 0 for the device's own stream.
    pub stream: usize,
}

/// Shared memory kept free for the equilibrium kernels' static arrays when sizing the dynamic part.
const STATIC_SMEM_RESERVE: usize = 16 * 1024;

/// Threads per block of the cluster-split equilibrium kernels (EQC_THREADS in kernels/equilibrium.cu).
const EQC_THREADS: u32 = 512;
/// Most principals the cluster-split kernels take (their accumulators must stay in registers).
pub const MAX_CLUSTER_PRINCIPALS: usize = 4;

/// Floats of the cluster exchange area of the split kernels (eq_exchange_floats in kernels/equilibrium.cu).
fn exchange_floats(j: usize) -> usize {
    (2 * (2 + j * (j + 2)) + j).next_multiple_of(4)
}

/// Launch shape of the equilibrium kernel.
#[derive(Clone, Copy, Debug)]
struct EqShape {
    stage: bool,
    threads: u32,
    smem: u32,
    /// Blocks per row (a thread-block cluster when > 1).
    cluster: u32,
}

/// An equilibrium prepared on the device: inputs uploaded, outputs allocated. [`Gpu::run_equilibrium`]
/// launches it (benchmarks time that), [`Gpu::fetch_equilibrium`] copies the solution back.
#[derive(Clone, Copy, Debug)]
pub struct EqJob {
    rows: usize,
    n: usize,
    j: usize,
    j_eff: usize,
    opts: EqOptions,
    shape: EqShape,
    base: DevPtr,
    values: DevPtr,
    tau: DevPtr,
    pi: DevPtr,
    agg: DevPtr,
    y: DevPtr,
    payoff: DevPtr,
    stats: DevPtr,
}

impl EqJob {
    /// Bytes one pass must read and the outputs write (the roofline's numerator).
    pub fn bytes_moved(&self) -> usize {
        let (b, n, j) = (self.rows, self.n, self.j_eff);
        let out = b * n * 8 + if self.opts.incentives { b * j * n * 4 } else { 0 };
        b * n * 4 + b * j * n * self.opts.values.size() + out
    }
}

/// A candidate selection prepared on the device (see [`Gpu::prepare_candidates`]).
#[derive(Clone, Copy, Debug)]
pub struct CandJob {
    rows: usize,
    vocab: usize,
    k: Option<usize>,
    tag: &'static str,
    x: DevPtr,
    logp: DevPtr,
    lse: DevPtr,
    ids: DevPtr,
}

impl CandJob {
    /// Bytes one launch must move at least: the logits once, the candidates out.
    pub fn bytes_moved(&self) -> usize {
        let elem = if self.tag == "f32" { 4 } else { 2 };
        let kk = self.k.unwrap_or(self.vocab);
        self.rows * self.vocab * elem + self.rows * kk * if self.k.is_some() { 8 } else { 4 }
    }
}

/// A device with its loaded kernels and reusable buffers.
pub struct Gpu {
    dev: Box<dyn Device>,
    bufs: HashMap<&'static str, (DevPtr, usize)>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        for (_, (p, _)) in self.bufs.drain() {
            self.dev.free(p);
        }
    }
}

fn bad(msg: String) -> CageError {
    CageError::InvalidArgument(msg)
}

fn check_i32(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| bad(format!("{what} = {x} is too large for the CUDA kernels")))
}

fn as_param<T>(x: &mut T) -> *mut c_void {
    x as *mut T as *mut c_void
}

impl Gpu {
    /// The host emulation (always available; slow).
    pub fn emulated() -> Self {
        Self { dev: Box::new(emu::Emulator::new()), bufs: HashMap::new() }
    }

    /// CUDA GPU `ordinal`; an error when there is no usable GPU.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Self { dev: Box::new(cuda::Cuda::open(ordinal)?), bufs: HashMap::new() })
    }

    /// The underlying device.
    pub fn device(&mut self) -> &mut dyn Device {
        self.dev.as_mut()
    }

    /// A description of the device.
    pub fn describe(&self) -> String {
        self.dev.describe()
    }

    /// Whether this runs on the host emulation.
    pub fn is_emulated(&self) -> bool {
        self.dev.is_emulated()
    }

    /// Device buffer `name` of at least `bytes`, reallocated only when it must grow.
    pub fn buffer(&mut self, name: &'static str, bytes: usize) -> Result<DevPtr> {
        if let Some(&(p, cap)) = self.bufs.get(name) {
            if cap >= bytes {
                return Ok(p);
            }
            self.dev.free(p);
            self.bufs.remove(name);
        }
        let p = self.dev.alloc(bytes.max(16))?;
        self.bufs.insert(name, (p, bytes.max(16)));
        Ok(p)
    }

    fn put<T: bytemuck::Pod>(&mut self, name: &'static str, data: &[T]) -> Result<DevPtr> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let p = self.buffer(name, bytes.len())?;
        self.dev.upload(p, bytes)?;
        Ok(p)
    }

    fn get<T: bytemuck::Pod + Default>(&mut self, p: DevPtr, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.dev.download(p, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// Uploads `batch` and allocates the outputs of its equilibrium.
    pub fn prepare_equilibrium(&mut self, batch: &Batch<f32>, opts: &EqOptions) -> Result<EqJob> {
        let (rows, n, j) = (batch.rows(), batch.candidates(), batch.principals());
        if j > MAX_PRINCIPALS {
            return Err(bad(format!("the CUDA equilibrium supports up to {MAX_PRINCIPALS} principals, got {j}")));
        }
        if !(opts.tol.is_finite() && opts.tol > 0.0) {
            return Err(bad(format!("tolerance must be a finite number > 0, got {}", opts.tol)));
        }
        if opts.max_iter == 0 {
            return Err(bad("max_iter must be >= 1".into()));
        }
        check_i32("candidates", n)?;
        check_i32("rows", rows)?;
        // With no principal the equilibrium is pi0: play it with one principal of value 0 (who never pays).
        let j_eff = j.max(1);
        let base = self.put("eq.base", batch.base())?;
        let values = match (opts.values, j) {
            (ValueType::F32, 0) => self.put("eq.values", &vec![0f32; rows * n])?,
            (ValueType::F32, _) => self.put("eq.values", batch.values())?,
            (ValueType::Bf16, _) => {
                let v: Vec<half::bf16> = if j == 0 {
                    vec![half::bf16::ZERO; rows * n]
                } else {
                    batch.values().iter().map(|&x| half::bf16::from_f32(x)).collect()
                };
                self.put("eq.values", &v)?
            }
        };
        let tau = self.put("eq.tau", batch.tau())?;
        let pi = self.buffer("eq.pi", rows * n * 4)?;
        let agg = self.buffer("eq.agg", rows * n * 4)?;
        let y = if opts.incentives { self.buffer("eq.y", rows * j_eff * n * 4)? } else { 0 };
        let payoff = self.buffer("eq.payoff", rows * j_eff * 4)?;
        let stats = self.buffer("eq.stats", rows * 3 * 4)?;
        let shape = self.equilibrium_shape(n, j_eff, opts)?;
        Ok(EqJob { rows, n, j, j_eff, opts: *opts, shape, base, values, tau, pi, agg, y, payoff, stats })
    }

    /// How the equilibrium of this job is launched: staged or not, and split across a cluster of how many
    /// blocks (1: one block per row).
    pub fn equilibrium_launch(job: &EqJob) -> (bool, u32) {
        (job.shape.stage, job.shape.cluster)
    }

    /// The launch shape of the equilibrium kernel for rows of `n` candidates and `j_eff` principals: staged in
    /// shared memory when a row fits one block's, else split across a cluster when the device can, else read
    /// from global memory on every pass.
    fn equilibrium_shape(&mut self, n: usize, j_eff: usize, opts: &EqOptions) -> Result<EqShape> {
        let vsize = opts.values.size();
        let stage_bytes = (n * 4).next_multiple_of(16) + j_eff * n * vsize;
        // Dynamic plus static shared memory must fit the block's limit: keep room for the kernels' static
        // arrays (13 KB at J = 8: the reduction scratch and the Newton control).
        let max = self.dev.max_dynamic_smem().saturating_sub(STATIC_SMEM_RESERVE);
        let fits = stage_bytes <= max;
        let threads = n.div_ceil(2).next_multiple_of(32).clamp(32, 256) as u32;
        let single =
            |stage: bool| EqShape { stage, threads, smem: if stage { stage_bytes as u32 } else { 0 }, cluster: 1 };
        // Bytes per block of a split into `c`: the exchange area, then the block's slice (see eq_row).
        let split_bytes = |c: usize| {
            let chunk = n.div_ceil(c).next_multiple_of(4);
            exchange_floats(j_eff) * 4 + (chunk * 4).next_multiple_of(16) + j_eff * chunk * vsize
        };
        let split_kernel = format!("cage_eqc_{}_j{j_eff}", opts.values.tag());
        let cluster_ok = |dev: &mut dyn Device, c: u32| {
            let bytes = split_bytes(c as usize);
            j_eff <= MAX_CLUSTER_PRINCIPALS
                && bytes <= max
                && dev.supports_cluster(&split_kernel, EQC_THREADS, c, bytes as u32)
        };
        let split =
            |c: u32| EqShape { stage: true, threads: EQC_THREADS, smem: split_bytes(c as usize) as u32, cluster: c };
        match (opts.cluster, opts.stage) {
            (Some(0), _) => Err(bad("a cluster of 0 blocks".into())),
            (Some(c), Some(false)) if c > 1 => Err(bad(format!(
                "a split across {c} blocks stages rows in shared memory: stage = false contradicts it"
            ))),
            (Some(c), _) if c > 1 => {
                if !cluster_ok(self.dev.as_mut(), c) {
                    return Err(bad(format!(
                        "{}: cannot split rows of {n} candidates and {j_eff} principals across a cluster of {c} \
                         blocks ({} bytes of shared memory each; clusters need sm_90, at most {MAX_CLUSTER_PRINCIPALS} \
                         principals, at most 8 blocks)",
                        self.dev.describe(),
                        split_bytes(c as usize)
                    )));
                }
                Ok(split(c))
            }
            (_, Some(false)) => Ok(single(false)),
            _ if fits => Ok(single(true)),
            (cluster, stage) => {
                // Too large for one block: the smallest cluster that fits, unless the caller forbade a split.
                if cluster.is_none()
                    && let Some(c) = [2u32, 4, 8].into_iter().find(|&c| cluster_ok(self.dev.as_mut(), c))
                {
                    return Ok(split(c));
                }
                if stage == Some(true) {
                    let why =
                        if cluster.is_none() { "no cluster split of it fits" } else { "cluster = 1 forbids a split" };
                    return Err(bad(format!(
                        "a row of {n} candidates and {j_eff} principals needs {stage_bytes} bytes of shared memory; \
                         the device leaves {max} per block for a staged row and {why}"
                    )));
                }
                Ok(single(false))
            }
        }
    }

    /// The exact equilibrium on buffers the caller owns, launched on the caller's stream (`stream` = 0: the
    /// device's own) with nothing copied: the C ABI's `cage_solve_device_f32`. Outputs the policy and, where
    /// given, the payoffs and per-row stats (iterations, residual, converged as floats); the aggregate incentive
    /// and unrequested outputs go to reused internal buffers. Returns without waiting for the kernel.
    ///
    /// # Safety
    /// Every non-zero pointer of `e` must be device memory of this device's context holding the documented
    /// number of f32 values (`base`: rows x n, `values`: rows x j x n game values v >= 0, `tau`: rows, `policy`:
    /// rows x n, `payoffs`: rows x j, `stats`: rows x 3), valid until the kernel has finished on `stream`, which
    /// must belong to this device's context. The inputs are not checked on the device.
    pub unsafe fn equilibrium_device(&mut self, e: &DeviceEquilibrium, opts: &EqOptions) -> Result<()> {
        let (rows, n, j) = (e.rows, e.candidates, e.principals);
        if j == 0 || j > MAX_PRINCIPALS {
            return Err(bad(format!("the device entry point supports 1 to {MAX_PRINCIPALS} principals, got {j}")));
        }
        if opts.values != ValueType::F32 {
            return Err(bad("the device entry point takes f32 values".into()));
        }
        if !(opts.tol.is_finite() && opts.tol > 0.0) || opts.max_iter == 0 {
            return Err(bad(format!(
                "tolerance must be > 0 and max_iter >= 1, got {} and {}",
                opts.tol, opts.max_iter
            )));
        }
        if rows == 0 || n == 0 {
            return Err(bad(format!("rows ({rows}) and candidates ({n}) must be > 0")));
        }
        check_i32("candidates", n)?;
        check_i32("rows", rows)?;
        for (what, p) in [("base_logprobs", e.base), ("values", e.values), ("tau", e.tau), ("policy", e.policy)] {
            if p == 0 {
                return Err(bad(format!("device pointer {what} is null")));
            }
        }
        let shape = self.equilibrium_shape(n, j, opts)?;
        let agg = self.buffer("dev.agg", rows * n * 4)?;
        let payoff = if e.payoffs != 0 { e.payoffs } else { self.buffer("dev.payoff", rows * j * 4)? };
        let stats = if e.stats != 0 { e.stats } else { self.buffer("dev.stats", rows * 3 * 4)? };
        // Internal buffers are ordered on the device's own stream: let that stream drain before a foreign one
        // writes into them.
        self.dev.synchronize()?;
        let job = EqJob {
            rows,
            n,
            j,
            j_eff: j,
            opts: EqOptions { incentives: false, ..*opts },
            shape,
            base: e.base,
            values: e.values,
            tau: e.tau,
            pi: e.policy,
            agg,
            y: 0,
            payoff,
            stats,
        };
        self.launch_equilibrium(&job, e.stream)
    }

    /// Launches a prepared equilibrium (asynchronously on a GPU).
    pub fn run_equilibrium(&mut self, job: &EqJob) -> Result<()> {
        self.launch_equilibrium(job, 0)
    }

    fn launch_equilibrium(&mut self, job: &EqJob, stream: usize) -> Result<()> {
        let sh = job.shape;
        let kind = if sh.cluster > 1 { "eqc" } else { "eq" };
        let name = format!("cage_{kind}_{}_j{}", job.opts.values.tag(), job.j_eff);
        let (mut base, mut values, mut tau) = (job.base, job.values, job.tau);
        let mut n = job.n as i32;
        let mut tol = job.opts.tol as f32;
        let mut max_iter = job.opts.max_iter.min(i32::MAX as u32) as i32;
        let mut cache = sh.stage as i32;
        let (mut pi, mut agg, mut y, mut payoff, mut stats) = (job.pi, job.agg, job.y, job.payoff, job.stats);
        let mut params = [
            as_param(&mut base),
            as_param(&mut values),
            as_param(&mut tau),
            as_param(&mut n),
            as_param(&mut tol),
            as_param(&mut max_iter),
            as_param(&mut cache),
            as_param(&mut pi),
            as_param(&mut agg),
            as_param(&mut y),
            as_param(&mut payoff),
            as_param(&mut stats),
        ];
        // SAFETY: the parameter list matches EQ_PARAMS in kernels/equilibrium.cu and every buffer was sized by
        // prepare_equilibrium for this shape; the locals outlive the launch call, which copies them.
        unsafe {
            if sh.cluster > 1 {
                let grid = [job.rows as u32 * sh.cluster, 1, 1];
                self.dev.launch_cluster(stream, &name, grid, [sh.threads, 1, 1], sh.cluster, sh.smem, &mut params)
            } else {
                self.dev.launch_on(stream, &name, [job.rows as u32, 1, 1], [sh.threads, 1, 1], sh.smem, &mut params)
            }
        }
    }

    /// Records the launch of a prepared equilibrium as a CUDA graph, so that a decoding loop replays the step
    /// with one driver call ([`Gpu::run_graph`]); inputs are re-uploaded into the same buffers between steps.
    /// An error under the emulation (use [`Gpu::run_equilibrium`] there).
    pub fn capture_equilibrium(&mut self, job: &EqJob) -> Result<usize> {
        // Module loading and the shared-memory opt-in are not capturable: do them with a first real launch.
        self.run_equilibrium(job)?;
        self.dev.synchronize()?;
        self.dev.begin_capture()?;
        let launched = self.run_equilibrium(job);
        let graph = self.dev.end_capture();
        launched?;
        graph
    }

    /// Launches a graph of [`Gpu::capture_equilibrium`].
    pub fn run_graph(&mut self, graph: usize) -> Result<()> {
        self.dev.launch_graph(graph)
    }

    /// Copies the solution of a finished equilibrium back.
    pub fn fetch_equilibrium(&mut self, job: &EqJob) -> Result<Solution<f32>> {
        let (b, n, j) = (job.rows, job.n, job.j);
        let mut sol = Solution::zeros(b, n, j);
        sol.policy = self.get(job.pi, b * n)?;
        sol.aggregate = self.get(job.agg, b * n)?;
        if j > 0 {
            if job.opts.incentives {
                sol.incentives = self.get(job.y, b * j * n)?;
            }
            sol.payoffs = self.get(job.payoff, b * j)?;
        }
        let stats: Vec<f32> = self.get(job.stats, b * 3)?;
        for r in 0..b {
            sol.iterations[r] = stats[r * 3] as u32;
            sol.residual[r] = stats[r * 3 + 1] as f64;
            sol.converged[r] = stats[r * 3 + 2] != 0.0;
        }
        Ok(sol)
    }

    /// The exact equilibrium of every row of `batch` (f32 on the device; values stored as `opts.values`).
    pub fn equilibrium(&mut self, batch: &Batch<f32>, opts: &EqOptions) -> Result<Solution<f32>> {
        let job = self.prepare_equilibrium(batch, opts)?;
        self.run_equilibrium(&job)?;
        self.fetch_equilibrium(&job)
    }

    /// The paper's Algorithm 1 (nonlinear Jacobi) on every row with options `o` (see
    /// [`crate::solver::jacobi`]): `JacobiOptions::converged` for the `jacobi` method, `JacobiOptions::paper`
    /// for the truncated `paper` mode. f32 on the device, where the CPU version runs in f64.
    pub fn jacobi(&mut self, batch: &Batch<f32>, o: &JacobiOptions) -> Result<Solution<f32>> {
        let (rows, n, j) = (batch.rows(), batch.candidates(), batch.principals());
        check_i32("candidates", n)?;
        check_i32("principals", j)?;
        if o.max_rounds == 0 || o.max_rounds > i32::MAX as u32 || o.inner_max_iter > i32::MAX as u32 {
            return Err(bad(format!("Jacobi rounds must be in 1..=2^31-1, got {}", o.max_rounds)));
        }
        for (what, x) in [("tol", o.tol), ("inner_tol", o.inner_tol), ("inner_ftol", o.inner_ftol)] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(bad(format!("Jacobi {what} must be a finite number >= 0, got {x}")));
            }
        }
        if !(o.damping > 0.0 && o.damping <= 1.0) {
            return Err(bad(format!("Jacobi damping must be in (0, 1], got {}", o.damping)));
        }
        let mut base = self.put("jac.base", batch.base())?;
        let mut values = self.put("jac.values", batch.values())?;
        let mut tau = self.put("jac.tau", batch.tau())?;
        let mut scratch = self.buffer("jac.scratch", rows * (2 * j + 6) * n * 4)?;
        let mut pi = self.buffer("jac.pi", rows * n * 4)?;
        let mut agg = self.buffer("jac.agg", rows * n * 4)?;
        let mut y = self.buffer("jac.y", rows * j * n * 4)?;
        let mut payoff = self.buffer("jac.payoff", rows * j * 4)?;
        let mut stats = self.buffer("jac.stats", rows * 3 * 4)?;
        let (mut n32, mut j32) = (n as i32, j as i32);
        let (mut rounds, mut inner) = (o.max_rounds as i32, o.inner_max_iter as i32);
        let (mut tol, mut itol, mut ftol, mut damp) =
            (o.tol as f32, o.inner_tol as f32, o.inner_ftol as f32, o.damping as f32);
        let mut scaled = i32::from(o.inner == Inner::ScaledProjectedGradient);
        let mut params = [
            as_param(&mut base),
            as_param(&mut values),
            as_param(&mut tau),
            as_param(&mut n32),
            as_param(&mut j32),
            as_param(&mut rounds),
            as_param(&mut inner),
            as_param(&mut tol),
            as_param(&mut itol),
            as_param(&mut ftol),
            as_param(&mut damp),
            as_param(&mut scaled),
            as_param(&mut scratch),
            as_param(&mut pi),
            as_param(&mut agg),
            as_param(&mut y),
            as_param(&mut payoff),
            as_param(&mut stats),
        ];
        let threads = n.div_ceil(2).next_multiple_of(32).clamp(32, 256) as u32;
        // SAFETY: matches cage_jacobi_f32 in kernels/jacobi.cu; buffers sized above for this shape.
        unsafe { self.dev.launch("cage_jacobi_f32", [rows as u32, 1, 1], [threads, 1, 1], 0, &mut params)? };
        let mut sol = Solution::zeros(rows, n, j);
        sol.policy = self.get(pi, rows * n)?;
        sol.aggregate = self.get(agg, rows * n)?;
        sol.incentives = self.get(y, rows * j * n)?;
        sol.payoffs = self.get(payoff, rows * j)?;
        let st: Vec<f32> = self.get(stats, rows * 3)?;
        for r in 0..rows {
            sol.iterations[r] = st[r * 3] as u32;
            sol.residual[r] = st[r * 3 + 1] as f64;
            sol.converged[r] = st[r * 3 + 2] != 0.0;
        }
        Ok(sol)
    }

    fn check_logits(logits: &Logits<'_>, rows: usize, vocab: usize) -> Result<()> {
        if rows == 0 || vocab == 0 {
            return Err(bad(format!("logits of {rows} rows x {vocab} tokens: both must be >= 1")));
        }
        if logits.len() != rows * vocab {
            return Err(CageError::Shape { what: "logits".into(), expected: rows * vocab, got: logits.len() });
        }
        check_i32("vocabulary size", vocab)?;
        for i in 0..logits.len() {
            let x = logits.get(i);
            if x.is_nan() || x == f32::INFINITY {
                return Err(CageError::NonFinite { what: "logits".into(), index: i, value: format!("{x}") });
            }
        }
        for r in 0..rows {
            if (0..vocab).all(|i| logits.get(r * vocab + i) == f32::NEG_INFINITY) {
                return Err(CageError::EmptyCandidates { row: r });
            }
        }
        Ok(())
    }

    /// Candidates of every row from full-vocabulary logits: the top `k` (`Some(k)`, 1 <= k <= 1024) or every
    /// token (`None`), with log pi0 normalised over the whole row.
    pub fn candidates(
        &mut self,
        logits: Logits<'_>,
        rows: usize,
        vocab: usize,
        k: Option<usize>,
    ) -> Result<Candidates> {
        let job = self.prepare_candidates(logits, rows, vocab, k)?;
        self.run_candidates(&job)?;
        self.fetch_candidates(&job)
    }

    /// Validates and uploads logits for [`Gpu::run_candidates`].
    pub fn prepare_candidates(
        &mut self,
        logits: Logits<'_>,
        rows: usize,
        vocab: usize,
        k: Option<usize>,
    ) -> Result<CandJob> {
        Self::check_logits(&logits, rows, vocab)?;
        let kk = k.unwrap_or(vocab);
        if k.is_some() && !(1..=MAX_TOP_K.min(vocab)).contains(&kk) {
            return Err(bad(format!("top-k needs 1 <= k <= min({MAX_TOP_K}, vocabulary = {vocab}), got {kk}")));
        }
        let x = self.buffer("cand.logits", logits.len() * 4)?;
        self.dev.upload(x, logits.bytes())?;
        Ok(CandJob {
            rows,
            vocab,
            k,
            tag: logits.tag(),
            x,
            logp: self.buffer("cand.logp", rows * kk * 4)?,
            lse: self.buffer("cand.lse", rows * 4)?,
            ids: self.buffer("cand.ids", rows * kk * 4)?,
        })
    }

    /// A candidate selection over f32 logits already on this device (`rows x vocab`, row-major), such as those
    /// of [`crate::model::gpu::GpuDecoder::forward_device`]: nothing is copied to the device.
    ///
    /// # Safety
    /// `logits` must be device memory of this device holding `rows x vocab` f32 values, unchanged until
    /// [`Gpu::run_candidates`] has run. They are not checked for NaN (the host path rejects those).
    pub unsafe fn prepare_candidates_device(
        &mut self,
        logits: DevPtr,
        rows: usize,
        vocab: usize,
        k: Option<usize>,
    ) -> Result<CandJob> {
        if rows == 0 || vocab == 0 || logits == 0 {
            return Err(bad(format!(
                "device logits of {rows} rows x {vocab} tokens at {logits:#x}: need rows, vocabulary >= 1 and a non-null pointer"
            )));
        }
        check_i32("vocabulary size", vocab)?;
        check_i32("rows", rows)?;
        let kk = k.unwrap_or(vocab);
        if k.is_some() && !(1..=MAX_TOP_K.min(vocab)).contains(&kk) {
            return Err(bad(format!("top-k needs 1 <= k <= min({MAX_TOP_K}, vocabulary = {vocab}), got {kk}")));
        }
        Ok(CandJob {
            rows,
            vocab,
            k,
            tag: "f32",
            x: logits,
            logp: self.buffer("cand.logp", rows * kk * 4)?,
            lse: self.buffer("cand.lse", rows * 4)?,
            ids: self.buffer("cand.ids", rows * kk * 4)?,
        })
    }

    /// Launches a prepared candidate selection.
    pub fn run_candidates(&mut self, job: &CandJob) -> Result<()> {
        let CandJob { rows, vocab, k, tag, mut x, mut logp, mut lse, mut ids } = *job;
        let mut v = vocab as i32;
        let mut k32 = k.unwrap_or(vocab) as i32;
        // A thread per 8 tokens up to 1024: small vocabularies do not pay for idle warps.
        let threads = vocab.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32;
        // SAFETY: parameter lists match kernels/softmax_topk.cu; buffers sized by prepare_candidates.
        unsafe {
            if k.is_some() {
                let mut p = [
                    as_param(&mut x),
                    as_param(&mut v),
                    as_param(&mut k32),
                    as_param(&mut ids),
                    as_param(&mut logp),
                    as_param(&mut lse),
                ];
                self.dev.launch(&format!("cage_topk_{tag}"), [rows as u32, 1, 1], [threads, 1, 1], 0, &mut p)
            } else {
                let mut p = [as_param(&mut x), as_param(&mut v), as_param(&mut logp), as_param(&mut lse)];
                self.dev.launch(&format!("cage_logsoftmax_{tag}"), [rows as u32, 1, 1], [threads, 1, 1], 0, &mut p)
            }
        }
    }

    /// Copies the result of a finished candidate selection back.
    pub fn fetch_candidates(&mut self, job: &CandJob) -> Result<Candidates> {
        let (rows, vocab) = (job.rows, job.vocab);
        let kk = job.k.unwrap_or(vocab);
        let ids = if job.k.is_some() {
            self.get(job.ids, rows * kk)?
        } else {
            (0..rows).flat_map(|_| 0..vocab as u32).collect()
        };
        Ok(Candidates { k: kk, ids, logp: self.get(job.logp, rows * kk)?, lse: self.get(job.lse, rows)? })
    }

    /// Picks one token per row from the policy `pi` (B x n). `ids` (B x n) maps candidates to token ids; without
    /// it the token is the candidate index. Sampling draws depend only on (seed, row, step, candidate).
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &mut self,
        pi: &[f32],
        rows: usize,
        n: usize,
        ids: Option<&[u32]>,
        mode: Choice,
        seed: u64,
        step: u32,
    ) -> Result<Vec<u32>> {
        if rows == 0 || n == 0 || pi.len() != rows * n {
            return Err(CageError::Shape { what: "policy".into(), expected: rows * n, got: pi.len() });
        }
        check_i32("candidates", n)?;
        if let Some((i, x)) = pi.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x >= 0.0)) {
            return Err(CageError::NonFinite {
                what: "policy (must be finite and >= 0)".into(),
                index: i,
                value: format!("{x}"),
            });
        }
        for r in 0..rows {
            if pi[r * n..(r + 1) * n].iter().all(|&x| x == 0.0) {
                return Err(CageError::EmptyCandidates { row: r });
            }
        }
        let p = self.put("choose.pi", pi)?;
        let idp: DevPtr = match ids {
            Some(ids) if ids.len() != rows * n => {
                return Err(CageError::Shape { what: "candidate ids".into(), expected: rows * n, got: ids.len() });
            }
            Some(ids) => self.put("choose.ids", ids)?,
            None => 0,
        };
        let tok = self.buffer("choose.tokens", rows * 4)?;
        // SAFETY: buffers sized above on this device.
        unsafe { self.launch_choose(p, rows, n, idp, mode, seed, step, tok)? };
        self.get(tok, rows)
    }

    /// Principal values at the candidates, preprocessed as the batch expects: for each row r and principal j,
    /// q = (arm_j - lse(arm_j)) - (ref_j - lse(ref_j)) gathered at `ids`, then `shift_min` over the candidates
    /// whose `base` log-probability is finite, then the weight; 0 at excluded candidates.
    /// `arm` and `reference` are B x J x V logits (`reference` may be B x V, shared by every principal).
    #[allow(clippy::too_many_arguments)]
    pub fn principal_values(
        &mut self,
        arm: Logits<'_>,
        reference: Logits<'_>,
        rows: usize,
        principals: usize,
        vocab: usize,
        cands: &Candidates,
        base: &[f32],
        weights: &[f32],
        normalize: Normalize,
    ) -> Result<Vec<f32>> {
        let (b, j, v, k) = (rows, principals, vocab, cands.k);
        if j == 0 {
            return Ok(Vec::new());
        }
        if arm.tag() != reference.tag() {
            return Err(bad(format!("ARM logits are {} but reference logits are {}", arm.tag(), reference.tag())));
        }
        Self::check_logits(&arm, b * j, v)?;
        let shared_ref = reference.len() == b * v;
        if !shared_ref {
            Self::check_logits(&reference, b * j, v)?;
        } else {
            Self::check_logits(&reference, b, v)?;
        }
        if cands.ids.len() != b * k || base.len() != b * k {
            return Err(CageError::Shape {
                what: "candidate ids / base".into(),
                expected: b * k,
                got: cands.ids.len().min(base.len()),
            });
        }
        if weights.len() != b * j {
            return Err(CageError::Shape { what: "weights".into(), expected: b * j, got: weights.len() });
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
            return Err(CageError::BadWeight { principal: format!("{}", i % j), value: *w as f64 });
        }
        if let Some(&id) = cands.ids.iter().find(|&&id| id as usize >= v) {
            return Err(bad(format!("token id {id} is outside a vocabulary of {v}")));
        }
        let a = self.buffer("val.arm", arm.len() * 4)?;
        self.dev.upload(a, arm.bytes())?;
        let rf = self.buffer("val.ref", reference.len() * 4)?;
        self.dev.upload(rf, reference.bytes())?;
        let idp = self.put("val.ids", &cands.ids)?;
        let bp = self.put("val.base", base)?;
        let wp = self.put("val.weights", weights)?;
        let out = self.buffer("val.out", b * j * k * 4)?;
        let shift = normalize == Normalize::ShiftMin;
        // SAFETY: buffers sized above on this device.
        unsafe { self.launch_values(arm.tag(), a, rf, !shared_ref, b, j, v, idp, k, bp, wp, shift, out)? };
        let vals: Vec<f32> = self.get(out, b * j * k)?;
        // -inf ARM logits at a candidate make q infinite: the game needs finite values.
        if let Some((i, x)) = vals.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(CageError::NonFinite {
                what: "principal values (ARM or reference log-probabilities)".into(),
                index: i,
                value: format!("{x}"),
            });
        }
        if normalize == Normalize::None {
            for r in 0..b {
                for p in 0..j {
                    for c in 0..k {
                        let x = vals[(r * j + p) * k + c];
                        if x < 0.0 && base[r * k + c] != f32::NEG_INFINITY {
                            return Err(CageError::NegativeValue {
                                row: r,
                                principal: format!("{p}"),
                                index: c,
                                value: x as f64,
                            });
                        }
                    }
                }
            }
        }
        Ok(vals)
    }
}

impl Gpu {
    /// Launches `cage_values_{tag}` (kernels/values.cu) on device buffers: B x J x V ARM logits `arm`, reference
    /// logits `reference` (B x J x V when `ref_per_principal`, else B x V), B x k candidate `ids` and `base` log
    /// pi0, B x J `weights`; writes B x J x k values to `out`.
    ///
    /// # Safety
    /// Every pointer must be device memory of this `Gpu` holding the stated number of elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_values(
        &mut self,
        tag: &str,
        mut arm: DevPtr,
        mut reference: DevPtr,
        ref_per_principal: bool,
        rows: usize,
        j: usize,
        v: usize,
        mut ids: DevPtr,
        k: usize,
        mut base: DevPtr,
        mut weights: DevPtr,
        shift_min: bool,
        mut out: DevPtr,
    ) -> Result<()> {
        let (mut j32, mut v32, mut k32) = (j as i32, v as i32, k as i32);
        let (mut rs, mut shift) = (i32::from(ref_per_principal), i32::from(shift_min));
        let mut params = [
            as_param(&mut arm),
            as_param(&mut reference),
            as_param(&mut rs),
            as_param(&mut j32),
            as_param(&mut v32),
            as_param(&mut ids),
            as_param(&mut k32),
            as_param(&mut base),
            as_param(&mut weights),
            as_param(&mut shift),
            as_param(&mut out),
        ];
        let threads = v.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32;
        // SAFETY: the list matches VALUES_PARAMS in kernels/values.cu; the caller vouches for the buffers.
        unsafe {
            self.dev.launch(&format!("cage_values_{tag}"), [(rows * j) as u32, 1, 1], [threads, 1, 1], 0, &mut params)
        }
    }

    /// Launches `cage_choose` (kernels/choose.cu): one token per row of the B x n policy `pi` into `tokens`,
    /// as candidate `ids` (B x n) or, with `ids` = 0, as candidate indices.
    ///
    /// # Safety
    /// Every non-zero pointer must be device memory of this `Gpu` holding the stated number of elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_choose(
        &mut self,
        mut pi: DevPtr,
        rows: usize,
        n: usize,
        mut ids: DevPtr,
        mode: Choice,
        mut seed: u64,
        mut step: u32,
        mut tokens: DevPtr,
    ) -> Result<()> {
        let (mut n32, mut code) = (n as i32, choice_code(mode));
        let mut params = [
            as_param(&mut pi),
            as_param(&mut n32),
            as_param(&mut ids),
            as_param(&mut code),
            as_param(&mut seed),
            as_param(&mut step),
            as_param(&mut tokens),
        ];
        let threads = n.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
        // SAFETY: the list matches cage_choose in kernels/choose.cu; the caller vouches for the buffers.
        unsafe { self.dev.launch("cage_choose", [rows as u32, 1, 1], [threads, 1, 1], 0, &mut params) }
    }
}

fn shared_gpu() -> &'static Mutex<Option<std::result::Result<Gpu, String>>> {
    static GPU: OnceLock<Mutex<Option<std::result::Result<Gpu, String>>>> = OnceLock::new();
    GPU.get_or_init(|| Mutex::new(None))
}

fn shared_emulator() -> &'static Mutex<Option<Gpu>> {
    static EMU: OnceLock<Mutex<Option<Gpu>>> = OnceLock::new();
    EMU.get_or_init(|| Mutex::new(None))
}

// SAFETY: a Gpu is only used behind the mutex of `shared_gpu` or by its single owner; the CUDA context it holds
// is thread-safe (cudarc binds it to the calling thread before every call).
unsafe impl Send for Gpu {}

/// Runs `f` on the process-wide GPU 0, opened on first use (the failure to open it is remembered).
pub fn with_shared_gpu<R>(f: impl FnOnce(&mut Gpu) -> Result<R>) -> Result<R> {
    let mut guard = shared_gpu().lock().unwrap_or_else(|e| e.into_inner());
    let gpu = guard.get_or_insert_with(|| Gpu::cuda(0).map_err(|e| e.to_string()));
    match gpu {
        Ok(gpu) => f(gpu),
        Err(e) => Err(bad(e.clone())),
    }
}

/// Runs `f` on the process-wide host emulation (`Backend::Emulation`: the GPU code path without a GPU).
pub fn with_shared_emulator<R>(f: impl FnOnce(&mut Gpu) -> Result<R>) -> Result<R> {
    let mut guard = shared_emulator().lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Gpu::emulated))
}
