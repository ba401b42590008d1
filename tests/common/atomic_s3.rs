//! s3s-fs with atomic conditional writes.
//!
//! s3s-fs checks `If-None-Match` / `If-Match` and then writes: two racing
//! conditional PUTs of one key can both succeed (measured: 60 of 60 races
//! had more than one winner, `/work/shared/test-infra.md`). Real S3 lets
//! exactly one win. This wrapper delegates every operation to s3s-fs and
//! holds a per-key async mutex around `PutObject` and
//! `CompleteMultipartUpload` when they carry a condition, so a lease test
//! against it proves something.
//!
//! [`Conditional::IgnoreIfNoneMatch`] instead strips `If-None-Match`, as
//! some S3-compatible servers do, for the start-up probe's test.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conditional {
    /// One conditional writer per key at a time: real S3's behaviour.
    Atomic,
    /// `If-None-Match` is dropped before s3s-fs sees it.
    IgnoreIfNoneMatch,
}

pub struct AtomicFs {
    inner: s3s_fs::FileSystem,
    mode: Conditional,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AtomicFs {
    pub fn new(inner: s3s_fs::FileSystem, mode: Conditional) -> Self {
        Self {
            inner,
            mode,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock_of(&self, bucket: &str, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(format!("{bucket}/{key}")).or_default().clone()
    }
}

/// The whole `S3` impl: `async_trait` must see every method, so the
/// delegating ones are generated inside the attributed impl.
macro_rules! s3_impl {
    ($($name:ident: $input:ty => $output:ty),* $(,)?) => {
        #[async_trait::async_trait]
        impl S3 for AtomicFs {
            $(
                async fn $name(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.inner.$name(req).await
                }
            )*

            async fn put_object(
                &self,
                req: S3Request<PutObjectInput>,
            ) -> S3Result<S3Response<PutObjectOutput>> {
                self.put_object_conditional(req).await
            }

            async fn complete_multipart_upload(
                &self,
                req: S3Request<CompleteMultipartUploadInput>,
            ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
                self.complete_conditional(req).await
            }
        }
    };
}

s3_impl!(
    create_bucket: CreateBucketInput => CreateBucketOutput,
    copy_object: CopyObjectInput => CopyObjectOutput,
    delete_bucket: DeleteBucketInput => DeleteBucketOutput,
    delete_object: DeleteObjectInput => DeleteObjectOutput,
    delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
    get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
    get_object: GetObjectInput => GetObjectOutput,
    head_bucket: HeadBucketInput => HeadBucketOutput,
    head_object: HeadObjectInput => HeadObjectOutput,
    list_buckets: ListBucketsInput => ListBucketsOutput,
    list_objects: ListObjectsInput => ListObjectsOutput,
    list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
    create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
    upload_part: UploadPartInput => UploadPartOutput,
    upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput,
    list_parts: ListPartsInput => ListPartsOutput,
    abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
);

impl AtomicFs {
    async fn put_object_conditional(
        &self,
        mut req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        if self.mode == Conditional::IgnoreIfNoneMatch {
            req.input.if_none_match = None;
        }
        if req.input.if_none_match.is_none() && req.input.if_match.is_none() {
            return self.inner.put_object(req).await;
        }
        let lock = self.lock_of(&req.input.bucket, &req.input.key);
        let _held = lock.lock().await;
        self.inner.put_object(req).await
    }

    async fn complete_conditional(
        &self,
        mut req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        if self.mode == Conditional::IgnoreIfNoneMatch {
            req.input.if_none_match = None;
        }
        if req.input.if_none_match.is_none() && req.input.if_match.is_none() {
            return self.inner.complete_multipart_upload(req).await;
        }
        let lock = self.lock_of(&req.input.bucket, &req.input.key);
        let _held = lock.lock().await;
        self.inner.complete_multipart_upload(req).await
    }
}
