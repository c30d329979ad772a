//! `cargo xtask setup`: install what a fresh Debian 12 machine lacks, idempotently.
//!
//! Steps (one line each, "already present" or "installing ..."):
//! 1. rust-src for the nightly toolchain (lb-ebpf builds with `-Z build-std=core`);
//! 2. Debian packages: llvm-22-dev + libpolly-22-dev (bpf-linker links against LLVM 22, the
//!    version rustc uses), and the lab's packages: postfix (for `smtp-sink`/`smtp-source`),
//!    iproute2, ethtool, swaks (with its IPv6/TLS/AUTH perl modules), haproxy, dovecot, keepalived
//!    (VRRP peers inside the lab's LB namespaces), perdition (the `bench proxy` comparison),
//!    fonts-dejavu-core (the `bench l4` chart).
//!    `apt-get update` runs once, only when something is missing;
//! 3. bpf-linker 0.13.0 built against Debian's LLVM 22 (prebuilt downloads are unreachable).
//!
//! The lab only runs Postfix's test programs inside its own namespaces; the system Postfix
//! service is never needed. When this command installs postfix, service start-up is suppressed
//! during the install (policy-rc.d) and any instance that started anyway is stopped and disabled.
//! A postfix that was already installed and running is left alone (it does not conflict: the lab's
//! sinks listen inside private namespaces). The same policy keeps a freshly installed keepalived
//! service from starting (its unit also needs `/etc/keepalived/keepalived.conf`, which the lab
//! never writes: it runs its own keepalived per LB namespace with its own config).

use crate::util::{cargo_bin_dir, is_root, path_with_cargo_bin, probe, run_visible, say};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

const T: &str = "setup";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages, with the reason each is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22 for bpf-linker"),
    ("libpolly-22-dev", "LLVM 22 Polly, linked by bpf-linker"),
    ("postfix", "smtp-sink/smtp-source for the lab"),
    ("iproute2", "ip/bridge for the lab"),
    ("ethtool", "offload settings in the lab"),
    ("swaks", "scriptable SMTP client for the lab"),
    ("libio-socket-inet6-perl", "IPv6 for swaks"),
    ("libnet-ssleay-perl", "STARTTLS for swaks"),
    ("libauthen-sasl-perl", "AUTH for swaks"),
    ("haproxy", "the agent-check interop test and the `bench l4` comparison row"),
    ("dovecot-imapd", "real IMAP back-ends in the lab"),
    ("dovecot-pop3d", "real POP3 back-ends in the lab"),
    ("dovecot-lmtpd", "real LMTP back-ends in the lab"),
    ("keepalived", "VRRP peers for the failover tests and `bench failover`"),
    ("perdition", "the POP3/IMAP proxy compared with mxlb's in `bench proxy`"),
    ("fonts-dejavu-core", "the font of the `bench l4` chart (read at run time: no fontconfig)"),
];

pub fn run() -> Result<()> {
    rust_src()?;
    apt_packages()?;
    bpf_linker()?;
    say(T, "done");
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} must be installed, which needs root: re-run `cargo xtask setup` as root \
             (or install it yourself; see shared docs/toolchain.md)"
        );
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    match installed {
        None => {
            bail!("rustup not found: install rustup (https://rustup.rs) with a nightly toolchain")
        }
        Some((true, list)) if list.lines().any(|l| l.trim().starts_with("rust-src")) => {
            say(T, "rust-src for nightly ... already present");
            Ok(())
        }
        Some((true, _)) => {
            say(
                T,
                "rust-src for nightly ... installing (rustup component add rust-src --toolchain nightly)",
            );
            run_visible(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        }
        Some((false, _)) => {
            say(
                T,
                "nightly toolchain ... missing, installing (rustup toolchain install nightly, with rust-src)",
            );
            run_visible(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    matches!(
        probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg])),
        Some((true, s)) if s.trim() == "install ok installed"
    )
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for (pkg, why) in APT_PACKAGES {
        if dpkg_installed(pkg) {
            say(T, &format!("{pkg} ({why}) ... already present"));
        } else {
            say(T, &format!("{pkg} ({why}) ... missing"));
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("Debian packages {}", missing.join(" ")))?;
    say(T, "apt-get update ... running");
    run_visible(
        Command::new("apt-get")
            .args(["update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;

    let installing_postfix = missing.contains(&"postfix");
    if installing_postfix {
        say(
            T,
            "postfix ... preseeding debconf: main_mailer_type = No configuration",
        );
        let mut child = Command::new("debconf-set-selections")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("cannot run debconf-set-selections")?;
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(b"postfix postfix/main_mailer_type select No configuration\n")?;
        let st = child.wait()?;
        if !st.success() {
            bail!("debconf-set-selections failed: {st}");
        }
    }
    // Keep maintainer scripts from starting services during the install.
    let policy = PolicyRcGuard::install()?;
    say(
        T,
        &format!("installing {} (apt-get install -y)", missing.join(" ")),
    );
    let res = run_visible(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    drop(policy);
    res?;
    if installing_postfix {
        stop_system_postfix();
    }
    Ok(())
}

/// Creates `/usr/sbin/policy-rc.d` (exit 101 = "do not start services") when none exists, and
/// removes it again on drop. An existing policy is left untouched.
struct PolicyRcGuard(bool);

impl PolicyRcGuard {
    const PATH: &str = "/usr/sbin/policy-rc.d";
    fn install() -> Result<Self> {
        if Path::new(Self::PATH).exists() {
            return Ok(Self(false));
        }
        std::fs::write(
            Self::PATH,
            "#!/bin/sh\n# temporary, written by cargo xtask setup\nexit 101\n",
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(Self::PATH, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self(true))
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::remove_file(Self::PATH);
        }
    }
}

/// The lab only needs smtp-sink/smtp-source: make sure the freshly installed system Postfix is
/// neither running nor enabled.
fn stop_system_postfix() {
    if Path::new("/run/systemd/system").exists() {
        say(
            T,
            "postfix service ... disabling (systemctl disable --now postfix)",
        );
        let _ = probe(Command::new("systemctl").args(["disable", "--now", "postfix"]));
    }
    if matches!(
        probe(Command::new("postfix").arg("status")),
        Some((true, _))
    ) {
        say(T, "postfix service ... running, stopping (postfix stop)");
        let _ = probe(Command::new("postfix").arg("stop"));
    } else {
        say(
            T,
            "postfix service ... not running (good: the lab only uses smtp-sink/smtp-source)",
        );
    }
}

fn bpf_linker_version() -> Option<String> {
    // Look in PATH and in $CARGO_HOME/bin (a fresh `cargo install` may not be on PATH yet).
    let out = probe(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", path_with_cargo_bin()),
    )?;
    out.0.then_some(out.1.trim().to_string())
}

fn bpf_linker() -> Result<()> {
    let want = BPF_LINKER_VERSION
        .rsplit_once('.')
        .map_or(BPF_LINKER_VERSION, |(mm, _)| mm); // "0.13"
    if let Some(v) = bpf_linker_version() {
        if v.split_whitespace()
            .any(|w| w == want || w.starts_with(&format!("{want}.")))
        {
            say(T, &format!("bpf-linker {want} ... already present ({v})"));
            warn_if_not_on_path();
            return Ok(());
        }
        say(
            T,
            &format!("bpf-linker ... found `{v}`, want {BPF_LINKER_VERSION}"),
        );
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!(
            "{LLVM_PREFIX} has no llvm-config: llvm-22-dev is needed before bpf-linker can be built"
        );
    }
    say(
        T,
        &format!(
            "installing bpf-linker {BPF_LINKER_VERSION} (LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker \
             --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22; about a minute)"
        ),
    );
    run_visible(
        crate::util::cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            // Don't let a caller's CARGO_TARGET_DIR mix the linker build with the workspace's.
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    warn_if_not_on_path();
    Ok(())
}

fn warn_if_not_on_path() {
    let on_path = probe(Command::new("bpf-linker").arg("--version")).is_some_and(|o| o.0);
    if !on_path && let Some(bin) = cargo_bin_dir() {
        say(
            T,
            &format!(
                "note: bpf-linker is in {} which is not on PATH; `cargo xtask test` adds it",
                bin.display()
            ),
        );
    }
}
