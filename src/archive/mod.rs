//! The archive: where results live after Kling deletes its copies.
//!
//! - [`Store`]: one interface, two backends chosen once at start — S3 (any
//!   S3-compatible server) and a local directory. Same semantics on both:
//!   atomic whole-object writes, metadata, SHA-256, create-if-absent.
//! - [`layout`]: every key the worker writes (documented in `docs/s3-layout.md`).
//!
//! A store of keys and bytes: knows nothing about RabbitMQ, how images are
//! fetched or prepared, or Kling (the manifest, which names those, lives
//! beside the pipeline in `crate::manifest`).

pub mod layout;
pub mod lease;
pub mod local;
pub mod s3;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use bytes::Bytes;
use sha2::Digest as _;

pub use crate::config::ArchiveTarget;
use crate::error::{Classify, Disposition};

pub use local::LocalStore;
pub use s3::S3Store;

/// A key inside the archive, relative to its prefix. Segments are
/// `[A-Za-z0-9._=-]`, never empty, `.` or `..`: safe as S3 keys and as paths.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 900 {
            return Err(format!("key must be 1..=900 bytes, got {}", s.len()));
        }
        for seg in s.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(format!("key {s:?} has an empty, . or .. segment"));
            }
            if let Some(c) = seg
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || "._=-".contains(*c)))
            {
                return Err(format!("key {s:?} has character {c:?}"));
            }
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    /// Hash a buffer. Large buffers: call from a blocking context.
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The base64 form S3's `x-amz-checksum-sha256` wants.
    pub fn base64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    pub fn parse_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.hex())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> serde::Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Sha256::parse_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex characters"))
    }
}

/// What is written with an object.
#[derive(Debug, Clone)]
pub struct PutMeta {
    pub content_type: &'static str,
    /// SHA-256 of the body: sent as S3's checksum (verified on arrival) and
    /// kept as `sha256` metadata.
    pub sha256: Sha256,
    /// User metadata (`x-amz-meta-*`). Keys lower-case, values ASCII.
    pub metadata: BTreeMap<String, String>,
}

impl PutMeta {
    /// The user metadata as stored: the caller's, plus `sha256`.
    pub fn stored_metadata(&self) -> BTreeMap<String, String> {
        let mut m = self.metadata.clone();
        m.insert("sha256".into(), self.sha256.hex());
        m
    }
}

/// What a HEAD returns.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectInfo {
    pub size: u64,
    pub content_type: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl ObjectInfo {
    pub fn sha256(&self) -> Option<Sha256> {
        self.metadata
            .get("sha256")
            .and_then(|s| Sha256::parse_hex(s))
    }
}

/// Result of a create-if-absent write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Yes,
    /// Someone else wrote the key first; nothing was changed.
    AlreadyExisted,
}

/// The archive store. An enum, not a trait object: the backend is chosen
/// once at start, and both are always compiled and tested.
#[derive(Debug, Clone)]
pub enum Store {
    Local(LocalStore),
    S3(S3Store),
}

impl Store {
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Store::Local(LocalStore::new(root.into()))
    }

    pub fn s3(
        client: aws_sdk_s3::Client,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        Store::S3(S3Store::new(client, bucket.into(), prefix.into()))
    }

    pub fn open(target: &ArchiveTarget, s3: &aws_sdk_s3::Client) -> Self {
        match target {
            ArchiveTarget::Local(p) => Store::local(p.clone()),
            ArchiveTarget::S3 { bucket, prefix } => {
                Store::s3(s3.clone(), bucket.clone(), prefix.clone())
            }
        }
    }

    /// Write an object whole (replacing any earlier one).
    pub async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => s.put(key, body, meta, false).await.map(|_| ()),
            Store::S3(s) => s.put(key, body, meta, false).await.map(|_| ()),
        }
    }

    /// Write an object only if the key is free. Used for manifests.
    pub async fn put_if_absent(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
    ) -> Result<Created, StoreError> {
        match self {
            Store::Local(s) => s.put(key, body, meta, true).await,
            Store::S3(s) => s.put(key, body, meta, true).await,
        }
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Bytes>, StoreError> {
        match self {
            Store::Local(s) => s.get(key).await,
            Store::S3(s) => s.get(key).await,
        }
    }

    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectInfo>, StoreError> {
        match self {
            Store::Local(s) => s.head(key).await,
            Store::S3(s) => s.head(key).await,
        }
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => s.delete(key).await,
            Store::S3(s) => s.delete(key).await,
        }
    }

    /// Keys under `prefix` (a key prefix, not necessarily ending in `/`), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>, StoreError> {
        let mut keys = match self {
            Store::Local(s) => s.list(prefix).await?,
            Store::S3(s) => s.list(prefix).await?,
        };
        keys.sort();
        Ok(keys)
    }

    /// The key as a downstream reader addresses it: with the archive prefix
    /// (S3), or relative to the archive directory (local).
    pub fn full_key(&self, key: &ObjectKey) -> String {
        match self {
            Store::Local(_) => key.as_str().to_owned(),
            Store::S3(s) => s.full_key(key),
        }
    }

    /// The key a manifest names (a [`Self::full_key`]) as a key of this
    /// store; `None` if it lies outside the archive.
    pub fn relative_key(&self, full: &str) -> Option<ObjectKey> {
        let rel = match self {
            Store::Local(_) => full,
            Store::S3(s) => s.relative(full)?,
        };
        ObjectKey::parse(rel).ok()
    }

    /// `s3://bucket/prefix` or the directory, for logs and summaries.
    pub fn describe(&self) -> String {
        match self {
            Store::Local(s) => s.root().display().to_string(),
            Store::S3(s) => s.describe(),
        }
    }
}

/// Why the store failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Network trouble, throttling, 5xx: try again later.
    #[error("archive store unavailable: {reason}")]
    Unavailable { reason: String },
    /// The worker may not write here (credentials, bucket, permissions):
    /// retrying will not help, and every job would fail the same way.
    #[error(
        "archive store refused the worker: {reason}; check ARCHIVE_URL and the S3 credentials/permissions"
    )]
    Denied { reason: String },
    /// The body did not match its checksum on arrival.
    #[error("archive store rejected the upload's checksum: {reason}")]
    Checksum { reason: String },
    #[error("archive directory I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored object {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

impl Classify for StoreError {
    fn disposition(&self) -> Disposition {
        match self {
            StoreError::Unavailable { .. }
            | StoreError::Checksum { .. }
            | StoreError::Corrupt { .. } => Disposition::Transient,
            StoreError::Denied { .. } => Disposition::Fatal,
            StoreError::Io(e) => match e.kind() {
                std::io::ErrorKind::PermissionDenied
                | std::io::ErrorKind::StorageFull
                | std::io::ErrorKind::ReadOnlyFilesystem => Disposition::Fatal,
                _ => Disposition::Transient,
            },
        }
    }

    fn code(&self) -> &'static str {
        match self {
            StoreError::Unavailable { .. } => "store_unavailable",
            StoreError::Denied { .. } => "store_denied",
            StoreError::Checksum { .. } => "store_checksum",
            StoreError::Io(_) => "store_io",
            StoreError::Corrupt { .. } => "store_corrupt",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_refuse_traversal() {
        assert!(ObjectKey::parse("jobs/a-1/manifest.json").is_ok());
        for bad in [
            "", "/a", "a//b", "a/../b", "./a", "a/b/", "a b", "a\\b", "a/\u{0}",
        ] {
            assert!(ObjectKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sha256_forms() {
        let h = Sha256::of(b"abc");
        assert_eq!(
            h.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(h.base64(), "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=");
        assert_eq!(Sha256::parse_hex(&h.hex()), Some(h));
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<Sha256>(&json).unwrap(), h);
    }
}
