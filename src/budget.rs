//! The byte budget: bytes held by jobs in flight (sources, prepared
//! bodies and their base64 form, segment PNGs), beside the pixel budget
//! that bounds decoded pixels. `--memory-budget-mb` of MiB permits, split
//! in two pools so that no holder of one waits for the other:
//!
//! - **jobs** (3/4): a job reserves before its fetch, for the largest
//!   source it may get (`SOURCE_MAX_BYTES`, or the inline source's exact
//!   length), and gives back the excess once the source is in hand
//!   ([`JobBytes::settle`]); it never asks for more, so a job never waits
//!   for budget while holding some.
//! - **segments** (1/4): each segment download reserves the most a mask
//!   of the prepared image's size can weigh, and frees it once stored. A
//!   segment holder waits for nothing else, so the jobs waiting on this
//!   pool (holding job bytes) always see it drain.
//!
//! A request larger than its pool is clamped to the pool: that job runs
//! alone. Plain arithmetic and semaphores: knows nothing of jobs or I/O.

use std::sync::Arc;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

pub const MIB: u64 = 1 << 20;

/// Kling's largest accepted body: a prepared image never exceeds it.
const MAX_PREPARED_BYTES: u64 = 10 * 1000 * 1000;

/// Headroom of a segment PNG over its raw RGBA pixels (filter bytes,
/// chunks; PNG stores incompressible data with small overhead).
const PNG_OVERHEAD: u64 = 64 * 1024;

/// Bytes a job holds for a source of `source` bytes: the source, the
/// prepared body (at most Kling's 10 MB, at most about the source for a
/// re-encode, the same buffer when passed through), its base64 (4/3) and
/// the JSON request body built from it (4/3 again).
pub fn job_bytes(source: u64) -> u64 {
    let prepared = source.min(MAX_PREPARED_BYTES);
    source + prepared + prepared.div_ceil(3) * 8
}

/// The most one segment PNG of a `width` × `height` mask may hold:
/// its raw RGBA pixels plus PNG overhead.
pub fn segment_bytes(width: u32, height: u32) -> u64 {
    u64::from(width) * u64::from(height) * 4 + PNG_OVERHEAD
}

/// Whole MiB permits for `bytes` (at least one).
fn permits(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(MIB))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Memory of the process besides the budgets: runtime, TLS, HTTP and AMQP
/// connection buffers, allocator slack, the binary (MiB).
pub const BASE_MIB: u64 = 256;

/// Bytes per decoded pixel under the pixel budget: the decoded image and
/// one working copy (turned / resized), 4 bytes per pixel each.
pub const BYTES_PER_BUDGET_PIXEL: u64 = 8;

/// Per delivery held, outside the budget: the message body (a URL job is
/// a few hundred bytes; inline images are counted by the budget once
/// their job starts) and the job's own state (MiB).
pub const PER_DELIVERY_MIB: u64 = 1;

/// The pod memory (request, limit) in MiB that `MEMORY_BUDGET_MB`,
/// `PIXEL_BUDGET_MP` and `WORKER_PREFETCH` call for (docs/operations.md):
///
/// - request = BASE + MEMORY_BUDGET_MB (the steady state: the byte budget
///   in use, no decode at its peak);
/// - limit = request + ⌈PIXEL_BUDGET_MP × 10⁶ × 8 B⌉ + PREFETCH × 1 MiB.
pub fn pod_memory_mib(memory_budget_mb: u32, pixel_budget_px: u64, prefetch: usize) -> (u64, u64) {
    let request = BASE_MIB + u64::from(memory_budget_mb);
    let decode = (pixel_budget_px * BYTES_PER_BUDGET_PIXEL).div_ceil(MIB);
    (
        request,
        request + decode + prefetch as u64 * PER_DELIVERY_MIB,
    )
}

/// The worker-wide byte budget; clones share it.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    jobs: Pool,
    segments: Pool,
    max_source: u64,
}

#[derive(Debug, Clone)]
struct Pool {
    sem: Arc<Semaphore>,
    size: u32,
}

impl Pool {
    fn new(size: u32) -> Self {
        let size = size.max(1);
        Self {
            sem: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    async fn take(&self, bytes: u64) -> Result<OwnedSemaphorePermit, AcquireError> {
        self.sem
            .clone()
            .acquire_many_owned(permits(bytes).min(self.size))
            .await
    }

    fn in_use(&self) -> u32 {
        self.size - u32::try_from(self.sem.available_permits()).unwrap_or(self.size)
    }
}

impl MemoryBudget {
    /// `mb` MiB in all; `max_source` is `SOURCE_MAX_BYTES`.
    pub fn new(mb: u32, max_source: u64) -> Self {
        let segments = (mb / 4).max(1);
        Self {
            jobs: Pool::new(mb.saturating_sub(segments)),
            segments: Pool::new(segments),
            max_source,
        }
    }

    /// Reserve a job's bytes before its fetch: for `known` source bytes
    /// (an inline source), else for the largest source allowed.
    pub async fn admit(&self, known: Option<u64>) -> Result<JobBytes, AcquireError> {
        let permit = self
            .jobs
            .take(job_bytes(known.unwrap_or(self.max_source)))
            .await?;
        Ok(JobBytes { permit })
    }

    /// Reserve one segment download of a mask `width` × `height`.
    pub async fn segment(&self, width: u32, height: u32) -> Result<SegmentBytes, AcquireError> {
        let permit = self.segments.take(segment_bytes(width, height)).await?;
        Ok(SegmentBytes { _permit: permit })
    }

    /// MiB reserved now, (jobs, segments).
    pub fn in_use_mb(&self) -> (u32, u32) {
        (self.jobs.in_use(), self.segments.in_use())
    }
}

/// A job's bytes; freed on drop (the job is done).
#[derive(Debug)]
pub struct JobBytes {
    permit: OwnedSemaphorePermit,
}

impl JobBytes {
    /// The source is in hand: keep what `source` bytes need, free the rest.
    /// Never grows (a job does not wait for budget while holding some).
    pub fn settle(&mut self, source: u64) {
        let keep = permits(job_bytes(source)) as usize;
        let held = self.permit.num_permits();
        if keep < held {
            drop(self.permit.split(held - keep));
        }
    }

    pub fn mb(&self) -> usize {
        self.permit.num_permits()
    }
}

/// One segment's bytes; freed on drop.
#[derive(Debug)]
pub struct SegmentBytes {
    _permit: OwnedSemaphorePermit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_cover_source_body_base64_and_request() {
        // 3 MB photo re-encoded: source + body + 2 × 4/3 body.
        assert_eq!(job_bytes(3_000_000), 3_000_000 + 3_000_000 + 8_000_000);
        // The body never exceeds Kling's 10 MB.
        assert_eq!(
            job_bytes(64 * MIB),
            64 * MIB + 10_000_000 + 10_000_000_u64.div_ceil(3) * 8
        );
        assert_eq!(permits(1), 1);
        assert_eq!(permits(MIB + 1), 2);
        assert_eq!(segment_bytes(320, 320), 320 * 320 * 4 + PNG_OVERHEAD);
    }

    #[test]
    fn pod_memory_follows_the_flags() {
        // The deployment's flags: 1024 MiB, 150 MP, prefetch 64.
        assert_eq!(
            pod_memory_mib(1024, 150_000_000, 64),
            (1280, 1280 + 1145 + 64)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_wait_for_budget_and_the_excess_comes_back_after_the_fetch() {
        let b = MemoryBudget::new(80, 8 * MIB); // jobs 60, segments 20
        let mut first = b.admit(None).await.unwrap();
        assert_eq!(first.mb(), permits(job_bytes(8 * MIB)) as usize);
        assert!(
            first.mb() > 30,
            "two unknown sources cannot both be admitted"
        );
        let second = tokio::spawn({
            let b = b.clone();
            async move { b.admit(None).await.unwrap() }
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "waits for the first job's bytes");
        first.settle(100_000);
        assert_eq!(first.mb(), 1);
        let second = second.await.unwrap();
        assert_eq!(b.in_use_mb().0 as usize, 1 + second.mb());
        drop((first, second));
        assert_eq!(b.in_use_mb(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_larger_than_the_pool_runs_alone_and_settle_never_grows() {
        let b = MemoryBudget::new(8, 64 * MIB); // jobs 6
        let mut j = b.admit(Some(2 * MIB)).await.unwrap();
        let held = j.mb();
        j.settle(50 * MIB);
        assert_eq!(j.mb(), held, "settle only gives back");
        drop(j);
        let big = b.admit(None).await.unwrap();
        assert_eq!(big.mb(), 6, "clamped to the pool");
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(1), b.admit(Some(1)))
                .await
                .is_err(),
            "nothing else runs beside it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn segments_have_their_own_pool() {
        let b = MemoryBudget::new(8, 64 * MIB); // jobs 6, segments 2
        let _all_jobs = b.admit(None).await.unwrap();
        let s1 = b.segment(300, 300).await.unwrap();
        let _s2 = b.segment(300, 300).await.unwrap();
        assert_eq!(b.in_use_mb(), (6, 2), "job bytes do not block segments");
        let third = tokio::spawn({
            let b = b.clone();
            async move { b.segment(300, 300).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        drop(s1);
        third.await.unwrap().unwrap();
    }
}
