//! Host side of kernels/equilibrium.cu: the batched exact equilibrium (the scheme of `solver::exact`), one
//! block per row with the row staged in shared memory when it fits, else split across a thread-block cluster
//! when the device can, else read from global memory on every pass. Entry points: [`Gpu::equilibrium`], its
//! three steps (prepare, run, fetch; a prepared job can also be captured as a CUDA graph), and
//! [`Gpu::equilibrium_device`] on caller-owned buffers (the C ABI's copy-free solve).

use super::device::{DevBuf, DevPtr, Device};
use super::{Gpu, Launch, bad, check_i32};
use crate::error::Result;
use crate::problem::Batch;
use crate::solution::Solution;

/// Largest J the equilibrium kernels are instantiated for.
pub const MAX_PRINCIPALS: usize = 8;
/// Most principals the cluster-split kernels take (their accumulators must stay in registers).
pub const MAX_CLUSTER_PRINCIPALS: usize = 4;

/// Shared memory kept free for the equilibrium kernels' static arrays when sizing the dynamic part.
const STATIC_SMEM_RESERVE: usize = 16 * 1024;
/// Threads per block of the cluster-split equilibrium kernels (EQC_THREADS in kernels/equilibrium.cu).
const EQC_THREADS: u32 = 512;

/// Floats of the cluster exchange area of the split kernels (eq_exchange_floats in kernels/equilibrium.cu).
fn exchange_floats(j: usize) -> usize {
    (2 * (2 + j * (j + 2)) + j).next_multiple_of(4)
}

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
#[derive(Clone, Copy, Debug, PartialEq)]
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

/// The buffers of [`Gpu::prepare_equilibrium`].
#[derive(Default)]
pub(super) struct EqBuffers {
    base: DevBuf,
    values: DevBuf,
    tau: DevBuf,
    pi: DevBuf,
    agg: DevBuf,
    y: DevBuf,
    payoff: DevBuf,
    stats: DevBuf,
}

impl EqBuffers {
    /// Changes whenever one of the buffers is reallocated: a job prepared before then points at freed memory.
    fn generation(&self) -> u64 {
        [&self.base, &self.values, &self.tau, &self.pi, &self.agg, &self.y, &self.payoff, &self.stats]
            .iter()
            .map(|b| b.serial())
            .max()
            .unwrap_or(0)
    }
}

/// The outputs of [`Gpu::equilibrium_device`] its caller does not want.
#[derive(Default)]
pub(super) struct CallerBuffers {
    agg: DevBuf,
    payoff: DevBuf,
    stats: DevBuf,
}

/// Launch shape of the equilibrium kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct EqShape {
    stage: bool,
    threads: u32,
    smem: u32,
    /// Blocks per row (a thread-block cluster when > 1).
    cluster: u32,
}

/// Where a solver kernel (equilibrium.cu, jacobi.cu) writes its solution: B x N policy and aggregate incentive,
/// B x J x N incentives (0: not written), B x J payoffs and B x 3 stats (passes, residual, converged).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct SolutionAt {
    pub(super) pi: DevPtr,
    pub(super) agg: DevPtr,
    pub(super) y: DevPtr,
    pub(super) payoff: DevPtr,
    pub(super) stats: DevPtr,
}

/// An equilibrium prepared on the device: inputs uploaded, outputs allocated. [`Gpu::run_equilibrium`]
/// launches it (benchmarks time that), [`Gpu::fetch_equilibrium`] copies the solution back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EqJob {
    pub(super) rows: usize,
    pub(super) n: usize,
    pub(super) j: usize,
    pub(super) j_eff: usize,
    pub(super) opts: EqOptions,
    pub(super) shape: EqShape,
    pub(super) base: DevPtr,
    pub(super) values: DevPtr,
    pub(super) tau: DevPtr,
    pub(super) out: SolutionAt,
    /// [`EqBuffers::generation`] when prepared (0: launched at once on other buffers, never checked).
    pub(super) generation: u64,
}

impl EqJob {
    /// Bytes one pass must read and the outputs write (the roofline's numerator).
    pub fn bytes_moved(&self) -> usize {
        let (b, n, j) = (self.rows, self.n, self.j_eff);
        let out = b * n * 8 + if self.opts.incentives { b * j * n * 4 } else { 0 };
        b * n * 4 + b * j * n * self.opts.values.size() + out
    }
}

impl Gpu {
    /// The exact equilibrium of every row of `batch` (f32 on the device; values stored as `opts.values`).
    pub fn equilibrium(&mut self, batch: &Batch<f32>, opts: &EqOptions) -> Result<Solution<f32>> {
        let job = self.prepare_equilibrium(batch, opts)?;
        self.run_equilibrium(&job)?;
        self.fetch_equilibrium(&job)
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
        let (dev, b) = (self.dev.as_mut(), &mut self.eq);
        let base = b.base.upload(dev, batch.base())?;
        let values = match (opts.values, j) {
            (ValueType::F32, 0) => b.values.upload(dev, &vec![0f32; rows * n])?,
            (ValueType::F32, _) => b.values.upload(dev, batch.values())?,
            (ValueType::Bf16, _) => {
                let v: Vec<half::bf16> = if j == 0 {
                    vec![half::bf16::ZERO; rows * n]
                } else {
                    batch.values().iter().map(|&x| half::bf16::from_f32(x)).collect()
                };
                b.values.upload(dev, &v)?
            }
        };
        let tau = b.tau.upload(dev, batch.tau())?;
        let out = SolutionAt {
            pi: b.pi.reserve(dev, rows * n * 4)?,
            agg: b.agg.reserve(dev, rows * n * 4)?,
            y: if opts.incentives { b.y.reserve(dev, rows * j_eff * n * 4)? } else { 0 },
            payoff: b.payoff.reserve(dev, rows * j_eff * 4)?,
            stats: b.stats.reserve(dev, rows * 3 * 4)?,
        };
        let shape = self.equilibrium_shape(n, j_eff, opts)?;
        let generation = self.eq.generation();
        Ok(EqJob { rows, n, j, j_eff, opts: *opts, shape, base, values, tau, out, generation })
    }

    /// How the equilibrium of this job is launched: staged or not, and split across a cluster of how many
    /// blocks (1: one block per row).
    pub fn equilibrium_launch(job: &EqJob) -> (bool, u32) {
        (job.shape.stage, job.shape.cluster)
    }

    /// The launch shape of the equilibrium kernel for rows of `n` candidates and `j_eff` principals: staged in
    /// shared memory when a row fits one block's, else split across a cluster when the device can, else read
    /// from global memory on every pass.
    pub(super) fn equilibrium_shape(&mut self, n: usize, j_eff: usize, opts: &EqOptions) -> Result<EqShape> {
        let vsize = opts.values.size();
        // The layout of eq_row: log pi0, then J value rows, each padded to a multiple of 4 elements (the
        // staged loop's vector loads).
        let stage_bytes = (n * 4).next_multiple_of(16) + j_eff * n.next_multiple_of(4) * vsize;
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
        let (dev, b) = (self.dev.as_mut(), &mut self.eq_caller);
        let out = SolutionAt {
            pi: e.policy,
            agg: b.agg.reserve(dev, rows * n * 4)?,
            y: 0,
            payoff: if e.payoffs != 0 { e.payoffs } else { b.payoff.reserve(dev, rows * j * 4)? },
            stats: if e.stats != 0 { e.stats } else { b.stats.reserve(dev, rows * 3 * 4)? },
        };
        // Internal buffers are ordered on the device's own stream: let that stream drain before a foreign one
        // writes into them.
        self.dev.synchronize()?;
        let opts = EqOptions { incentives: false, ..*opts };
        let job =
            EqJob { rows, n, j, j_eff: j, opts, shape, base: e.base, values: e.values, tau: e.tau, out, generation: 0 };
        self.launch_equilibrium(&job, e.stream)
    }

    /// Launches a prepared equilibrium (asynchronously on a GPU).
    pub fn run_equilibrium(&mut self, job: &EqJob) -> Result<()> {
        self.check_generation(job)?;
        self.launch_equilibrium(job, 0)
    }

    /// A job whose buffers a later, larger prepare reallocated would read and write freed memory: an error.
    fn check_generation(&self, job: &EqJob) -> Result<()> {
        if job.generation != self.eq.generation() {
            return Err(bad(format!(
                "this equilibrium job ({} rows x {} candidates x {} principals) was prepared before a larger one \
                 reallocated its device buffers: prepare it again",
                job.rows, job.n, job.j
            )));
        }
        Ok(())
    }

    /// Launches `cage_eq_*` or, split across clusters, `cage_eqc_*` for `job` on `stream` (0: the device's).
    pub(super) fn launch_equilibrium(&mut self, job: &EqJob, stream: usize) -> Result<()> {
        let (sh, o) = (job.shape, job.out);
        let kind = if sh.cluster > 1 { "eqc" } else { "eq" };
        let name = format!("cage_{kind}_{}_j{}", job.opts.values.tag(), job.j_eff);
        let launch = Launch::new(&name)
            .grid(job.rows as u32 * sh.cluster)
            .block(sh.threads)
            .smem(sh.smem)
            .cluster(sh.cluster)
            .stream(stream)
            .ptr(job.base)
            .ptr(job.values)
            .ptr(job.tau)
            .i32(job.n as i32)
            .f32(job.opts.tol as f32)
            .i32(job.opts.max_iter.min(i32::MAX as u32) as i32)
            .i32(i32::from(sh.stage))
            .ptr(o.pi)
            .ptr(o.agg)
            .ptr(o.y)
            .ptr(o.payoff)
            .ptr(o.stats);
        // SAFETY: the arguments follow EQ_PARAMS in kernels/equilibrium.cu, and every buffer was sized for this
        // shape by prepare_equilibrium (or vouched for by the caller of equilibrium_device).
        unsafe { launch.run(self.dev.as_mut()) }
    }

    /// Records the launch of a prepared equilibrium as a CUDA graph, so that a decoding loop replays the step
    /// with one driver call ([`Gpu::run_graph`]); inputs are re-uploaded into the same buffers between steps.
    /// The emulation records and replays it alike.
    pub fn capture_equilibrium(&mut self, job: &EqJob) -> Result<usize> {
        // Module loading and the shared-memory opt-in are not capturable: do them with a first real launch.
        self.run_equilibrium(job)?;
        self.dev.synchronize()?;
        self.dev.begin_capture()?;
        let launched = self.run_equilibrium(job);
        let graph = self.dev.end_capture();
        launched?;
        let graph = graph?;
        self.eq_graphs.push((graph, job.generation));
        Ok(graph)
    }

    /// Launches a graph of [`Gpu::capture_equilibrium`]; an error when its buffers were reallocated since.
    pub fn run_graph(&mut self, graph: usize) -> Result<()> {
        match self.eq_graphs.iter().find(|(g, _)| *g == graph) {
            None => return Err(bad(format!("no captured equilibrium graph {graph} on this device"))),
            Some(&(_, generation)) if generation != self.eq.generation() => {
                return Err(bad(format!(
                    "captured equilibrium graph {graph} uses device buffers that a larger job has since \
                     reallocated: capture it again"
                )));
            }
            Some(_) => {}
        }
        self.dev.launch_graph(graph)
    }

    /// Copies the solution of a finished equilibrium back.
    pub fn fetch_equilibrium(&mut self, job: &EqJob) -> Result<Solution<f32>> {
        self.check_generation(job)?;
        self.download_solution(job.rows, job.n, job.j, &job.out)
    }

    /// Copies the solution a solver kernel wrote at `at` back: `rows` x `n` candidates, `j` principals.
    pub(super) fn download_solution(
        &mut self,
        rows: usize,
        n: usize,
        j: usize,
        at: &SolutionAt,
    ) -> Result<Solution<f32>> {
        let mut sol = Solution::zeros(rows, n, j);
        sol.policy = self.download(at.pi, rows * n)?;
        sol.aggregate = self.download(at.agg, rows * n)?;
        if j > 0 {
            if at.y != 0 {
                sol.incentives = self.download(at.y, rows * j * n)?;
            }
            sol.payoffs = self.download(at.payoff, rows * j)?;
        }
        let stats: Vec<f32> = self.download(at.stats, rows * 3)?;
        for (r, s) in stats.chunks_exact(3).enumerate() {
            sol.iterations[r] = s[0] as u32;
            sol.residual[r] = s[1] as f64;
            sol.converged[r] = s[2] != 0.0;
        }
        Ok(sol)
    }
}
