//! The local-directory backend: the embedded default, for laptops, demos and
//! single-node installs.
//!
//! An object is a file at `<root>/<key>`; its metadata sits in
//! `<root>/.kling-meta/<key>.json`. Writes go to a temporary file in the
//! same directory, are fsynced, then renamed (or hard-linked, for
//! create-if-absent) into place, and the directory is fsynced: an object is
//! either absent or whole. Every directory the store creates has its parent
//! fsynced too ([`create_dirs`]), so a power cut cannot lose a new
//! `jobs/<id>/` with the acked manifest in it.
//!
//! Metadata: a plain `put` writes it before the object, so a replaced
//! object always has metadata. A create-if-absent writes it only after its
//! hard link won: a writer that lost never touches the winner's metadata.
//! (A crash between the link and the metadata leaves the object without
//! metadata, read as none; nothing the worker decides reads the metadata of
//! a create-if-absent object.)

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{Created, ObjectInfo, ObjectKey, PutMeta, StoreError};

const META_DIR: &str = ".kling-meta";
const TMP_MARK: &str = ".kling-tmp-";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MetaFile {
    content_type: String,
    metadata: BTreeMap<String, String>,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    fn meta_path(&self, key: &ObjectKey) -> PathBuf {
        self.root
            .join(META_DIR)
            .join(format!("{}.json", key.as_str()))
    }

    pub async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
        if_absent: bool,
    ) -> Result<Created, StoreError> {
        let path = self.path(key);
        let meta_path = self.meta_path(key);
        let metadata = meta.stored_metadata();
        let meta_json = serde_json::to_vec(&MetaFile {
            content_type: meta.content_type.to_owned(),
            metadata,
        })
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        blocking(move || {
            if !if_absent {
                write_atomic(&meta_path, &meta_json, false)?;
                return write_atomic(&path, &body, false);
            }
            if path.exists() {
                return Ok(Created::AlreadyExisted);
            }
            // The link decides; only its winner writes metadata.
            let created = write_atomic(&path, &body, true)?;
            if created == Created::Yes {
                write_atomic(&meta_path, &meta_json, false)?;
            }
            Ok(created)
        })
        .await
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key);
        blocking(move || match fs::read(&path) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        })
        .await
    }

    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectInfo>, StoreError> {
        let path = self.path(key);
        let meta_path = self.meta_path(key);
        let key = key.to_string();
        blocking(move || {
            let size = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let meta: MetaFile = match fs::read(&meta_path) {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    reason: format!("metadata: {e}"),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => MetaFile {
                    content_type: String::new(),
                    metadata: BTreeMap::new(),
                },
                Err(e) => return Err(e.into()),
            };
            Ok(Some(ObjectInfo {
                size,
                content_type: (!meta.content_type.is_empty()).then_some(meta.content_type),
                metadata: meta.metadata,
            }))
        })
        .await
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let path = self.path(key);
        let meta_path = self.meta_path(key);
        blocking(move || {
            for p in [path, meta_path] {
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
        .await
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectKey>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let mut out = Vec::new();
            // Only walk the directory that can hold matches.
            let start = match prefix.rfind('/') {
                Some(i) => root.join(&prefix[..i]),
                None => root.clone(),
            };
            walk(&root, &start, &prefix, &mut out)?;
            Ok(out)
        })
        .await
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectKey>) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == META_DIR || name.contains(TMP_MARK) {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(root, &path, prefix, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let rel = rel
                .to_string_lossy()
                .replace(std::path::MAIN_SEPARATOR, "/");
            if rel.starts_with(prefix)
                && let Ok(key) = ObjectKey::parse(&rel)
            {
                out.push(key);
            }
        }
    }
    Ok(())
}

/// Write `data` to `path` atomically. With `if_absent`, an existing file is
/// left alone and reported as [`Created::AlreadyExisted`] (hard link: the
/// check and the write are one step).
fn write_atomic(path: &Path, data: &[u8], if_absent: bool) -> Result<Created, StoreError> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("key has no parent directory"))?;
    create_dirs(dir, &mut sync_dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}{TMP_MARK}{:016x}", fastrand::u64(..)));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        let created = if if_absent {
            match fs::hard_link(&tmp, path) {
                Ok(()) => Created::Yes,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Created::AlreadyExisted,
                Err(e) => return Err(e),
            }
        } else {
            fs::rename(&tmp, path)?;
            Created::Yes
        };
        sync_dir(dir)?;
        Ok(created)
    })();
    let _ = fs::remove_file(&tmp);
    Ok(result?)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// `create_dir_all`, durably: each directory it creates has its parent
/// synced with `sync` (outermost first), since a new directory entry lives
/// in its parent. Returns the directories created.
fn create_dirs(
    dir: &Path,
    sync: &mut impl FnMut(&Path) -> std::io::Result<()>,
) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    if missing.is_empty() {
        return Ok(missing);
    }
    fs::create_dir_all(dir)?;
    missing.reverse();
    for d in &missing {
        match d.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync(parent)?,
            _ => sync(Path::new("."))?,
        }
    }
    Ok(missing)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
}

/// Conditional writes for leases (`super::lease`). An object's version is
/// the SHA-256 of its bytes. Create is a hard link (atomic against other
/// creates); replace and delete compare and write under an exclusive
/// `flock` on `.kling-meta/<key>.lock`, which the kernel releases if the
/// process dies.
impl LocalStore {
    pub async fn create_versioned(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
    ) -> Result<Option<String>, StoreError> {
        let version = super::Sha256::of(&body).hex();
        match self.put(key, body, meta, true).await? {
            Created::Yes => Ok(Some(version)),
            Created::AlreadyExisted => Ok(None),
        }
    }

    pub async fn get_versioned(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<(Bytes, String)>, StoreError> {
        Ok(self.get(key).await?.map(|b| {
            let v = super::Sha256::of(&b).hex();
            (b, v)
        }))
    }

    pub async fn replace_versioned(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &PutMeta,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        let path = self.path(key);
        let lock = self.meta_path(key).with_extension("lock");
        let version = version.to_owned();
        let new_version = super::Sha256::of(&body).hex();
        let meta_json = serde_json::to_vec(&MetaFile {
            content_type: meta.content_type.to_owned(),
            metadata: meta.stored_metadata(),
        })
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let meta_path = self.meta_path(key);
        blocking(move || {
            let _guard = FileLock::take(&lock)?;
            match fs::read(&path) {
                Ok(cur) if super::Sha256::of(&cur).hex() == version => {}
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            write_atomic(&meta_path, &meta_json, false)?;
            write_atomic(&path, &body, false)?;
            Ok(Some(new_version))
        })
        .await
    }

    /// Delete `key` only if its version is still `version`. Its metadata
    /// file stays: removing it could race a new create of the same key.
    pub async fn delete_versioned(
        &self,
        key: &ObjectKey,
        version: &str,
    ) -> Result<bool, StoreError> {
        let path = self.path(key);
        let lock = self.meta_path(key).with_extension("lock");
        let version = version.to_owned();
        blocking(move || {
            let _guard = FileLock::take(&lock)?;
            let same = match fs::read(&path) {
                Ok(cur) => super::Sha256::of(&cur).hex() == version,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e.into()),
            };
            if same {
                fs::remove_file(&path)?;
            }
            Ok(same)
        })
        .await
    }
}

/// An exclusive `flock` held until dropped.
struct FileLock(fs::File);

impl FileLock {
    fn take(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            create_dirs(dir, &mut sync_dir)?;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        f.lock()?;
        Ok(Self(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk syncs the parent of every directory it made, outermost
    /// first, and nothing once they exist.
    #[test]
    fn creating_directories_syncs_the_parent_of_each_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("arch");
        let deep = root.join("jobs").join("j-1");
        let mut synced = Vec::new();
        let made = create_dirs(&deep, &mut |p: &Path| {
            synced.push(p.to_path_buf());
            sync_dir(p)
        })
        .unwrap();
        assert!(deep.is_dir());
        assert_eq!(made, vec![root.clone(), root.join("jobs"), deep.clone()]);
        assert_eq!(
            synced,
            vec![tmp.path().to_path_buf(), root.clone(), root.join("jobs")]
        );

        synced.clear();
        let again = create_dirs(&deep, &mut |p: &Path| {
            synced.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert!(again.is_empty() && synced.is_empty(), "{synced:?}");

        // A sibling under an existing parent: only that parent is synced.
        let sibling = root.join("jobs").join("j-2");
        create_dirs(&sibling, &mut |p: &Path| {
            synced.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert_eq!(synced, vec![root.join("jobs")]);
    }

    /// A failing directory sync fails the write instead of being ignored.
    #[test]
    fn a_failed_directory_sync_fails_the_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("x").join("y");
        let err = create_dirs(&dir, &mut |_: &Path| {
            Err(std::io::Error::other("disk gone"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk gone");
    }
}
