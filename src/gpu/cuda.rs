//! The CUDA device through cudarc's driver API. Modules are loaded lazily, the first time one of their kernels
//! is launched: the sm_90a cubin on a Hopper GPU, else the compute_80 PTX (JIT-compiled by the driver), else
//! the embedded source compiled by NVRTC (builds made without nvcc). One stream for everything.
//!
//! cudarc panics when libcuda is missing, so [`Cuda::open`] checks for the library and a device first: a
//! machine without a GPU gets an ordinary error.

use super::device::{DevPtr, Device, Release, Transfers};
use super::{KernelModule, MODULES};
use crate::error::{CageError, Result};
use cudarc::driver::sys::{
    CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream, result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

fn gpu_err(what: &str, e: impl std::fmt::Display) -> CageError {
    CageError::Cuda(format!("{what}: {e}"))
}

/// Whether a CUDA driver library is present and reports at least one device, without ever panicking.
pub fn probe() -> Result<usize> {
    // Probing dlopens the driver and asks for a device count: 0.58 ms, 20x a k = 50 equilibrium, so the answer
    // is computed once per process (a GPU does not appear or vanish under a running process).
    static PROBE: std::sync::OnceLock<std::result::Result<usize, String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            probe_uncached().map_err(|e| match e {
                CageError::NoGpu(m) => m,
                e => e.to_string(),
            })
        })
        .clone()
        .map_err(CageError::NoGpu)
}

fn probe_uncached() -> Result<usize> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CageError::NoGpu("the CUDA driver library (libcuda) is not installed".into()));
    }
    let n = std::panic::catch_unwind(CudaContext::device_count)
        .map_err(|_| CageError::NoGpu("the CUDA driver failed to load".into()))?
        .map_err(|e| CageError::NoGpu(format!("cuInit / cuDeviceGetCount failed: {e}")))?;
    if n <= 0 {
        return Err(CageError::NoGpu("the driver reports no device".into()));
    }
    Ok(n as usize)
}

/// A CUDA GPU with its context, one stream and the modules loaded so far.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: HashMap<String, Kernel>,
    cc: (i32, i32),
    max_smem: usize,
    name: String,
    timer: Option<CudaEvent>,
    /// Captured graphs by handle (None once dropped).
    graphs: Vec<Option<Graph>>,
    /// Modules whose image was built for sm_90 or later, so that their cluster kernels have a body.
    cluster_modules: Vec<&'static str>,
    blas: Option<cudarc::cublas::CudaBlas>,
    /// cuBLAS' workspace, set on the handle so that GEMMs inside a graph capture allocate nothing.
    blas_workspace: Option<super::device::DevBuf>,
    transfers: Transfers,
    /// Pinned staging of [`Device::upload_staged`]: bytes from `staged` on are free; those before are read by
    /// copies the stream may not have run yet, until the next synchronisation.
    upload_pinned: Option<Pinned>,
    staged: usize,
    /// Pinned landing area of downloads (a step's tokens; the host stages' logits), grown to the largest.
    download_pinned: Option<Pinned>,
}

/// Page-locked host memory (`cuMemHostAlloc`): copies from it run asynchronously, DMA straight from it.
struct Pinned {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain host memory owned by this value; the device that holds it is Send.
unsafe impl Send for Pinned {}

impl Pinned {
    fn alloc(ctx: &Arc<CudaContext>, bytes: usize, write_combined: bool) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        let flags = if write_combined { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
        // SAFETY: plain allocation, freed once in Drop.
        let ptr = unsafe { result::malloc_host(bytes, flags) }
            .map_err(|e| gpu_err(&format!("allocating {bytes} bytes of pinned host memory"), e))?;
        Ok(Self { ctx: ctx.clone(), ptr: ptr as *mut u8, bytes })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host; the owner synchronised the stream before dropping (see the users).
        let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
    }
}

/// Downloads up to this size land in pinned memory first (a step's tokens and values, the host stages' logits:
/// 49 MB at an 8B shape, 3 streams x 32 rows); larger ones go straight to the caller's memory rather than keep
/// a pinned copy of that size.
const PINNED_DOWNLOAD_MAX: usize = 256 << 20;

/// Bytes of cuBLAS workspace (cuBLAS' own recommendation for Hopper is 32 MiB).
const BLAS_WORKSPACE: usize = 32 << 20;

/// A loaded kernel and what it may use of shared memory.
#[derive(Clone)]
struct Kernel {
    f: CudaFunction,
    /// Its static `__shared__` bytes (ptxas' figure, read from the driver).
    static_smem: u32,
    /// The dynamic shared memory it may take without (more) opt-in.
    dynamic_limit: u32,
}

/// Without opting in, a block may use 48 KiB of shared memory, static and dynamic together.
const DEFAULT_SMEM: u32 = 48 * 1024;

/// An instantiated CUDA graph.
struct Graph(CudaGraph);

// SAFETY: the graph is only launched through the Cuda device that owns it, which binds its context first.
unsafe impl Send for Graph {}

impl Cuda {
    /// Opens GPU `ordinal`; every failure (no driver, no device, context creation) is an error.
    pub fn open(ordinal: usize) -> Result<Self> {
        let n = probe()?;
        if ordinal >= n {
            return Err(CageError::NoGpu(format!("CUDA device {ordinal} requested, {n} present")));
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| CageError::NoGpu("context creation panicked".into()))?
            .map_err(|e| CageError::NoGpu(format!("creating a context: {e}")))?;
        let stream = ctx.new_stream().map_err(|e| gpu_err("creating a stream", e))?;
        let cc = ctx.compute_capability().map_err(|e| gpu_err("compute capability", e))?;
        let max_smem = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| gpu_err("shared memory size", e))? as usize;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Self {
            ctx,
            stream,
            modules: HashMap::new(),
            functions: HashMap::new(),
            cc,
            max_smem,
            name,
            timer: None,
            graphs: Vec::new(),
            cluster_modules: Vec::new(),
            blas: None,
            blas_workspace: None,
            transfers: Transfers::default(),
            upload_pinned: None,
            staged: 0,
            download_pinned: None,
        })
    }

    fn load_module(&mut self, m: &'static KernelModule) -> Result<Arc<CudaModule>> {
        if let Some(x) = self.modules.get(m.name) {
            return Ok(x.clone());
        }
        // The compute_80 PTX compiles the cluster kernels without a body (clusters need sm_90): only the sm_90a
        // cubin and NVRTC for this GPU's own architecture give them one.
        let (image, clusters) = if fmad_off() {
            (compile_nvrtc_for(m, Some(self.cc))?, self.cc.0 >= 9)
        } else if let (Some(cubin), (9, 0)) = (m.cubin_sm90a, self.cc) {
            (cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()), true)
        } else if let Some(ptx) = m.ptx {
            (cudarc::nvrtc::Ptx::from_src(ptx), false)
        } else {
            (compile_nvrtc_for(m, Some(self.cc))?, self.cc.0 >= 9)
        };
        if clusters {
            self.cluster_modules.push(m.name);
        }
        let module = self.ctx.load_module(image).map_err(|e| gpu_err(&format!("loading module {}", m.name), e))?;
        self.modules.insert(m.name, module.clone());
        Ok(module)
    }

    fn function(&mut self, name: &str) -> Result<Kernel> {
        if let Some(f) = self.functions.get(name) {
            return Ok(f.clone());
        }
        let m = MODULES
            .iter()
            .find(|m| m.kernels.contains(&name))
            .ok_or_else(|| CageError::InvalidArgument(format!("no kernel named {name}")))?;
        let module = self.load_module(m)?;
        let f = module.load_function(name).map_err(|e| gpu_err(&format!("function {name}"), e))?;
        let static_smem =
            f.shared_size_bytes().map_err(|e| gpu_err(&format!("{name}: static shared memory"), e))?.max(0) as u32;
        let k = Kernel { f, static_smem, dynamic_limit: DEFAULT_SMEM.saturating_sub(static_smem) };
        self.functions.insert(name.to_string(), k.clone());
        Ok(k)
    }
}

/// A launch attribute asking for clusters of `x` blocks along x.
fn cluster_attribute(x: u32) -> cudarc::driver::sys::CUlaunchAttribute {
    use cudarc::driver::sys::{CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue};
    // SAFETY: a zeroed union is a valid (empty) attribute value; the cluster field is set next.
    let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.clusterDim.x = x;
    value.clusterDim.y = 1;
    value.clusterDim.z = 1;
    CUlaunchAttribute { id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, pad: [0; 4], value }
}

fn launch_config(
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
    stream: cudarc::driver::sys::CUstream,
    attr: &mut cudarc::driver::sys::CUlaunchAttribute,
) -> cudarc::driver::sys::CUlaunchConfig {
    cudarc::driver::sys::CUlaunchConfig {
        gridDimX: grid[0],
        gridDimY: grid[1],
        gridDimZ: grid[2],
        blockDimX: block[0],
        blockDimY: block[1],
        blockDimZ: block[2],
        sharedMemBytes: smem,
        hStream: stream,
        attrs: attr,
        numAttrs: 1,
    }
}

impl Cuda {
    /// The function `name`, loaded, opted in to `smem` bytes of dynamic shared memory, with the context bound.
    fn prepare(&mut self, name: &str, smem: u32) -> Result<CudaFunction> {
        let k = self.function(name)?;
        if smem > k.dynamic_limit {
            // The 48 KiB default covers static and dynamic shared memory together; above it a kernel must opt in
            // to the dynamic size, and static + dynamic must stay within the card's opt-in maximum.
            let total = k.static_smem as usize + smem as usize;
            if total > self.max_smem {
                return Err(CageError::Cuda(format!(
                    "{name}: {} static + {smem} dynamic bytes of shared memory exceed {}'s {} per block",
                    k.static_smem, self.name, self.max_smem
                )));
            }
            k.f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(|e| gpu_err(&format!("{name}: {smem} bytes of dynamic shared memory"), e))?;
            self.functions.insert(name.to_string(), Kernel { dynamic_limit: smem, ..k.clone() });
        }
        let f = k.f;
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        Ok(f)
    }
}

/// `CAGE_CUDA_FMAD=0`: every module is compiled here by NVRTC with `--fmad=false` instead of loading the prebuilt
/// cubin / PTX, so that no multiply-add is fused, as on the emulation and in the CPU references. The GPU bundle
/// reruns a failed test this way to tell an FMA rounding that flipped an exact comparison from a bug.
fn fmad_off() -> bool {
    std::env::var("CAGE_CUDA_FMAD").is_ok_and(|v| v == "0")
}

/// Compiles a module's embedded source with NVRTC for compute capability `cc` (None: NVRTC's default), without
/// fused multiply-adds under `CAGE_CUDA_FMAD=0`.
pub fn compile_nvrtc_for(m: &KernelModule, cc: Option<(i32, i32)>) -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CageError::InvalidArgument(format!(
            "CUDA: module {} was built without nvcc and NVRTC (libnvrtc) is not installed",
            m.name
        )));
    }
    // cuda_fp16.h / cuda_bf16.h come from the toolkit: CUDA_HOME, or the PyPI wheel of scripts/install-cuda.sh.
    let mut include_paths = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            include_paths.push(format!("{}/include", h.to_string_lossy()));
        }
    }
    include_paths.push(concat!(env!("CARGO_MANIFEST_DIR"), "/.cuda/nvidia/cu13/include").to_string());
    let mut options = vec!["-std=c++17".to_string()];
    if let Some((major, minor)) = cc {
        options.push(format!("--gpu-architecture=compute_{major}{minor}"));
    }
    if fmad_off() {
        options.push("--fmad=false".to_string());
    }
    let opts = cudarc::nvrtc::CompileOptions { include_paths, options, ..Default::default() };
    std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(m.source, opts))
        .map_err(|_| CageError::Cuda("NVRTC panicked".into()))?
        .map_err(|e| gpu_err(&format!("NVRTC compiling {}", m.name), e))
}

impl Device for Cuda {
    fn describe(&self) -> String {
        format!("{} (compute capability {}.{})", self.name, self.cc.0, self.cc.1)
    }
    fn is_emulated(&self) -> bool {
        false
    }
    fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        // SAFETY: plain allocation; freed in `free`.
        unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| gpu_err(&format!("allocating {bytes} bytes"), e))
    }
    fn release(&self) -> Release {
        let (ctx, stream) = (self.ctx.clone(), self.stream.clone());
        Arc::new(move |ptr| {
            let _ = ctx.bind_to_thread();
            let _ = stream.synchronize();
            // SAFETY: `ptr` came from `alloc` in this context and its owner frees it once; the stream was
            // synchronised first so no kernel still uses it.
            let _ = unsafe { result::free_sync(ptr) };
        })
    }
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        // On our (non-blocking) stream, so the copy is ordered before the kernels that read it (a legacy
        // synchronous copy would not be), then waited for: the driver only "may" have consumed pageable `src`
        // when the call returns, and the caller frees it next.
        // SAFETY: the caller passes a live allocation of at least src.len() bytes.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| gpu_err("copy to device", e))?;
        self.transfers.upload(src.len());
        self.synchronize().map_err(|e| gpu_err("copy to device", e))
    }
    fn upload_staged(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let need = self.staged + src.len().next_multiple_of(16);
        if self.upload_pinned.as_ref().is_none_or(|p| p.bytes < need) {
            // Full: wait for the copies reading the staging, then start over in one large enough.
            self.synchronize()?;
            let cap = self.upload_pinned.as_ref().map_or(0, |p| p.bytes);
            if cap < src.len() {
                self.upload_pinned = None;
                self.upload_pinned = Some(Pinned::alloc(&self.ctx, src.len().next_power_of_two().max(1 << 16), true)?);
            }
        }
        let p = self.upload_pinned.as_ref().expect("allocated above");
        // SAFETY: bytes staged..staged + len lie inside the allocation (checked above) and no queued copy reads
        // them (they are past every slot handed out since the last synchronisation).
        let slot = unsafe { std::slice::from_raw_parts_mut(p.ptr.add(self.staged), src.len()) };
        slot.copy_from_slice(src);
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        // SAFETY: pinned source, so the copy is truly asynchronous; the slot stays reserved until the next
        // synchronisation, after which the copy is done; `dst` is the caller's live allocation.
        unsafe { result::memcpy_htod_async(dst, &*slot, self.stream.cu_stream()) }
            .map_err(|e| gpu_err("copy to device", e))?;
        self.staged += src.len().next_multiple_of(16);
        self.transfers.upload(src.len());
        Ok(())
    }
    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        let n = dst.len();
        if n > PINNED_DOWNLOAD_MAX {
            // SAFETY: as in upload; the stream is synchronised before `dst` is handed back.
            unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
                .map_err(|e| gpu_err("copy to host", e))?;
            self.transfers.download(n);
            self.stream.synchronize().map_err(|e| gpu_err("kernel execution", e))?;
            self.staged = 0;
            return Ok(());
        }
        if self.download_pinned.as_ref().is_none_or(|p| p.bytes < n) {
            // No copy into it is queued (downloads wait before returning): free the smaller one first.
            self.download_pinned = None;
            self.download_pinned = Some(Pinned::alloc(&self.ctx, n.next_power_of_two().max(1 << 16), false)?);
        }
        let p = self.download_pinned.as_ref().expect("allocated above");
        // SAFETY: n <= the pinned allocation; nothing else uses it (downloads wait before returning).
        let landing = unsafe { std::slice::from_raw_parts_mut(p.ptr, n) };
        // SAFETY: pinned destination of n bytes; `src` is the caller's live allocation.
        unsafe { result::memcpy_dtoh_async(landing, src, self.stream.cu_stream()) }
            .map_err(|e| gpu_err("copy to host", e))?;
        self.transfers.download(n);
        self.stream.synchronize().map_err(|e| gpu_err("kernel execution", e))?;
        self.staged = 0;
        dst.copy_from_slice(landing);
        Ok(())
    }
    fn transfers(&self) -> Transfers {
        self.transfers
    }
    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        // SAFETY: both are live allocations of at least `bytes`.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| gpu_err("device copy", e))
    }
    unsafe fn launch(
        &mut self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: forwarded contract; 0 selects the device's own stream.
        unsafe { self.launch_on(0, name, grid, block, smem, params) }
    }
    unsafe fn launch_on(
        &mut self,
        stream: usize,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.prepare(name, smem)?;
        let stream = if stream == 0 { self.stream.cu_stream() } else { stream as cudarc::driver::sys::CUstream };
        // SAFETY: the caller guarantees that params match the kernel and outlive the launch, and that a foreign
        // stream belongs to this context.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                smem,
                stream,
                params,
            )
        }
        .map_err(|e| gpu_err(&format!("launching {name}"), e))
    }
    fn supports_cluster(&mut self, name: &str, block: u32, cluster: u32, smem: u32) -> bool {
        if self.cc.0 < 9 || !(1..=8).contains(&cluster) {
            return false;
        }
        let Ok(f) = self.prepare(name, smem) else { return false };
        let module = MODULES.iter().find(|m| m.kernels.contains(&name)).map(|m| m.name);
        if !module.is_some_and(|m| self.cluster_modules.contains(&m)) {
            return false;
        }
        // The driver's answer for this exact shape: a cluster of blocks this large must fit in one GPC.
        let mut attr = cluster_attribute(cluster);
        let config = launch_config([cluster, 1, 1], [block, 1, 1], smem, self.stream.cu_stream(), &mut attr);
        let mut n = 0;
        // SAFETY: plain query on a loaded function with a config that outlives the call.
        let rc = unsafe { cudarc::driver::sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config) };
        rc == cudarc::driver::sys::CUresult::CUDA_SUCCESS && n > 0
    }
    unsafe fn launch_cluster(
        &mut self,
        stream: usize,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        cluster: u32,
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        if cluster == 0 || !grid[0].is_multiple_of(cluster) {
            return Err(CageError::InvalidArgument(format!(
                "launch of {name}: clusters of {cluster} blocks do not tile a grid of {} blocks",
                grid[0]
            )));
        }
        let f = self.prepare(name, smem)?;
        let stream = if stream == 0 { self.stream.cu_stream() } else { stream as cudarc::driver::sys::CUstream };
        let mut attr = cluster_attribute(cluster);
        let config = launch_config(grid, block, smem, stream, &mut attr);
        // SAFETY: as in launch_on; `config` and `attr` outlive the call.
        let rc = unsafe {
            cudarc::driver::sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
        };
        if rc != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            return Err(CageError::Cuda(format!("launching {name} in clusters of {cluster}: {rc:?}")));
        }
        Ok(())
    }
    fn synchronize(&mut self) -> Result<()> {
        self.stream.synchronize().map_err(|e| gpu_err("kernel execution", e))?;
        self.transfers.wait();
        // Every staged copy is done.
        self.staged = 0;
        Ok(())
    }
    fn max_dynamic_smem(&self) -> usize {
        self.max_smem
    }
    fn free_memory(&mut self) -> Result<Option<usize>> {
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        let (free, _total) = cudarc::driver::result::mem_get_info().map_err(|e| gpu_err("reading free memory", e))?;
        Ok(Some(free))
    }
    fn begin_capture(&mut self) -> Result<()> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| gpu_err("beginning a graph capture", e))
    }
    fn end_capture(&mut self) -> Result<usize> {
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| gpu_err("ending a graph capture", e))?
            .ok_or_else(|| CageError::Cuda("the graph capture recorded nothing".into()))?;
        self.graphs.push(Some(Graph(graph)));
        Ok(self.graphs.len() - 1)
    }
    fn launch_graph(&mut self, graph: usize) -> Result<()> {
        let g = self
            .graphs
            .get(graph)
            .and_then(Option::as_ref)
            .ok_or_else(|| CageError::InvalidArgument(format!("no CUDA graph {graph}")))?;
        g.0.launch().map_err(|e| gpu_err("launching a graph", e))
    }
    fn drop_graph(&mut self, graph: usize) {
        if let Some(g) = self.graphs.get_mut(graph) {
            *g = None;
        }
    }
    fn timer_start(&mut self) -> Result<()> {
        // Timing needs events created with the default flags (cudarc's default disables timing).
        let ev = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| gpu_err("event", e))?;
        self.timer = Some(ev);
        Ok(())
    }
    fn timer_stop(&mut self) -> Result<f64> {
        let start =
            self.timer.take().ok_or_else(|| CageError::InvalidArgument("timer_stop without timer_start".into()))?;
        let end = self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| gpu_err("event", e))?;
        end.synchronize().map_err(|e| gpu_err("kernel execution", e))?;
        self.transfers.wait();
        Ok(start.elapsed_ms(&end).map_err(|e| gpu_err("event timing", e))? as f64)
    }
    unsafe fn gemm_bf16(
        &mut self,
        m: usize,
        n: usize,
        k: usize,
        a: DevPtr,
        w: DevPtr,
        c: DevPtr,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dim = |what: &str, x: usize| {
            i32::try_from(x).map_err(|_| CageError::InvalidArgument(format!("GEMM {what} = {x} exceeds cuBLAS' int")))
        };
        let (m32, n32, k32) = (dim("m", m)?, dim("n", n)?, dim("k", k)?);
        let handle = *self.blas()?.handle();
        // Row-major C [m, n] is column-major C^T [n, m] = W A^T: W (column-major [k, n], ld k) transposed times
        // A^T (column-major [k, m], ld k), leading dimension of C^T n.
        // SAFETY: the caller guarantees the buffers' sizes; alpha and beta are host scalars (the handle's default
        // pointer mode); the handle runs on this device's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                handle,
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n32,
                m32,
                k32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                cudaDataType::CUDA_R_16BF,
                k32,
                a as *const c_void,
                cudaDataType::CUDA_R_16BF,
                k32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                n32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| gpu_err(&format!("cuBLAS GEMM {m} x {n} x {k}"), e))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // The pinned staging is freed with the device: no queued copy may still read it.
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
    }
}

impl Cuda {
    /// The cuBLAS handle on this device's stream, created on the first GEMM (most uses of the device, the
    /// equilibrium kernels, never need one); an error when libcublas is missing, never a panic.
    fn blas(&mut self) -> Result<&cudarc::cublas::CudaBlas> {
        if self.blas.is_none() {
            // SAFETY: only tries to dlopen libcublas.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(CageError::Cuda(
                    "cuBLAS (libcublas) is not installed; the GPU forward pass needs it".into(),
                ));
            }
            self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
            let stream = self.stream.clone();
            let blas = std::panic::catch_unwind(move || cudarc::cublas::CudaBlas::new(stream))
                .map_err(|_| CageError::Cuda("creating the cuBLAS handle panicked".into()))?
                .map_err(|e| gpu_err("creating the cuBLAS handle", e))?;
            // A workspace of our own: cuBLAS would otherwise allocate one inside a graph capture.
            let ws = super::device::DevBuf::alloc(self, BLAS_WORKSPACE)?;
            // SAFETY: the workspace is device memory of this context of the stated size, kept as long as the
            // handle (both are fields of this device).
            unsafe { cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ws.ptr() as *mut c_void, ws.bytes()) }
                .result()
                .map_err(|e| gpu_err("setting the cuBLAS workspace", e))?;
            self.blas_workspace = Some(ws);
            self.blas = Some(blas);
        }
        self.ctx.bind_to_thread().map_err(|e| gpu_err("binding the context", e))?;
        Ok(self.blas.as_ref().expect("created above"))
    }
}
