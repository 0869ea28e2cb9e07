//! Shared by the targets that load model files.

use std::path::PathBuf;

/// A scratch folder for this process's files (tmpfs where there is one: targets write files every run).
pub fn scratch(tag: &str) -> PathBuf {
    let root = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    root.join(format!("cage-fuzz-{tag}-{}", std::process::id()))
}

/// libfuzzer-sys aborts on every panic, even one cage catches; cage turns the tokenizers crate's panics on
/// malformed tokenizer.json files into errors (src/model/tokenizer.rs), so only those are let through
/// (printed, not fatal). Any other panic still aborts and is reported.
pub fn let_tokenizer_panics_unwind() {
    let fatal = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.location().is_some_and(|l| l.file().contains("/tokenizers-")) {
            eprintln!("caught by cage: {info}");
        } else {
            fatal(info);
        }
    }));
}
