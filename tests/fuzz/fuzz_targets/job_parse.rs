//! Any message body: parsing returns a job or a classified error, never
//! panics, and an accepted job's id is key-safe.
#![no_main]

use kling_archiver::error::Classify as _;
use kling_archiver::job::Job;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match Job::parse(body) {
        Ok(job) => {
            let id = job.id.as_str();
            assert!(!id.is_empty() && id.len() <= 128);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            );
            assert!(id != "." && id != "..");
        }
        Err(e) => {
            assert!(!e.code().is_empty());
        }
    }
    let _ = Job::salvage_id(body);
});
