//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Third-party test data (`TSDISTILL_TEST_DATA`, default `../shared/data`).
/// Panics (never skips) when it is missing.
pub fn test_data() -> PathBuf {
    let dir = std::env::var_os("TSDISTILL_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    assert!(
        dir.join("totalseg_example").is_dir(),
        "test data not found at {}: set TSDISTILL_TEST_DATA",
        dir.display()
    );
    dir
}

/// Committed fixtures (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
