//! Decoding with the equilibrium on the device: `backend: emulation` runs the CUDA kernels on the host emulation
//! inside the engine's loop and must decode what the CPU decodes, for every method (the methods without an
//! equilibrium included; `cage-paper` runs another truncation there and only has to decode); `auto` is the CPU without a GPU and the GPU with one; `cuda` without a GPU is a
//! NoGpu error.

mod common;

use cage::Backend;
use cage::decode::{DecodeMethod, DecodeOptions, Engine, Event, RowRequest, RunConfig, StepDiag};
use common::fixtures::tiny_run_config;
use serde_json::json;

const PROMPTS: [&str; 3] = ["t3 t4 t5 t6", "t20 t21", "t100 t7 t8 t9 t50 t60"];

/// Tokens per row and every step's diagnostics (row, step, iterations, KL(pi || pi0)) of `cfg` on `backend`.
type Run = (Vec<Vec<u32>>, Vec<(usize, usize, u32, f64)>);

fn run(cfg: &RunConfig, backend: Backend) -> cage::Result<Run> {
    let cfg = RunConfig { backend, ..cfg.clone() };
    let e = Engine::from_config(&cfg)?;
    let mut opts = DecodeOptions::from_config(&cfg)?;
    opts.diagnostics = true;
    let rows: Vec<RowRequest> =
        PROMPTS.iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    let mut diags: Vec<StepDiag> = vec![];
    let (res, _) = e.decode(&rows, &opts, &mut |ev| {
        if let Event::Step(d) = ev {
            diags.push(d.clone());
        }
    })?;
    let toks = res.iter().map(|r| r.tokens.clone()).collect();
    Ok((toks, diags.iter().map(|d| (d.row, d.step, d.iterations, d.kl)).collect()))
}

fn config(method: DecodeMethod, sampling: &str) -> RunConfig {
    tiny_run_config(json!({"method": method.to_string(), "weights": [1.0, 0.6], "tau": 0.2, "k": 20,
                           "sampling": sampling, "seed": 11, "max_new_tokens": 10}))
}

#[test]
fn every_method_decodes_on_the_emulated_device_as_on_the_cpu() {
    for m in DecodeMethod::ALL {
        for sampling in ["greedy", "sample"] {
            let cfg = config(m, sampling);
            let cpu = run(&cfg, Backend::Cpu).unwrap();
            let emu = run(&cfg, Backend::Emulation).unwrap_or_else(|e| panic!("{m} {sampling} on the emulation: {e}"));
            if m == DecodeMethod::CagePaper {
                // The device's `paper` is another approximation (the Jacobi kernel's projected-gradient
                // truncation, checked against its CPU mirror in tests/kernels_bodies.rs), not the CPU's port of the
                // authors' L-BFGS-B: it decodes, but its tokens are its own.
                assert!(emu.0.iter().all(|t| !t.is_empty()), "{m} {sampling}: no tokens on the emulation");
            } else {
                assert_eq!(emu.0, cpu.0, "{m} {sampling}: the emulated equilibrium decodes other tokens");
            }
            if matches!(m, DecodeMethod::Cage | DecodeMethod::CagePaper) {
                // The kernels ran: a policy solved in f32 on the device is not bit for bit the CPU's f64 one, so
                // the KL to the base differs in its last digits.
                assert_ne!(emu.1, cpu.1, "{m} {sampling}: the diagnostics are the CPU's");
                assert!(emu.1.iter().all(|d| d.2 >= 1), "{m}: a step without solver iterations");
            }
        }
    }
}

#[test]
fn auto_is_the_cpu_without_a_gpu_and_cuda_needs_one() {
    let cfg = config(DecodeMethod::Cage, "greedy");
    let cpu = run(&cfg, Backend::Cpu).unwrap();
    let auto = run(&cfg, Backend::Auto).unwrap();
    if cage::backend::cuda_usable().is_err() {
        assert_eq!(auto, cpu, "auto without a GPU must be the CPU, diagnostics included");
        match run(&cfg, Backend::Cuda) {
            Err(cage::CageError::NoGpu(_)) => {}
            other => panic!("backend cuda without a GPU must be a NoGpu error, got {other:?}"),
        }
        common::skip::skip("the GPU half of auto_is_the_cpu_without_a_gpu_and_cuda_needs_one: no GPU");
        return;
    }
    let cuda = run(&cfg, Backend::Cuda).unwrap();
    assert_eq!(auto, cuda, "auto with a GPU must be the GPU");
    assert_eq!(cuda.0, cpu.0, "the GPU's equilibrium decodes other tokens than the CPU's");
    assert_ne!(cuda.1, cpu.1, "the diagnostics are the CPU's: the GPU did not run");
}
