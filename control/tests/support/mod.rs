//! Shared helpers for the host integration tests.

pub mod netns;

use std::path::PathBuf;

/// The path of a file written by a real flanneld v0.20.2, kept in
/// `control/tests/fixtures/flannel-v0.20.2/` (its README says how each was captured).
#[allow(dead_code)]
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flannel-v0.20.2")
        .join(name)
}

/// The text of a flanneld fixture file.
#[allow(dead_code)]
pub fn fixture(name: &str) -> String {
    let path = fixture_path(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}
