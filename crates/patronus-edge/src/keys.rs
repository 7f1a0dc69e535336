//! The edge's WireGuard identity: an X25519 private key generated on the edge, stored 0600 in
//! WireGuard's base64 form, never printed, never sent anywhere. Only the public key leaves.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use boringtun::x25519::{PublicKey, StaticSecret};
use patronus_api::{WgPublicKey, key_from_base64, key_to_base64};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {problem}")]
    Bad { path: String, problem: String },
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// The private key. `Debug` shows only the public half.
pub struct PrivateKey(StaticSecret);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public())
    }
}

impl PrivateKey {
    /// A new key from the OS's random source.
    pub fn generate() -> Result<Self, KeyFileError> {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).map_err(|e| KeyFileError::Random(e.to_string()))?;
        Ok(Self(StaticSecret::from(b)))
    }

    pub fn public(&self) -> WgPublicKey {
        WgPublicKey(PublicKey::from(&self.0).to_bytes())
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }

    /// Reads the key at `path`, or generates one there (mode 0600, never overwriting) if there
    /// is none. A key file that others can read is refused.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        let p = path.display().to_string();
        let io = |error| KeyFileError::Io {
            path: p.clone(),
            error,
        };
        // The link itself, not what it points to: a key must be a regular file of our own.
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_file() {
                    return Err(KeyFileError::Bad {
                        path: p,
                        problem: "is not a regular file (a symlink or a directory?)".into(),
                    });
                }
                let me = nix::unistd::geteuid().as_raw();
                if meta.uid() != me {
                    return Err(KeyFileError::Bad {
                        path: p,
                        problem: format!(
                            "belongs to uid {}, not to this process's uid {me}",
                            meta.uid()
                        ),
                    });
                }
                let mode = meta.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(KeyFileError::Bad {
                        path: p,
                        problem: format!(
                            "a private key must be readable by its owner only (mode {:o}); chmod 600 it",
                            mode & 0o777
                        ),
                    });
                }
                let text = std::fs::read_to_string(path).map_err(io)?;
                let bytes = key_from_base64(&text).map_err(|e| KeyFileError::Bad {
                    path: p.clone(),
                    problem: e.to_string(),
                })?;
                Ok(Self(StaticSecret::from(bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                writeln!(f, "{}", key_to_base64(&key.0.to_bytes())).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("patronus-keys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_key_is_created_0600_once_and_read_back_the_same() {
        let dir = tmp("create");
        let path = dir.join("sub/private.key");
        let k1 = PrivateKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = PrivateKey::load_or_create(&path).unwrap();
        assert_eq!(k1.public(), k2.public());
        assert!(!format!("{k1:?}").contains(&key_to_base64(&k1.0.to_bytes())));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_key_others_can_read_or_a_malformed_one_is_refused() {
        let dir = tmp("refuse");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, key_to_base64(&[7; 32])).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PrivateKey::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PrivateKey::load_or_create(&path).is_ok());
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = PrivateKey::load_or_create(&link).unwrap_err().to_string();
        assert!(e.contains("regular file"), "{e}");
        std::fs::write(&path, "not a key").unwrap();
        assert!(PrivateKey::load_or_create(&path).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
