//! The decoding run config (`cage decode --config`): any text parses to a config or a clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cage::decode::RunConfig::parse(text);
    }
});
