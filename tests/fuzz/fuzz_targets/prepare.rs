//! Any bytes as an image: the probe and the whole preparation return an
//! in-spec image or a classified error, never panic, and stay within the
//! limits (small ones here, so the fuzzer explores rather than allocates).
#![no_main]

use kling_archiver::prepare::{Limits, Spec, check, prepare, probe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = probe(data);
    let limits = Limits {
        max_pixels: 4_000_000,
        max_side: 8_000,
        max_input_bytes: 4 * 1024 * 1024,
    };
    if let Ok(out) = prepare(bytes::Bytes::copy_from_slice(data), &Spec::KLING, &limits) {
        let p = probe(&out.bytes).expect("a prepared image probes");
        assert!(
            check(&p, &Spec::KLING).is_empty(),
            "prepared image out of spec"
        );
    }
});
