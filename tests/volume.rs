//! volume integration tests.
