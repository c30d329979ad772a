//! Which back-end gets a recipient.
//!
//! - `shared`: every back-end can deliver every mailbox (shared storage, or a director in front
//!   of it). A message goes to one healthy back-end chosen by weight; the choice is keyed by
//!   the message and its attempt count, so a retry may land elsewhere.
//! - `partitioned`: each mailbox lives on one back-end, its owner. An optional mapping file
//!   names owners explicitly; every other mailbox is placed by weighted rendezvous hashing
//!   (HRW) of the lower-cased address over the *configured* back-ends, healthy or not. So the
//!   owner never changes because some other back-end failed, and when the owner itself is
//!   down its recipients wait (deferred) rather than land on a server that does not hold the
//!   mailbox.
//!
//! Adding a back-end moves to it about `weight_new / total_weight` of the hashed mailboxes and
//! moves nothing between the existing ones; removing one moves only its own mailboxes. Either
//! is a data migration for a partitioned cluster: pin mailboxes that must not move in the
//! mapping file before changing the back-end list.
//!
//! Why not [`crate::maglev`]: Maglev identifies back-ends by IP address and is built for a
//! per-packet table lookup. Mailbox ownership must follow the back-end's *name* (renumbering a
//! server does not move its mailboxes), and HRW gives the minimal movement above with no
//! table to rebuild.
use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use xxhash_rust::xxh64::xxh64;

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
#[derive(Debug, Clone, Default)]
pub enum Routing {
    #[default]
    Shared,
    Partitioned {
        mapping: Option<Mapping>,
    },
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
            match rendezvous(healthy, message_key) {
                Some(b) => Route::To(b),
                None => Route::Wait("no healthy back-end".into()),
            }
        }
        Routing::Partitioned { mapping } => {
            let key = mailbox.to_lowercase();
            let owner = match mapping.as_ref().and_then(|m| m.owners.get(&key)) {
                Some(name) => backends.iter().find(|b| &b.backend.name == name),
                None => rendezvous(backends.iter().map(|b| &b.backend), &key)
                    .and_then(|o| backends.iter().find(|b| b.backend.name == o.name)),
            };
            match owner {
                Some(b) if b.healthy => Route::To(&b.backend),
                Some(b) => Route::Wait(format!("owner back-end `{}` of {mailbox} is down", b.backend.name)),
                None => Route::Wait(format!("no configured back-end owns {mailbox}")),
            }
        }
    }
}

/// Weighted rendezvous hashing: each back-end scores `weight / -ln(u)` with `u` in (0, 1]
/// from a hash of (back-end name, key); the highest wins. A back-end wins a share of keys
/// proportional to its weight, and its score for a key does not depend on the others.
fn rendezvous<'a>(candidates: impl Iterator<Item = &'a Backend>, key: &str) -> Option<&'a Backend> {
    let mut best: Option<(f64, &Backend)> = None;
    for b in candidates.filter(|b| b.weight > 0) {
        let h = xxh64(key.as_bytes(), xxh64(b.name.as_bytes(), 0x6d78_6c62_7274));
        let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let score = f64::from(b.weight) / -u.ln();
        let better = match best {
            None => true,
            Some((s, prev)) => score > s || (score == s && b.name < prev.name),
        };
        if better {
            best = Some((score, b));
        }
    }
    best.map(|(_, b)| b)
}

/// Explicit mailbox owners, from a file of `user@domain backend-name` lines (`#` starts a
/// comment). Addresses match case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    owners: HashMap<String, String>,
}

/// A mapping file that cannot be used; names the file and line so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("{}: {source}", file.display())]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {message}", file.display())]
    Line { file: PathBuf, line: usize, message: String },
}

impl Mapping {
    /// Reads and checks `file`; `backends` are the configured back-end names.
    pub fn load(file: &Path, backends: &[&str]) -> Result<Mapping, MappingError> {
        let text =
            std::fs::read_to_string(file).map_err(|source| MappingError::Read { file: file.to_path_buf(), source })?;
        Mapping::parse(&text, file, backends)
    }

    /// Parses mapping text; `file` only names the source in errors.
    pub fn parse(text: &str, file: &Path, backends: &[&str]) -> Result<Mapping, MappingError> {
        let mut owners = HashMap::new();
        let mut first_line = HashMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let err = |message: String| MappingError::Line { file: file.to_path_buf(), line, message };
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let &[address, backend] = fields.as_slice() else {
                return Err(err(format!("expected `user@domain backend-name`, found {} fields", fields.len())));
            };
            match address.rsplit_once('@') {
                Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {}
                _ => {
                    return Err(err(format!("`{address}` is not a mailbox address (user@domain)")));
                }
            }
            if !backends.contains(&backend) {
                return Err(err(format!("no [[backend]] is named `{backend}`")));
            }
            let key = address.to_lowercase();
            if let Some(prev) = first_line.insert(key.clone(), line) {
                return Err(err(format!("`{address}` is already mapped on line {prev}")));
            }
            owners.insert(key, backend.to_string());
        }
        Ok(Mapping { owners })
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
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
    use super::*;

    fn backends(spec: &[(&str, u32, bool)]) -> Vec<BackendState> {
        spec.iter()
            .enumerate()
            .map(|(i, &(name, weight, healthy))| BackendState {
                backend: Backend {
                    name: name.into(),
                    address: SocketAddr::from(([10, 0, 0, i as u8 + 1], 24)),
                    weight,
                },
                healthy,
            })
            .collect()
    }

    fn owner(routing: &Routing, b: &[BackendState], mailbox: &str) -> Option<String> {
        match route(routing, b, mailbox, "") {
            Route::To(b) => Some(b.name.clone()),
            Route::Wait(_) => None,
        }
    }

    fn partitioned() -> Routing {
        Routing::Partitioned { mapping: None }
    }

    #[test]
    fn weights_are_roughly_respected_over_many_mailboxes_and_messages() {
        let b = backends(&[("a", 1, true), ("b", 2, true), ("c", 1, true), ("d", 0, true)]);
        let n = 40_000;
        for routing in [partitioned(), Routing::Shared] {
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
        let mut waited = 0;
        for i in 0..3000 {
            let m = format!("u{i}@example.org");
            let before = owner(&partitioned(), &up, &m).unwrap();
            let after = owner(&partitioned(), &b_down, &m);
            if before == "b" {
                waited += 1;
                assert!(matches!(route(&partitioned(), &b_down, &m, ""), Route::Wait(w) if w.contains("`b`")));
            } else {
                assert_eq!(after.as_deref(), Some(before.as_str()), "{m} moved although its owner is up");
            }
        }
        assert!(waited > 500, "b owns a third of the mailboxes");
        // Case does not change the owner.
        assert_eq!(owner(&partitioned(), &up, "U7@Example.ORG"), owner(&partitioned(), &up, "u7@example.org"));
    }

    #[test]
    fn adding_a_back_end_only_moves_mailboxes_to_it() {
        let three = backends(&[("a", 1, true), ("b", 1, true), ("c", 1, true)]);
        let four = backends(&[("a", 1, true), ("b", 1, true), ("c", 1, true), ("e", 1, true)]);
        let mut moved = 0;
        for i in 0..4000 {
            let m = format!("u{i}@example.org");
            let (before, after) =
                (owner(&partitioned(), &three, &m).unwrap(), owner(&partitioned(), &four, &m).unwrap());
            if before != after {
                assert_eq!(after, "e");
                moved += 1;
            }
        }
        assert!((800..1200).contains(&moved), "about a quarter moves, got {moved}");
    }

    #[test]
    fn mapping_file_overrides_the_hash_and_errors_name_file_and_line() {
        let b = backends(&[("a", 1, true), ("b", 1, true), ("c", 1, false)]);
        let names = ["a", "b", "c"];
        let hashed = owner(&partitioned(), &b, "boss@example.org");
        let other = if hashed.as_deref() == Some("a") { "b" } else { "a" };
        let text = format!("# owners\n\nboss@example.org {other}  # pinned\nBig@Example.org c\n");
        let m = Mapping::parse(&text, Path::new("/etc/mxlb/owners"), &names).unwrap();
        assert_eq!(m.len(), 2);
        let routing = Routing::Partitioned { mapping: Some(m) };
        assert_eq!(owner(&routing, &b, "Boss@example.org").as_deref(), Some(other));
        // Mapped to a back-end that is down: waits, does not fall back to the hash.
        assert!(matches!(route(&routing, &b, "big@example.org", ""), Route::Wait(_)));

        let err = |text: &str| Mapping::parse(text, Path::new("owners.txt"), &names).unwrap_err().to_string();
        assert_eq!(err("a@x a\nb@x zz\n"), "owners.txt:2: no [[backend]] is named `zz`");
        assert_eq!(
            err("\n\nnot-an-address a\n"),
            "owners.txt:3: `not-an-address` is not a mailbox address (user@domain)"
        );
        assert_eq!(err("a@x a b\n"), "owners.txt:1: expected `user@domain backend-name`, found 3 fields");
        assert_eq!(err("a@x a\nA@X b\n"), "owners.txt:2: `A@X` is already mapped on line 1");
        assert!(
            Mapping::load(Path::new("/nonexistent/owners"), &names)
                .unwrap_err()
                .to_string()
                .starts_with("/nonexistent/owners: ")
        );
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
