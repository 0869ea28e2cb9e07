//! The host emulation device: the kernels of `kernels/` compiled by the host C++ compiler (see build.rs and
//! kernels/emu/cuda_emu.h), "device" memory in host buffers. Slow (every CUDA thread is a fiber) but it runs the
//! unchanged kernel sources, which is how CI tests them without a GPU.

use super::device::{DevPtr, Device, Release, Transfers};
use crate::error::{CageError, Result};
use std::collections::HashMap;
use std::ffi::{CString, c_char, c_void};
use std::sync::{Arc, Mutex, MutexGuard};

unsafe extern "C" {
    fn cage_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        cluster: u32,
        args: *mut *mut c_void,
    ) -> i32;
    fn cage_emu_param_sizes(name: *const c_char, out: *mut usize, max: i32) -> i32;
}

/// Most parameters a recorded launch may have.
const MAX_PARAMS: usize = 32;

/// One operation of a recorded graph: what CUDA's stream capture keeps of it.
enum Op {
    /// A kernel launch with a copy of each parameter's bytes (CUDA copies them at capture too).
    Launch { name: CString, grid: [u32; 3], block: [u32; 3], smem: u32, cluster: u32, params: Vec<Vec<u128>> },
    /// A GEMM of [`Device::gemm_bf16`] (cuBLAS' kernels, captured alike).
    Gemm { m: usize, n: usize, k: usize, a: DevPtr, w: DevPtr, c: DevPtr, alpha: f32, beta: f32 },
    /// A device-to-device copy.
    Copy { dst: DevPtr, src: DevPtr, bytes: usize },
}

/// Shared memory per block the emulation offers: an H100's, so that the host picks the same code paths.
pub const EMU_MAX_DYNAMIC_SMEM: usize = 227 * 1024;

/// Largest thread-block cluster the emulation runs (the portable limit of CUDA).
pub const EMU_MAX_CLUSTER: u32 = 8;

/// The emulated device.
#[derive(Default)]
pub struct Emulator {
    // u128 elements give 16-byte alignment, as the kernels' vector accesses need. Shared with the buffers'
    // release handles, which may outlive the device.
    buffers: Arc<Mutex<HashMap<DevPtr, Vec<u128>>>>,
    timer: Option<std::time::Instant>,
    transfers: Transfers,
    /// The operations recorded since [`Device::begin_capture`], and whether one of them failed.
    capture: Option<(Vec<Op>, Option<String>)>,
    /// Recorded graphs by handle (None once dropped).
    graphs: Vec<Option<Vec<Op>>>,
}

impl Emulator {
    /// A fresh emulated device.
    pub fn new() -> Self {
        Self::default()
    }

    fn buffers(&self) -> MutexGuard<'_, HashMap<DevPtr, Vec<u128>>> {
        self.buffers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An error when capturing: `what` (a copy to or from the host, a wait) cannot be part of a graph.
    fn not_capturing(&mut self, what: &str) -> Result<()> {
        if let Some((_, failed)) = &mut self.capture {
            let msg = format!("{what} while capturing a graph");
            failed.get_or_insert(msg.clone());
            return Err(CageError::InvalidArgument(format!("emulated device: {msg}")));
        }
        Ok(())
    }

    /// Records `op` when capturing (and returns true), so that the caller does not run it.
    fn record(&mut self, op: impl FnOnce() -> Result<Op>) -> Result<bool> {
        let Some((ops, failed)) = &mut self.capture else { return Ok(false) };
        match op() {
            Ok(op) => ops.push(op),
            Err(e) => {
                failed.get_or_insert(e.to_string());
                return Err(e);
            }
        }
        Ok(true)
    }

    fn check(&self, ptr: DevPtr, bytes: usize) -> Result<()> {
        let ok = self.buffers().iter().any(|(&p, b)| ptr >= p && ptr + bytes as u64 <= p + (b.len() * 16) as u64);
        if ok || bytes == 0 {
            Ok(())
        } else {
            Err(CageError::InvalidArgument(format!("emulated device: {bytes} bytes at {ptr:#x} are not allocated")))
        }
    }
}

impl Device for Emulator {
    fn describe(&self) -> String {
        "host emulation of CUDA (kernels compiled by the host C++ compiler)".into()
    }
    fn is_emulated(&self) -> bool {
        true
    }
    fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        let buf = vec![0u128; bytes.div_ceil(16).max(1)];
        let ptr = buf.as_ptr() as DevPtr;
        self.buffers().insert(ptr, buf);
        Ok(ptr)
    }
    fn release(&self) -> Release {
        let buffers = self.buffers.clone();
        Arc::new(move |ptr| {
            buffers.lock().unwrap_or_else(|e| e.into_inner()).remove(&ptr);
        })
    }
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.upload_staged(dst, src)?;
        // A GPU waits for this copy.
        self.transfers.wait();
        Ok(())
    }
    fn upload_staged(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.not_capturing("a copy from the host")?;
        self.check(dst, src.len())?;
        // SAFETY: the range was checked to lie inside a live allocation of ours.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        self.transfers.upload(src.len());
        Ok(())
    }
    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.not_capturing("a copy to the host")?;
        self.check(src, dst.len())?;
        // SAFETY: as in upload.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        self.transfers.download(dst.len());
        Ok(())
    }
    fn transfers(&self) -> Transfers {
        self.transfers
    }
    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.check(dst, bytes)?;
        self.check(src, bytes)?;
        if self.record(|| Ok(Op::Copy { dst, src, bytes }))? {
            return Ok(());
        }
        // SAFETY: both ranges checked; `copy` tolerates overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
    unsafe fn launch(
        &mut self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.launch_cluster(0, name, grid, block, 1, smem, params) }
    }
    fn supports_cluster(&mut self, _name: &str, block: u32, cluster: u32, smem: u32) -> bool {
        // An H100's limits: portable clusters of up to 8 blocks.
        (1..=EMU_MAX_CLUSTER).contains(&cluster) && block <= 1024 && smem as usize <= EMU_MAX_DYNAMIC_SMEM
    }
    unsafe fn launch_cluster(
        &mut self,
        _stream: usize,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        cluster: u32,
        smem: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        if !(1..=EMU_MAX_CLUSTER).contains(&cluster) || !grid[0].is_multiple_of(cluster) {
            return Err(CageError::InvalidArgument(format!(
                "launch of {name}: clusters of {cluster} blocks (at most {EMU_MAX_CLUSTER}) do not tile a grid of {} \
                 blocks",
                grid[0]
            )));
        }
        let threads = block.iter().product::<u32>();
        if threads == 0 || threads > 1024 || grid.contains(&0) {
            return Err(CageError::InvalidArgument(format!(
                "launch of {name}: invalid grid {grid:?} / block {block:?}"
            )));
        }
        let cname = CString::new(name).map_err(|_| CageError::InvalidArgument(format!("kernel name {name:?}")))?;
        let recorded = self.record(|| {
            // SAFETY: the caller guarantees that params match the kernel, whose parameter sizes these are.
            let params = unsafe { copy_params(&cname, params) }?;
            Ok(Op::Launch { name: cname.clone(), grid, block, smem, cluster, params })
        })?;
        if recorded {
            return Ok(());
        }
        // SAFETY: the caller guarantees params match the kernel; the launcher only reads them.
        let rc = unsafe {
            cage_emu_launch(cname.as_ptr(), grid.as_ptr(), block.as_ptr(), smem as usize, cluster, params.as_mut_ptr())
        };
        if rc != 0 {
            return Err(CageError::InvalidArgument(format!("emulated device: no kernel named {name}")));
        }
        Ok(())
    }
    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("a synchronisation")?;
        self.transfers.wait();
        Ok(())
    }
    fn max_dynamic_smem(&self) -> usize {
        EMU_MAX_DYNAMIC_SMEM
    }
    fn free_memory(&mut self) -> Result<Option<usize>> {
        // The emulation's device memory is the host's.
        Ok(crate::model::memory::host_available().map(|b| b.min(usize::MAX as u128) as usize))
    }
    fn begin_capture(&mut self) -> Result<()> {
        if self.capture.is_some() {
            return Err(CageError::InvalidArgument("emulated device: a graph capture is already under way".into()));
        }
        self.capture = Some((Vec::new(), None));
        Ok(())
    }
    fn end_capture(&mut self) -> Result<usize> {
        match self.capture.take() {
            None => Err(CageError::InvalidArgument("emulated device: end_capture without begin_capture".into())),
            Some((_, Some(failed))) => {
                Err(CageError::InvalidArgument(format!("emulated device: the graph capture failed: {failed}")))
            }
            Some((ops, None)) if ops.is_empty() => {
                Err(CageError::InvalidArgument("emulated device: the graph capture recorded nothing".into()))
            }
            Some((ops, None)) => {
                self.graphs.push(Some(ops));
                Ok(self.graphs.len() - 1)
            }
        }
    }
    fn launch_graph(&mut self, graph: usize) -> Result<()> {
        self.not_capturing("a graph launch")?;
        // Taken out while it runs, so that its operations can use the device; put back after.
        let ops = self
            .graphs
            .get_mut(graph)
            .and_then(Option::take)
            .ok_or_else(|| CageError::InvalidArgument(format!("emulated device: no graph {graph}")))?;
        let ran = self.replay(&ops);
        self.graphs[graph] = Some(ops);
        ran
    }
    fn drop_graph(&mut self, graph: usize) {
        if let Some(g) = self.graphs.get_mut(graph) {
            *g = None;
        }
    }
    fn timer_start(&mut self) -> Result<()> {
        self.timer = Some(std::time::Instant::now());
        Ok(())
    }
    fn timer_stop(&mut self) -> Result<f64> {
        let t = self.timer.take().ok_or_else(|| CageError::InvalidArgument("timer_stop without timer_start".into()))?;
        // A GPU waits for the stream here.
        self.transfers.wait();
        Ok(t.elapsed().as_secs_f64() * 1e3)
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
        // The emulation of cuBLAS: the same bf16 inputs, f32 products and f32 accumulation (the summation order
        // differs from cuBLAS', so results agree to f32 rounding, not bit for bit).
        self.check(a, m * k * 2)?;
        self.check(w, n * k * 2)?;
        self.check(c, m * n * 4)?;
        if m == 0 || n == 0 || self.record(|| Ok(Op::Gemm { m, n, k, a, w, c, alpha, beta }))? {
            return Ok(());
        }
        // SAFETY: the three ranges were checked to lie inside live allocations (16-byte aligned, so the casts
        // to u16 / f32 are aligned for every element offset the caller may add: multiples of 2 and 4 bytes);
        // the caller guarantees that `c` overlaps neither input.
        let (a, w, c) = unsafe {
            (
                std::slice::from_raw_parts(a as *const u16, m * k),
                std::slice::from_raw_parts(w as *const u16, n * k),
                std::slice::from_raw_parts_mut(c as *mut f32, m * n),
            )
        };
        let f = |b: u16| half::bf16::from_bits(b).to_f32();
        for (i, crow) in c.chunks_exact_mut(n).enumerate() {
            let arow = &a[i * k..(i + 1) * k];
            for (j, cij) in crow.iter_mut().enumerate() {
                let wrow = &w[j * k..(j + 1) * k];
                let dot: f32 = arow.iter().zip(wrow).map(|(&x, &y)| f(x) * f(y)).sum();
                *cij = if beta == 0.0 { alpha * dot } else { alpha * dot + beta * *cij };
            }
        }
        Ok(())
    }
}

impl Emulator {
    /// Runs a recorded graph's operations in order, each as it would have run uncaptured.
    fn replay(&mut self, ops: &[Op]) -> Result<()> {
        for op in ops {
            match op {
                Op::Launch { name, grid, block, smem, cluster, params } => {
                    let mut ptrs: Vec<*mut c_void> = params.iter().map(|p| p.as_ptr() as *mut c_void).collect();
                    let name = name.to_str().map_err(|_| CageError::InvalidArgument("kernel name".into()))?;
                    // SAFETY: the parameters are the copies recorded from a launch whose caller vouched for them;
                    // the kernel only reads them.
                    unsafe { self.launch_cluster(0, name, *grid, *block, *cluster, *smem, &mut ptrs) }?;
                }
                // SAFETY: recorded from a call whose caller vouched for the buffers, which a graph's owner keeps
                // alive while it replays it.
                Op::Gemm { m, n, k, a, w, c, alpha, beta } => {
                    unsafe { self.gemm_bf16(*m, *n, *k, *a, *w, *c, *alpha, *beta) }?
                }
                Op::Copy { dst, src, bytes } => self.copy(*dst, *src, *bytes)?,
            }
        }
        Ok(())
    }
}

/// A copy of each parameter of a launch of `name`, by the sizes its kernel declares (16-byte aligned, as a
/// kernel may read them).
///
/// # Safety
/// `params` must match the kernel's parameter list (each pointer at a value of the parameter's size).
unsafe fn copy_params(name: &CString, params: &[*mut c_void]) -> Result<Vec<Vec<u128>>> {
    let mut sizes = [0usize; MAX_PARAMS];
    // SAFETY: writes at most MAX_PARAMS sizes.
    let n = unsafe { cage_emu_param_sizes(name.as_ptr(), sizes.as_mut_ptr(), MAX_PARAMS as i32) };
    let name = name.to_string_lossy();
    if n < 0 {
        return Err(CageError::InvalidArgument(format!(
            "emulated device: no kernel named {name} (or over {MAX_PARAMS} parameters)"
        )));
    }
    if n as usize != params.len() {
        return Err(CageError::InvalidArgument(format!(
            "launch of {name}: {} parameters given, the kernel takes {n}",
            params.len()
        )));
    }
    Ok(params
        .iter()
        .zip(&sizes)
        .map(|(&p, &size)| {
            let mut v = vec![0u128; size.div_ceil(16)];
            // SAFETY: the caller guarantees that `p` points at a value of `size` bytes.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, v.as_mut_ptr() as *mut u8, size) };
            v
        })
        .collect())
}
