//! Host-device traffic of a decoding step, counted by the device layer (issue: the GPU path resident on the
//! device). Today the engine downloads each stream's full-vocabulary logits at every step and computes values
//! and the policy on the host: these tests pin that figure, so the resident path's reduction shows, and check
//! that the CPU path reports no traffic.

use cage::decode::{DecodeOptions, Engine, RowRequest, RunConfig};
use std::path::Path;

fn fixture(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p).display().to_string()
}

fn run(principals: serde_json::Value, device: &str) -> cage::decode::Timings {
    let cfg = RunConfig::parse(
        &serde_json::json!({
            "base": fixture("tiny-llama"), "tokenizer": fixture("tiny-word-tokenizer"),
            "principals": principals, "method": "cage", "tau": 0.5, "k": 20, "max_new_tokens": 5,
            "model_device": device
        })
        .to_string(),
    )
    .unwrap();
    let e = Engine::from_config(&cfg).unwrap();
    let mut opts = DecodeOptions::from_config(&cfg).unwrap();
    opts.ignore_eos = true;
    let rows: Vec<RowRequest> =
        ["t3 t4 t5", "t20 t21"].iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    e.decode(&rows, &opts, &mut |_| {}).unwrap().1
}

const VOCAB: u64 = 128;

#[test]
fn each_step_downloads_every_streams_logits_and_the_cpu_none() {
    let lexicon = serde_json::json!({"name": "words", "kind": "lexicon", "words": {"t5": 2.0}});
    let arm = serde_json::json!({"name": "arm", "kind": "arm", "adapter": fixture("tiny-lora-a")});
    // (principals, streams per row): a lexicon reads the base's candidates; an ARM adds its adapter's stream
    // (its reference is the base stream).
    for (principals, streams) in [(serde_json::json!([lexicon]), 1), (serde_json::json!([lexicon, arm]), 2)] {
        let t = run(principals.clone(), "emulation");
        assert_eq!(t.transfer_steps, 4, "5 tokens: 4 steps after the prefill");
        let per_step = t.step_transfers.device_to_host / t.transfer_steps as u64;
        assert_eq!(per_step, 2 * streams * VOCAB * 4, "2 rows x {streams} streams x {VOCAB} f32 logits: {t:?}");
        assert!(t.step_transfers.host_to_device > 0, "the step's tokens are uploaded: {t:?}");
        let cpu = run(principals, "cpu");
        assert_eq!(cpu.step_transfers, Default::default(), "the CPU decoder has no device traffic");
        assert_eq!(cpu.transfer_steps, 4);
    }
}
