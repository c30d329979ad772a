//! `cargo xtask` — developer and CI entry points for mxlb.
//!
//! * `cargo xtask setup` installs what a fresh Debian 12 machine lacks (idempotent).
//! * `cargo xtask test`  runs `setup`, then the whole test suite (the README's test command).
//! * `cargo xtask run`   builds, brings up the lab with `mxlb run` in it and sends SMTP through it.
//! * `cargo xtask bench NAME` runs a named benchmark: xdp, health, failover, l4, relay or proxy
//!   (writes target/bench/NAME.json; see bench.rs).

mod bench;
mod run;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mxlb developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and lab packages a fresh machine lacks (idempotent).
    Setup,
    /// Run `setup`, then `cargo test --workspace --exclude lb-ebpf`; extra args go to cargo test.
    Test {
        /// Arguments passed through to `cargo test` (put them after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, bring up the lab with `mxlb run` on its LB node, send SMTP through it, show the
    /// distribution; `-- --config FILE` runs on real interfaces instead.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark (xdp, health, failover, l4, relay, proxy); writes target/bench/NAME.json
    /// (xdp, l4 and proxy also update bench/RESULTS.md).
    Bench {
        /// Benchmark name.
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::run().map(|()| 0),
        Cmd::Test { args } => test::run(&args),
        Cmd::Run { args } => run::run(&args).map(|()| 0),
        Cmd::Bench { name, args } => bench::run(&name, &args).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
