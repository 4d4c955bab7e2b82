//! The one integration-test binary (one binary keeps cold CI builds short).
//! Each area has its own module file.

mod common;
mod engine;
mod learning;
mod nn;
mod totalseg;
mod train;
mod volume;
