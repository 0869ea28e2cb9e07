//! The CUDA kernels run by the host emulation (kernels/emu) and checked against the CPU solvers: this is how
//! every CI run, on machines without a GPU, tests the unchanged kernel sources. The tests are the list of
//! tests/kernels_bodies.rs, in the module `emulated`.

#[macro_use]
#[path = "kernels_bodies.rs"]
mod bodies;

use cage::gpu::Gpu;

/// A fresh host emulation for every test.
fn emulation(_test: &str) -> Option<Gpu> {
    Some(Gpu::emulated())
}

// A 211-candidate full row: no multiple of the warp, the block or a vector width. One converged Jacobi case, to
// 1e-4: Algorithm 1 to 1e-5 takes thousands of passes, slow under emulation. The emulation runs clusters (each
// block on its own OS thread), so the split must not skip.
kernel_tests!(emulated, open: emulation, full_row: 211, jacobi: (1, 1e-4), must_split: true);
