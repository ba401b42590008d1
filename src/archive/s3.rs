//! The S3 backend: AWS S3 or any S3-compatible server.
//!
//! Every PUT carries `x-amz-checksum-sha256` (precomputed: it works whatever
//! the SDK's checksum mode, and S3 rejects a body that does not match), the
//! content type and `x-amz-meta-*` metadata. Create-if-absent uses
//! `If-None-Match: *`; servers that ignore the header still get a HEAD check
//! first, so only a race between two writers of the same job can overwrite,
//! and they write the same manifest.
//!
//! Bodies of [`MULTIPART_THRESHOLD`] and more (large source images) go up
//! as a multipart upload in [`PART_SIZE`] parts, each with its own SHA-256
//! checksum; a failed upload is aborted so no parts linger. Manifests and
//! segments are far below the threshold: always a single PUT.

use std::collections::HashMap;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use super::{Created, ObjectInfo, ObjectKey, PutMeta, Sha256, StoreError};

/// Bodies this large or larger are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Part size of a multipart upload (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Without trailing slash; may be empty.
    prefix: String,
}

impl S3Store {
    pub fn new(client: aws_sdk_s3::Client, bucket: String, prefix: String) -> Self {
        Self {
            client,
            bucket,
            prefix: prefix.trim_matches('/').to_owned(),
        }
    }

    pub fn full_key(&self, key: &ObjectKey) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.prefix, key)
        }
    }

    /// The inverse of [`Self::full_key`].
    pub fn relative<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }

    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
        if_absent: bool,
    ) -> Result<Created, StoreError> {
        if if_absent && self.head(key).await?.is_some() {
            return Ok(Created::AlreadyExisted);
        }
        if body.len() >= MULTIPART_THRESHOLD {
            let metadata: HashMap<String, String> = meta.stored_metadata().into_iter().collect();
            return self
                .put_multipart(key, body, meta, metadata, if_absent)
                .await;
        }
        let mut req = self.small_put(key, body, meta);
        if if_absent {
            req = req.if_none_match("*");
        }
        created(req.send().await, if_absent)
    }

    async fn put_multipart(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
        metadata: HashMap<String, String>,
        if_absent: bool,
    ) -> Result<Created, StoreError> {
        let full = self.full_key(key);
        let create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .content_type(meta.content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .set_metadata(Some(metadata))
            .send()
            .await
            .map_err(classify)?;
        let upload_id = create
            .upload_id()
            .ok_or_else(|| StoreError::Unavailable {
                reason: "CreateMultipartUpload returned no upload id".into(),
            })?
            .to_owned();
        let upload = async {
            let parts = self.upload_parts(&full, &upload_id, &body).await?;
            let mut req = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                );
            if if_absent {
                req = req.if_none_match("*");
            }
            created(req.send().await, if_absent)
        };
        let result = upload.await;
        if result.is_err() || matches!(result, Ok(Created::AlreadyExisted)) {
            // Best effort: parts of an unfinished upload are billed storage.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    /// Upload `body` in parts of `PART_SIZE`, each with its SHA-256, and
    /// return them in order for the completing request.
    async fn upload_parts(
        &self,
        full: &str,
        upload_id: &str,
        body: &Bytes,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let mut parts = Vec::new();
        let mut start = 0;
        let mut number = 1;
        while start < body.len() {
            let end = (start + PART_SIZE).min(body.len());
            let part = body.slice(start..end);
            let checksum = Sha256::of(&part).base64();
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_sha256(&checksum)
                .body(ByteStream::from(part))
                .send()
                .await
                .map_err(classify)?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .checksum_sha256(out.checksum_sha256().unwrap_or(&checksum))
                    .build(),
            );
            start = end;
            number += 1;
        }
        Ok(parts)
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Bytes>, StoreError> {
        Ok(self.fetch(key).await?.map(|(body, _)| body))
    }

    /// The object's bytes and ETag (`None`: no such key).
    async fn fetch(&self, key: &ObjectKey) -> Result<Option<(Bytes, Option<String>)>, StoreError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(classify(e)),
        };
        let etag = out.e_tag().map(str::to_owned);
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unavailable {
                reason: e.to_string(),
            })?;
        Ok(Some((data.into_bytes(), etag)))
    }

    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectInfo>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(o) => Ok(Some(ObjectInfo {
                size: o.content_length().unwrap_or(0).max(0) as u64,
                content_type: o.content_type().map(str::to_owned),
                metadata: o
                    .metadata()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>, StoreError> {
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{}", self.prefix, prefix)
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(full_prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(classify)?;
            for obj in page.contents() {
                if let Some(k) = obj.key()
                    && let Some(rel) = k.get(strip..)
                    && let Ok(key) = ObjectKey::parse(rel)
                {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }
}

/// A write's outcome; with `If-None-Match: *`, 412 means another writer
/// was first.
fn created<T, E, R>(
    result: Result<T, SdkError<E, R>>,
    if_absent: bool,
) -> Result<Created, StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: HttpStatus + std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(Created::Yes),
        Err(e) if if_absent && http_status(&e) == Some(412) => Ok(Created::AlreadyExisted),
        Err(e) => Err(classify(e)),
    }
}

fn http_status<E, R: HttpStatus>(e: &SdkError<E, R>) -> Option<u16> {
    e.raw_response().map(HttpStatus::status_u16)
}

/// Lets the error helpers read a status from the SDK's raw response type.
trait HttpStatus {
    fn status_u16(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_u16(&self) -> u16 {
        self.status().as_u16()
    }
}

fn is_not_found<E: ProvideErrorMetadata, R: HttpStatus>(e: &SdkError<E, R>) -> bool {
    matches!(e.code(), Some("NoSuchKey" | "NotFound")) || http_status(e) == Some(404)
}

fn classify<E, R>(e: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: HttpStatus + std::fmt::Debug,
{
    let status = http_status(&e);
    let code = e.code().unwrap_or_default().to_owned();
    let reason = format!(
        "{}{}",
        aws_sdk_s3::error::DisplayErrorContext(&e),
        status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
    );
    match code.as_str() {
        "AccessDenied"
        | "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "NoSuchBucket"
        | "AllAccessDisabled"
        | "AccountProblem"
        | "InvalidBucketName" => StoreError::Denied { reason },
        "BadDigest" | "XAmzContentSHA256Mismatch" | "InvalidDigest" => {
            StoreError::Checksum { reason }
        }
        _ if status == Some(403) => StoreError::Denied { reason },
        _ => StoreError::Unavailable { reason },
    }
}

/// Conditional writes for leases (`super::lease`): S3's `If-None-Match: *`
/// and `If-Match: <etag>`. No HEAD first: the server's condition is the
/// only check, so a server that ignores it is caught by the start-up probe.
impl S3Store {
    /// Create `key` only if it does not exist; its ETag, or `None` if
    /// another writer was first.
    pub async fn create_versioned(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
    ) -> Result<Option<String>, StoreError> {
        let out = self
            .small_put(key, body, meta)
            .if_none_match("*")
            .send()
            .await;
        match out {
            Ok(o) => etag(o.e_tag()).map(Some),
            Err(e) if lost_race(&e) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// Replace `key` only if its ETag is still `version`; the new ETag, or
    /// `None` if it changed (or vanished) meanwhile.
    pub async fn replace_versioned(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        let out = self
            .small_put(key, body, meta)
            .if_match(version)
            .send()
            .await;
        match out {
            Ok(o) => etag(o.e_tag()).map(Some),
            Err(e) if lost_race(&e) || is_not_found(&e) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// The body and ETag of `key`.
    pub async fn get_versioned(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<(Bytes, String)>, StoreError> {
        match self.fetch(key).await? {
            Some((body, e)) => Ok(Some((body, etag(e.as_deref())?))),
            None => Ok(None),
        }
    }

    fn small_put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        let metadata: HashMap<String, String> = meta.stored_metadata().into_iter().collect();
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_type(meta.content_type)
            .checksum_sha256(meta.sha256.base64())
            .set_metadata(Some(metadata))
            .body(ByteStream::from(body))
    }
}

fn etag(e: Option<&str>) -> Result<String, StoreError> {
    match e {
        Some(e) if !e.is_empty() => Ok(e.to_owned()),
        _ => Err(StoreError::Unavailable {
            reason: "the S3 server returned no ETag; leases need one".into(),
        }),
    }
}

/// 412: the condition failed; 409: S3's `ConditionalRequestConflict`
/// (another conditional write to the key in progress). Either way another
/// writer won.
fn lost_race<E, R: HttpStatus>(e: &SdkError<E, R>) -> bool {
    matches!(http_status(e), Some(412 | 409))
}
