//! The lab: network namespaces, a bridge, veths, addresses, real mail daemons and drop guards.
//! One topology builder serves the integration tests, `cargo xtask run` and the benchmarks.
//!
//! Rules it keeps: every host in its own namespace; no test address in the root namespace;
//! addresses only from 198.18.0.0/15 and 2001:db8::/32; names carry a per-lab prefix; every
//! process and namespace is removed by drop guards (also on panic); every wait is bounded.

pub mod cmd;
pub mod netns;
pub mod root;
pub mod smtp;
pub mod topology;
