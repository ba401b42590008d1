//! The result CDN: segment PNGs kept in memory and served under signed,
//! expiring URLs, like the ones Kling deletes after 30 days.
//!
//! URL: `{base}/cdn/{id}/{type}.png?expires=<unix s>&sig=<hex>`, where `sig`
//! is HMAC-SHA256 (key derived from the secret key) over path and expiry,
//! truncated to 128 bits. Expired results keep a small tombstone so they
//! keep answering 403 rather than 404; their bytes are freed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::masks::SegmentKind;

/// Sweep expired results every this many inserts.
const SWEEP_EVERY: usize = 64;

/// What a CDN GET finds.
pub(super) enum Lookup {
    Found(Bytes),
    BadSignature,
    Expired,
    NotFound,
}

pub(super) struct ResultStore {
    key: [u8; 32],
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    expires: u64,
    /// The fault generation at issue; older than the current one = expired.
    generation: u64,
    /// Emptied once the entry is known to be expired.
    pngs: Vec<(SegmentKind, Bytes)>,
}

impl Entry {
    fn expired(&self, now: u64, generation: u64) -> bool {
        now > self.expires || self.generation < generation
    }
}

impl ResultStore {
    pub fn new(secret: &SecretString) -> Self {
        let key = Sha256::new()
            .chain_update(b"kling-sim-cdn\0")
            .chain_update(secret.expose_secret().as_bytes())
            .finalize()
            .into();
        Self {
            key,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Keep one result's PNGs; now and then also frees the bytes of expired
    /// results (their URLs keep answering 403). Unexpired results stay in
    /// memory for the life of the simulator.
    pub fn insert(
        &self,
        id: String,
        expires: u64,
        pngs: Vec<(SegmentKind, Bytes)>,
        now: u64,
        generation: u64,
    ) {
        let mut entries = self.lock();
        entries.insert(
            id,
            Entry {
                expires,
                generation,
                pngs,
            },
        );
        if entries.len().is_multiple_of(SWEEP_EVERY) {
            for entry in entries.values_mut().filter(|e| e.expired(now, generation)) {
                entry.pngs = Vec::new();
            }
        }
    }

    /// The signed URL of one segment.
    pub fn url(&self, base_url: &str, id: &str, kind: SegmentKind, expires: u64) -> String {
        let path = path(id, &format!("{}.png", kind.as_str()));
        let sig = self.sign(&path, expires);
        format!("{base_url}{path}?expires={expires}&sig={sig}")
    }

    /// Serve `GET /cdn/{id}/{file}?expires=..&sig=..`.
    pub fn get(
        &self,
        id: &str,
        file: &str,
        expires: u64,
        sig: &str,
        now: u64,
        generation: u64,
    ) -> Lookup {
        if !constant_time_eq(
            self.sign(&path(id, file), expires).as_bytes(),
            sig.as_bytes(),
        ) {
            return Lookup::BadSignature;
        }
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(id) else {
            return Lookup::NotFound;
        };
        if now > expires || entry.expired(now, generation) {
            entry.pngs = Vec::new();
            return Lookup::Expired;
        }
        let kind = file.strip_suffix(".png");
        match entry.pngs.iter().find(|(k, _)| Some(k.as_str()) == kind) {
            Some((_, png)) => Lookup::Found(png.clone()),
            None => Lookup::NotFound,
        }
    }

    fn sign(&self, path: &str, expires: u64) -> String {
        let mac = hmac_sha256(&self.key, format!("{path}\n{expires}").as_bytes());
        hex::encode(&mac[..16])
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn path(id: &str, file: &str) -> String {
    format!("/cdn/{id}/{file}")
}

/// RFC 2104 HMAC with SHA-256, for a key shorter than the block size.
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let (mut inner_pad, mut outer_pad) = ([0x36u8; 64], [0x5cu8; 64]);
    for (i, k) in key.iter().enumerate() {
        inner_pad[i] ^= k;
        outer_pad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(inner_pad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(outer_pad)
        .chain_update(inner)
        .finalize()
        .into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_test_case_1() {
        // Zero-padding a short key is part of HMAC, so 20 × 0x0b padded to 32 is
        // the RFC's key.
        let mut key = [0u8; 32];
        key[..20].fill(0x0b);
        let mac = hmac_sha256(&key, b"Hi There");
        assert_eq!(
            hex::encode(mac),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }
}
