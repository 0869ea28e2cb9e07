//! The engine keeps its decoders for its life (src/decode/pool.rs): one decoder per model serves every chunk,
//! every method and every call, and a reused decoder decodes exactly as a fresh one.

use cage::decode::{DecodeMethod, DecodeOptions, Engine, RowRequest, RunConfig};
use std::path::Path;

fn fixture(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p).display().to_string()
}

fn config(device: &str) -> RunConfig {
    RunConfig::parse(
        &serde_json::json!({
            "base": fixture("tiny-llama"), "tokenizer": fixture("tiny-word-tokenizer"),
            "principals": [
                {"name": "arm", "kind": "arm", "adapter": fixture("tiny-lora-a")},
                {"name": "brief", "kind": "prompted", "instruction": "t9 t10"}
            ],
            "method": "cage", "tau": 0.5, "k": 20, "max_new_tokens": 6, "batch_size": 2, "model_device": device
        })
        .to_string(),
    )
    .unwrap()
}

fn decode(e: &Engine, cfg: &RunConfig, method: DecodeMethod, prompts: &[&str]) -> Vec<Vec<u32>> {
    let mut opts = DecodeOptions::from_config(cfg).unwrap();
    opts.method = method;
    let rows: Vec<RowRequest> =
        prompts.iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    e.decode(&rows, &opts, &mut |_| {}).unwrap().0.into_iter().map(|r| r.tokens).collect()
}

#[test]
fn one_decoder_serves_every_chunk_method_and_call_and_decodes_as_a_fresh_one() {
    for device in ["cpu", "emulation"] {
        let cfg = config(device);
        let same_length = ["t3 t4 t5", "t20 t21 t22", "t7 t8 t9", "t30 t31 t32", "t40 t41 t42"];
        let e = Engine::from_config(&cfg).unwrap();
        let first = decode(&e, &cfg, DecodeMethod::Cage, &same_length);
        // Three chunks of at most two rows, one model: one decoder.
        assert_eq!(e.decoders_built(), 1, "{device}: a decoder per chunk");
        let genarm = decode(&e, &cfg, DecodeMethod::Genarm, &same_length[..3]);
        let again = decode(&e, &cfg, DecodeMethod::Cage, &same_length);
        assert_eq!(e.decoders_built(), 1, "{device}: a decoder per call");
        assert_eq!(again, first, "{device}: a reused decoder decodes differently");
        // Each against a fresh engine: no state leaks from call to call.
        let fresh = |m, p: &[&str]| decode(&Engine::from_config(&cfg).unwrap(), &cfg, m, p);
        assert_eq!(first, fresh(DecodeMethod::Cage, &same_length), "{device}");
        assert_eq!(genarm, fresh(DecodeMethod::Genarm, &same_length[..3]), "{device}");
        // A longer prompt needs more positions: one more build, with room for both, then none.
        let long = ["t3 t4 t5 t6 t7 t8 t9 t10 t11 t12 t13 t14"];
        let l1 = decode(&e, &cfg, DecodeMethod::Cage, &long);
        assert_eq!(e.decoders_built(), 2, "{device}");
        decode(&e, &cfg, DecodeMethod::Cage, &same_length);
        assert_eq!(l1, decode(&e, &cfg, DecodeMethod::Cage, &long), "{device}");
        assert_eq!(e.decoders_built(), 2, "{device}: the grown decoder serves smaller requests");
        assert_eq!(l1, fresh(DecodeMethod::Cage, &long), "{device}");
    }
}
