//! Whether the worker's other dependencies can take work: the archive and
//! Kling's CDN. Kling itself has its own gate ([`crate::kling::gate`]).
//!
//! A dependency is marked **down** only by a probe that fails, never by
//! one job's failure: a job that fails with a transient archive or CDN
//! error asks for a probe ([`Outages::confirm`]), and only if the archive
//! (a HEAD) or the CDN's host (any HTTP answer) does not answer is the
//! failure an outage. Then the worker stops consuming, starts no Kling
//! call, and hands held jobs back uncharged, as for a Kling outage; a
//! supervisor probes every [`PROBE_EVERY`] and marks it **up** again.
//!
//! Knows nothing about S3, HTTP or RabbitMQ: the probe is the caller's.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How often a supervisor probes a dependency marked down.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A probe result this fresh answers a [`Outages::confirm`] without a new
/// probe (many jobs fail at once when a dependency goes away).
const PROBE_FRESH: Duration = Duration::from_millis(500);
/// A probe that takes longer than this counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A dependency the worker cannot work without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dependency {
    /// The archive (S3 or the local directory): no record, segment or
    /// manifest can be written.
    Archive,
    /// Kling's CDN: no result can be downloaded.
    Cdn,
}

impl Dependency {
    pub const ALL: [Dependency; 2] = [Dependency::Archive, Dependency::Cdn];

    /// The `cause` label of `kling_archiver_suspended`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dependency::Archive => "archive",
            Dependency::Cdn => "cdn",
        }
    }

    /// The stable code of a job handed back because of it.
    pub fn code(self) -> &'static str {
        match self {
            Dependency::Archive => "archive_down",
            Dependency::Cdn => "cdn_down",
        }
    }

    /// What readiness and the log say the operator can do.
    pub fn advice(self) -> &'static str {
        match self {
            Dependency::Archive => {
                "the archive does not answer: check the S3 endpoint (ARCHIVE_URL, AWS_ENDPOINT_URL), its credentials and the network; the worker resumes by itself when it answers"
            }
            Dependency::Cdn => {
                "Kling's result CDN does not answer: check the network path to KLING_RESULT_HOSTS; the worker resumes by itself when it answers, and stored recognitions are reused (nothing is billed again)"
            }
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One dependency marked down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Down {
    pub dependency: Dependency,
    pub since: Instant,
    /// What the failing probe said (no secrets: store and HTTP errors are
    /// already redacted).
    pub reason: String,
}

/// The last probe of one dependency.
#[derive(Debug, Default)]
struct LastProbe {
    at: Option<Instant>,
    ok: bool,
}

/// The state of the archive and the CDN, shared by the pipeline (which
/// reports failures and asks) and the worker (which pauses on it).
#[derive(Debug)]
pub struct Outages {
    state: watch::Sender<[Option<Down>; 2]>,
    /// One probe at a time per dependency; concurrent askers share it.
    probing: [tokio::sync::Mutex<LastProbe>; 2],
    /// Billed answers held in memory, waiting for the archive to take
    /// their record.
    unrecorded: AtomicUsize,
    /// The CDN origin (`scheme://host:port/`) the last failing download
    /// used: what the supervisor probes.
    cdn_origin: Mutex<Option<url::Url>>,
}

impl Default for Outages {
    fn default() -> Self {
        Self::new()
    }
}

impl Outages {
    pub fn new() -> Self {
        Self {
            state: watch::Sender::new([None, None]),
            probing: Default::default(),
            unrecorded: AtomicUsize::new(0),
            cdn_origin: Mutex::new(None),
        }
    }

    /// Watch dependencies go down and come back.
    pub fn subscribe(&self) -> watch::Receiver<[Option<Down>; 2]> {
        self.state.subscribe()
    }

    /// The first dependency marked down, if any.
    pub fn down(&self) -> Option<Down> {
        self.state.borrow().iter().flatten().next().cloned()
    }

    pub fn is_down(&self, dep: Dependency) -> bool {
        self.state.borrow()[dep.index()].is_some()
    }

    /// Mark `dep` down after a failed probe said `reason`; the first mark
    /// logs the one line that says what the worker waits for. True if this
    /// call marked it.
    pub fn mark_down(&self, dep: Dependency, reason: String) -> bool {
        let marked = self.state.send_if_modified(|s| {
            let slot = &mut s[dep.index()];
            if slot.is_some() {
                return false;
            }
            *slot = Some(Down {
                dependency: dep,
                since: Instant::now(),
                reason: reason.clone(),
            });
            true
        });
        if marked {
            tracing::error!(
                cause = dep.as_str(),
                error.code = dep.code(),
                error = reason,
                action = dep.advice(),
                "dependency down: the worker stops taking jobs, hands held jobs back uncharged and probes every {}s",
                PROBE_EVERY.as_secs()
            );
        }
        marked
    }

    /// Mark `dep` up; returns how long it was down, if it was.
    pub fn mark_up(&self, dep: Dependency) -> Option<Duration> {
        let mut was = None;
        self.state.send_if_modified(|s| {
            was = s[dep.index()].take().map(|d| d.since.elapsed());
            was.is_some()
        });
        was
    }

    /// A job failed with a transient error of `dep`: is it an outage?
    /// Runs `probe` (or shares a probe run moments ago, or one in
    /// progress); a failing probe marks `dep` down. True when `dep` is down.
    pub async fn confirm<F, Fut>(&self, dep: Dependency, probe: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        if self.is_down(dep) {
            return true;
        }
        let mut last = self.probing[dep.index()].lock().await;
        if let Some(at) = last.at
            && at.elapsed() < PROBE_FRESH
        {
            return !last.ok || self.is_down(dep);
        }
        let result = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        *last = LastProbe {
            at: Some(Instant::now()),
            ok: result.is_ok(),
        };
        drop(last);
        match result {
            Ok(()) => self.is_down(dep),
            Err(reason) => {
                self.mark_down(dep, reason);
                true
            }
        }
    }

    /// Remember where the CDN lives (the origin of a result URL).
    pub fn note_cdn_origin(&self, url: &url::Url) {
        let mut origin = url.clone();
        origin.set_path("/");
        origin.set_query(None);
        origin.set_fragment(None);
        *self.cdn_origin.lock().unwrap_or_else(|p| p.into_inner()) = Some(origin);
    }

    /// What the CDN supervisor probes.
    pub fn cdn_origin(&self) -> Option<url::Url> {
        self.cdn_origin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A billed answer is held in memory until its record is written; the
    /// guard counts it (a crash loses exactly these).
    pub fn hold_unrecorded(&self) -> Unrecorded<'_> {
        let n = self.unrecorded.fetch_add(1, Ordering::SeqCst) + 1;
        crate::ops::metrics::answers_unrecorded(n);
        Unrecorded { outages: self }
    }

    pub fn unrecorded(&self) -> usize {
        self.unrecorded.load(Ordering::SeqCst)
    }
}

/// See [`Outages::hold_unrecorded`].
pub struct Unrecorded<'a> {
    outages: &'a Outages,
}

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        let n = self.outages.unrecorded.fetch_sub(1, Ordering::SeqCst) - 1;
        crate::ops::metrics::answers_unrecorded(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn a_failing_probe_marks_down_and_a_passing_one_does_not() {
        let o = Outages::new();
        assert!(!o.confirm(Dependency::Archive, || async { Ok(()) }).await);
        assert!(o.down().is_none());
        tokio::time::sleep(PROBE_FRESH).await;
        assert!(
            o.confirm(Dependency::Archive, || async { Err("refused".into()) })
                .await
        );
        let d = o.down().unwrap();
        assert_eq!(
            (d.dependency, d.reason.as_str()),
            (Dependency::Archive, "refused")
        );
        assert!(!o.is_down(Dependency::Cdn));
        assert!(o.mark_up(Dependency::Archive).is_some());
        assert!(o.mark_up(Dependency::Archive).is_none(), "up once");
        assert!(o.down().is_none());
    }

    #[tokio::test]
    async fn many_failing_jobs_share_one_probe() {
        let o = std::sync::Arc::new(Outages::new());
        let probes = std::sync::Arc::new(AtomicU32::new(0));
        let asks = (0..32).map(|_| {
            let (o, probes) = (o.clone(), probes.clone());
            tokio::spawn(async move {
                o.confirm(Dependency::Cdn, || async {
                    probes.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err("503".into())
                })
                .await
            })
        });
        for a in futures::future::join_all(asks).await {
            assert!(a.unwrap());
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_counts_as_failed() {
        let o = Outages::new();
        let down = o.confirm(Dependency::Archive, std::future::pending).await;
        assert!(down);
        assert!(o.down().unwrap().reason.contains("no answer"));
    }

    #[test]
    fn the_cdn_origin_keeps_no_path_or_signature() {
        let o = Outages::new();
        let u = url::Url::parse("https://cdn.klingai.com:8443/a/b.png?sig=secret#x").unwrap();
        o.note_cdn_origin(&u);
        assert_eq!(
            o.cdn_origin().unwrap().as_str(),
            "https://cdn.klingai.com:8443/"
        );
    }

    #[test]
    fn unrecorded_answers_are_counted_while_held() {
        let o = Outages::new();
        let a = o.hold_unrecorded();
        let b = o.hold_unrecorded();
        assert_eq!(o.unrecorded(), 2);
        drop(a);
        drop(b);
        assert_eq!(o.unrecorded(), 0);
    }
}
