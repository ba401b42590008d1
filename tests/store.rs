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
);

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
