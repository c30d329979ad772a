//! Edge protection, userspace side: the source block list and allow list (CIDR prefixes) and
//! the per-source SYN rate limit enforced by the XDP program (`lb-ebpf/src/edge.rs`).
//!
//! - **Intent** lives in `state_dir/edge.json` ([`EdgeState`]): the two lists and, if the
//!   operator set one with `mxlb block rate`, a rate/burst that overrides the config's `[edge]`
//!   section. Every `mxlb block` command writes that file first (atomically), then the pinned
//!   maps, so the maps keep filtering across agent restarts and [`restore`] rebuilds them after a
//!   reboot (when `mxlb run` starts, maps gone).
//! - **The maps** (`MXLB_BLOCK`, `MXLB_ALLOW`: LPM tries of IPv4-mapped 16-byte prefixes;
//!   `MXLB_EDGE_CFG`: rate and burst) are written only by this module ([`Edge`], [`restore`]),
//!   directly, whether the agent runs or not: they do not depend on the back-end plan. When no
//!   agent has pinned them yet, the file alone is updated and applied at the next start.
//! - **Bad input changes nothing**: every CIDR (every line of a file) is parsed before anything
//!   is written, and all errors are reported at once with their line numbers.
//! - `mxlb block load FILE` **replaces** the list with the file (a feed file is the whole list,
//!   so reloading it from cron is idempotent and deletions in the feed take effect); `--merge`
//!   adds the file's prefixes to the list instead.
//! - Concurrent `mxlb block` commands are serialised by a lock file (`state_dir/edge.lock`).
//!
//! Defaults: the rate limit is **off** (`syn_rate = 0`): mail clients often share one address
//! (carrier-grade NAT in front of thousands of IMAP/POP3 users, a large provider's outbound MTA
//! pool), and a limit that is too low silently refuses legitimate mail. Turn it on with a value
//! well above the busiest legitimate source; 200 SYN/s with a burst of 400 is a reasonable start
//! (a single-source flood runs at tens of thousands per second).
use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
};

use lb_common::{EdgeLimits, MAX_SYN_LIMIT, PrefixKey};
use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    maps::{EdgeMaps, MapsError},
};

/// The config's `[edge]` section.
///
/// ```toml
/// [edge]
/// syn_rate = 200   # SYNs per second per source (IPv4 address, IPv6 /64); 0 = off
/// syn_burst = 400  # SYNs a source may send at once after being idle
/// ```
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Sustained SYNs per second per source to the VIPs; 0 = no rate limit (the default).
    #[serde(default)]
    pub syn_rate: u32,
    /// Bucket size; 0 with a non-zero rate means "twice the rate".
    #[serde(default)]
    pub syn_burst: u32,
}

impl EdgeConfig {
    /// Checks the limits (both at most [`MAX_SYN_LIMIT`]).
    pub fn validate(&self) -> Result<(), String> {
        if self.syn_rate > MAX_SYN_LIMIT || self.syn_burst > MAX_SYN_LIMIT {
            return Err(format!("syn_rate and syn_burst must be at most {MAX_SYN_LIMIT}"));
        }
        Ok(())
    }

    /// What the data path gets: rate 0 turns limiting off (burst 0 too); a missing burst is
    /// twice the rate (at least 1).
    pub fn limits(&self) -> EdgeLimits {
        if self.syn_rate == 0 {
            return EdgeLimits { syn_rate: 0, syn_burst: 0 };
        }
        let burst = if self.syn_burst == 0 { self.syn_rate.saturating_mul(2).min(MAX_SYN_LIMIT) } else { self.syn_burst };
        EdgeLimits { syn_rate: self.syn_rate, syn_burst: burst.max(1) }
    }
}

/// The `[edge]` settings of `config`.
pub fn settings(config: &Config) -> EdgeConfig {
    config.edge
}

// ---------------------------------------------------------------------------------------------
// CIDR prefixes.

/// An IPv4 or IPv6 prefix with no host bits set (`198.18.0.0/15`, `2001:db8::/32`; a bare
/// address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}`: {reason}")]
pub struct CidrError {
    pub input: String,
    pub reason: String,
}

const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl Cidr {
    /// `addr/len`; fails if `len` is too long for the family or host bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, CidrError> {
        let err = |reason: String| CidrError { input: format!("{addr}/{len}"), reason };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(err(format!("prefix length {len} is longer than {max}")));
        }
        if let IpAddr::V6(v6) = addr {
            if v6.octets()[..12] == MAPPED_PREFIX {
                return Err(err("IPv4-mapped IPv6 prefix: write it in IPv4 form".into()));
            }
        }
        let net = mask(addr, len);
        if net != addr {
            return Err(err(format!("host bits set (the network is {net}/{len})")));
        }
        Ok(Cidr { addr, len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// The map key: IPv4 as `::ffff:a.b.c.d/(96+len)`, IPv6 as is.
    pub fn key(&self) -> PrefixKey {
        match self.addr {
            IpAddr::V4(v4) => PrefixKey { prefix_len: 96 + self.len as u32, addr: v4.to_ipv6_mapped().octets() },
            IpAddr::V6(v6) => PrefixKey { prefix_len: self.len as u32, addr: v6.octets() },
        }
    }

    /// The prefix a map key encodes (None for a key no [`Cidr::key`] produces).
    pub fn from_key(key: PrefixKey) -> Option<Cidr> {
        if key.prefix_len >= 96 && key.addr[..12] == MAPPED_PREFIX {
            let a = Ipv4Addr::new(key.addr[12], key.addr[13], key.addr[14], key.addr[15]);
            Cidr::new(IpAddr::V4(a), (key.prefix_len - 96) as u8).ok()
        } else if key.prefix_len <= 128 {
            Cidr::new(IpAddr::V6(Ipv6Addr::from(key.addr)), key.prefix_len as u8).ok()
        } else {
            None
        }
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32) as u32) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len.min(128) as u32) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let s = s.trim();
        let err = |reason: &str| CidrError { input: s.to_string(), reason: reason.to_string() };
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| err("not an IPv4 or IPv6 address (expected e.g. 198.51.100.0/24 or 2001:db8::/48)"))?;
        let len = match len {
            None => if addr.is_ipv4() { 32 } else { 128 },
            Some(l) => l.parse::<u8>().map_err(|_| err("the prefix length is not a number from 0 to 128"))?,
        };
        Cidr::new(addr, len).map_err(|e| CidrError { input: s.to_string(), reason: e.reason })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a list file: one CIDR per line; `#` starts a comment; blank lines are ignored. All
/// errors are returned, each with its line number.
pub fn parse_list(text: &str) -> Result<Vec<Cidr>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

// ---------------------------------------------------------------------------------------------
// Persistent intent.

/// `state_dir/edge.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeState {
    #[serde(default)]
    pub block: BTreeSet<Cidr>,
    #[serde(default)]
    pub allow: BTreeSet<Cidr>,
    /// Set by `mxlb block rate`; overrides the config's `[edge]` until `--reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<EdgeConfig>,
}

/// Errors of the edge commands.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    State(#[from] crate::statefile::StateError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{0}")]
    Invalid(String),
}

impl EdgeState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("edge.json")
    }

    /// Loads the state; a missing file is the empty state.
    pub fn load(state_dir: &Path) -> Result<EdgeState, EdgeError> {
        Ok(crate::statefile::load(&Self::path(state_dir), "edge state file")?)
    }

    /// Writes the state atomically and durably ([`crate::statefile::save`]).
    pub fn save(&self, state_dir: &Path) -> Result<(), EdgeError> {
        Ok(crate::statefile::save(state_dir, "edge.json", self)?)
    }

    fn list_mut(&mut self, allow: bool) -> &mut BTreeSet<Cidr> {
        if allow { &mut self.allow } else { &mut self.block }
    }
}

/// What [`restore`] and [`Edge::sync`] changed in the maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub removed: usize,
}

/// Makes the pinned maps match the persisted state and the limits (CLI override, else
/// `config`'s `[edge]`). Called by `mxlb run` after loading the balancer, so a reboot (maps
/// gone) or a lost map restores the lists.
pub fn restore(config: &Config, maps: &mut EdgeMaps) -> Result<SyncReport, EdgeError> {
    let state = EdgeState::load(&config.node.state_dir)?;
    sync_maps(&state, &settings(config), maps)
}

fn sync_maps(state: &EdgeState, config: &EdgeConfig, maps: &mut EdgeMaps) -> Result<SyncReport, EdgeError> {
    let mut report = SyncReport::default();
    for (allow, wanted) in [(false, &state.block), (true, &state.allow)] {
        let present: HashSet<PrefixKey> = maps.prefixes(allow)?.into_iter().collect();
        let want: HashSet<PrefixKey> = wanted.iter().map(Cidr::key).collect();
        for k in want.difference(&present) {
            maps.insert_prefix(allow, *k)?;
            report.added += 1;
        }
        for k in present.difference(&want) {
            maps.remove_prefix(allow, *k)?;
            report.removed += 1;
        }
    }
    let limits = state.limits.unwrap_or(*config).limits();
    if maps.limits()? != limits {
        maps.set_limits(limits)?;
    }
    Ok(report)
}

/// One `mxlb block` session: the lock, the state and (if pinned) the maps.
pub struct Edge {
    state_dir: PathBuf,
    config: EdgeConfig,
    state: EdgeState,
    maps: Option<EdgeMaps>,
    _lock: crate::statefile::Lock,
}

/// `mxlb block list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgeListing {
    pub block: Vec<Cidr>,
    pub allow: Vec<Cidr>,
    /// Effective SYN limit per source (0 = off).
    pub syn_rate: u32,
    pub syn_burst: u32,
    /// `config` or `cli` (set with `mxlb block rate`).
    pub limits_from: String,
    /// Whether the data path's maps are pinned (else the lists apply when `mxlb run` starts).
    pub applied: bool,
    /// Sources with a SYN bucket in the data path now.
    pub tracked_sources: Option<usize>,
}

impl Edge {
    /// Locks `state_dir/edge.lock`, loads the state and opens the pinned maps if any.
    pub fn open(config: &Config) -> Result<Edge, EdgeError> {
        Self::open_with(settings(config), &config.node.state_dir, &config.node.bpffs_dir)
    }

    pub fn open_with(config: EdgeConfig, state_dir: &Path, bpffs_dir: &Path) -> Result<Edge, EdgeError> {
        let lock = crate::statefile::lock(state_dir, "edge.lock")?;
        let state = EdgeState::load(state_dir)?;
        let maps = if EdgeMaps::pinned_in(bpffs_dir) { Some(EdgeMaps::open_pinned(bpffs_dir)?) } else { None };
        Ok(Edge { state_dir: state_dir.to_path_buf(), config, state, maps, _lock: lock })
    }

    /// Whether the maps are pinned (changes reach the data path now).
    pub fn applied(&self) -> bool {
        self.maps.is_some()
    }

    pub fn state(&self) -> &EdgeState {
        &self.state
    }

    /// Saves `next` as the state, then makes the maps match it.
    fn commit(&mut self, next: EdgeState) -> Result<SyncReport, EdgeError> {
        next.save(&self.state_dir)?;
        self.state = next;
        match &mut self.maps {
            Some(m) => sync_maps(&self.state, &self.config, m),
            None => Ok(SyncReport::default()),
        }
    }

    /// Adds prefixes to the block list (or the allow list); returns how many were new.
    pub fn add(&mut self, allow: bool, cidrs: &[Cidr]) -> Result<usize, EdgeError> {
        let mut next = self.state.clone();
        let n = cidrs.iter().filter(|c| next.list_mut(allow).insert(**c)).count();
        self.commit(next)?;
        Ok(n)
    }

    /// Removes prefixes; every one must be in the list (else nothing changes).
    pub fn remove(&mut self, allow: bool, cidrs: &[Cidr]) -> Result<usize, EdgeError> {
        let mut next = self.state.clone();
        let missing: Vec<String> = cidrs.iter().filter(|c| !next.list_mut(allow).contains(c)).map(|c| c.to_string()).collect();
        if !missing.is_empty() {
            let list = if allow { "allow" } else { "block" };
            return Err(EdgeError::Invalid(format!("not in the {list} list: {} (nothing changed)", missing.join(", "))));
        }
        for c in cidrs {
            next.list_mut(allow).remove(c);
        }
        self.commit(next)?;
        Ok(cidrs.len())
    }

    /// Loads a list file: replaces the list (or merges into it with `merge`). Returns the
    /// prefixes (added, removed).
    pub fn load(&mut self, allow: bool, text: &str, merge: bool) -> Result<(usize, usize), EdgeError> {
        let cidrs = parse_list(text).map_err(|e| EdgeError::Invalid(format!("{} (nothing changed)", e.join("\n"))))?;
        let mut next = self.state.clone();
        let new: BTreeSet<Cidr> = cidrs.into_iter().collect();
        let old = next.list_mut(allow).clone();
        let added = new.difference(&old).count();
        let removed = if merge { 0 } else { old.difference(&new).count() };
        if merge {
            next.list_mut(allow).extend(new);
        } else {
            *next.list_mut(allow) = new;
        }
        self.commit(next)?;
        Ok((added, removed))
    }

    /// Sets the SYN limit (None: back to the config's `[edge]`).
    pub fn set_rate(&mut self, limits: Option<EdgeConfig>) -> Result<EdgeLimits, EdgeError> {
        if let Some(l) = &limits {
            l.validate().map_err(EdgeError::Invalid)?;
        }
        let mut next = self.state.clone();
        next.limits = limits;
        self.commit(next)?;
        Ok(self.effective_limits())
    }

    fn effective_limits(&self) -> EdgeLimits {
        self.state.limits.unwrap_or(self.config).limits()
    }

    /// Lists, limits and whether they are in the data path.
    pub fn listing(&self) -> EdgeListing {
        let l = self.effective_limits();
        EdgeListing {
            block: self.state.block.iter().copied().collect(),
            allow: self.state.allow.iter().copied().collect(),
            syn_rate: l.syn_rate,
            syn_burst: l.syn_burst,
            limits_from: if self.state.limits.is_some() { "cli" } else { "config" }.into(),
            applied: self.maps.is_some(),
            tracked_sources: self.maps.as_ref().map(|m| m.bucket_count()),
        }
    }

    /// Makes the maps match the state (what [`restore`] does at start).
    pub fn sync(&mut self) -> Result<SyncReport, EdgeError> {
        match &mut self.maps {
            Some(m) => sync_maps(&self.state, &self.config, m),
            None => Ok(SyncReport::default()),
        }
    }
}

/// Key of the SYN bucket of a source: the IPv4-mapped address, or the IPv6 /64 (low half zero).
pub fn bucket_key(src: IpAddr) -> [u8; 16] {
    match src {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            o
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_and_prints_cidrs() {
        for (input, shown) in [
            ("198.18.0.0/15", "198.18.0.0/15"),
            (" 198.51.100.7 ", "198.51.100.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:DB8:1:2::/64", "2001:db8:1:2::/64"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("::/0", "::/0"),
        ] {
            assert_eq!(c(input).to_string(), shown, "{input}");
        }
    }

    #[test]
    fn rejects_bad_cidrs_with_a_reason() {
        for (input, reason) in [
            ("198.18.0.1/15", "host bits set (the network is 198.18.0.0/15)"),
            ("198.18.0.0/33", "prefix length 33 is longer than 32"),
            ("2001:db8::/129", "prefix length 129"),
            ("2001:db8::1/64", "host bits set (the network is 2001:db8::/64)"),
            ("198.18.0/24", "not an IPv4 or IPv6 address"),
            ("example.com", "not an IPv4 or IPv6 address"),
            ("10.0.0.0/x", "prefix length is not a number"),
            ("10.0.0.0/-1", "prefix length is not a number"),
            ("", "not an IPv4 or IPv6 address"),
            ("::ffff:198.18.0.0/112", "IPv4-mapped"),
        ] {
            let e = input.parse::<Cidr>().expect_err(input);
            assert!(e.to_string().contains(reason), "{input}: {e}");
            assert!(e.to_string().contains(input.trim()), "{input}: {e}");
        }
    }

    #[test]
    fn keys_are_v4_mapped_with_96_plus_n() {
        let k = c("198.18.0.0/15").key();
        assert_eq!(k.prefix_len, 111);
        assert_eq!(k.addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 0]);
        let k = c("2001:db8::/32").key();
        assert_eq!(k.prefix_len, 32);
        assert_eq!(k.addr[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(c("0.0.0.0/0").key().prefix_len, 96);
        for s in ["198.18.0.0/15", "198.51.100.7/32", "0.0.0.0/0", "2001:db8::/32", "::/0", "2001:db8::1/128"] {
            assert_eq!(Cidr::from_key(c(s).key()), Some(c(s)), "{s}");
        }
    }

    #[test]
    fn contains_respects_family_and_prefix() {
        let n = c("198.18.0.0/15");
        assert!(n.contains("198.19.255.255".parse().unwrap()));
        assert!(!n.contains("198.20.0.0".parse().unwrap()));
        assert!(!n.contains("::ffff:198.18.0.1".parse().unwrap()));
        assert!(c("2001:db8:1::/48").contains("2001:db8:1:ffff::1".parse().unwrap()));
    }

    #[test]
    fn list_files_report_every_bad_line() {
        let ok = "# feed\n198.18.0.0/24  # lab\n\n2001:db8::/48\n   \n";
        assert_eq!(parse_list(ok).unwrap(), vec![c("198.18.0.0/24"), c("2001:db8::/48")]);
        let bad = "198.18.0.0/24\n198.18.0.1/24\nnonsense # x\n";
        let e = parse_list(bad).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("line 2:"), "{e:?}");
        assert!(e[1].starts_with("line 3:") && e[1].contains("nonsense"), "{e:?}");
    }

    #[test]
    fn bucket_keys_aggregate_ipv6_by_64() {
        assert_eq!(bucket_key("2001:db8:1:2::1".parse().unwrap()), bucket_key("2001:db8:1:2:ffff::9".parse().unwrap()));
        assert_ne!(bucket_key("2001:db8:1:2::1".parse().unwrap()), bucket_key("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(bucket_key("198.18.0.1".parse().unwrap()), lb_common::addr_to_key("198.18.0.1".parse().unwrap()));
    }

    #[test]
    fn limits_default_off_and_burst_defaults_to_twice_the_rate() {
        assert_eq!(EdgeConfig::default().limits(), EdgeLimits { syn_rate: 0, syn_burst: 0 });
        assert_eq!(EdgeConfig { syn_rate: 200, syn_burst: 0 }.limits(), EdgeLimits { syn_rate: 200, syn_burst: 400 });
        assert_eq!(EdgeConfig { syn_rate: 0, syn_burst: 50 }.limits(), EdgeLimits { syn_rate: 0, syn_burst: 0 });
        assert!(EdgeConfig { syn_rate: MAX_SYN_LIMIT + 1, syn_burst: 0 }.validate().is_err());
        let parsed: EdgeConfig = toml::from_str("syn_rate = 200\nsyn_burst = 400\n").unwrap();
        assert_eq!(parsed, EdgeConfig { syn_rate: 200, syn_burst: 400 });
        assert!(toml::from_str::<EdgeConfig>("syn_rat = 1\n").is_err());
    }

    #[test]
    fn state_round_trips_and_edits_without_maps() {
        let dir = std::env::temp_dir().join(format!("mxlb-edge-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let bpffs = dir.join("no-bpffs");
        let mut e = Edge::open_with(EdgeConfig::default(), &dir, &bpffs).unwrap();
        assert!(!e.applied());
        assert_eq!(e.add(false, &[c("198.18.0.0/24"), c("2001:db8:1::/48")]).unwrap(), 2);
        assert_eq!(e.add(false, &[c("198.18.0.0/24")]).unwrap(), 0);
        assert_eq!(e.add(true, &[c("198.18.0.5/32")]).unwrap(), 1);
        let err = e.remove(false, &[c("198.18.0.0/24"), c("198.18.9.0/24")]).unwrap_err();
        assert!(err.to_string().contains("198.18.9.0/24") && err.to_string().contains("nothing changed"), "{err}");
        assert_eq!(e.state().block.len(), 2, "a failed remove changes nothing");
        // Replace, then merge.
        assert_eq!(e.load(false, "198.18.1.0/24\n", false).unwrap(), (1, 2));
        assert_eq!(e.load(false, "198.18.2.0/24\n198.18.1.0/24\n", true).unwrap(), (1, 0));
        assert!(e.load(false, "198.18.3.0/24\nbad\n", false).is_err());
        e.set_rate(Some(EdgeConfig { syn_rate: 100, syn_burst: 0 })).unwrap();
        drop(e);
        let s = EdgeState::load(&dir).unwrap();
        assert_eq!(s.block, [c("198.18.1.0/24"), c("198.18.2.0/24")].into_iter().collect());
        assert_eq!(s.allow, [c("198.18.0.5/32")].into_iter().collect());
        let l = Edge::open_with(EdgeConfig::default(), &dir, &bpffs).unwrap().listing();
        assert_eq!((l.syn_rate, l.syn_burst, l.limits_from.as_str(), l.applied), (100, 200, "cli", false));
        let _ = fs::remove_dir_all(&dir);
    }
}
