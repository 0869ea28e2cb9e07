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
}

impl Emulator {
    /// A fresh emulated device.
    pub fn new() -> Self {
        Self::default()
    }

    fn buffers(&self) -> MutexGuard<'_, HashMap<DevPtr, Vec<u128>>> {
        self.buffers.lock().unwrap_or_else(|e| e.into_inner())
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
        self.check(dst, src.len())?;
        // SAFETY: the range was checked to lie inside a live allocation of ours.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        self.transfers.upload(src.len());
        Ok(())
    }
    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
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
        // Kernel parameters arrive as untyped pointers, so a recording could not copy them: run launches directly.
        Err(CageError::InvalidArgument("the host emulation does not capture CUDA graphs".into()))
    }
    fn end_capture(&mut self) -> Result<usize> {
        Err(CageError::InvalidArgument("the host emulation does not capture CUDA graphs".into()))
    }
    fn launch_graph(&mut self, _graph: usize) -> Result<()> {
        Err(CageError::InvalidArgument("the host emulation does not capture CUDA graphs".into()))
    }
    fn timer_start(&mut self) -> Result<()> {
        self.timer = Some(std::time::Instant::now());
        Ok(())
    }
    fn timer_stop(&mut self) -> Result<f64> {
        let t = self.timer.take().ok_or_else(|| CageError::InvalidArgument("timer_stop without timer_start".into()))?;
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
        if m == 0 || n == 0 {
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
