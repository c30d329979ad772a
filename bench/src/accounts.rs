//! Sessions over several accounts: each session takes the next account in turn (round robin,
//! across all workers), and connects to that account's own target when it has one.
//!
//! Why: a cluster that partitions mailboxes (one owner back-end per user) is only loaded as a
//! whole when the sessions log in as users of every back-end; and the baseline without a proxy
//! ("direct") must send each user to the back-end holding the mailbox, with the same rotation,
//! so the only difference between it and a proxied run is the proxy.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use crate::cli::Account;

/// An account and where its sessions connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub account: Account,
    pub target: SocketAddr,
}

/// Pairs each account with its target: the one `user_targets` gives for its user, else
/// `default`. A user target that names no account is an error (a typo would silently send
/// that user's sessions to the default target).
pub fn routes(
    accounts: &[Account],
    user_targets: &[(String, SocketAddr)],
    default: SocketAddr,
) -> Result<Vec<Route>, String> {
    if let Some((u, _)) = user_targets
        .iter()
        .find(|(u, _)| !accounts.iter().any(|a| &a.user == u))
    {
        return Err(format!("--user-target {u}=…: no such account"));
    }
    Ok(accounts
        .iter()
        .map(|a| Route {
            account: a.clone(),
            target: user_targets
                .iter()
                .find(|(u, _)| *u == a.user)
                .map_or(default, |(_, t)| *t),
        })
        .collect())
}

/// The accounts in turn.
#[derive(Debug)]
pub struct Rotation {
    routes: Vec<Route>,
    next: AtomicUsize,
}

impl Rotation {
    /// `None` without routes.
    pub fn new(routes: Vec<Route>) -> Option<Rotation> {
        (!routes.is_empty()).then_some(Rotation {
            routes,
            next: AtomicUsize::new(0),
        })
    }

    /// The next session's route.
    pub fn next(&self) -> &Route {
        let i = self.next.fetch_add(1, Relaxed) % self.routes.len();
        &self.routes[i]
    }

    /// The distinct targets, in account order, comma-separated (for the report).
    pub fn targets_text(&self) -> String {
        let mut seen: Vec<SocketAddr> = Vec::new();
        for r in &self.routes {
            if !seen.contains(&r.target) {
                seen.push(r.target);
            }
        }
        seen.iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(u: &str) -> Account {
        Account {
            user: u.into(),
            pass: format!("{u}-pw"),
        }
    }

    #[test]
    fn each_account_to_its_own_target_or_the_default() {
        let vip: SocketAddr = "10.0.0.100:110".parse().unwrap();
        let b2: SocketAddr = "10.0.0.12:110".parse().unwrap();
        let r = routes(&[acc("alice"), acc("bob")], &[("bob".into(), b2)], vip).unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.account.user.as_str(), r.target))
                .collect::<Vec<_>>(),
            vec![("alice", vip), ("bob", b2)]
        );
        let e = routes(&[acc("alice")], &[("alcie".into(), b2)], vip).unwrap_err();
        assert!(e.contains("alcie"), "{e}");
    }

    #[test]
    fn sessions_take_the_accounts_round_robin() {
        let t: SocketAddr = "10.0.0.100:143".parse().unwrap();
        let rot = Rotation::new(routes(&[acc("a"), acc("b"), acc("c")], &[], t).unwrap()).unwrap();
        let users: Vec<String> = (0..7).map(|_| rot.next().account.user.clone()).collect();
        assert_eq!(users, ["a", "b", "c", "a", "b", "c", "a"]);
        assert_eq!(rot.targets_text(), "10.0.0.100:143");
        assert!(Rotation::new(vec![]).is_none());
    }
}
