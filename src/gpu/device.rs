//! The few raw operations every kernel launch needs, implemented by the CUDA driver ([`super::cuda`]) and by
//! the host emulation ([`super::emu`]), and [`DevBuf`], the device memory everything above this layer holds.
//! Everything above it ([`super::Gpu`]) is shared, so the same code path and the same test bodies run on a GPU
//! and, in CI, on the CPU.

use crate::error::Result;
use std::ffi::c_void;
use std::sync::Arc;

/// A device address (a `CUdeviceptr` on a GPU, a host address under emulation).
pub type DevPtr = u64;

/// Frees an allocation of one device, from any thread: what a [`DevBuf`] calls when it is dropped. It keeps
/// what freeing needs (the CUDA context and stream, the emulation's memory) alive, so a buffer may outlive the
/// [`Device`] value it came from.
pub type Release = Arc<dyn Fn(DevPtr) + Send + Sync>;

/// Bytes copied between host and device, counted by each [`Device`] (the emulation too), so that a decoding
/// step's traffic is measured where it happens rather than estimated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Transfers {
    /// Bytes copied host to device.
    pub host_to_device: u64,
    /// Bytes copied device to host.
    pub device_to_host: u64,
    /// Number of host-to-device copies (each one a call, and on a GPU today a stream drain).
    pub uploads: u64,
    /// Number of device-to-host copies.
    pub downloads: u64,
    /// Times the host waited for the device's stream (a synchronisation, a download, a draining upload): what
    /// a decoding step should do once, for its tokens.
    pub waits: u64,
}

impl Transfers {
    /// Counts one upload of `bytes`.
    pub fn upload(&mut self, bytes: usize) {
        self.host_to_device += bytes as u64;
        self.uploads += 1;
    }
    /// Counts one download of `bytes` (and the wait it makes).
    pub fn download(&mut self, bytes: usize) {
        self.device_to_host += bytes as u64;
        self.downloads += 1;
        self.waits += 1;
    }
    /// Counts one wait for the stream.
    pub fn wait(&mut self) {
        self.waits += 1;
    }
    /// What was counted between `earlier` and `self` (a later reading of the same counters).
    pub fn since(self, earlier: Transfers) -> Transfers {
        Transfers {
            host_to_device: self.host_to_device.saturating_sub(earlier.host_to_device),
            device_to_host: self.device_to_host.saturating_sub(earlier.device_to_host),
            uploads: self.uploads.saturating_sub(earlier.uploads),
            downloads: self.downloads.saturating_sub(earlier.downloads),
            waits: self.waits.saturating_sub(earlier.waits),
        }
    }
    /// The sum of two counts.
    pub fn plus(self, o: Transfers) -> Transfers {
        Transfers {
            host_to_device: self.host_to_device + o.host_to_device,
            device_to_host: self.device_to_host + o.device_to_host,
            uploads: self.uploads + o.uploads,
            downloads: self.downloads + o.downloads,
            waits: self.waits + o.waits,
        }
    }
}

/// Device memory that frees itself when dropped, and that grows only when a call needs more than it holds
/// ([`DevBuf::reserve`]): a decoding loop that calls the same shapes every step allocates nothing after its
/// first. The default value is empty (address 0).
#[derive(Default)]
pub struct DevBuf {
    ptr: DevPtr,
    bytes: usize,
    serial: u64,
    release: Option<Release>,
}

/// Serial number of the next allocation: later allocations get larger numbers, so the largest serial of a set
/// of buffers changes whenever one of them is reallocated (how a prepared job finds that its buffers moved).
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl DevBuf {
    /// A new allocation of at least `bytes` (16 at the least, uninitialised) on `dev`.
    pub fn alloc(dev: &mut dyn Device, bytes: usize) -> Result<Self> {
        let bytes = bytes.max(16);
        let ptr = dev.alloc(bytes)?;
        let serial = NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self { ptr, bytes, serial, release: Some(dev.release()) })
    }

    /// The device address (0 when empty).
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    /// The size of the allocation in bytes (0 when empty).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// This allocation's serial number (0 when empty): larger for every later allocation in the process.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The address of a buffer of at least `bytes` on `dev`: this one, reallocated (without its contents) only
    /// when it is smaller.
    pub fn reserve(&mut self, dev: &mut dyn Device, bytes: usize) -> Result<DevPtr> {
        if self.ptr == 0 || self.bytes < bytes {
            // Free the old allocation before making the larger one.
            *self = Self::default();
            *self = Self::alloc(dev, bytes)?;
        }
        Ok(self.ptr)
    }

    /// Copies `data` to the start of this buffer, grown first where it is too small; returns the address.
    pub fn upload<T: bytemuck::Pod>(&mut self, dev: &mut dyn Device, data: &[T]) -> Result<DevPtr> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let ptr = self.reserve(dev, bytes.len())?;
        dev.upload(ptr, bytes)?;
        Ok(ptr)
    }

    /// [`DevBuf::upload`] by a staged copy that does not wait ([`Device::upload_staged`]): for a step's inputs.
    pub fn upload_staged<T: bytemuck::Pod>(&mut self, dev: &mut dyn Device, data: &[T]) -> Result<DevPtr> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let ptr = self.reserve(dev, bytes.len())?;
        dev.upload_staged(ptr, bytes)?;
        Ok(ptr)
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release(self.ptr);
        }
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// Raw device operations. Kernel parameters are passed as `cuLaunchKernel` takes them: one pointer per
/// parameter, pointing at the parameter's value.
pub trait Device: Send {
    /// Human-readable description of the device (name, compute capability).
    fn describe(&self) -> String;
    /// Whether this is the host emulation (slow: benchmarks report it as such).
    fn is_emulated(&self) -> bool;
    /// Allocates `bytes` (uninitialised, 256-byte aligned at least); [`DevBuf::alloc`] is the owning form.
    fn alloc(&mut self, bytes: usize) -> Result<DevPtr>;
    /// How allocations of [`Device::alloc`] are freed (each once; the stream's work is waited for first).
    fn release(&self) -> Release;
    /// Copies host bytes to the device and waits for the copy (the caller may free `src` next).
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Copies host bytes to the device without waiting: `src` is copied into the device's pinned staging at
    /// once, and the stream copies it from there in order with the launches (so the next kernels see it). A
    /// staging slot stays reserved until the stream is known to have passed it (the next synchronising call);
    /// only when the staging is full does a call wait. The hot path's upload: a decoding step's inputs in one
    /// packed copy.
    fn upload_staged(&mut self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Copies device bytes to the host (waits for the stream).
    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    /// The bytes [`Device::upload`] and [`Device::download`] have copied since the device was opened.
    fn transfers(&self) -> Transfers;
    /// Device-to-device copy (the bandwidth yardstick of the benchmarks).
    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    /// Launches kernel `name` on the device's one stream.
    ///
    /// # Safety
    /// `params` must match the kernel's parameter list and every pointer must stay valid until the launch is
    /// over (until [`Device::synchronize`] or a download).
    unsafe fn launch(
        &mut self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()>;
    /// Launches kernel `name` on a caller's stream (a raw `CUstream`; 0 = the device's own stream): the C ABI's
    /// copy-free entry point runs on the stream its caller already uses. The emulation runs every launch to
    /// completion at once, so it has no streams and ignores `stream`.
    ///
    /// # Safety
    /// As for [`Device::launch`]; a non-zero `stream` must be a live stream of this device's context.
    unsafe fn launch_on(
        &mut self,
        stream: usize,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let _ = stream;
        // SAFETY: forwarded contract.
        unsafe { self.launch(name, grid, block, smem, params) }
    }
    /// Whether kernel `name` can run in thread-block clusters of `cluster` blocks (along x) of `block` threads
    /// with `smem` bytes of dynamic shared memory each: Hopper GPUs running a module built for sm_90 and the
    /// emulation can; everything else answers false.
    fn supports_cluster(&mut self, name: &str, block: u32, cluster: u32, smem: u32) -> bool {
        let _ = (name, block, cluster, smem);
        false
    }
    /// Launches kernel `name` in thread-block clusters of `cluster` consecutive blocks along x (`grid[0]` a
    /// multiple of `cluster`), on a caller's stream as [`Device::launch_on`]. An error where clusters are not
    /// supported (see [`Device::supports_cluster`]).
    ///
    /// # Safety
    /// As for [`Device::launch_on`].
    #[allow(clippy::too_many_arguments)]
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
        let _ = (stream, grid, block, smem, params);
        Err(crate::error::CageError::InvalidArgument(format!(
            "{}: no thread-block clusters (of {cluster} blocks for {name}) on this device",
            self.describe()
        )))
    }
    /// Waits until all launched work is done.
    fn synchronize(&mut self) -> Result<()>;
    /// The largest dynamic shared memory a block may use.
    fn max_dynamic_smem(&self) -> usize;
    /// Bytes of device memory free now (`None`: unknown), read before a large upload so that a model too big
    /// for the card is an error naming both sizes rather than a failed allocation halfway through.
    fn free_memory(&mut self) -> Result<Option<usize>>;
    /// Starts recording the stream's launches, GEMMs and device copies into a graph instead of running them
    /// (CUDA stream capture). Kernel parameters are copied when recorded, as CUDA does: a graph replays the
    /// values of its capture, so whatever changes between replays must live in device memory. Copies to or
    /// from the host and waits are errors while capturing.
    fn begin_capture(&mut self) -> Result<()>;
    /// Ends a capture and returns a handle to the instantiated graph (an error, and no graph, when something
    /// in the capture failed).
    fn end_capture(&mut self) -> Result<usize>;
    /// Launches a captured graph: one driver call for the whole recorded sequence.
    fn launch_graph(&mut self, graph: usize) -> Result<()>;
    /// Frees a captured graph (its handle is not reused).
    fn drop_graph(&mut self, graph: usize);
    /// Starts a timer on the device's stream (a device event on a GPU, the wall clock under emulation).
    fn timer_start(&mut self) -> Result<()>;
    /// Milliseconds of stream work since [`Device::timer_start`]; waits for that work to finish.
    fn timer_stop(&mut self) -> Result<f64>;
    /// `C = alpha * A W^T + beta * C` on the device's stream, all row-major: `A` is `[m, k]` bf16 (activations),
    /// `W` is `[n, k]` bf16 (a weight as PyTorch stores it, out x in, so no transposed copy is ever made), `C` is
    /// `[m, n]` f32 with f32 accumulation. `beta = 0` overwrites `C` whatever it held (as cuBLAS does). cuBLAS
    /// on a GPU; a plain host loop under emulation (its stand-in, for tiny models). The default is an error,
    /// for devices that have no GEMM.
    ///
    /// # Safety
    /// `a`, `w` and `c` must be device memory of at least `m * k * 2`, `n * k * 2` and `m * n * 4` bytes inside
    /// live allocations, each aligned to its element size; `c` must not overlap `a` or `w`.
    #[allow(clippy::too_many_arguments)]
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
        let _ = (m, n, k, a, w, c, alpha, beta);
        Err(crate::error::CageError::InvalidArgument(format!("{} offers no GEMM", self.describe())))
    }
}
