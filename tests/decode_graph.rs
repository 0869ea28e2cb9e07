//! The resident decoding step replayed as a graph against the same step launched kernel by kernel, on the
//! emulation (which records a capture as CUDA does: launches with a copy of their parameters, GEMMs and device
//! copies, replayed by `launch_graph`), and both against the host stages (`--diagnostics`: the host's f64
//! candidates, values, policy and Philox draws on the same forwards), the reference of tests/decode_resident.rs.
//! Equal tokens over several steps, greedy and sampled, show that nothing that changes from step to step was
//! frozen into the graph (a step counter, a position, a token); a row finishing early changes the shape, which
//! must fall back to plain launches and capture again. `CAGE_TEST_MODEL_DEVICE=cuda` (the GPU bundle) runs the
//! decoding bodies on a GPU, where the graph is CUDA's.

use cage::decode::{DecodeOptions, Engine, RowRequest, RunConfig, Timings};
use cage::gpu::Gpu;
use cage::sampling::Choice;
use std::ffi::c_void;
use std::path::Path;

fn fixture(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p).display().to_string()
}

/// Where the models run: the emulation, or `CAGE_TEST_MODEL_DEVICE=cuda`.
fn model_device() -> String {
    std::env::var("CAGE_TEST_MODEL_DEVICE").unwrap_or_else(|_| "emulation".into())
}

/// How a run's steps are made.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    /// The resident step, captured and replayed.
    Graph,
    /// The resident step, kernel by kernel.
    Plain,
    /// The host stages.
    Host,
}

/// Decodes `prompts` with `method` on the emulation; the tokens of each row and the timings.
fn run(method: &str, choice: Choice, via: Via, prompts: &[String], max_new: usize) -> (Vec<Vec<u32>>, Timings) {
    let lexicon = serde_json::json!({"name": "words", "kind": "lexicon", "words": {"t5": 2.0, "t9": 1.0}});
    let arm = serde_json::json!({"name": "arm", "kind": "arm", "adapter": fixture("tiny-lora-a")});
    let cfg = RunConfig::parse(
        &serde_json::json!({
            "base": fixture("tiny-llama"), "tokenizer": fixture("tiny-word-tokenizer"),
            "principals": [lexicon, arm], "method": method, "tau": 0.5, "k": 16, "max_new_tokens": max_new,
            "model_device": model_device(), "seed": 11
        })
        .to_string(),
    )
    .unwrap();
    let e = Engine::from_config(&cfg).unwrap();
    let mut opts = DecodeOptions::from_config(&cfg).unwrap();
    opts.ignore_eos = true;
    opts.choice = choice;
    opts.graphs = via == Via::Graph;
    opts.diagnostics = via == Via::Host;
    let rows: Vec<RowRequest> =
        prompts.iter().map(|p| RowRequest { prompt: p.clone(), weights: cfg.weights() }).collect();
    let (res, t) = e.decode(&rows, &opts, &mut |_| {}).unwrap();
    (res.into_iter().map(|r| r.tokens).collect(), t)
}

#[test]
fn a_replayed_graph_gives_the_tokens_of_plain_launches() {
    let prompts = ["t3 t4 t5".to_string(), "t20 t21".to_string()];
    for method in ["cage", "genarm", "base"] {
        for choice in [Choice::Greedy, Choice::Gumbel] {
            let (plain, tp) = run(method, choice, Via::Plain, &prompts, 5);
            let (graph, tg) = run(method, choice, Via::Graph, &prompts, 5);
            let (host, _) = run(method, choice, Via::Host, &prompts, 5);
            assert_eq!(graph, plain, "{method} {choice:?}: graph vs plain launches");
            assert_eq!(graph, host, "{method} {choice:?}: graph vs the host stages");
            assert!(plain.iter().all(|r| r.len() == 5));
            // Prefill and the first decode step run plain (each a new shape), the second decode step is
            // captured, the rest replay it.
            assert_eq!((tp.paths.plain, tp.paths.graph, tp.paths.captures), (5, 0, 0), "{method}: {:?}", tp.paths);
            assert_eq!((tg.paths.plain, tg.paths.graph, tg.paths.captures), (2, 3, 1), "{method}: {:?}", tg.paths);
            assert_eq!(tg.paths.fallback, None);
            // A replay uploads and downloads what plain launches do.
            assert_eq!(tg.step_transfers.host_to_device, tp.step_transfers.host_to_device, "{method} {choice:?}");
            assert_eq!(tg.step_transfers.device_to_host, tp.step_transfers.device_to_host, "{method} {choice:?}");
            assert_eq!(tg.step_transfers.waits, tg.transfer_steps as u64, "{method}: one wait a step");
        }
    }
}

#[test]
fn a_row_finishing_changes_the_shape_and_the_step_falls_back_then_captures_again() {
    // The tiny model's context is 64 positions: a long prompt leaves its row a few tokens of room, so it stops
    // before the other and the batch shrinks from two rows to one.
    let long: Vec<String> = (0..58).map(|i| format!("t{}", 3 + i % 100)).collect();
    let prompts = [long.join(" "), "t20 t21".to_string()];
    let max_new = 9;
    let (host, _) = run("cage", Choice::Gumbel, Via::Host, &prompts, max_new);
    let (graph, t) = run("cage", Choice::Gumbel, Via::Graph, &prompts, max_new);
    assert_eq!(graph, host);
    let (l, n) = (host[0].len(), host[1].len());
    assert_eq!(n, max_new);
    assert!((3..max_new - 1).contains(&l), "the long row must stop part way: {l} tokens");
    // Two rows for l steps: the prefill and the first decode step plain, then one capture and replays; one row
    // for the rest: a plain step for the new shape, then a second capture and replays.
    let one = max_new - l;
    assert_eq!(t.paths.plain, 2 + 1, "{:?}", t.paths);
    assert_eq!(t.paths.captures, 2, "{:?}", t.paths);
    assert_eq!(t.paths.graph, (l - 2) + (one - 1), "{:?}", t.paths);
}

#[test]
fn the_emulation_records_a_capture_with_copies_of_the_parameters_and_replays_it() {
    let mut gpu = Gpu::emulated();
    let n = 8usize;
    let x0: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let d: Vec<f32> = (0..n).map(|i| 0.5 + i as f32).collect();
    let mut x = gpu.alloc(n * 4).unwrap();
    let mut dd = gpu.alloc(n * 4).unwrap();
    let dev = gpu.device();
    x.upload(dev, &x0).unwrap();
    dd.upload(dev, &d).unwrap();
    let read = |dev: &mut dyn cage::gpu::device::Device, p| {
        let mut out = vec![0f32; n];
        dev.download(p, bytemuck::cast_slice_mut(&mut out)).unwrap();
        out
    };
    dev.begin_capture().unwrap();
    // cage_tf_add(x, d, n): x += d. The count is changed after the launch: the graph keeps the value it had.
    let (mut xp, mut dp, mut count) = (x.ptr(), dd.ptr(), n as i32);
    let mut params =
        [&mut xp as *mut u64 as *mut c_void, &mut dp as *mut u64 as *mut c_void, &mut count as *mut i32 as *mut c_void];
    // SAFETY: cage_tf_add's parameter list; x and d hold n floats.
    unsafe { dev.launch("cage_tf_add", [1, 1, 1], [64, 1, 1], 0, &mut params) }.unwrap();
    count = 0;
    let _ = count;
    // Copies to or from the host cannot be captured.
    assert!(dev.upload_staged(x.ptr(), bytemuck::cast_slice(&x0)).is_err());
    let g = dev.end_capture();
    assert!(g.is_err(), "a capture with a failed operation gives no graph");
    // Again, without the upload.
    dev.begin_capture().unwrap();
    let mut count = n as i32;
    let mut params =
        [&mut xp as *mut u64 as *mut c_void, &mut dp as *mut u64 as *mut c_void, &mut count as *mut i32 as *mut c_void];
    // SAFETY: as above.
    unsafe { dev.launch("cage_tf_add", [1, 1, 1], [64, 1, 1], 0, &mut params) }.unwrap();
    count = 0;
    let _ = count;
    let g = dev.end_capture().unwrap();
    assert!(dev.synchronize().is_ok());
    assert_eq!(read(dev, x.ptr()), x0, "recorded, not run");
    for times in 1..=2 {
        dev.launch_graph(g).unwrap();
        let want: Vec<f32> = x0.iter().zip(&d).map(|(a, b)| a + times as f32 * b).collect();
        assert_eq!(read(dev, x.ptr()), want, "replay {times} adds d over all {n} elements");
    }
    dev.drop_graph(g);
    assert!(dev.launch_graph(g).is_err());
    // A launch with the wrong number of parameters is refused at capture.
    dev.begin_capture().unwrap();
    // SAFETY: refused before the kernel runs.
    assert!(unsafe { dev.launch("cage_tf_add", [1, 1, 1], [64, 1, 1], 0, &mut params[..2]) }.is_err());
    assert!(dev.end_capture().is_err());
}
