//! Host-device traffic of a decoding step, counted by the device layer (the emulation counts it too). The
//! resident step (`model_device` on a device) downloads per row the token and each principal's value there,
//! 4 x (1 + J) bytes, within the target of rows x (4 + 64) bytes for J <= 16, and uploads only what the next
//! forward reads (each stream's new token, its position, its KV slot and its logits row), packed in one staged
//! copy that does not wait; the only wait of a step is the download of its report. The host stages
//! (`--diagnostics`) download every stream's full-vocabulary logits. The CPU path reports no traffic.

use cage::decode::{DecodeOptions, Engine, RowRequest, RunConfig};
use std::path::Path;

fn fixture(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p).display().to_string()
}

fn run(principals: serde_json::Value, device: &str, method: &str, diagnostics: bool) -> cage::decode::Timings {
    let cfg = RunConfig::parse(
        &serde_json::json!({
            "base": fixture("tiny-llama"), "tokenizer": fixture("tiny-word-tokenizer"),
            "principals": principals, "method": method, "tau": 0.5, "k": 20, "max_new_tokens": 5,
            "model_device": device
        })
        .to_string(),
    )
    .unwrap();
    let e = Engine::from_config(&cfg).unwrap();
    let mut opts = DecodeOptions::from_config(&cfg).unwrap();
    opts.ignore_eos = true;
    opts.diagnostics = diagnostics;
    let rows: Vec<RowRequest> =
        ["t3 t4 t5", "t20 t21"].iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    e.decode(&rows, &opts, &mut |_| {}).unwrap().1
}

const VOCAB: u64 = 128;
const ROWS: u64 = 2;

#[test]
fn the_resident_step_downloads_tokens_and_values_only() {
    let lexicon = serde_json::json!({"name": "words", "kind": "lexicon", "words": {"t5": 2.0}});
    let arm = serde_json::json!({"name": "arm", "kind": "arm", "adapter": fixture("tiny-lora-a")});
    // (principals, J, streams per row): a lexicon reads the base's candidates; an ARM adds its adapter's stream
    // (its reference is the base stream).
    for (principals, j, streams) in [(serde_json::json!([lexicon]), 1, 1), (serde_json::json!([lexicon, arm]), 2, 2)] {
        for method in ["base", "linear", "genarm", "mod", "cage"] {
            let t = run(principals.clone(), "emulation", method, false);
            assert_eq!(t.transfer_steps, 4, "5 tokens: 4 steps after the prefill");
            let d2h = t.step_transfers.device_to_host / t.transfer_steps as u64;
            assert_eq!(d2h, ROWS * (1 + j) * 4, "{method}: {ROWS} rows x (token + {j} values): {t:?}");
            assert!(d2h <= ROWS * (4 + 64), "{method}: over the target of rows x (4 + 64) bytes");
            assert_eq!(t.step_transfers.downloads / t.transfer_steps as u64, 1, "{method}: one download a step");
            assert_eq!(t.step_transfers.uploads, t.transfer_steps as u64, "{method}: one packed upload a step: {t:?}");
            assert_eq!(t.step_transfers.waits, t.transfer_steps as u64, "{method}: one wait a step: {t:?}");
            // Token, position, slot and logits row of each stream: nothing else (tables, weights, lexicon)
            // is uploaded again once the rows stay the same.
            let h2d = t.step_transfers.host_to_device / t.transfer_steps as u64;
            assert_eq!(h2d, 4 * ROWS * streams * 4, "{method}: uploads per step: {t:?}");
        }
        // The host stages download every stream's logits.
        let t = run(principals.clone(), "emulation", "cage", true);
        let per_step = t.step_transfers.device_to_host / t.transfer_steps as u64;
        assert_eq!(per_step, ROWS * streams * VOCAB * 4, "{ROWS} rows x {streams} streams x {VOCAB} f32 logits: {t:?}");
        // One packed upload and one wait (the logits' download) a step there too.
        assert_eq!((t.step_transfers.uploads, t.step_transfers.waits), (4, 4), "host stages: {t:?}");
        let cpu = run(principals, "cpu", "cage", false);
        assert_eq!(cpu.step_transfers, Default::default(), "the CPU decoder has no device traffic");
        assert_eq!(cpu.transfer_steps, 4);
    }
}
