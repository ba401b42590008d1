//! One billed call per recognition key, across the fleet.
//!
//! Before a job may call Kling for its prepared image it must hold the
//! image's claim:
//!
//! 1. **In this process**, a single-flight map ([`SingleFlight`]): the
//!    first job for a key leads; duplicates wait for it without touching
//!    the archive.
//! 2. **Across workers**, a lease in the archive ([`Leases`]): the leader
//!    claims `leases/<key>` with a conditional create. A job that finds the
//!    lease held waits for the recognition record with bounded backoff; if
//!    the lease vanishes (its holder failed without a record) or expires
//!    (its holder died), it claims again, and of several takers exactly one
//!    wins.
//! 3. The winner checks for the record once more before calling: the
//!    previous holder may have stored it just before releasing.
//!
//! A waiter never calls Kling. One that runs out of patience hands its job
//! back (a transient `lease_busy`, the retry queue).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::archive::lease::{Claim, Lease, Leases};
use crate::archive::{ObjectKey, StoreError};

/// What a job is to do about its recognition.
pub(crate) enum Turn<R> {
    /// The record exists (stored before, or by the holder we waited for).
    Recorded(R),
    /// This job holds the claim: it calls Kling, stores the record, then
    /// drops [`Held`] (after [`Once::release`]).
    Call(Held),
}

/// The claim on a key, in process and in the archive.
pub(crate) struct Held {
    pub lease: Lease,
    pub flight: FlightGuard,
}

/// Why a job could not get its turn.
#[derive(Debug)]
pub(crate) enum WaitError {
    Store(StoreError),
    /// Another holder kept the claim past the wait budget.
    Busy {
        holder: Option<String>,
    },
}

impl From<StoreError> for WaitError {
    fn from(e: StoreError) -> Self {
        WaitError::Store(e)
    }
}

/// The claim machinery a pipeline shares among its jobs.
pub(crate) struct Once {
    pub leases: Leases,
    flights: SingleFlight,
    /// How long a job waits for another holder before handing its job back.
    wait_budget: Duration,
}

/// First and largest delay between polls of a held claim.
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(2);

impl Once {
    pub fn new(leases: Leases) -> Self {
        let wait_budget = leases.ttl().saturating_mul(2).max(Duration::from_secs(5));
        Self {
            leases,
            flights: SingleFlight::default(),
            wait_budget,
        }
    }

    /// Find the record, or get the claim to make it. `record` reads the
    /// record (`None`: absent or not usable). Waiting is counted once per
    /// job; a takeover is counted when it happens.
    pub async fn turn<R, F, Fut>(
        &self,
        record_key: &ObjectKey,
        lease_key: &ObjectKey,
        job_id: &str,
        record: F,
    ) -> Result<Turn<R>, WaitError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<R>, StoreError>>,
    {
        let deadline = Instant::now() + self.wait_budget;
        let mut waited = false;
        let mut wait = |why: &str, holder: Option<&str>| {
            if !std::mem::replace(&mut waited, true) {
                crate::ops::metrics::lease_wait();
                tracing::info!(
                    holder,
                    why,
                    "another job holds this image's claim; waiting for its record"
                );
            }
        };
        loop {
            if let Some(r) = record().await? {
                return Ok(Turn::Recorded(r));
            }
            let flight = match self.flights.enter(record_key) {
                Entry::Leader(g) => g,
                Entry::Follower(mut rx) => {
                    wait("in this process", None);
                    // Ends when the leader's guard drops (Err: sender gone).
                    let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
                    if Instant::now() >= deadline {
                        return Err(WaitError::Busy { holder: None });
                    }
                    continue;
                }
            };
            return self
                .lead(lease_key, job_id, flight, deadline, &record, &mut wait)
                .await;
        }
    }

    /// The in-process leader: claim the lease, or wait for its holder.
    async fn lead<R, F, Fut>(
        &self,
        lease_key: &ObjectKey,
        job_id: &str,
        flight: FlightGuard,
        deadline: Instant,
        record: &F,
        wait: &mut impl FnMut(&str, Option<&str>),
    ) -> Result<Turn<R>, WaitError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<R>, StoreError>>,
    {
        let mut delay = POLL_MIN;
        loop {
            let lease = match self.leases.claim(lease_key, job_id).await? {
                Claim::Won(lease) => lease,
                Claim::TookOver { lease, from } => {
                    crate::ops::metrics::lease_takeover();
                    tracing::warn!(
                        previous.holder = from.holder.instance,
                        previous.pid = from.holder.pid,
                        previous.host = from.holder.hostname,
                        previous.job = from.job_id,
                        "took over the claim of a holder that stopped renewing"
                    );
                    lease
                }
                Claim::Held(body) => {
                    let holder = body.as_ref().map(|b| b.job_id.as_str());
                    wait("another worker", holder);
                    if Instant::now() + delay > deadline {
                        return Err(WaitError::Busy {
                            holder: body.map(|b| b.job_id),
                        });
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(POLL_MAX);
                    if let Some(r) = record().await? {
                        return Ok(Turn::Recorded(r));
                    }
                    continue;
                }
            };
            // The previous holder may have stored the record and released
            // the lease between our read and our claim.
            if let Some(r) = record().await? {
                self.release(lease).await;
                return Ok(Turn::Recorded(r));
            }
            return Ok(Turn::Call(Held { lease, flight }));
        }
    }

    /// Keep `lease` alive until `work` completes, renewing every TTL/3.
    /// A failed or lost renewal is logged; the work is never abandoned (it
    /// may already be billed).
    pub async fn renewing<T>(&self, lease: &mut Lease, work: impl Future<Output = T>) -> T {
        let every = (self.leases.ttl() / 3).max(Duration::from_millis(100));
        let renew = async {
            loop {
                tokio::time::sleep(every).await;
                match self.leases.renew(lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            "lost the image's claim while calling Kling (renewals too late?); finishing the call"
                        );
                        std::future::pending::<()>().await;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not renew the image's claim"),
                }
            }
        };
        tokio::select! {
            out = work => out,
            () = renew => unreachable!("renewal never ends"),
        }
    }

    /// Release the lease (best effort: it expires anyway).
    pub async fn release(&self, lease: Lease) {
        if let Err(e) = self.leases.release(lease).await {
            tracing::warn!(error = %e, "could not release the image's claim; it expires by itself");
        }
    }
}

/// In-process single flight: one leader per key; followers wait for the
/// leader's guard to drop.
#[derive(Default)]
pub(crate) struct SingleFlight {
    map: Arc<Mutex<HashMap<ObjectKey, watch::Receiver<()>>>>,
}

pub(crate) enum Entry {
    Leader(FlightGuard),
    Follower(watch::Receiver<()>),
}

impl SingleFlight {
    pub fn enter(&self, key: &ObjectKey) -> Entry {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = map.get(key) {
            return Entry::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        map.insert(key.clone(), rx);
        Entry::Leader(FlightGuard {
            map: self.map.clone(),
            key: key.clone(),
            _tx: tx,
        })
    }
}

/// Leadership of a key in this process; dropping it wakes the followers.
pub(crate) struct FlightGuard {
    map: Arc<Mutex<HashMap<ObjectKey, watch::Receiver<()>>>>,
    key: ObjectKey,
    _tx: watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // Out of the map first, so a woken follower can lead; then `_tx`
        // drops and every follower's `changed()` returns.
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ObjectKey {
        ObjectKey::parse(s).unwrap()
    }

    #[tokio::test]
    async fn one_leader_per_key_and_followers_wake_when_it_ends() {
        let f = SingleFlight::default();
        let Entry::Leader(g) = f.enter(&key("a")) else {
            panic!("first is leader")
        };
        let Entry::Follower(mut rx) = f.enter(&key("a")) else {
            panic!("second follows")
        };
        assert!(
            matches!(f.enter(&key("b")), Entry::Leader(_)),
            "keys are independent"
        );
        drop(g);
        assert!(rx.changed().await.is_err(), "the follower wakes");
        assert!(
            matches!(f.enter(&key("a")), Entry::Leader(_)),
            "and may lead next"
        );
    }
}
