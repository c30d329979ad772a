//! Which back-end gets a recipient.
//!
//! - `shared`: every back-end can deliver every mailbox (shared storage, or a director in front
//!   of it). A message goes to one healthy back-end chosen by weight; the choice is keyed by
//!   the message and its attempt count, so a retry may land elsewhere.
//! - `partitioned`: each mailbox lives on one back-end, its owner, found in the mailbox map
//!   ([`crate::mailbox::Directory`]: the table, the back-ends' reports, else weighted
//!   consistent hashing over the *configured* back-ends, healthy or not). So the owner never
//!   changes because some other back-end failed, and when the owner itself is down its
//!   recipients wait (deferred) rather than land on a server that does not hold the mailbox.

use std::{fmt, net::SocketAddr, sync::Arc};

use crate::mailbox::{Directory, rendezvous};

/// A back-end as delivery sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The `[[backend]]` name: the identity that owns mailboxes.
    pub name: String,
    /// Where its SMTP/LMTP service listens.
    pub address: SocketAddr,
    /// The *configured* weight (not one scaled by load: ownership must not move with load).
    pub weight: u32,
}

/// A configured back-end and whether it may receive mail now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub backend: Backend,
    /// Passing health checks and not drained.
    pub healthy: bool,
}

/// How recipients map to back-ends.
#[derive(Clone, Default)]
pub enum Routing {
    #[default]
    Shared,
    Partitioned { directory: Arc<Directory> },
}

impl fmt::Debug for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Routing::Shared => "shared",
            Routing::Partitioned { .. } => "partitioned",
        })
    }
}

/// Where a recipient goes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    To(&'a Backend),
    /// No back-end may take it now (the reason); try later.
    Wait(String),
}

/// Routes one recipient. `message_key` keys the shared choice (same key, same back-end, so
/// the recipients of one message share one transaction).
pub fn route<'a>(routing: &Routing, backends: &'a [BackendState], mailbox: &str, message_key: &str) -> Route<'a> {
    match routing {
        Routing::Shared => {
            let healthy = backends.iter().filter(|b| b.healthy).map(|b| &b.backend);
            let candidates: Vec<&Backend> = healthy.collect();
            match rendezvous(candidates.iter().map(|b| (b.name.as_str(), b.weight)), message_key)
                .and_then(|name| candidates.iter().find(|b| b.name == name))
            {
                Some(b) => Route::To(b),
                None => Route::Wait("no healthy back-end".into()),
            }
        }
        Routing::Partitioned { directory } => {
            let owner = directory.owner(mailbox);
            match backends.iter().find(|b| b.backend.name == owner.backend) {
                Some(b) if b.healthy => Route::To(&b.backend),
                Some(b) => Route::Wait(format!("owner back-end `{}` of {mailbox} is down", b.backend.name)),
                None => Route::Wait(format!("the owner of {mailbox}, `{}`, is not a delivery back-end", owner.backend)),
            }
        }
    }
}

impl fmt::Display for Route<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::To(b) => write!(f, "{} ({})", b.name, b.address),
            Route::Wait(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::mailbox::MailboxBackend;

    fn backends(spec: &[(&str, u32, bool)]) -> Vec<BackendState> {
        spec.iter()
            .enumerate()
            .map(|(i, &(name, weight, healthy))| BackendState {
                backend: Backend {
                    name: name.into(),
                    address: SocketAddr::from(([198, 18, 0, i as u8 + 1], 24)),
                    weight,
                },
                healthy,
            })
            .collect()
    }

    /// The mailbox map over the same back-ends (delivery health comes from `b`, not the map).
    fn partitioned(b: &[BackendState], table: Option<std::path::PathBuf>) -> Routing {
        let mb = b
            .iter()
            .map(|s| MailboxBackend {
                name: s.backend.name.clone(),
                address: s.backend.address.ip(),
                weight: s.backend.weight,
                agent: None,
            })
            .collect();
        Routing::Partitioned { directory: Arc::new(Directory::new(mb, table).unwrap()) }
    }

    fn owner(routing: &Routing, b: &[BackendState], mailbox: &str) -> Option<String> {
        match route(routing, b, mailbox, "") {
            Route::To(b) => Some(b.name.clone()),
            Route::Wait(_) => None,
        }
    }

    #[test]
    fn weights_are_roughly_respected_over_many_mailboxes_and_messages() {
        let b = backends(&[("a", 1, true), ("b", 2, true), ("c", 1, true), ("d", 0, true)]);
        let n = 40_000;
        for routing in [partitioned(&b, None), Routing::Shared] {
            let mut count: HashMap<String, usize> = HashMap::new();
            for i in 0..n {
                let (mailbox, key) = (format!("user{i}@example.org"), format!("{i:024x}:0"));
                let Route::To(to) = route(&routing, &b, &mailbox, &key) else { panic!("no route") };
                *count.entry(to.name.clone()).or_default() += 1;
            }
            for (name, share) in [("a", 0.25), ("b", 0.5), ("c", 0.25)] {
                let got = count.get(name).copied().unwrap_or(0) as f64 / n as f64;
                assert!((got - share).abs() < 0.02, "{routing:?}: {name} got {got}, expected {share}");
            }
            assert!(!count.contains_key("d"), "weight 0 takes nothing");
        }
    }

    #[test]
    fn partitioned_owner_is_stable_when_another_back_end_is_down_and_waits_when_down() {
        let up = backends(&[("a", 1, true), ("b", 1, true), ("c", 1, true)]);
        let b_down = backends(&[("a", 1, true), ("b", 1, false), ("c", 1, true)]);
        let routing = partitioned(&up, None);
        let mut waited = 0;
        for i in 0..3000 {
            let m = format!("u{i}@example.org");
            let before = owner(&routing, &up, &m).unwrap();
            let after = owner(&routing, &b_down, &m);
            if before == "b" {
                waited += 1;
                assert!(matches!(route(&routing, &b_down, &m, ""), Route::Wait(w) if w.contains("`b`")));
            } else {
                assert_eq!(after.as_deref(), Some(before.as_str()), "{m} moved although its owner is up");
            }
        }
        assert!(waited > 500, "b owns a third of the mailboxes");
    }

    #[test]
    fn a_pinned_owner_that_is_down_makes_mail_wait_rather_than_fall_back() {
        let b = backends(&[("a", 1, true), ("b", 1, true), ("c", 1, false)]);
        let dir = std::env::temp_dir().join(format!("mxlb-route-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = dir.join("table");
        std::fs::write(&table, "Big@Example.org c\nboss@example.org a\n").unwrap();
        let routing = partitioned(&b, Some(table));
        assert_eq!(owner(&routing, &b, "BOSS@example.org").as_deref(), Some("a"));
        assert!(matches!(route(&routing, &b, "big@example.org", ""), Route::Wait(w) if w.contains("`c`")));
        // An owner that delivery does not know (the map has more back-ends): wait, named.
        let fewer = backends(&[("a", 1, true), ("b", 1, true)]);
        assert!(matches!(route(&routing, &fewer, "big@example.org", ""), Route::Wait(w) if w.contains("not a delivery back-end")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_uses_only_healthy_back_ends_and_waits_when_none() {
        let b = backends(&[("a", 1, false), ("b", 1, true)]);
        for i in 0..100 {
            let Route::To(to) = route(&Routing::Shared, &b, "x@y", &format!("{i}")) else { panic!() };
            assert_eq!(to.name, "b");
        }
        let none = backends(&[("a", 1, false)]);
        assert_eq!(route(&Routing::Shared, &none, "x@y", "k"), Route::Wait("no healthy back-end".into()));
    }
}
