//! One suite, both backends: the local directory and S3 (a real S3 server,
//! s3s-fs, in-process). Each test is generated for each backend.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use kling_archiver::archive::{Created, ObjectKey, PutMeta, Sha256, Store};

struct Fixture {
    store: Store,
    _s3: Option<common::S3Server>,
    _dir: Option<tempfile::TempDir>,
}

async fn local() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        store: Store::local(dir.path()),
        _s3: None,
        _dir: Some(dir),
    }
}

async fn s3() -> Fixture {
    let s3 = common::start_s3().await;
    let bucket = common::unique("s");
    common::create_bucket(&s3.client, &bucket).await;
    Fixture {
        store: Store::s3(s3.client.clone(), bucket, "pfx"),
        _s3: Some(s3),
        _dir: None,
    }
}

fn key(s: &str) -> ObjectKey {
    ObjectKey::parse(s).unwrap()
}

fn meta(body: &[u8]) -> PutMeta {
    PutMeta {
        content_type: "image/png",
        sha256: Sha256::of(body),
        metadata: BTreeMap::from([
            ("job-id".into(), "j-1".into()),
            ("segment-type".into(), "face_seg".into()),
        ]),
    }
}

async fn put_then_read_back_bytes_metadata_and_checksum(store: Store) {
    let body = Bytes::from_static(b"\x89PNG fake but fine");
    let k = key("segments/r1/face_seg.png");
    store.put(&k, body.clone(), &meta(&body)).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(body.clone()));
    let info = store.head(&k).await.unwrap().expect("exists");
    assert_eq!(info.size, body.len() as u64);
    assert_eq!(info.content_type.as_deref(), Some("image/png"));
    assert_eq!(info.metadata.get("job-id").map(String::as_str), Some("j-1"));
    assert_eq!(
        info.metadata.get("segment-type").map(String::as_str),
        Some("face_seg")
    );
    assert_eq!(info.sha256(), Some(Sha256::of(&body)));
}

async fn missing_objects_are_none(store: Store) {
    let k = key("jobs/nope/manifest.json");
    assert_eq!(store.get(&k).await.unwrap(), None);
    assert_eq!(store.head(&k).await.unwrap(), None);
    store.delete(&k).await.unwrap();
}

async fn put_replaces_whole_objects(store: Store) {
    let k = key("a/b.json");
    let one = Bytes::from(vec![1u8; 10_000]);
    let two = Bytes::from_static(b"short");
    store.put(&k, one.clone(), &meta(&one)).await.unwrap();
    store.put(&k, two.clone(), &meta(&two)).await.unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(two.clone()));
    assert_eq!(
        store.head(&k).await.unwrap().unwrap().sha256(),
        Some(Sha256::of(&two))
    );
}

async fn put_if_absent_never_overwrites(store: Store) {
    let k = key("jobs/j-1/manifest.json");
    let first = Bytes::from_static(b"{\"first\":true}");
    let second = Bytes::from_static(b"{\"second\":true}");
    assert_eq!(
        store
            .put_if_absent(&k, first.clone(), &meta(&first))
            .await
            .unwrap(),
        Created::Yes
    );
    assert_eq!(
        store
            .put_if_absent(&k, second.clone(), &meta(&second))
            .await
            .unwrap(),
        Created::AlreadyExisted
    );
    assert_eq!(store.get(&k).await.unwrap(), Some(first));
}

async fn list_returns_keys_under_a_prefix(store: Store) {
    for k in [
        "jobs/a/manifest.json",
        "jobs/b/manifest.json",
        "images/x.png",
        "jobsz/c",
    ] {
        let b = Bytes::from(k.as_bytes().to_vec());
        store.put(&key(k), b.clone(), &meta(&b)).await.unwrap();
    }
    let keys: Vec<String> = store
        .list("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys, vec!["jobs/a/manifest.json", "jobs/b/manifest.json"]);
    assert_eq!(store.list("images/").await.unwrap().len(), 1);
    assert!(store.list("nothing/").await.unwrap().is_empty());
}

async fn delete_removes_object_and_metadata(store: Store) {
    let k = key("x/y.png");
    let b = Bytes::from_static(b"abc");
    store.put(&k, b.clone(), &meta(&b)).await.unwrap();
    store.delete(&k).await.unwrap();
    assert_eq!(store.head(&k).await.unwrap(), None);
    assert!(store.list("x/").await.unwrap().is_empty());
}

async fn large_objects_round_trip(store: Store) {
    // 12 MiB: one PUT. 21 MiB: a multipart upload in S3 (three parts, the
    // last one short), create-if-absent included.
    for (mib, name) in [(12, "segments/big/object_seg.png"), (21, "images/huge.jpg")] {
        let body = Bytes::from(
            (0..mib * 1024 * 1024 + 17)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let k = key(name);
        let m = meta(&body);
        assert_eq!(
            store.put_if_absent(&k, body.clone(), &m).await.unwrap(),
            Created::Yes
        );
        assert_eq!(
            store.put_if_absent(&k, body.clone(), &m).await.unwrap(),
            Created::AlreadyExisted
        );
        let back = store.get(&k).await.unwrap().unwrap();
        assert_eq!(Sha256::of(&back), Sha256::of(&body), "{name}");
        let info = store.head(&k).await.unwrap().unwrap();
        assert_eq!(info.size, body.len() as u64);
        assert_eq!(info.sha256(), Some(Sha256::of(&body)), "metadata of {name}");
        assert_eq!(info.content_type.as_deref(), Some(m.content_type));
    }
}

async fn full_keys_carry_the_prefix(store: Store) {
    let k = key("jobs/j/manifest.json");
    let full = store.full_key(&k);
    match store {
        Store::S3(_) => assert_eq!(full, "pfx/jobs/j/manifest.json"),
        Store::Local(_) => assert_eq!(full, "jobs/j/manifest.json"),
    }
}

fn json_meta(body: &[u8]) -> PutMeta {
    PutMeta {
        content_type: "application/json",
        sha256: Sha256::of(body),
        metadata: BTreeMap::new(),
    }
}

/// Of eight racing conditional creates of one key, exactly one wins (the
/// S3 server is s3s-fs behind the atomic wrapper, `common::atomic_s3`).
async fn conditional_create_has_exactly_one_winner(store: Store) {
    for round in 0..10 {
        let k = key(&format!("leases/race-{round}.json"));
        let results = futures::future::join_all((0..8).map(|i| {
            let body = Bytes::from(format!("{{\"writer\":{i}}}"));
            let store = store.clone();
            let k = k.clone();
            async move {
                store
                    .create_versioned(&k, body.clone(), &json_meta(&body))
                    .await
            }
        }))
        .await;
        let won: Vec<_> = results
            .iter()
            .filter(|r| matches!(r, Ok(Some(_))))
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
}

/// Eight writers race to create one key, each with its own body and
/// metadata: the object and its metadata are the winner's, whoever lost
/// (a loser once wrote its metadata before losing the link, local store).
async fn the_losers_of_a_create_race_leave_no_metadata(store: Store) {
    for round in 0..20 {
        let k = key(&format!("jobs/race-{round}/manifest.json"));
        let results = futures::future::join_all((0..8).map(|i| {
            let body = Bytes::from(format!("{{\"writer\":{i}}}"));
            let mut m = json_meta(&body);
            m.metadata.insert("writer".into(), i.to_string());
            let store = store.clone();
            let k = k.clone();
            async move { (i, store.put_if_absent(&k, body, &m).await.unwrap()) }
        }))
        .await;
        let winners: Vec<_> = results
            .iter()
            .filter(|(_, c)| *c == Created::Yes)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let w = winners[0];
        let info = store.head(&k).await.unwrap().expect("created");
        assert_eq!(
            info.metadata.get("writer"),
            Some(&w.to_string()),
            "round {round}: the metadata of a writer that lost"
        );
        let body = store.get(&k).await.unwrap().unwrap();
        assert_eq!(body, Bytes::from(format!("{{\"writer\":{w}}}")));
    }
}

/// `replace_versioned` is a compare-and-swap on the version token.
async fn replace_versioned_is_compare_and_swap(store: Store) {
    let k = key("leases/cas.json");
    let b = |s: &'static str| Bytes::from_static(s.as_bytes());
    let v1 = store
        .create_versioned(&k, b("{\"n\":1}"), &json_meta(b"{\"n\":1}"))
        .await
        .unwrap()
        .expect("created");
    let (got, v) = store.get_versioned(&k).await.unwrap().unwrap();
    assert_eq!((got, &v), (b("{\"n\":1}"), &v1));
    let v2 = store
        .replace_versioned(&k, b("{\"n\":2}"), &json_meta(b"{\"n\":2}"), &v1)
        .await
        .unwrap()
        .expect("the version matched");
    assert_ne!(v1, v2);
    let stale = store
        .replace_versioned(&k, b("{\"n\":3}"), &json_meta(b"{\"n\":3}"), &v1)
        .await
        .unwrap();
    assert_eq!(stale, None, "a stale version loses");
    assert_eq!(store.get(&k).await.unwrap(), Some(b("{\"n\":2}")));
    assert!(!store.delete_versioned(&k, &v1).await.unwrap());
    assert!(store.delete_versioned(&k, &v2).await.unwrap());
    assert_eq!(store.get(&k).await.unwrap(), None);
    let gone = store
        .replace_versioned(&k, b("{\"n\":4}"), &json_meta(b"{\"n\":4}"), &v2)
        .await
        .unwrap();
    assert_eq!(gone, None, "no replace of a missing key");
}

/// A lease: held while live, renewed by its holder, taken over by exactly
/// one of many takers once expired, released only by its holder.
async fn leases_are_claimed_renewed_taken_over_once_and_released(store: Store) {
    use kling_archiver::archive::lease::{Claim, Holder, Leases};
    use std::time::Duration;
    let k = key("leases/img.json");
    let live = Leases::new(store.clone(), Duration::from_secs(60), Holder::current());
    let Claim::Won(mut lease) = live.claim(&k, "j-1").await.unwrap() else {
        panic!("the key was free")
    };
    let other = Leases::new(store.clone(), Duration::from_secs(60), Holder::current());
    match other.claim(&k, "j-2").await.unwrap() {
        Claim::Held(Some(b)) => assert_eq!(b.job_id, "j-1"),
        c => panic!("a live lease is held: {c:?}"),
    }
    let before = lease.body.expires_at_ms;
    assert!(live.renew(&mut lease).await.unwrap());
    assert!(lease.body.expires_at_ms >= before);
    assert!(live.release(lease).await.unwrap());
    assert_eq!(live.current(&k).await.unwrap(), None);

    // A holder that stops renewing (TTL zero: expired at once).
    let dead = Leases::new(store.clone(), Duration::ZERO, Holder::current());
    let Claim::Won(mut old) = dead.claim(&k, "j-3").await.unwrap() else {
        panic!("the key was free again")
    };
    let takers: Vec<_> = (0..8)
        .map(|_| Leases::new(store.clone(), Duration::from_secs(60), Holder::current()))
        .collect();
    let results = futures::future::join_all(takers.iter().map(|t| t.claim(&k, "j-4"))).await;
    let took: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Ok(Claim::TookOver { lease, from }) => {
                Some((lease.body.takeovers, from.job_id.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(took, vec![(1, "j-3".to_owned())], "{results:?}");
    assert!(
        !dead.renew(&mut old).await.unwrap(),
        "the old holder lost it"
    );
    assert!(!dead.release(old).await.unwrap());
    assert_eq!(live.current(&k).await.unwrap().unwrap().job_id, "j-4");

    // What a claim costs the job that pays: create + release (read, delete),
    // against one plain PUT of the same size, measured in this run.
    let rounds = 20u32;
    let body = Bytes::from_static(b"{}");
    let t = std::time::Instant::now();
    for i in 0..rounds {
        let k = key(&format!("plain/{i}.json"));
        store
            .put(&k, body.clone(), &json_meta(&body))
            .await
            .unwrap();
    }
    let put = t.elapsed() / rounds;
    let t = std::time::Instant::now();
    for i in 0..rounds {
        let k = key(&format!("leases/cost-{i}.json"));
        let Claim::Won(lease) = live.claim(&k, "j-5").await.unwrap() else {
            panic!("free key")
        };
        assert!(live.release(lease).await.unwrap());
    }
    let claim = t.elapsed() / rounds;
    eprintln!(
        "lease cost ({}): claim + release {:.2} ms = {:.1} x one PUT ({:.2} ms)",
        store.describe(),
        claim.as_secs_f64() * 1e3,
        claim.as_secs_f64() / put.as_secs_f64().max(1e-9),
        put.as_secs_f64() * 1e3
    );
}

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod local_backend {
            $(#[tokio::test] async fn $name() { let f = super::local().await; super::$name(f.store.clone()).await; })*
        }
        mod s3_backend {
            $(#[tokio::test] async fn $name() { let f = super::s3().await; super::$name(f.store.clone()).await; })*
        }
    };
}

for_each_backend!(
    put_then_read_back_bytes_metadata_and_checksum,
    missing_objects_are_none,
    put_replaces_whole_objects,
    put_if_absent_never_overwrites,
    list_returns_keys_under_a_prefix,
    delete_removes_object_and_metadata,
    large_objects_round_trip,
    full_keys_carry_the_prefix,
    conditional_create_has_exactly_one_winner,
    the_losers_of_a_create_race_leave_no_metadata,
    replace_versioned_is_compare_and_swap,
    leases_are_claimed_renewed_taken_over_once_and_released,
);

/// The test double the start-up probe is tested against: a server that
/// ignores `If-None-Match` lets a second create "succeed".
#[tokio::test]
async fn the_ignoring_s3_server_lets_a_second_create_through() {
    let s3 = common::start_s3_ignoring_if_none_match().await;
    let bucket = common::unique("s");
    common::create_bucket(&s3.client, &bucket).await;
    let store = Store::s3(s3.client.clone(), bucket, "pfx");
    let k = key("_probe/x.json");
    let body = Bytes::from_static(b"{}");
    assert!(
        store
            .create_versioned(&k, body.clone(), &json_meta(&body))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .create_versioned(&k, body.clone(), &json_meta(&body))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn s3_rejects_a_body_that_does_not_match_its_checksum() {
    let f = s3().await;
    let body = Bytes::from_static(b"real bytes");
    let mut m = meta(&body);
    m.sha256 = Sha256::of(b"other bytes");
    let err = f.store.put(&key("bad/x.png"), body, &m).await.unwrap_err();
    assert_eq!(
        kling_archiver::error::Classify::code(&err),
        "store_checksum",
        "{err}"
    );
}

#[tokio::test]
async fn s3_keeps_the_sha256_checksum_it_verified_on_arrival() {
    let s3 = common::start_s3().await;
    let bucket = common::unique("s");
    common::create_bucket(&s3.client, &bucket).await;
    let store = Store::s3(s3.client.clone(), bucket.clone(), "pfx");
    let body = Bytes::from_static(b"\x89PNG\r\n\x1a\n a segment");
    store
        .put(
            &key("segments/r/object_seg.png"),
            body.clone(),
            &meta(&body),
        )
        .await
        .unwrap();
    let head = s3
        .client
        .head_object()
        .bucket(&bucket)
        .key("pfx/segments/r/object_seg.png")
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.checksum_sha256(),
        Some(Sha256::of(&body).base64().as_str()),
        "S3's own checksum of the stored bytes"
    );
    let meta = head.metadata().unwrap();
    assert_eq!(meta.get("sha256"), Some(&Sha256::of(&body).hex()));
    assert_eq!(meta.get("job-id").map(String::as_str), Some("j-1"));
    assert_eq!(head.content_type(), Some("image/png"));
}
