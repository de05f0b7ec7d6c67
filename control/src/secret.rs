//! Secrets from the command line or a file (`--etcd-password`, `--etcd-password-file`), kept
//! out of `Debug` output and logs.

use std::fmt;
use std::path::Path;

/// A string that must not be shown: its `Debug` form is `Secret(<redacted>)`, and it has no
/// `Display`. [`Secret::expose`] is the one way to read it, at the place that needs it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file, as `--etcd-password-file` names it: the whole content
    /// without one trailing line end, so that `echo pass > file` works.
    pub fn read_file(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError {
            path: path.to_owned(),
            source,
        })?;
        let value = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        Ok(Secret::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub struct SecretError {
    /// The file.
    pub path: std::path::PathBuf,
    /// The cause.
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(
            format!("{:?}", Some(("root", s.clone()))),
            "Some((\"root\", Secret(<redacted>)))"
        );
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_file_loses_one_line_end() {
        let dir = std::env::temp_dir().join(format!("weft-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (content, want) in [
            ("pa ss\n", "pa ss"),
            ("pass\r\n", "pass"),
            ("pass", "pass"),
            ("pass\n\n", "pass\n"),
            ("", ""),
        ] {
            let path = dir.join("password");
            std::fs::write(&path, content).unwrap();
            assert_eq!(
                Secret::read_file(&path).unwrap().expose(),
                want,
                "{content:?}"
            );
        }
        let missing = Secret::read_file(&dir.join("missing")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
