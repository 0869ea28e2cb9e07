//! CUDA backend: the kernels of `kernels/` (compiled and embedded by build.rs), driven through a thin host
//! layer that is the same for a real GPU ([`cuda::Cuda`]) and for the host emulation ([`emu::Emulator`]) that
//! runs the unchanged kernel sources on the CPU in tests.
//!
//! Each kernel file keeps its host side beside it, llm.c style: `kernels/X.cu` is launched, with its options,
//! buffers and output decoding, from `src/gpu/X.rs`, and checked against its CPU reference by one test body in
//! `tests/kernels_bodies.rs`:
//!
//! - `equilibrium.rs` (equilibrium.cu): [`Gpu::equilibrium`], the batched exact equilibrium, also replayable as
//!   a CUDA graph and on caller-owned buffers; CPU reference `solver::exact`.
//! - `jacobi.rs` (jacobi.cu): [`Gpu::jacobi`], Algorithm 1 (the `jacobi` and `paper` methods); `solver::jacobi`.
//! - `candidates.rs` (softmax_topk.cu): [`Gpu::candidates`], fused log-softmax and top-k; `crate::candidates`.
//! - `values.rs` (values.cu): [`Gpu::principal_values`], ARM values at the candidates with the preprocessing;
//!   the implicit reward of `decode::principal::ArmSource`.
//! - `choose.rs` (choose.cu): [`Gpu::choose`], greedy or sampled token choice (Philox); `crate::sampling`.
//! - `policy.rs` (policy.cu): [`Gpu::policy`], the policies of `base`, `linear`, `genarm` and `mod`; the host
//!   policy stage (`crate::baselines`).
//! - `transformer.rs` (transformer.cu): the forward pass' kernels for [`crate::model::gpu::GpuDecoder`];
//!   `model::forward`; its attention alone ([`AttentionJob`]: one pass and split-K) against an f64 reference.
//! - `quant.rs` (quant.cu): [`quant::QuantLinear`], weight-only int8 / int4 (GPTQ layout) linear layers of the
//!   GPU decoder; `model::devquant` (quantization and the f64 dequantized weights).
//!
//! [`Gpu::decode_step_device`] (`step.rs`, the C ABI's) chains candidates, values, equilibrium and choice on
//! device-resident logits; [`Gpu::resident_step`] (`resident.rs`, the engine's) does it for every method and
//! principal kind, on streams wherever their forwards left them. The core here: [`Gpu`] (one device, each kernel family's named buffers, grown only
//! when a shape grows, so a decoding loop allocates nothing in steady state), the embedded modules and the
//! process-wide GPU and emulator of [`crate::backend::solve_with`]. No GPU, no driver or a failed context is an
//! ordinary [`CageError`], never a panic. See docs/architecture.md.

pub mod bench;
mod candidates;
mod choose;
pub mod cuda;
pub mod device;
pub mod emu;
mod equilibrium;
mod jacobi;
mod launch;
mod policy;
pub mod quant;
mod resident;
mod step;
pub(crate) mod transformer;
mod values;

pub use candidates::{CandJob, Candidates, Logits, MAX_TOP_K, MIN_SLICE, row_split};
pub use equilibrium::{DeviceEquilibrium, EqJob, EqOptions, MAX_CLUSTER_PRINCIPALS, MAX_PRINCIPALS, ValueType};
pub use policy::DevicePolicy;
pub use resident::{PrincipalStreams, ResidentLaunch, ResidentMethod, ResidentReport, ResidentStep};
pub use step::{DeviceStep, StepOutput};
pub use transformer::{
    ATT_MIN_CHUNK, ATT_TARGET_BLOCKS, AttentionJob, AttentionShape, Heads, KvCacheType, attention_scratch_bytes,
    attention_splits,
};

use crate::error::{CageError, Result};
use device::{DevBuf, DevPtr, Device};
use launch::Launch;
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

/// A device with its loaded kernels and the buffers of each kernel family, reused from call to call.
pub struct Gpu {
    eq: equilibrium::EqBuffers,
    eq_caller: equilibrium::CallerBuffers,
    /// Captured equilibrium graphs and the buffer generation they were captured with.
    eq_graphs: Vec<(usize, u64)>,
    jacobi: jacobi::JacobiBuffers,
    cand: candidates::CandBuffers,
    values: values::ValueBuffers,
    choose: choose::ChooseBuffers,
    step: step::StepBuffers,
    policy: policy::PolicyBuffers,
    resident: resident::ResidentBuffers,
    dev: Box<dyn Device>,
}

fn bad(msg: String) -> CageError {
    CageError::InvalidArgument(msg)
}

fn check_i32(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| bad(format!("{what} = {x} is too large for the CUDA kernels")))
}

impl Gpu {
    fn new(dev: Box<dyn Device>) -> Self {
        Self {
            eq: Default::default(),
            eq_caller: Default::default(),
            eq_graphs: Vec::new(),
            jacobi: Default::default(),
            cand: Default::default(),
            values: Default::default(),
            choose: Default::default(),
            step: Default::default(),
            policy: Default::default(),
            resident: Default::default(),
            dev,
        }
    }

    /// The host emulation (always available; slow).
    pub fn emulated() -> Self {
        Self::new(Box::new(emu::Emulator::new()))
    }

    /// CUDA GPU `ordinal`; an error when there is no usable GPU.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Self::new(Box::new(cuda::Cuda::open(ordinal)?)))
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

    /// The bytes copied between host and device since this device was opened.
    pub fn transfers(&self) -> device::Transfers {
        self.dev.transfers()
    }

    /// A new device buffer of at least `bytes`, freed when dropped.
    pub fn alloc(&mut self, bytes: usize) -> Result<DevBuf> {
        DevBuf::alloc(self.dev.as_mut(), bytes)
    }

    /// `n` values of type `T` at `p`, copied to the host (after the work queued before).
    fn download<T: bytemuck::Pod + Default>(&mut self, p: DevPtr, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.dev.download(p, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Why GPU 0 could not be opened: the error's kind (`NoGpu` stays `NoGpu`, so callers can fall back to the CPU)
/// and its message, remembered so that every later call gets the same error.
type OpenFailure = (fn(String) -> CageError, String);

fn shared_gpu() -> &'static Mutex<Option<std::result::Result<Gpu, OpenFailure>>> {
    static GPU: OnceLock<Mutex<Option<std::result::Result<Gpu, OpenFailure>>>> = OnceLock::new();
    GPU.get_or_init(|| Mutex::new(None))
}

fn shared_emulator() -> &'static Mutex<Option<Gpu>> {
    static EMU: OnceLock<Mutex<Option<Gpu>>> = OnceLock::new();
    EMU.get_or_init(|| Mutex::new(None))
}

/// The transfers of the process-wide GPU and emulation so far (those not opened count nothing; neither is opened
/// here): the equilibrium of `backend: cuda | emulation` runs there, apart from the decoders' devices.
pub fn shared_transfers() -> device::Transfers {
    let gpu = match &*shared_gpu().lock().unwrap_or_else(|e| e.into_inner()) {
        Some(Ok(g)) => g.transfers(),
        _ => device::Transfers::default(),
    };
    let emu = shared_emulator().lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(Gpu::transfers);
    gpu.plus(emu.unwrap_or_default())
}

/// Runs `f` on the process-wide GPU 0, opened on first use (the failure to open it is remembered).
pub fn with_shared_gpu<R>(f: impl FnOnce(&mut Gpu) -> Result<R>) -> Result<R> {
    let mut guard = shared_gpu().lock().unwrap_or_else(|e| e.into_inner());
    let gpu = guard.get_or_insert_with(|| {
        Gpu::cuda(0).map_err(|e| -> OpenFailure {
            match e {
                CageError::NoGpu(m) => (CageError::NoGpu, m),
                CageError::Cuda(m) => (CageError::Cuda, m),
                e => (bad, e.to_string()),
            }
        })
    });
    match gpu {
        Ok(gpu) => f(gpu),
        Err((kind, msg)) => Err(kind(msg.clone())),
    }
}

/// Runs `f` on the process-wide host emulation (`Backend::Emulation`: the GPU code path without a GPU).
pub fn with_shared_emulator<R>(f: impl FnOnce(&mut Gpu) -> Result<R>) -> Result<R> {
    let mut guard = shared_emulator().lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Gpu::emulated))
}
