//! The one way a GPU test says that it did not run. Without a GPU (CI), a GPU test prints a `SKIP` line and
//! passes; on the GPU machine the bundle (scripts/gpu-bundle.sh) sets `CAGE_REQUIRE_GPU=1`, which turns every
//! skip into a failure, so that the proof run cannot pass by skipping.

/// Prints `SKIP line` past the test harness' output capture (which only captures the print macros), or panics
/// when `CAGE_REQUIRE_GPU` is set.
pub fn skip(line: &str) {
    if std::env::var_os(REQUIRE_GPU).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{line} ({REQUIRE_GPU} is set: a skipped GPU test is a failure)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {line}");
}

/// The variable that turns skips into failures.
pub const REQUIRE_GPU: &str = "CAGE_REQUIRE_GPU";

/// Runs `body` on the emulation, then on GPU 0 when there is one (a [`skip`] otherwise): one test body per
/// backend, each given a way to open its device and the device's name.
#[allow(dead_code)]
pub fn on_every_device(test: &str, body: impl Fn(&dyn Fn() -> cage::gpu::Gpu, &str)) {
    body(&cage::gpu::Gpu::emulated, "emulation");
    match cage::gpu::Gpu::cuda(0) {
        Ok(g) => {
            eprintln!("{test}: running on {}", g.describe());
            drop(g);
            body(&|| cage::gpu::Gpu::cuda(0).unwrap(), "cuda");
        }
        Err(e) => skip(&format!("{test}: no CUDA GPU ({e})")),
    }
}
