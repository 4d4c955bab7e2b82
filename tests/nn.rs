//! nn integration tests.
