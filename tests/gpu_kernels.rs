//! The kernel test bodies of tests/kernels_bodies.rs on a real CUDA GPU (the module `gpu`, plus the
//! full-vocabulary shapes of `full_vocabulary`), and the checks that need none: no GPU is an ordinary error,
//! `auto` falls back to the CPU, and NVRTC compiles the embedded sources.
//! Without a GPU each GPU test prints a `SKIP` line and passes: these run for real from the bundle of
//! scripts/gpu-bundle.sh on the GPU machine, where `CAGE_REQUIRE_GPU=1` makes a skip a failure.

#[macro_use]
#[path = "kernels_bodies.rs"]
mod bodies;

use cage::backend::{Backend, cuda_usable, solve_with};
use cage::gpu::{EqOptions, Gpu, MODULES, ValueType};
use cage::solver::{Method, SolveOptions};

#[path = "common/skip.rs"]
mod support;
use support::skip;

/// GPU 0, or None after printing why the test is skipped.
fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::cuda(0) {
        Ok(g) => {
            eprintln!("{test}: running on {}", g.describe());
            Some(g)
        }
        Err(e) => {
            skip(&format!("{test}: no CUDA GPU ({e})"));
            None
        }
    }
}

// A 4099-candidate full row; three converged Jacobi cases to 1e-5. Pre-Hopper GPUs have no clusters.
kernel_tests!(gpu, open: gpu_or_skip, full_row: 4099, jacobi: (3, 1e-5), must_split: false);

/// Full-vocabulary shapes, beyond what the emulation runs in reasonable time.
mod full_vocabulary {
    use super::*;

    /// A row too long for shared memory: the global-memory path at V = 152064.
    #[test]
    fn equilibrium_matches_reference() {
        if let Some(mut g) = gpu_or_skip("full_vocabulary::equilibrium_matches_reference") {
            let (b64, b32) = bodies::batch(bodies::Shape::new(2, 152_064, 4), 77);
            let sol = g.equilibrium(&b32, &bodies::eq_opts()).unwrap();
            bodies::check_against_reference(&b64, &sol, "V = 152064");
        }
    }

    /// The full-vocabulary shape, split across a cluster with bf16 values, against the global-memory
    /// path.
    #[test]
    fn equilibrium_cluster_split() {
        let test = "full_vocabulary::equilibrium_cluster_split";
        let Some(mut g) = gpu_or_skip(test) else { return };
        if !bodies::has_clusters(&mut g) {
            skip(&format!("{test}: {} has no thread-block clusters", g.describe()));
            return;
        }
        let (_, b32) = bodies::batch(bodies::Shape::new(4, 128_256, 4), 78);
        let opts = EqOptions { values: ValueType::Bf16, ..bodies::eq_opts() };
        let job = g.prepare_equilibrium(&b32, &opts).unwrap();
        assert!(Gpu::equilibrium_launch(&job).1 > 1, "V = 128256, J = 4 bf16 rows were not split");
        g.run_equilibrium(&job).unwrap();
        let split = g.fetch_equilibrium(&job).unwrap();
        let global = g.equilibrium(&b32, &EqOptions { cluster: Some(1), stage: Some(false), ..opts }).unwrap();
        let d = split.policy.iter().zip(&global.policy).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d <= 2e-5, "split and global-memory policies differ by {d:e}");
    }

    #[test]
    fn candidates_match_cpu() {
        if let Some(mut g) = gpu_or_skip("full_vocabulary::candidates_match_cpu") {
            bodies::candidates_match_cpu(&mut g, 152_064);
        }
    }
}

/// Staged launches whose dynamic shared memory stays under 48 KiB while dynamic plus static (ptxas: the J = 8
/// kernels hold 12.5 KB of `__shared__`) crosses it: a launcher that opts in on the dynamic size alone has
/// these rejected by the driver. The emulation has no shared-memory limit, so only a GPU can show it. (Value
/// rows are staged padded to a multiple of 4 elements: N = 1364, J = 8 is the last f32 row under 48 KiB.)
mod shared_memory_windows {
    use super::*;

    #[test]
    fn staged_rows_just_below_the_dynamic_limit() {
        let Some(mut g) = gpu_or_skip("shared_memory_windows::staged_rows_just_below_the_dynamic_limit") else {
            return;
        };
        for (n, j) in [(1017, 8), (1200, 8), (1364, 8), (3975, 2), (4096, 2)] {
            let (b64, b32) = bodies::batch(bodies::Shape::new(2, n, j), 90 + n as u64);
            let job = g.prepare_equilibrium(&b32, &bodies::eq_opts()).unwrap();
            assert!(Gpu::equilibrium_launch(&job).0, "N = {n}, J = {j} f32 rows are no longer staged: move the window");
            g.run_equilibrium(&job).unwrap_or_else(|e| panic!("N = {n}, J = {j}: {e}"));
            let sol = g.fetch_equilibrium(&job).unwrap();
            bodies::check_against_reference(&b64, &sol, &format!("staged N = {n}, J = {j}"));
        }
    }
}

/// The bundle's guard: with `CAGE_REQUIRE_GPU=1` a GPU test that would skip fails instead.
#[test]
fn a_required_gpu_turns_skips_into_failures() {
    let run = |require: bool| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args(["gpu::equilibrium_edge_cases", "--exact", "--test-threads=1"]).env_remove(support::REQUIRE_GPU);
        if require {
            c.env(support::REQUIRE_GPU, "1");
        }
        let out = c.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, out) = run(true);
    assert!(out.contains("1 passed") || out.contains("1 failed"), "the filter ran no test: {out}");
    assert_eq!(ok, Gpu::cuda(0).is_ok(), "with {} set: {out}", support::REQUIRE_GPU);
    let (ok, out) = run(false);
    assert!(ok, "without it a missing GPU is a skip: {out}");
}

#[test]
fn backends_without_a_gpu_are_errors_or_fall_back() {
    let (b64, _) = bodies::batch(bodies::Shape::new(2, 20, 2), 5);
    let opts = SolveOptions::new(Method::Exact);
    let cpu = solve_with(Backend::Cpu, &b64, &opts).unwrap();
    let auto = solve_with(Backend::Auto, &b64, &opts).unwrap();
    match cuda_usable() {
        Err(e) => {
            skip(&format!("the CUDA half of backends_without_a_gpu_are_errors_or_fall_back: {e}"));
            // No GPU: cuda is an error that says so, never a panic, and auto is the CPU solver, bit for bit.
            let err = solve_with(Backend::Cuda, &b64, &opts).unwrap_err().to_string();
            assert!(err.contains("CUDA"), "{err}");
            assert!(Gpu::cuda(0).is_err());
            assert_eq!(auto.policy, cpu.policy);
        }
        Ok(_) => {
            // auto ran on the GPU in f32: it agrees with the CPU to f32 accuracy.
            let d = auto.policy.iter().zip(&cpu.policy).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(d < 1e-4, "auto (GPU) and cpu policies differ by {d:e}");
        }
    }
    // Methods the GPU does not run are an error on cuda and run on the CPU under auto.
    let jacobi = SolveOptions::new(Method::Linear);
    let e = solve_with(Backend::Cuda, &b64, &jacobi);
    assert!(e.is_err());
    assert!(solve_with(Backend::Auto, &b64, &jacobi).is_ok());
    assert!("gpu".parse::<Backend>().is_err());
    assert_eq!("auto".parse::<Backend>().unwrap(), Backend::Auto);
}

#[test]
fn nvrtc_compiles_every_embedded_kernel_source() {
    // The fallback path of builds made without nvcc. Needs libnvrtc (scripts/install-cuda.sh installs it; CI
    // puts its folder on LD_LIBRARY_PATH), not a GPU.
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        skip("nvrtc_compiles_every_embedded_kernel_source: libnvrtc not found (set LD_LIBRARY_PATH)");
        return;
    }
    for m in MODULES {
        let ptx = cage::gpu::cuda::compile_nvrtc_for(m, None).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        let text = ptx.to_src();
        for k in m.kernels {
            assert!(text.contains(&format!(".entry {k}(")), "{}: NVRTC output lacks {k}", m.name);
        }
        // For a Hopper GPU the cluster kernels get their body (cluster barriers in the PTX).
        let ptx = cage::gpu::cuda::compile_nvrtc_for(m, Some((9, 0))).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        if m.kernels.iter().any(|k| k.starts_with("cage_eqc_")) {
            assert!(ptx.to_src().contains("barrier.cluster"), "{}: no cluster barrier for sm_90", m.name);
        }
    }
}
