//! `cargo xtask bench NAME`: run a named benchmark in the same lab the tests use.

use anyhow::{Result, bail};

pub fn run(name: &str, _args: &[String]) -> Result<()> {
    // TODO(lead): dispatch NAME to a benchmark built on `lab::Lab` (smtp-source load through the
    // VIP, TestRun timings, ...), and print/record its results.
    bail!("`cargo xtask bench {name}` is not yet implemented (placeholder; see xtask/src/bench.rs)")
}
