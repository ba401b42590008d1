//! Leases: a fleet-wide claim on a key, kept in the archive itself (no new
//! service), so that of all the workers holding jobs for one prepared image
//! exactly one pays Kling for it.
//!
//! A lease is a small JSON object ([`LeaseBody`]: holder, job, expiry).
//!
//! - **Claim**: a conditional create (S3 `If-None-Match: *`, local: a hard
//!   link). One writer wins; the others read the lease and wait.
//! - **Renew**: the holder rewrites its lease with a later expiry, on the
//!   condition that it is still the version it wrote (S3 `If-Match: <etag>`,
//!   local: compare under `flock`).
//! - **Take over**: a lease past its expiry is rewritten by a taker on the
//!   condition that it is still the version the taker read: of several
//!   takers exactly one wins.
//! - **Release**: deleted by its holder, if still its version.
//!
//! Expiry compares the lease's wall-clock `expires_at_ms` with the reader's
//! clock: hosts need clocks within a small fraction of the TTL (NTP).
//! See `docs/reliability.md`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ObjectKey, PutMeta, Sha256, Store, StoreError};

/// Conditional operations of either backend, with an opaque version token
/// (S3: the ETag; local: the SHA-256 of the bytes).
impl Store {
    /// Create `key` only if absent: its version, or `None` if it existed.
    pub async fn create_versioned(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
    ) -> Result<Option<String>, StoreError> {
        match self {
            Store::Local(s) => s.create_versioned(key, body, meta).await,
            Store::S3(s) => s.create_versioned(key, body, meta).await,
        }
    }

    /// The object and its version.
    pub async fn get_versioned(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<(Bytes, String)>, StoreError> {
        match self {
            Store::Local(s) => s.get_versioned(key).await,
            Store::S3(s) => s.get_versioned(key).await,
        }
    }

    /// Replace `key` only if it is still at `version`: the new version, or
    /// `None` if another writer changed or deleted it.
    pub async fn replace_versioned(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        match self {
            Store::Local(s) => s.replace_versioned(key, body, meta, version).await,
            Store::S3(s) => s.replace_versioned(key, body, meta, version).await,
        }
    }

    /// Delete `key` if it is still at `version`. On S3 this reads, compares
    /// and deletes (conditional deletes are not portable across
    /// S3-compatible servers): a write landing in between can be deleted.
    /// Leases only delete their own version after the work is recorded, so
    /// that window costs at most a redundant claim, never a second call.
    pub async fn delete_versioned(
        &self,
        key: &ObjectKey,
        version: &str,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Local(s) => s.delete_versioned(key, version).await,
            Store::S3(_) => match self.get_versioned(key).await? {
                Some((_, v)) if v == version => self.delete(key).await.map(|()| true),
                _ => Ok(false),
            },
        }
    }
}

impl Store {
    /// Does the archive honour `If-None-Match: *`? Creates a probe key
    /// under `_probe/` twice: the second create must fail. Then deletes it.
    pub async fn conditional_writes_honoured(&self) -> Result<bool, StoreError> {
        let key = ObjectKey::parse(&format!("_probe/{:016x}.json", fastrand::u64(..)))
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let body = Bytes::from_static(b"{\"probe\":\"conditional writes\"}");
        let meta = PutMeta {
            content_type: "application/json",
            sha256: Sha256::of(&body),
            metadata: BTreeMap::new(),
        };
        let first = self.create_versioned(&key, body.clone(), &meta).await?;
        let second = self.create_versioned(&key, body, &meta).await?;
        let _ = self.delete(&key).await;
        Ok(first.is_some() && second.is_none())
    }
}

/// Who holds a lease: a worker process, for logs and for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Random per pipeline instance: tells apart workers in one process.
    pub instance: String,
    pub pid: u32,
    pub hostname: String,
}

impl Holder {
    /// A new identity for this process.
    pub fn current() -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Self {
            instance: format!("{:016x}", fastrand::u64(..)),
            pid: std::process::id(),
            hostname,
        }
    }
}

/// The lease object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBody {
    pub holder: Holder,
    /// The job whose claim this is.
    pub job_id: String,
    /// Unix milliseconds.
    pub acquired_at_ms: u64,
    pub expires_at_ms: u64,
    /// How many times this lease was taken over from a dead holder.
    pub takeovers: u32,
}

impl LeaseBody {
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }
}

/// A lease this worker holds.
#[derive(Debug)]
pub struct Lease {
    pub key: ObjectKey,
    version: String,
    pub body: LeaseBody,
}

/// The outcome of a claim.
#[derive(Debug)]
pub enum Claim {
    /// The key was free: ours.
    Won(Lease),
    /// The previous holder's lease had expired: ours now.
    TookOver { lease: Lease, from: LeaseBody },
    /// Another worker holds it (`None`: it changed hands too fast to read).
    Held(Option<LeaseBody>),
}

/// Claims, renews and releases leases in one store.
#[derive(Debug, Clone)]
pub struct Leases {
    store: Store,
    ttl: Duration,
    holder: Holder,
}

/// How many create/read/take-over rounds one claim tries under contention.
const CLAIM_ROUNDS: usize = 3;

impl Leases {
    pub fn new(store: Store, ttl: Duration, holder: Holder) -> Self {
        Self { store, ttl, holder }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Claim `key` for `job_id`: create it, or take it over if expired.
    pub async fn claim(&self, key: &ObjectKey, job_id: &str) -> Result<Claim, StoreError> {
        for _ in 0..CLAIM_ROUNDS {
            let body = self.body(job_id, 0);
            let (bytes, meta) = encode(&body)?;
            if let Some(version) = self.store.create_versioned(key, bytes, &meta).await? {
                return Ok(Claim::Won(self.lease(key, version, body)));
            }
            let Some((current, version)) = self.store.get_versioned(key).await? else {
                continue; // released between our create and our read
            };
            // An unreadable lease protects nothing: treat it as expired.
            let from = serde_json::from_slice::<LeaseBody>(&current).ok();
            if let Some(c) = &from
                && !c.expired(now_ms())
            {
                return Ok(Claim::Held(from));
            }
            let taken = self.body(job_id, from.as_ref().map_or(1, |c| c.takeovers + 1));
            let (bytes, meta) = encode(&taken)?;
            if let Some(v) = self
                .store
                .replace_versioned(key, bytes, &meta, &version)
                .await?
            {
                let from = from.unwrap_or_else(|| taken.clone());
                return Ok(Claim::TookOver {
                    lease: self.lease(key, v, taken),
                    from,
                });
            }
        }
        Ok(Claim::Held(self.current(key).await?))
    }

    /// Push the expiry one TTL further. False when the lease is no longer
    /// ours (it expired and was taken over, or was deleted).
    pub async fn renew(&self, lease: &mut Lease) -> Result<bool, StoreError> {
        let mut body = lease.body.clone();
        body.expires_at_ms = now_ms().saturating_add(millis(self.ttl));
        let (bytes, meta) = encode(&body)?;
        match self
            .store
            .replace_versioned(&lease.key, bytes, &meta, &lease.version)
            .await?
        {
            Some(v) => {
                lease.version = v;
                lease.body = body;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Delete the lease if it is still ours.
    pub async fn release(&self, lease: Lease) -> Result<bool, StoreError> {
        self.store
            .delete_versioned(&lease.key, &lease.version)
            .await
    }

    /// The lease on `key` now, if any (unreadable: `None`).
    pub async fn current(&self, key: &ObjectKey) -> Result<Option<LeaseBody>, StoreError> {
        Ok(self
            .store
            .get_versioned(key)
            .await?
            .and_then(|(b, _)| serde_json::from_slice(&b).ok()))
    }

    fn body(&self, job_id: &str, takeovers: u32) -> LeaseBody {
        let now = now_ms();
        LeaseBody {
            holder: self.holder.clone(),
            job_id: job_id.to_owned(),
            acquired_at_ms: now,
            expires_at_ms: now.saturating_add(millis(self.ttl)),
            takeovers,
        }
    }

    fn lease(&self, key: &ObjectKey, version: String, body: LeaseBody) -> Lease {
        Lease {
            key: key.clone(),
            version,
            body,
        }
    }
}

fn encode(body: &LeaseBody) -> Result<(Bytes, PutMeta), StoreError> {
    let bytes = Bytes::from(
        serde_json::to_vec(body).map_err(|e| StoreError::Io(std::io::Error::other(e)))?,
    );
    let meta = PutMeta {
        content_type: "application/json",
        sha256: Sha256::of(&bytes),
        metadata: BTreeMap::from([("job-id".to_owned(), ascii_id(&body.job_id))]),
    };
    Ok((bytes, meta))
}

fn ascii_id(s: &str) -> String {
    s.chars().filter(char::is_ascii_graphic).take(128).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(dir: &std::path::Path, ttl: Duration) -> Leases {
        Leases::new(Store::local(dir), ttl, Holder::current())
    }

    fn key() -> ObjectKey {
        ObjectKey::parse("leases/abc.json").unwrap()
    }

    #[tokio::test]
    async fn a_live_lease_is_held_and_an_expired_one_is_taken_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = leases(dir.path(), Duration::ZERO);
        let Claim::Won(lease) = a.claim(&key(), "j-1").await.unwrap() else {
            panic!("the key was free")
        };
        assert_eq!(lease.body.takeovers, 0);
        // TTL zero: expired at once; eight takers race, one wins.
        let takers: Vec<_> = (0..8)
            .map(|_| leases(dir.path(), Duration::from_secs(60)))
            .collect();
        let k = key();
        let results = futures::future::join_all(takers.iter().map(|t| t.claim(&k, "j-2"))).await;
        let won = results
            .iter()
            .filter(|r| matches!(r, Ok(Claim::TookOver { .. })))
            .count();
        assert_eq!(won, 1, "{results:?}");
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Ok(Claim::TookOver { .. } | Claim::Held(Some(_))))),
            "{results:?}"
        );
        // The old holder cannot renew or release what is no longer its.
        let mut lease = lease;
        assert!(!a.renew(&mut lease).await.unwrap());
        assert!(!a.release(lease).await.unwrap());
        assert!(a.current(&key()).await.unwrap().is_some());
    }

    #[test]
    fn expiry_is_inclusive() {
        let b = LeaseBody {
            holder: Holder::current(),
            job_id: "j".into(),
            acquired_at_ms: 0,
            expires_at_ms: 10,
            takeovers: 0,
        };
        assert!(!b.expired(9));
        assert!(b.expired(10));
    }
}
