//! The mxlb lab (library name `lab`): see [`lab`] for the rules and [`Lab`] for the topology.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! if !lab::require_root("example") { return Ok(()); }
//! let lab = lab::Lab::builder().backends(3).build()?;
//! let b1 = lab.backend(1).addr(lab::AddrFamily::V4);
//! let r = lab.smtp_source((b1, 25).into(), &lab::SourceOpts { sessions: 50, ..Default::default() })?;
//! r.assert_ok();
//! assert_eq!(lab.wait_sessions(50, std::time::Duration::from_secs(10))?[0].sessions, 50);
//! # Ok(()) }
//! ```

pub mod lab;

pub use lab::cmd::{CMD_TIMEOUT, Daemon, LineSink, run_bounded, run_checked};
pub use lab::netns::{
    LinkInfo, LinkStats, Netns, NetnsGuard, mac_to_string, namespaces_with_prefix,
};
pub use lab::root::{in_ci, is_root, require_root, wait_for_interrupt};
pub use lab::smtp::{
    SinkCounts, SinkOpts, SmtpSink, SourceOpts, SourceResult, postfix_endpoint, smtp_source,
};
pub use lab::topology::{
    AddrFamily, CLIENT_MTU, HOST_DEV, Host, Lab, LabBuilder, MAX_BACKENDS, MAX_LBS, PATH_MTU,
    OWNERS_DIR, PeerPort, Role, VIP4, VIP6, sweep_dead_labs,
};
pub mod capture;
pub mod cpu;
pub mod frames;
pub mod haproxy;
pub mod keepalived;
pub mod loadgen;
pub mod node;
pub mod perdition;
pub mod postfix;
pub mod sessions;
pub mod dovecot;
pub mod failover;
pub mod flood;
pub mod proxy;
pub mod relay;
pub mod vrrp;

/// Polls `f` every 200 ms until it gives `Some` (bounded by `timeout`); the error names `what`.
/// An error from `f` ends the wait at once.
pub fn wait_some<T>(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
