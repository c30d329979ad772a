//! Who may send mail to whom: the answer to `RCPT TO`.
//!
//! Three inputs, in the spirit of Postfix's `relay_domains`, `mynetworks` and
//! `relay_recipient_maps`:
//! - **Relay domains**: the domains this cluster accepts mail for from anyone. Matching is
//!   case-insensitive and exact (`example.net` does not cover `mail.example.net`); an entry
//!   with a leading dot, `.example.net`, covers every subdomain (`a.example.net`,
//!   `b.a.example.net`) but not `example.net` itself; list both to get both. A trailing dot
//!   (`example.net.`) is ignored.
//! - **Trusted networks** ([`Cidr`]s): clients there may relay to any domain, as with
//!   `mynetworks`. So may a client that authenticated (a certificate from the client CA).
//!   IPv4 clients seen on a dual-stack socket as `::ffff:a.b.c.d` are matched as IPv4.
//! - **An optional mailbox list** (a file): when configured, a recipient in a relay domain
//!   must be listed, else `550 5.1.1` at RCPT time rather than a bounce later (which would go
//!   to a likely forged sender: backscatter). See [`parse_mailboxes`] for the format.
//!
//! - **The back-ends' own lists** (the mailbox map, [`crate::mailbox`], when back-ends run
//!   `mxlb agent --mailboxes`): a recipient in a relay domain must exist on some back-end (or
//!   be pinned in the mailbox table, or be listed or caught by the mailbox file), else
//!   `550 5.1.1`. This is the dictionary-attack protection that needs no list on the LB
//!   nodes. Until every reporting back-end's list has been fetched once the answer is
//!   `450 4.3.0` (as Postfix answers when a lookup table is unavailable): refusing a real
//!   user permanently would bounce mail, accepting everyone would let a dictionary attack
//!   through.
//!
//! # Decisions worth knowing
//! - A domain with **no line at all** in the mailbox file accepts every local part: the file
//!   lists the domains whose mailboxes we know, and a domain added to the relay domains before
//!   its users are exported keeps receiving mail. Add `@domain` (catch-all) or at least one
//!   user to make a domain strict.
//! - Local parts are compared case-insensitively (RFC 5321 lets them be case-sensitive, but
//!   no mail system in practice distinguishes `John` from `john`, and a mismatch would bounce
//!   mail).
//! - `postmaster` (bare) and `postmaster@<relay domain>` are always accepted, as RFC 5321
//!   section 4.5.1 requires, even if the mailbox list omits them.
//! - A malformed address (no `@`, empty local part or domain, spaces or control characters)
//!   gets [`RcptVerdict::UnknownUser`]: it is permanently undeliverable, and answering
//!   "relay denied" would send the client looking for a configuration problem that is not
//!   there. This applies to trusted clients too: there is no point queueing what cannot be
//!   delivered.
//! - Sender-specified routing into a relay domain (`user%other.org@example.net`,
//!   `user!other.org@example.net`, `"user@other.org"@example.net`) is relaying, not local
//!   delivery: a back-end that honours the `%` hack would forward it. Untrusted,
//!   unauthenticated clients get [`RcptVerdict::RelayDenied`] for it, as with Postfix's
//!   `reject_unauth_destination`.
//! - Internationalised domains are compared as given (Unicode lowercased); a U-label and its
//!   `xn--` A-label are not treated as equal: list the form clients use.
use std::{
    collections::HashSet,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use super::RcptVerdict;
use crate::edge::Cidr;

/// Errors building the policy or reading the mailbox list.
#[derive(Debug, thiserror::Error)]
pub enum RecipientsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bad line in the mailbox list, as `path:line: reason` so editors can jump to it.
    #[error("{path}:{line}: {reason}")]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error("relay domain `{domain}`: {reason}")]
    BadDomain { domain: String, reason: String },
}

/// The parsed mailbox list. Replaced whole on reload, never edited in place.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mailboxes {
    /// `local@domain`, lowercased.
    addresses: HashSet<String>,
    /// Domains with an `@domain` line.
    catch_all: HashSet<String>,
    /// Domains with any line: only these are checked.
    domains: HashSet<String>,
}

impl Mailboxes {
    /// Listed addresses plus catch-all entries.
    pub fn len(&self) -> usize {
        self.addresses.len() + self.catch_all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `local@domain` (already lowercased) may receive mail, per the list alone.
    fn allows(&self, local: &str, domain: &str) -> bool {
        !self.domains.contains(domain) || self.lists(local, domain)
    }

    /// Whether the list names `local@domain` or catches its whole domain.
    fn lists(&self, local: &str, domain: &str) -> bool {
        self.catch_all.contains(domain) || self.addresses.contains(&format!("{local}@{domain}"))
    }
}

/// Parses a mailbox list (`path` is only for error messages).
///
/// One entry per line: `user@example.net` (that mailbox) or `@example.net` (every mailbox of
/// the domain). Blank lines and lines whose first non-blank character is `#` are ignored;
/// a `#` later in a line is part of the address (it is legal in local parts). Surrounding
/// blanks are trimmed; blanks inside an entry are an error (one address per line).
pub fn parse_mailboxes(text: &[u8], path: &Path) -> Result<Mailboxes, RecipientsError> {
    let mut list = Mailboxes::default();
    for (n, raw) in text.split(|&b| b == b'\n').enumerate() {
        let err = |reason: String| RecipientsError::Parse { path: path.to_path_buf(), line: n + 1, reason };
        let line = std::str::from_utf8(raw).map_err(|_| err("not UTF-8".into()))?.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains(char::is_whitespace) {
            return Err(err(format!("`{line}`: one address per line")));
        }
        if line.chars().any(char::is_control) {
            return Err(err(format!("`{}`: control character", line.escape_debug())));
        }
        let Some((local, domain)) = line.rsplit_once('@') else {
            return Err(err(format!("`{line}` is not an address (expected user@example.net, or @example.net for the whole domain)")));
        };
        let domain = normalise_domain(domain);
        if domain.is_empty() || domain.starts_with('.') || domain.starts_with('[') {
            return Err(err(format!("`{line}`: missing or unusable domain")));
        }
        if local.is_empty() {
            list.catch_all.insert(domain.clone());
        } else {
            list.addresses.insert(format!("{}@{domain}", local.to_lowercase()));
        }
        list.domains.insert(domain);
    }
    Ok(list)
}

fn normalise_domain(domain: &str) -> String {
    domain.strip_suffix('.').unwrap_or(domain).to_lowercase()
}

/// The relay's recipient rules; cheap to share (`Arc`) between sessions.
#[derive(Debug)]
pub struct RecipientPolicy {
    /// Relay domains matched exactly, lowercased.
    exact: HashSet<String>,
    /// `.example.net` entries, lowercased, with their leading dot.
    parents: Vec<String>,
    trusted: Vec<Cidr>,
    mailbox_file: Option<PathBuf>,
    /// Swapped whole by [`RecipientPolicy::reload`], so a check sees the old list or the new
    /// one, never a mix; readers hold the lock only to clone the `Arc`.
    mailboxes: RwLock<Arc<Mailboxes>>,
    /// The back-ends' reported mailboxes (set when they report; see the module doc).
    directory: Option<Arc<crate::mailbox::Directory>>,
}

impl RecipientPolicy {
    /// Builds the policy and reads the mailbox list if one is configured (an unreadable or
    /// invalid list is an error: starting without it would accept mail for any user).
    pub fn new(relay_domains: Vec<String>, trusted: Vec<Cidr>, mailbox_file: Option<PathBuf>) -> Result<RecipientPolicy, RecipientsError> {
        let mut exact = HashSet::new();
        let mut parents = Vec::new();
        for entry in relay_domains {
            let bad = |reason: &str| RecipientsError::BadDomain { domain: entry.clone(), reason: reason.into() };
            let domain = normalise_domain(entry.trim());
            let name = domain.strip_prefix('.').unwrap_or(&domain);
            if name.is_empty() {
                return Err(bad("empty"));
            }
            if name.contains(|c: char| c == '@' || c == '[' || c.is_whitespace() || c.is_control()) || name.starts_with('.') || name.contains("..") {
                return Err(bad("not a domain name"));
            }
            if domain.starts_with('.') {
                parents.push(domain);
            } else {
                exact.insert(domain);
            }
        }
        let list = match &mailbox_file {
            Some(path) => read_mailboxes(path)?,
            None => Mailboxes::default(),
        };
        let policy = RecipientPolicy {
            exact,
            parents,
            trusted,
            mailbox_file,
            mailboxes: RwLock::new(Arc::new(Mailboxes::default())),
            directory: None,
        };
        policy.install(list);
        Ok(policy)
    }

    /// Also checks recipients against the mailboxes the back-ends report (only when at least
    /// one of the map's back-ends reports).
    pub fn with_directory(mut self, directory: Arc<crate::mailbox::Directory>) -> RecipientPolicy {
        self.directory = directory.learning().then_some(directory);
        self
    }

    /// Whether `domain` is one we accept mail for from anyone.
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        let domain = normalise_domain(domain);
        self.exact.contains(&domain) || self.parents.iter().any(|p| domain.ends_with(p.as_str()))
    }

    /// Whether a client at `ip` may relay (is in a trusted network).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The verdict for `RCPT TO:<rcpt>` (`rcpt` without angle brackets) from a client at
    /// `client_ip`. See the module documentation for the rules.
    pub fn check(&self, rcpt: &str, client_ip: IpAddr, authenticated: bool) -> RcptVerdict {
        if rcpt.eq_ignore_ascii_case("postmaster") {
            return RcptVerdict::Accept;
        }
        let Some((local, domain)) = rcpt.rsplit_once('@') else {
            return RcptVerdict::UnknownUser;
        };
        if local.is_empty() || domain.is_empty() || rcpt.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return RcptVerdict::UnknownUser;
        }
        let may_relay = authenticated || self.is_trusted(client_ip);
        let domain = normalise_domain(domain);
        if !self.is_relay_domain(&domain) {
            return if may_relay { RcptVerdict::Accept } else { RcptVerdict::RelayDenied };
        }
        let local = local.to_lowercase();
        if local == "postmaster" {
            return RcptVerdict::Accept;
        }
        if !may_relay && local.contains(['%', '!', '@']) {
            return RcptVerdict::RelayDenied;
        }
        let list = self.snapshot();
        let Some(directory) = &self.directory else {
            return if list.allows(&local, &domain) { RcptVerdict::Accept } else { RcptVerdict::UnknownUser };
        };
        if list.lists(&local, &domain) {
            return RcptVerdict::Accept;
        }
        // Back-ends report `user@domain`, or bare user names for a single-domain server.
        use crate::mailbox::Existence;
        // The bare name is looked up only when the full address is not found.
        match directory.exists(&format!("{local}@{domain}")) {
            Existence::Exists => RcptVerdict::Accept,
            _ if directory.exists(&local) == Existence::Exists => RcptVerdict::Accept,
            Existence::Nowhere => RcptVerdict::UnknownUser,
            Existence::Unknown(why) => RcptVerdict::TempFail(format!("Recipient address lookup failed: {why}")),
        }
    }

    /// Re-reads the mailbox list and returns its size. On error the old list stays in force
    /// (a typo in the file must not open or close the gates). Without a configured file there
    /// is nothing to read: `Ok(0)`.
    pub fn reload(&self) -> Result<usize, RecipientsError> {
        let Some(path) = &self.mailbox_file else { return Ok(0) };
        let list = read_mailboxes(path)?;
        let n = list.len();
        self.install(list);
        Ok(n)
    }

    /// Entries (addresses and catch-alls) in the mailbox list in force.
    pub fn mailbox_count(&self) -> usize {
        self.snapshot().len()
    }

    fn snapshot(&self) -> Arc<Mailboxes> {
        // A panic elsewhere while holding the lock cannot leave a half-swapped Arc.
        self.mailboxes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn install(&self, list: Mailboxes) {
        let foreign: Vec<&String> = list.domains.iter().filter(|d| !self.is_relay_domain(d)).collect();
        if let Some(example) = foreign.first() {
            tracing::warn!(count = foreign.len(), example = %example, "mailbox list names domains that are not relay domains; their lines have no effect");
        }
        *self.mailboxes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(list);
    }
}

fn read_mailboxes(path: &Path) -> Result<Mailboxes, RecipientsError> {
    let text = fs::read(path).map_err(|source| RecipientsError::Io { path: path.to_path_buf(), source })?;
    parse_mailboxes(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed when the test ends.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> TestDir {
            let dir = std::env::temp_dir().join(format!("mxlb-rcpt-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
        fn file(&self, text: &str) -> PathBuf {
            let path = self.0.join("mailboxes");
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const STRANGER: &str = "203.0.113.9";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(file: Option<PathBuf>) -> RecipientPolicy {
        RecipientPolicy::new(
            vec!["Example.NET".into(), "example.com.".into(), ".example.org".into()],
            vec!["198.51.100.0/24".parse().unwrap(), "2001:db8:1::/48".parse().unwrap()],
            file,
        )
        .unwrap()
    }

    fn check(p: &RecipientPolicy, rcpt: &str) -> RcptVerdict {
        p.check(rcpt, ip(STRANGER), false)
    }

    const LIST: &str = "# our users\n\nalice@example.net\n  Bob.Smith@EXAMPLE.net  \n@example.com\n";

    #[test]
    fn each_verdict_for_a_stranger() {
        let dir = TestDir::new("verdicts");
        let p = policy(Some(dir.file(LIST)));
        assert_eq!(check(&p, "alice@example.net"), RcptVerdict::Accept);
        assert_eq!(check(&p, "carol@example.net"), RcptVerdict::UnknownUser);
        assert_eq!(check(&p, "someone@elsewhere.org"), RcptVerdict::RelayDenied);
        assert_eq!(check(&p, "postmaster"), RcptVerdict::Accept);
        assert_eq!(check(&p, "PostMaster@example.net"), RcptVerdict::Accept, "RFC 5321 postmaster even if unlisted");
        assert_eq!(check(&p, "postmaster@elsewhere.org"), RcptVerdict::RelayDenied, "only our own postmaster");
        for bad in ["alice", "@example.net", "alice@", "al ice@example.net", "alice@example.net\r", ""] {
            assert_eq!(check(&p, bad), RcptVerdict::UnknownUser, "{bad:?}");
            assert_eq!(p.check(bad, ip("198.51.100.1"), true), RcptVerdict::UnknownUser, "{bad:?} from a trusted client");
        }
    }

    #[test]
    fn catch_all_and_unlisted_domains_accept_every_mailbox() {
        let dir = TestDir::new("catchall");
        let p = policy(Some(dir.file(LIST)));
        assert_eq!(check(&p, "anyone@example.com"), RcptVerdict::Accept, "@example.com is a catch-all");
        // example.org subdomains are relay domains without a line in the file.
        assert_eq!(check(&p, "anyone@lists.example.org"), RcptVerdict::Accept);
        // Without a file every mailbox of a relay domain is accepted.
        let open = policy(None);
        assert_eq!(check(&open, "carol@example.net"), RcptVerdict::Accept);
        assert_eq!(open.mailbox_count(), 0);
    }

    #[test]
    fn domains_and_mailboxes_compare_case_insensitively() {
        let dir = TestDir::new("case");
        let p = policy(Some(dir.file(LIST)));
        assert_eq!(check(&p, "ALICE@EXAMPLE.NET"), RcptVerdict::Accept);
        assert_eq!(check(&p, "bob.smith@example.net"), RcptVerdict::Accept, "listed as Bob.Smith@EXAMPLE.net");
        assert_eq!(check(&p, "alice@example.net."), RcptVerdict::Accept, "trailing dot");
        assert_eq!(check(&p, "x@EXAMPLE.COM"), RcptVerdict::Accept);
        assert!(p.is_relay_domain("EXAMPLE.com"));
    }

    #[test]
    fn a_dot_entry_covers_subdomains_but_not_the_domain() {
        let p = policy(None);
        assert_eq!(check(&p, "a@lists.example.org"), RcptVerdict::Accept);
        assert_eq!(check(&p, "a@x.lists.Example.ORG"), RcptVerdict::Accept);
        assert_eq!(check(&p, "a@example.org"), RcptVerdict::RelayDenied);
        assert_eq!(check(&p, "a@badexample.org"), RcptVerdict::RelayDenied);
        assert_eq!(check(&p, "a@mail.example.net"), RcptVerdict::RelayDenied, "plain entries are exact");
    }

    #[test]
    fn trusted_networks_and_authenticated_clients_may_relay() {
        let p = policy(None);
        for client in ["198.51.100.77", "::ffff:198.51.100.77", "2001:db8:1:ff::25"] {
            assert_eq!(p.check("x@elsewhere.org", ip(client), false), RcptVerdict::Accept, "{client}");
        }
        for client in ["198.51.101.1", "2001:db8:2::25", "::ffff:203.0.113.9"] {
            assert_eq!(p.check("x@elsewhere.org", ip(client), false), RcptVerdict::RelayDenied, "{client}");
        }
        assert_eq!(p.check("x@elsewhere.org", ip(STRANGER), true), RcptVerdict::Accept);
        assert_eq!(p.check("x@elsewhere.org", ip("2001:db8:2::25"), true), RcptVerdict::Accept);
    }

    #[test]
    fn trusted_clients_still_get_the_mailbox_check_for_our_domains() {
        let dir = TestDir::new("trustedlocal");
        let p = policy(Some(dir.file(LIST)));
        assert_eq!(p.check("carol@example.net", ip("198.51.100.1"), false), RcptVerdict::UnknownUser);
        assert_eq!(p.check("carol@example.net", ip(STRANGER), true), RcptVerdict::UnknownUser);
    }

    #[test]
    fn sender_routing_into_our_domain_is_relaying() {
        let p = policy(None);
        for rcpt in ["x%elsewhere.org@example.net", "elsewhere.org!x@example.net", "\"x@elsewhere.org\"@example.net"] {
            assert_eq!(check(&p, rcpt), RcptVerdict::RelayDenied, "{rcpt}");
            assert_eq!(p.check(rcpt, ip("198.51.100.1"), false), RcptVerdict::Accept, "{rcpt} from a trusted client");
        }
    }

    #[test]
    fn reload_adds_and_removes_users() {
        let dir = TestDir::new("reload");
        let path = dir.file("alice@example.net\n");
        let p = policy(Some(path.clone()));
        assert_eq!(p.mailbox_count(), 1);
        assert_eq!(check(&p, "bob@example.net"), RcptVerdict::UnknownUser);
        fs::write(&path, "bob@example.net\n@example.com\n").unwrap();
        assert_eq!(p.reload().unwrap(), 2);
        assert_eq!(p.mailbox_count(), 2);
        assert_eq!(check(&p, "bob@example.net"), RcptVerdict::Accept);
        assert_eq!(check(&p, "alice@example.net"), RcptVerdict::UnknownUser, "alice was removed");
    }

    #[test]
    fn a_broken_reload_keeps_the_old_list_and_names_file_and_line() {
        let dir = TestDir::new("broken");
        let path = dir.file(LIST);
        let p = policy(Some(path.clone()));
        let before = p.mailbox_count();
        fs::write(&path, "# users\nzed@example.net\nnot-an-address\n").unwrap();
        let err = p.reload().unwrap_err();
        assert_eq!(err.to_string(), format!("{}:3: `not-an-address` is not an address (expected user@example.net, or @example.net for the whole domain)", path.display()));
        assert_eq!(p.mailbox_count(), before);
        assert_eq!(check(&p, "alice@example.net"), RcptVerdict::Accept);
        assert_eq!(check(&p, "zed@example.net"), RcptVerdict::UnknownUser, "nothing of the broken file applies");
        fs::remove_file(&path).unwrap();
        let err = p.reload().unwrap_err();
        assert!(matches!(err, RecipientsError::Io { .. }) && err.to_string().contains(path.to_str().unwrap()), "{err}");
        assert_eq!(check(&p, "alice@example.net"), RcptVerdict::Accept, "a vanished file keeps the old list too");
    }

    #[test]
    fn bad_lines_and_bad_domains_are_rejected() {
        let path = Path::new("/etc/mxlb/mailboxes");
        for (text, line) in [("a@example.net b@example.net\n", 1), ("\n\nuser@\n", 3), ("ok@example.net\n@\n", 2), ("x@[192.0.2.1]\n", 1), ("a@example.net\n\u{1}b@example.net\n", 2)] {
            match parse_mailboxes(text.as_bytes(), path) {
                Err(RecipientsError::Parse { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(parse_mailboxes(b"a@example.net\n\xff@example.net\n", path), Err(RecipientsError::Parse { line: 2, .. })));
        // Files edited on Windows work.
        let list = parse_mailboxes(b"a@example.net\r\n@example.com\r\n", path).unwrap();
        assert!(list.allows("a", "example.net") && !list.allows("b", "example.net") && list.allows("b", "example.com"));
        // A # inside an address is part of it; only a leading # is a comment.
        let list = parse_mailboxes(b"  # note\na#b@example.net\n", path).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list.allows("a#b", "example.net") && !list.allows("a", "example.net"));
        for domain in ["", ".", "user@example.net", "exa mple.net", "a..b", "..example.net"] {
            assert!(matches!(RecipientPolicy::new(vec![domain.into()], vec![], None), Err(RecipientsError::BadDomain { .. })), "{domain:?}");
        }
        let missing = Path::new("/nonexistent/mxlb-mailboxes");
        let err = RecipientPolicy::new(vec!["example.net".into()], vec![], Some(missing.into())).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/mxlb-mailboxes: "), "{err}");
    }

    #[test]
    fn reported_mailboxes_decide_once_every_back_end_has_reported() {
        use crate::mailbox::{Directory, MailboxBackend};
        let backend = |name: &str, i: u8| MailboxBackend {
            name: name.into(),
            address: IpAddr::from([198, 18, 0, i]),
            weight: 1,
            agent: Some(std::net::SocketAddr::from(([198, 18, 0, i], 5555))),
        };
        let dir = Arc::new(Directory::new(vec![backend("a", 1), backend("b", 2)], None).unwrap());
        let t = TestDir::new("learned");
        let file = t.file("listed@example.net\n@catchall.example.net\n");
        let policy = RecipientPolicy::new(
            vec!["example.net".into(), "catchall.example.net".into(), "bare.example.net".into()],
            vec![],
            Some(file),
        )
        .unwrap()
        .with_directory(dir.clone());
        let check = |rcpt: &str| policy.check(rcpt, ip(STRANGER), false);
        assert!(matches!(check("alice@example.net"), RcptVerdict::TempFail(w) if w.contains("not fetched")), "no lists yet: try later");
        assert_eq!(check("listed@example.net"), RcptVerdict::Accept, "the file still counts");
        assert_eq!(check("x@catchall.example.net"), RcptVerdict::Accept);
        dir.set_reported("a", ["Alice@Example.net".to_string()]);
        assert!(matches!(check("alice@example.net"), RcptVerdict::Accept), "exists on a, b not fetched");
        assert!(matches!(check("nobody@example.net"), RcptVerdict::TempFail(_)));
        dir.set_reported("b", ["bob".to_string()]);
        assert_eq!(check("ALICE@example.net"), RcptVerdict::Accept);
        assert_eq!(check("bob@bare.example.net"), RcptVerdict::Accept, "a bare user name matches in any relay domain");
        assert_eq!(check("nobody@example.net"), RcptVerdict::UnknownUser);
        assert_eq!(check("postmaster@example.net"), RcptVerdict::Accept);
        assert_eq!(check("x@elsewhere.org"), RcptVerdict::RelayDenied, "not a relay domain: unchanged");
        // A user added on a back-end is accepted after the next fetch.
        dir.set_reported("b", ["bob".to_string(), "carol@example.net".to_string()]);
        assert_eq!(check("carol@example.net"), RcptVerdict::Accept);
        // Back-ends without agents report nothing: the map does not decide.
        let quiet = Arc::new(Directory::new(vec![MailboxBackend { agent: None, ..backend("a", 1) }], None).unwrap());
        let p2 = RecipientPolicy::new(vec!["example.net".into()], vec![], None).unwrap().with_directory(quiet);
        assert_eq!(p2.check("anyone@example.net", ip(STRANGER), false), RcptVerdict::Accept);
    }
}
