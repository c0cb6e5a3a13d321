//! The static config parser (workloads and policies) on arbitrary text: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = ferry::config::Config::parse(text, std::path::Path::new("fuzz.yaml"));
});
