//! The metric catalogue: every metric the worker exports, its name, labels
//! and meaning, in one place (documented in `docs/operations.md`).
//!
//! Metrics go through the `metrics` facade; [`install`] puts the Prometheus
//! recorder behind it once per process. Without it (library use, most
//! tests) every call here is a no-op.

use std::sync::OnceLock;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages settled, by `outcome` (`archived`, `already_archived`,
/// `dead_lettered`, `requeued`, `returned`, `fatal`) and `code` (the
/// failure's stable code, `none` on success).
pub const JOBS: &str = "kling_archiver_jobs_total";
/// Jobs being worked on right now.
pub const JOBS_IN_FLIGHT: &str = "kling_archiver_jobs_in_flight";
/// Kling recognize calls by answer `code` (`ok`, `kling_1303`, …), probes
/// included.
pub const KLING_CALLS: &str = "kling_archiver_kling_calls_total";
/// The adaptive (AIMD) limit on Kling calls in flight.
pub const KLING_LIMIT: &str = "kling_archiver_kling_adaptive_limit";
/// 1 while the worker is suspended, by `cause` (`account`, `outage`,
/// `archive`, `cdn`; see [`SUSPEND_CAUSES`]).
pub const SUSPENDED: &str = "kling_archiver_suspended";
/// Kling `final_unit_deduction`, summed, in thousandths of a unit.
pub const COST: &str = "kling_archiver_cost_milliunits_total";

/// Seconds per job stage, by `stage` (`fetch`, `prepare`, `kling`,
/// `archive`); the `kling` stage includes retries and waiting for a permit.
pub const STAGE_SECONDS: &str = "kling_archiver_stage_seconds";
/// Segment PNG bytes downloaded from Kling and stored.
pub const ARCHIVED_BYTES: &str = "kling_archiver_archived_bytes_total";
/// Stored recognitions whose result URLs had expired, recognized again.
pub const RESULTS_EXPIRED: &str = "kling_archiver_results_expired_total";
/// Kling calls sent without an answer coming back whole (timeout, dropped
/// connection): perhaps billed, retried only after re-checking the record.
pub const KLING_AMBIGUOUS: &str = "kling_archiver_kling_ambiguous_calls_total";
/// Jobs that used a stored recognition instead of calling Kling.
pub const RECOGNITIONS_REUSED: &str = "kling_archiver_recognitions_reused_total";
/// Jobs that waited for another job (in this process or another worker)
/// holding the claim on their image.
pub const LEASE_WAITS: &str = "kling_archiver_lease_waits_total";
/// Leases taken over from a holder that stopped renewing (died).
pub const LEASE_TAKEOVERS: &str = "kling_archiver_lease_takeovers_total";
/// Billed Kling answers that failed our checks (kept, never re-billed).
pub const KLING_BAD_ANSWERS: &str = "kling_archiver_kling_bad_answers_total";
/// 1 while the archive answered the last reachability check.
pub const STORE_REACHABLE: &str = "kling_archiver_store_reachable";
/// Billed Kling answers held in memory because the archive cannot take
/// their record yet (a crash now loses exactly these).
pub const ANSWERS_UNRECORDED: &str = "kling_archiver_answers_unrecorded";
/// Billed Kling answers whose record was never written (the job's deadline
/// ran out, or the worker exited first): a retry pays for them again.
pub const ANSWERS_LOST: &str = "kling_archiver_answers_lost_total";
/// Always 1, labelled with the build: `version` and `jpeg_simd` (`true`,
/// or `false` when libjpeg was built without nasm: slow preparation).
pub const BUILD_INFO: &str = "kling_archiver_build_info";

const STAGE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the Prometheus recorder (once per process) and return the handle
/// that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), STAGE_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed already; then the
            // handle renders an empty page, which the caller can see.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            build_info();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(JOBS, "Messages settled, by outcome and code");
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs being worked on right now");
    describe_counter!(KLING_CALLS, "Kling recognize calls by answer code");
    describe_gauge!(KLING_LIMIT, "Adaptive limit on Kling calls in flight");
    describe_gauge!(SUSPENDED, "1 while the worker is suspended, by cause");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Seconds per job stage");
    describe_counter!(ARCHIVED_BYTES, Unit::Bytes, "Segment PNG bytes stored");
    describe_gauge!(STORE_REACHABLE, "1 while the archive answers");
    describe_gauge!(
        ANSWERS_UNRECORDED,
        "Billed Kling answers held in memory, waiting for the archive"
    );
    describe_counter!(
        ANSWERS_LOST,
        "Billed Kling answers whose record was never written (paid again on retry)"
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; labels say the version and whether the JPEG codec has SIMD"
    );
    describe_counter!(
        RESULTS_EXPIRED,
        "Stored recognitions whose results expired, recognized again"
    );
    describe_counter!(
        KLING_AMBIGUOUS,
        "Kling calls sent without a whole answer back (perhaps billed)"
    );
    describe_counter!(
        RECOGNITIONS_REUSED,
        "Jobs that used a stored recognition instead of calling Kling"
    );
    describe_counter!(
        LEASE_WAITS,
        "Jobs that waited for another holder of their image's claim"
    );
    describe_counter!(
        LEASE_TAKEOVERS,
        "Leases taken over from a holder that stopped renewing"
    );
    describe_counter!(
        KLING_BAD_ANSWERS,
        "Billed Kling answers that failed our checks, kept as they came"
    );
    describe_counter!(
        COST,
        Unit::Count,
        "Kling final_unit_deduction summed, in thousandths of a unit"
    );
    describe_gauge!(BUILD_INFO, "1, labelled with the version and JPEG SIMD");
    // Exported at 0 from start-up, so alerts on their increase see the first
    // (a series born at 1 is invisible to increase()). The cost alert divides
    // billed calls by archived jobs: both start at 0, or a fresh worker's
    // first burst skews the ratio for an hour.
    claim_counters_at_zero();
    counter!(ANSWERS_LOST).increment(0);
    gauge!(ANSWERS_UNRECORDED).set(0.0);
    counter!(KLING_CALLS, "code" => "ok").increment(0);
    for outcome in ["archived", "already_archived"] {
        counter!(JOBS, "outcome" => outcome, "code" => "none").increment(0);
    }
}

fn build_info() {
    use crate::build_info::{JPEG_SIMD, VERSION};
    let simd = if JPEG_SIMD { "true" } else { "false" };
    gauge!(BUILD_INFO, "version" => VERSION, "jpeg_simd" => simd).set(1.0);
}

pub fn job(outcome: &'static str, code: &'static str) {
    counter!(JOBS, "outcome" => outcome, "code" => code).increment(1);
}

pub fn jobs_in_flight(delta: f64) {
    gauge!(JOBS_IN_FLIGHT).increment(delta);
}

pub fn kling_call(code: &'static str) {
    counter!(KLING_CALLS, "code" => code).increment(1);
}

pub fn kling_limit(limit: usize) {
    gauge!(KLING_LIMIT).set(limit as f64);
}

/// The `cause` values of [`SUSPENDED`]: Kling refuses the account, Kling
/// outage (breaker open), archive unreachable, Kling's CDN failing.
pub const SUSPEND_CAUSES: [&str; 4] = ["account", "outage", "archive", "cdn"];

/// Set [`SUSPENDED`] for one cause.
pub fn suspended(cause: &'static str, on: bool) {
    gauge!(SUSPENDED, "cause" => cause).set(if on { 1.0 } else { 0.0 });
}

/// Every cause at 0, so the series exist from start-up.
pub fn not_suspended() {
    for c in SUSPEND_CAUSES {
        suspended(c, false);
    }
}

pub fn answers_unrecorded(n: usize) {
    gauge!(ANSWERS_UNRECORDED).set(n as f64);
}

pub fn answers_lost(n: usize) {
    counter!(ANSWERS_LOST).increment(n as u64);
}

pub fn archived_bytes(n: usize) {
    counter!(ARCHIVED_BYTES).increment(n as u64);
}

pub fn results_expired() {
    counter!(RESULTS_EXPIRED).increment(1);
}

pub fn kling_ambiguous() {
    counter!(KLING_AMBIGUOUS).increment(1);
}

pub fn recognition_reused() {
    counter!(RECOGNITIONS_REUSED).increment(1);
}

pub fn lease_wait() {
    counter!(LEASE_WAITS).increment(1);
}

pub fn lease_takeover() {
    counter!(LEASE_TAKEOVERS).increment(1);
}

pub fn kling_bad_answer() {
    counter!(KLING_BAD_ANSWERS).increment(1);
}

/// Register the claim counters at zero, so `/metrics` shows them (and
/// alerts can use them) before the first event.
pub fn claim_counters_at_zero() {
    for name in [
        KLING_AMBIGUOUS,
        RECOGNITIONS_REUSED,
        LEASE_WAITS,
        LEASE_TAKEOVERS,
        KLING_BAD_ANSWERS,
    ] {
        counter!(name).increment(0);
    }
}

pub fn store_reachable(ok: bool) {
    gauge!(STORE_REACHABLE).set(if ok { 1.0 } else { 0.0 });
}

/// Times one stage of a job; recorded by [`StageTimer::stop`] (a failed
/// stage, which returns early, is not recorded).
pub struct StageTimer {
    stage: &'static str,
    started: std::time::Instant,
}

impl StageTimer {
    pub fn start(stage: &'static str) -> Self {
        Self {
            stage,
            started: std::time::Instant::now(),
        }
    }

    pub fn stop(self) {
        histogram!(STAGE_SECONDS, "stage" => self.stage)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// Add a `final_unit_deduction` ("1", "0.5", "12.125").
pub fn cost(units: &str) {
    if let Some(milli) = milliunits(units) {
        counter!(COST).increment(milli);
    }
}

/// A decimal string in thousandths, rounded down; `None` if unreadable.
fn milliunits(units: &str) -> Option<u64> {
    let units = units.trim();
    let (whole, frac) = units.split_once('.').unwrap_or((units, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let frac: String = frac.chars().chain("000".chars()).take(3).collect();
    whole.checked_mul(1000)?.checked_add(frac.parse().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliunits_reads_decimal_strings() {
        assert_eq!(milliunits("1"), Some(1000));
        assert_eq!(milliunits("0.5"), Some(500));
        assert_eq!(milliunits("12.1259"), Some(12125));
        assert_eq!(milliunits(".25"), Some(250));
        assert_eq!(milliunits("-1"), None);
        assert_eq!(milliunits("1e3"), None);
        assert_eq!(milliunits(""), Some(0));
    }
}
