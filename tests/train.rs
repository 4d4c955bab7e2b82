//! train integration tests.
