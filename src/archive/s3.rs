//! The S3 backend: AWS S3 or any S3-compatible server.
//!
//! Every PUT carries `x-amz-checksum-sha256` (precomputed: it works whatever
//! the SDK's checksum mode, and S3 rejects a body that does not match), the
//! content type and `x-amz-meta-*` metadata. Create-if-absent uses
//! `If-None-Match: *`; servers that ignore the header still get a HEAD check
//! first, so only a race between two writers of the same job can overwrite,
//! and they write the same manifest.

use std::collections::HashMap;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{Created, ObjectInfo, ObjectKey, PutMeta, StoreError};

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
        let metadata: HashMap<String, String> = meta.stored_metadata().into_iter().collect();
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_type(meta.content_type)
            .checksum_sha256(meta.sha256.base64())
            .set_metadata(Some(metadata))
            .body(ByteStream::from(body));
        if if_absent {
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(Created::Yes),
            Err(e) if if_absent && http_status(&e) == Some(412) => Ok(Created::AlreadyExisted),
            Err(e) => Err(classify(e)),
        }
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Bytes>, StoreError> {
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
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unavailable {
                reason: e.to_string(),
            })?;
        Ok(Some(data.into_bytes()))
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
