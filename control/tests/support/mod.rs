//! Shared helpers for the host integration tests.

pub mod netns;

use std::path::PathBuf;

/// The project's `shared/` directory (specs and fixtures), which lives beside the
/// repository: the nearest `shared/fixtures` found walking up from the repository root.
/// `WEFT_SHARED_DIR` overrides the search.
#[allow(dead_code)]
pub fn shared_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_SHARED_DIR") {
        return PathBuf::from(dir);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    repo.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared"))
        .find(|shared| shared.join("fixtures").is_dir())
        .unwrap_or_else(|| {
            panic!(
                "no shared/fixtures beside {} or above it; set WEFT_SHARED_DIR",
                repo.display()
            )
        })
}
