//! GGUF files: parse, dequantize every tensor, and when the file parses, import it into a model folder and
//! load that folder (weights and tokenizer). Every failure is a clear error; a failed import leaves nothing.
#![no_main]

use cage::model::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(init: common::let_tokenizer_panics_unwind(), |data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else { return };
    for t in &f.tensors {
        if let Ok(v) = f.dequantize(t) {
            assert_eq!(v.len(), t.numel(), "tensor {}", t.name);
        }
    }
    let dir = common::scratch("gguf");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("m.gguf");
    std::fs::write(&src, data).unwrap();
    let out = dir.join("out");
    match cage::model::import::import_gguf(&src, &out) {
        Ok(_) => {
            let _ = cage::model::Model::load(&out);
            if let Ok(t) = cage::model::Tokenizer::load(&out) {
                let _ = t.prompt_ids("Hello, wörld! 42", cage::model::PromptFormat::Chat);
                if let Ok(ids) = t.encode("Hello, wörld! 42", true) {
                    let _ = t.decode(&ids, true);
                }
            }
        }
        Err(e) => assert!(!out.exists(), "the failed import ({e}) left {}", out.display()),
    }
    let _ = std::fs::remove_dir_all(&dir);
});
