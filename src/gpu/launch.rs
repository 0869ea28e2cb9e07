//! One typed builder for every kernel launch of the host layer (candle's `builder.arg(&x)`, FlashInfer's
//! `void* args[]` beside the call): the kernel's name, its grid, and its arguments in the order of its
//! parameter list, each with the width the kernel reads. [`Launch::run`] hands them to the raw
//! [`Device`] seam as `cuLaunchKernel` takes them (one pointer per argument, at the argument's value).
//!
//! ```text
//! // SAFETY: the arguments follow cage_topk_f32's parameter list; the buffers hold the extents it reads.
//! unsafe { Launch::new("cage_topk_f32").grid(rows).block(256).ptr(x).i32(v).i32(k).ptr(ids).run(dev) }?;
//! ```

use super::device::{DevPtr, Device};
use crate::error::Result;
use std::ffi::c_void;

/// Most arguments a kernel of `kernels/` takes (the Jacobi kernel: 18).
const MAX_ARGS: usize = 20;

/// One kernel argument, by the width and type the kernel's parameter has.
#[derive(Clone, Copy, Debug)]
enum Arg {
    /// A device pointer or a 64-bit integer.
    U64(u64),
    I32(i32),
    U32(u32),
    F32(f32),
}

impl Arg {
    /// The pointer `cuLaunchKernel` expects for this argument: the address of its value.
    fn param(&mut self) -> *mut c_void {
        match self {
            Arg::U64(x) => x as *mut u64 as *mut c_void,
            Arg::I32(x) => x as *mut i32 as *mut c_void,
            Arg::U32(x) => x as *mut u32 as *mut c_void,
            Arg::F32(x) => x as *mut f32 as *mut c_void,
        }
    }
}

/// A kernel launch being built: one block of one thread, no dynamic shared memory, no cluster and the
/// device's own stream until said otherwise.
#[derive(Clone, Copy, Debug)]
#[must_use = "a launch does nothing until it is run"]
pub(crate) struct Launch<'a> {
    kernel: &'a str,
    grid: [u32; 3],
    block: u32,
    smem: u32,
    cluster: u32,
    stream: usize,
    args: [Arg; MAX_ARGS],
    len: usize,
}

impl<'a> Launch<'a> {
    /// A launch of the `extern "C"` kernel `kernel`.
    pub(crate) fn new(kernel: &'a str) -> Self {
        Self { kernel, grid: [1; 3], block: 1, smem: 0, cluster: 1, stream: 0, args: [Arg::U64(0); MAX_ARGS], len: 0 }
    }

    /// `blocks` blocks along x.
    pub(crate) fn grid(self, blocks: u32) -> Self {
        self.grid_xy(blocks, 1)
    }

    /// `x` by `y` blocks.
    pub(crate) fn grid_xy(mut self, x: u32, y: u32) -> Self {
        self.grid = [x, y, 1];
        self
    }

    /// `x` by `y` by `z` blocks.
    pub(crate) fn grid_xyz(mut self, x: u32, y: u32, z: u32) -> Self {
        self.grid = [x, y, z];
        self
    }

    /// `threads` threads per block (along x).
    /// A block of a thread per 8 entries of a `width`-wide row (whole warps, 32 to 1024 threads): the
    /// block-per-row kernels (top-k / log-softmax, values) read a row with 16-byte loads, and a small
    /// vocabulary does not pay for idle warps.
    pub(crate) fn row_block(self, width: usize) -> Self {
        self.block(width.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32)
    }

    pub(crate) fn block(mut self, threads: u32) -> Self {
        self.block = threads;
        self
    }

    /// `bytes` of dynamic shared memory per block.
    pub(crate) fn smem(mut self, bytes: u32) -> Self {
        self.smem = bytes;
        self
    }

    /// Thread-block clusters of `blocks` consecutive blocks along x (1: no cluster); see
    /// [`Device::launch_cluster`].
    pub(crate) fn cluster(mut self, blocks: u32) -> Self {
        self.cluster = blocks;
        self
    }

    /// On a caller's stream (a raw `CUstream`; 0: the device's own), see [`Device::launch_on`].
    pub(crate) fn stream(mut self, stream: usize) -> Self {
        self.stream = stream;
        self
    }

    fn arg(mut self, a: Arg) -> Self {
        assert!(self.len < MAX_ARGS, "{}: more than {MAX_ARGS} kernel arguments", self.kernel);
        self.args[self.len] = a;
        self.len += 1;
        self
    }

    /// A pointer parameter (`T*`; 0 for NULL).
    pub(crate) fn ptr(self, p: DevPtr) -> Self {
        self.arg(Arg::U64(p))
    }

    /// An `int` parameter.
    pub(crate) fn i32(self, x: i32) -> Self {
        self.arg(Arg::I32(x))
    }

    /// An `unsigned int` parameter.
    pub(crate) fn u32(self, x: u32) -> Self {
        self.arg(Arg::U32(x))
    }

    /// An `unsigned long long` parameter.
    pub(crate) fn u64(self, x: u64) -> Self {
        self.arg(Arg::U64(x))
    }

    /// A `float` parameter.
    pub(crate) fn f32(self, x: f32) -> Self {
        self.arg(Arg::F32(x))
    }

    /// Launches on `dev` (asynchronously on a GPU).
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in number, order and type, and every pointer must
    /// be device memory of `dev` holding what the kernel reads and writes for this grid, valid until the launch
    /// is over (a synchronisation or a download); a stream must be a live stream of `dev`'s context.
    pub(crate) unsafe fn run(mut self, dev: &mut dyn Device) -> Result<()> {
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (p, a) in params.iter_mut().zip(&mut self.args[..self.len]) {
            *p = a.param();
        }
        let params = &mut params[..self.len];
        let (name, grid, block) = (self.kernel, self.grid, [self.block, 1, 1]);
        // SAFETY: the caller vouches for the arguments; `self.args`, which `params` point into, outlives the
        // call, which copies the values.
        unsafe {
            if self.cluster > 1 {
                dev.launch_cluster(self.stream, name, grid, block, self.cluster, self.smem, params)
            } else if self.stream != 0 {
                dev.launch_on(self.stream, name, grid, block, self.smem, params)
            } else {
                dev.launch(name, grid, block, self.smem, params)
            }
        }
    }
}
