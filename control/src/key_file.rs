//! This host's private key for encryption between hosts, in a file only root can read.
//!
//! The file holds the key as WireGuard's tools write it (`wg genkey`): 32 bytes in standard
//! base64 and a newline. On first start it is created with mode 0600 (its directory with
//! 0700 if missing), from the operating system's random source; later starts read it. A file
//! that others may read, or that does not hold a key, is refused: weftd then does not start,
//! rather than join in plaintext or with a key someone else may know.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::RngCore;
use weft_engine::KEY_LEN;

/// Why the key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file or its directory cannot be read or written.
    #[error("private key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Group or others may read or write the file.
    #[error("private key file {path} has mode {mode:04o}; it must be readable by its owner only (chmod 600)")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a key.
    #[error("private key file {path} does not hold a base64 X25519 key (as `wg genkey` writes)")]
    Malformed {
        /// The file.
        path: PathBuf,
    },
}

/// Whether a key came from the file or was made now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Read from an existing file.
    Read,
    /// Made and written now (first start).
    Created,
}

/// Read the private key at `path`, or create one there if there is no file.
pub fn load_or_create(path: &Path) -> Result<([u8; KEY_LEN], KeyOrigin), KeyFileError> {
    let io_error = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Exposed {
                    path: path.to_owned(),
                    mode,
                });
            }
            let text = fs::read_to_string(path).map_err(io_error)?;
            let key = decode_key(&text).ok_or_else(|| KeyFileError::Malformed {
                path: path.to_owned(),
            })?;
            Ok((key, KeyOrigin::Read))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; KEY_LEN];
            rand::rngs::OsRng.fill_bytes(&mut key);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io_error)?;
            }
            // create_new: two weftds starting at once never overwrite each other's key.
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io_error)?;
            file.write_all(format!("{}\n", encode_key(&key)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_error)?;
            Ok((key, KeyOrigin::Created))
        }
        Err(e) => Err(io_error(e)),
    }
}

/// A key in WireGuard's text form: standard base64 with padding.
pub fn encode_key(key: &[u8; KEY_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A key from its text form (surrounding whitespace ignored); `None` if it is not one.
pub fn decode_key(text: &str) -> Option<[u8; KEY_LEN]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-key-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_key_is_created_once_with_mode_0600_and_read_back() {
        let dir = temp_dir("create");
        let path = dir.join("sub").join("private.key");
        let (key, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, KeyOrigin::Created);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 45, "44 base64 characters and a newline");
        assert_eq!(load_or_create(&path).unwrap(), (key, KeyOrigin::Read));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exposed_or_malformed_files_are_refused() {
        let dir = temp_dir("refuse");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("private.key");
        fs::write(&path, format!("{}\n", encode_key(&[7; KEY_LEN]))).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_or_create(&path).unwrap().0, [7; KEY_LEN]);
        fs::write(&path, "not a key\n").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("does not hold"), "{err}");
        fs::write(&path, &encode_key(&[7; KEY_LEN])[..20]).unwrap();
        assert!(load_or_create(&path).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_read_as_wireguard_writes_them() {
        // The RFC 7748 test key in `wg`'s form.
        let text = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n";
        let key = decode_key(text).unwrap();
        assert_eq!(key[0], 0x77);
        assert_eq!(encode_key(&key), text.trim());
        assert_eq!(decode_key("c2hvcnQ="), None);
    }
}
