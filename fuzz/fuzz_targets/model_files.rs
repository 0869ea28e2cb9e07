//! A model folder from untrusted files: `config.json`, `model.safetensors`, `tokenizer.json` and
//! `tokenizer_config.json`, given as one input split at `SEP` (a part may be missing). Loading the config,
//! the weights, the model and the tokenizer, tokenizing and rendering the chat template give results or clear
//! errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

/// Separates the files of one input (see fuzz/make_corpus.py).
const SEP: &[u8] = b"\n==cage-fuzz==\n";
const FILES: [&str; 4] = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest);
    parts
}

fuzz_target!(init: common::let_tokenizer_panics_unwind(), |data: &[u8]| {
    let parts = split(data);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(parts[0]) {
        let _ = cage::model::ModelConfig::from_json(&v, "fuzz");
    }
    let dir = common::scratch("model");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, part) in FILES.iter().zip(&parts) {
        std::fs::write(dir.join(name), part).unwrap();
    }
    if let Ok(st) = cage::model::weights::TensorStore::open(&dir) {
        for name in st.names() {
            if let Some(shape) = st.shape(&name) {
                let _ = st.get(&name, &shape);
            }
        }
    }
    if let Ok(m) = cage::model::Model::load(&dir) {
        // The rotary table of a model whose weights matched its config.
        assert_eq!(m.config.inv_freq().len(), m.config.head_dim / 2);
    }
    if let Ok(t) = cage::model::Tokenizer::load(&dir) {
        for format in [cage::model::PromptFormat::Plain, cage::model::PromptFormat::Chat] {
            if let Ok(ids) = t.prompt_ids("Hello, wörld! t3 t4 42", format) {
                let _ = t.decode(&ids, false);
            }
        }
        let _ = t.eos_id();
    }
    let _ = std::fs::remove_dir_all(&dir);
});
