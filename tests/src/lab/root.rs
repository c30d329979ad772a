//! Root handling for tests that need namespaces.

/// Is the process running as root (effective uid 0)?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Is `CI` set to "true"?
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Call at the top of a lab test: `if !lab::require_root("my_test") { return; }`.
///
/// Returns true as root. Otherwise prints a skip message and returns false, except under CI
/// (`CI=true`), where a lab test that cannot run is a failure: it panics.
#[track_caller]
pub fn require_root(test_name: &str) -> bool {
    if is_root() {
        return true;
    }
    if in_ci() {
        panic!("{test_name}: needs root (network namespaces), and CI=true: refusing to skip");
    }
    eprintln!(
        "{test_name}: SKIPPED (needs root for network namespaces; run as root, e.g. `sudo -E cargo xtask test`)"
    );
    false
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Blocks until SIGINT or SIGTERM arrives (returns true) or `max` elapses (returns false), so a
/// long-running lab (`cargo xtask run`) is dropped, and cleaned up, on Ctrl-C instead of being
/// killed with its namespaces left behind. The default handlers are restored before returning.
pub fn wait_for_interrupt(max: Option<std::time::Duration>) -> bool {
    use std::sync::atomic::Ordering;
    INTERRUPTED.store(false, Ordering::SeqCst);
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let (old_int, old_term) = unsafe {
        (
            libc::signal(libc::SIGINT, handler),
            libc::signal(libc::SIGTERM, handler),
        )
    };
    let deadline = max.map(|d| std::time::Instant::now() + d);
    let got = loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break true;
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // SAFETY: restoring the previous dispositions.
    unsafe {
        libc::signal(libc::SIGINT, old_int);
        libc::signal(libc::SIGTERM, old_term);
    }
    got
}
