//! Where backups are kept: a local directory, or S3-compatible object storage
//! (`backup_url = "s3://BUCKET/PREFIX"`).
//!
//! With object storage, a backup is made whole in a staging directory (under `backup_dir`,
//! 0700), its ciphertext uploaded (multipart for large ones), then its manifest, then the
//! staged files removed: as in a directory, a backup whose manifest is listed is a backup
//! whole, and a prune deletes the manifest first. `verify` and `restore` download the
//! ciphertext into a private temporary directory and check it there against the manifest
//! before anything is decrypted.
//!
//! The object store is reached at the operator's endpoint only: credentials are static (from
//! the environment), so no instance-metadata service is ever asked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncWriteExt;

use super::{BackupError, Manifest, Retention};
use crate::store::Store;

/// Splits `s3://BUCKET/PREFIX` into the bucket and the prefix (without slashes at its ends).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or("must be an s3://BUCKET/PREFIX URL")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // S3's bucket names: 3 to 63 lowercase letters, digits, dots and hyphens.
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !ok {
        return Err(format!(
            "{bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, dots, hyphens)"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
        return Err(format!("{prefix:?} is not a key prefix"));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// Where backups are kept.
#[derive(Debug, Clone)]
pub enum Destination {
    Dir(PathBuf),
    Object(Bucket),
}

/// An S3-compatible bucket (and key prefix) backups go to, with the local directory they are
/// staged in.
#[derive(Clone)]
pub struct Bucket {
    url: String,
    prefix: String,
    store: Arc<dyn ObjectStore>,
    staging: PathBuf,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("url", &self.url)
            .field("staging", &self.staging)
            .finish_non_exhaustive()
    }
}

fn remote(url: &str, e: impl std::fmt::Display) -> BackupError {
    BackupError::Remote {
        url: url.to_owned(),
        message: e.to_string(),
    }
}

impl Destination {
    /// The destination the configuration names: `backup_url` if set (credentials from `env`:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`), else
    /// `backup_dir`.
    pub fn from_config(
        c: &crate::config::Config,
        env: &[(String, String)],
    ) -> Result<Self, BackupError> {
        let Some(url) = &c.backup_url else {
            return Ok(Self::Dir(c.backup_dir.clone()));
        };
        let (bucket, prefix) = parse_url(url).map_err(|e| remote(url, e))?;
        let var = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let (Some(key_id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(remote(
                url,
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (the \
                 object store's credentials are never read from the configuration file)",
            ));
        };
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(&c.backup_s3_region)
            .with_access_key_id(key_id)
            .with_secret_access_key(secret)
            // A drill or an operator waits on this: a few quick retries, not S3's 3 minutes.
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            });
        if let Some(t) = var("AWS_SESSION_TOKEN") {
            b = b.with_token(t);
        }
        if let Some(e) = &c.backup_s3_endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        let store = b.build().map_err(|e| remote(url, e))?;
        Ok(Self::Object(Bucket {
            url: url.clone(),
            prefix,
            store: Arc::new(store),
            staging: c.backup_dir.join("staging"),
        }))
    }

    /// For messages: the directory or the URL.
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(d) => d.display().to_string(),
            Self::Object(b) => b.url.clone(),
        }
    }

    /// Takes a backup of `store` here (see [`super::create`]).
    pub async fn create(
        &self,
        store: &Store,
        recipients: &[age::x25519::Recipient],
    ) -> Result<Manifest, BackupError> {
        match self {
            Self::Dir(d) => super::create(store, d, recipients).await,
            Self::Object(b) => {
                let m = super::create(store, &b.staging, recipients).await?;
                let uploaded = b.upload(&m).await;
                for ext in ["json", "age"] {
                    let _ = std::fs::remove_file(b.staging.join(format!("{}.{ext}", m.name)));
                }
                uploaded.map(|()| m)
            }
        }
    }

    /// Every backup here (those with a manifest), oldest first.
    pub async fn list(&self) -> Result<Vec<Manifest>, BackupError> {
        match self {
            Self::Dir(d) => super::list(d),
            Self::Object(b) => b.list().await,
        }
    }

    /// The backup to restore: `name` if given, else the newest at or before `before_ms` if
    /// given, else the newest.
    pub async fn pick(
        &self,
        name: Option<&str>,
        before_ms: Option<i64>,
    ) -> Result<Manifest, BackupError> {
        let all = self.list().await?;
        super::choose(all, name, before_ms, &self.describe())
    }

    /// Deletes the backups `retention` does not keep; returns their names.
    pub async fn prune(&self, retention: &Retention) -> Result<Vec<String>, BackupError> {
        match self {
            Self::Dir(d) => super::prune(d, retention),
            Self::Object(b) => {
                let mut gone = Vec::new();
                for m in retention.doomed(b.list().await?) {
                    // The manifest first, as in a directory.
                    for ext in ["json", "age"] {
                        let key = b.key(&format!("{}.{ext}", m.name));
                        match b.store.delete(&key).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(remote(&b.url, e)),
                        }
                    }
                    gone.push(m.name);
                }
                Ok(gone)
            }
        }
    }

    /// A local directory holding backup `m`'s ciphertext (`NAME.age`): this directory, or a
    /// private one under `scratch` it is downloaded into (removed when the returned value is
    /// dropped).
    pub async fn fetch(&self, m: &Manifest, scratch: &Path) -> Result<Fetched, BackupError> {
        match self {
            Self::Dir(d) => Ok(Fetched {
                dir: d.clone(),
                remove: false,
            }),
            Self::Object(b) => {
                let dir = super::fresh_private_dir(scratch, ".patronus-fetch")?;
                let fetched = Fetched { dir, remove: true };
                b.download(m, &fetched.dir).await?;
                Ok(fetched)
            }
        }
    }
}

/// A backup's ciphertext on local disk (see [`Destination::fetch`]).
#[derive(Debug)]
pub struct Fetched {
    dir: PathBuf,
    remove: bool,
}

impl Fetched {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Bucket {
    fn key(&self, file: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(file)
        } else {
            ObjectPath::from(format!("{}/{file}", self.prefix))
        }
    }

    async fn upload(&self, m: &Manifest) -> Result<(), BackupError> {
        let local = self.staging.join(format!("{}.age", m.name));
        let mut file = tokio::fs::File::open(&local)
            .await
            .map_err(super::io(&local))?;
        let mut w = object_store::buffered::BufWriter::new(
            self.store.clone(),
            self.key(&format!("{}.age", m.name)),
        );
        let copied = async {
            tokio::io::copy(&mut file, &mut w).await?;
            w.shutdown().await
        }
        .await;
        if let Err(e) = copied {
            let _ = w.abort().await;
            return Err(remote(&self.url, format!("uploading {}.age: {e}", m.name)));
        }
        let json = std::fs::read(self.staging.join(format!("{}.json", m.name)))
            .map_err(super::io(&self.staging))?;
        self.store
            .put(
                &self.key(&format!("{}.json", m.name)),
                PutPayload::from(json),
            )
            .await
            .map_err(|e| remote(&self.url, format!("uploading {}.json: {e}", m.name)))?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Manifest>, BackupError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let objects: Vec<_> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(|e| remote(&self.url, e))?;
        let mut out = Vec::new();
        for o in objects {
            let Some(file) = o.location.filename() else {
                continue;
            };
            // Only this prefix's own files, not those of a "directory" below it.
            if o.location != self.key(file)
                || !file.starts_with("patronus-")
                || !file.ends_with(".json")
            {
                continue;
            }
            let bytes = self
                .store
                .get(&o.location)
                .await
                .map_err(|e| remote(&self.url, e))?
                .bytes()
                .await
                .map_err(|e| remote(&self.url, e))?;
            match super::parse_manifest(&bytes, Path::new(file)) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(error = %e, url = %self.url, "not a backup; left alone"),
            }
        }
        out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    async fn download(&self, m: &Manifest, dir: &Path) -> Result<(), BackupError> {
        let path = dir.join(format!("{}.age", m.name));
        let got = self
            .store
            .get(&self.key(&format!("{}.age", m.name)))
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => BackupError::Corrupt {
                    name: m.name.clone(),
                    message: format!("its manifest is in {} but not its .age file", self.url),
                },
                e => remote(&self.url, e),
            })?;
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(super::io(&path))?
        };
        let mut out = tokio::fs::File::from_std(file);
        let mut chunks = got.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = chunks
            .try_next()
            .await
            .map_err(|e| remote(&self.url, format!("downloading {}.age: {e}", m.name)))?
        {
            // Never more than the manifest says: the hash check comes after.
            written += chunk.len() as u64;
            if written > m.ciphertext_bytes {
                return Err(BackupError::Corrupt {
                    name: m.name.clone(),
                    message: format!(
                        "the object in {} is larger than its manifest says ({} bytes)",
                        self.url, m.ciphertext_bytes
                    ),
                });
            }
            out.write_all(&chunk).await.map_err(super::io(&path))?;
        }
        out.flush().await.map_err(super::io(&path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        assert_eq!(
            parse_url("s3://backups/patronus/prod/"),
            Ok(("backups".into(), "patronus/prod".into()))
        );
        assert_eq!(
            parse_url("s3://backups"),
            Ok(("backups".into(), String::new()))
        );
        assert!(parse_url("https://backups").is_err());
        assert!(parse_url("s3://Backups/x").is_err());
        assert!(parse_url("s3://ab/x").is_err());
        assert!(parse_url("s3://backups/a/../b").is_err());
    }
}
