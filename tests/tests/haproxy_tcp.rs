//! The comparison row: Debian's HAProxy in `mode tcp` on the LB node, `balance roundrobin` over
//! the same three smtp-sink back-ends with weights 100/200/300. 600 SMTP sessions from
//! smtp-source all succeed, the messages each back-end receives follow the weights within ±10%,
//! and the CPU accounting of [`lab::cpu`] sees HAProxy's process time. A baseline window (the
//! same sessions straight to back-end 1) gives the softirq figure to subtract; both are printed
//! per 1000 sessions. Needs root; skips locally otherwise, fails under CI=true.
use std::time::Duration;

use lab::{
    Lab, SourceOpts,
    cpu::CpuUse,
    haproxy::{HaproxyOpts, HaproxyTcp},
};

const SESSIONS: u32 = 600;
const WEIGHTS: [u32; 3] = [100, 200, 300];

#[test]
fn haproxy_tcp_spreads_sessions_by_weight_and_is_measured() -> anyhow::Result<()> {
    if !lab::require_root("haproxy_tcp_spreads_sessions_by_weight_and_is_measured") {
        return Ok(());
    }
    let lab = Lab::builder().backends(3).build()?;
    let src = SourceOpts {
        sessions: SESSIONS,
        concurrency: 20,
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut hap = HaproxyTcp::start(&lab, &HaproxyOpts::new(&lab, WEIGHTS.to_vec()))?;
    assert_eq!(hap.listen().ip(), std::net::IpAddr::from(lab.lb().v4()));
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", hap.pid()))?;
    assert_eq!(comm.trim(), "haproxy", "pid() is not the haproxy process");

    // Baseline: the same traffic straight to back-end 1, no LB in the path.
    let b1 = (lab.backend(1).v4(), 25).into();
    let (r, base) = CpuUse::measure(&[hap.pid()], || lab.smtp_source(b1, &src));
    r?.assert_ok();
    let before = lab.wait_sessions(u64::from(SESSIONS), Duration::from_secs(20))?;

    // Through HAProxy.
    let (r, through) = CpuUse::measure(&[hap.pid()], || lab.smtp_source(hap.listen(), &src));
    let r = r?;
    assert!(
        r.ok(),
        "smtp-source through haproxy: {r:#?}\nhaproxy log:\n{}",
        hap.log()
    );
    let after = lab.wait_sessions(2 * u64::from(SESSIONS), Duration::from_secs(20))?;
    let msgs: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.messages - b.messages)
        .collect();
    let total: u64 = msgs.iter().sum();
    assert_eq!(
        total,
        u64::from(SESSIONS),
        "messages per back-end: {msgs:?}"
    );
    let wsum: u32 = WEIGHTS.iter().sum();
    for (i, (&got, &w)) in msgs.iter().zip(&WEIGHTS).enumerate() {
        let want = total as f64 * f64::from(w) / f64::from(wsum);
        assert!(
            (got as f64 - want).abs() <= 0.10 * want,
            "back-end {}: {got} messages, want {want:.0} ±10% (all: {msgs:?})",
            i + 1
        );
    }

    assert!(
        through.process_ms > 0.0,
        "no haproxy process time measured: {through}"
    );
    assert!(
        base.process_ms < through.process_ms,
        "haproxy busier idle than proxying: {base} vs {through}"
    );
    let n = u64::from(SESSIONS);
    eprintln!("messages per back-end through haproxy: {msgs:?}");
    eprintln!(
        "baseline (direct to b1), per 1000 sessions: {}",
        base.per_1000(n)
    );
    eprintln!(
        "through haproxy, per 1000 sessions: {}",
        through.per_1000(n)
    );
    eprintln!(
        "haproxy net of baseline, per 1000 sessions: {}",
        through.minus(&base).per_1000(n)
    );
    assert!(hap.running(), "haproxy exited:\n{}", hap.log());
    hap.stop()?;
    Ok(())
}
