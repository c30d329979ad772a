//! Small helpers shared by the xtask commands (std only).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Prints one progress line, prefixed with the task name.
pub fn say(task: &str, msg: &str) {
    println!("{task}: {msg}");
}

/// Effective uid of this process, read from /proc (std has no geteuid).
pub fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid: real effective saved fs
    line.split_whitespace().nth(2)?.parse().ok()
}

pub fn is_root() -> bool {
    euid() == Some(0)
}

/// Runs a command with inherited stdout/stderr; fails if it cannot start or exits non-zero.
pub fn run_visible(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs a command quietly and returns (success, stdout). `None` if it cannot be started.
pub fn probe(cmd: &mut Command) -> Option<(bool, String)> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// PATH with `$CARGO_HOME/bin` appended if it is missing (so freshly installed tools are found).
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    std::env::join_paths(dirs).unwrap_or(path)
}

/// The cargo that runs us (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}
