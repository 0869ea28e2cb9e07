//! The CUDA kernels run by the host emulation (kernels/emu) and checked against the CPU solvers: this is how
//! every CI run, on machines without a GPU, tests the unchanged kernel sources.

#[path = "kernels_bodies.rs"]
mod bodies;

use cage::gpu::Gpu;

#[test]
fn emulated_equilibrium_matches_reference() {
    // 211 candidates: a full row that is no multiple of the warp, the block or a vector width.
    bodies::equilibrium_matches_reference(&mut Gpu::emulated(), 211);
}

#[test]
fn emulated_equilibrium_edge_cases() {
    bodies::equilibrium_edge_cases(&mut Gpu::emulated());
}

#[test]
fn emulated_equilibrium_cluster_split() {
    // The emulation runs clusters (each block on its own OS thread), so this must not skip.
    assert!(bodies::equilibrium_cluster_split(&mut Gpu::emulated()));
}

#[test]
fn emulated_equilibrium_bf16_values() {
    bodies::equilibrium_bf16_values(&mut Gpu::emulated());
}

#[test]
fn emulated_equilibrium_rejects_bad_requests() {
    bodies::equilibrium_rejects_bad_requests(&mut Gpu::emulated());
}

#[test]
fn emulated_candidates_match_cpu() {
    // 3001 tokens: more than the top-k limit, so `k = min(V, 1024)` and the full row take different paths.
    bodies::candidates_match_cpu(&mut Gpu::emulated(), 3001);
}

#[test]
fn emulated_device_step_matches_host_chain() {
    bodies::device_step_matches_host_chain(&mut Gpu::emulated());
}

#[test]
fn emulated_candidates_massive_ties() {
    bodies::candidates_massive_ties(&mut Gpu::emulated());
}

#[test]
fn emulated_candidates_reject_bad_requests() {
    bodies::candidates_reject_bad_requests(&mut Gpu::emulated());
    bodies::candidates_mostly_excluded(&mut Gpu::emulated());
}

#[test]
fn emulated_choose_is_reproducible_and_follows_pi() {
    bodies::choose_is_reproducible_and_follows_pi(&mut Gpu::emulated());
}

#[test]
fn emulated_principal_values_match_cpu() {
    bodies::principal_values_match_cpu(&mut Gpu::emulated());
}

#[test]
fn emulated_jacobi_matches_cpu() {
    // One converged case, to 1e-4: Algorithm 1 to 1e-5 takes thousands of passes, slow under emulation.
    bodies::jacobi_matches_cpu(&mut Gpu::emulated(), 1, 1e-4);
}

#[test]
fn emulated_graph_capture_is_an_error() {
    bodies::graph_replays_equilibrium(&mut Gpu::emulated());
}
