//! mxlb agent library: everything `mxlb run` and the CLI do, as modules the integration tests
//! and benchmarks can use too.
//!
//! # Layout
//! - [`afpacket`]: AF_PACKET sockets on one interface (frames for the VIP-path probe, ARP).
//! - [`agent`]: `mxlb agent` on each mail server: queue, disk and load in HAProxy's
//!   agent-check format (and as JSON).
//! - [`config`]: the TOML file, `validate()`, errors located by file/line/key.
//! - [`desired`]: config + the operator's CLI changes (kept across restarts) and [`desired::plan`],
//!   the one function turning intent and health into back-end states and weights.
//! - [`edge`]: edge protection: source block/allow lists (CIDR) and the per-source SYN rate
//!   limit, kept in `state_dir/edge.json` and written to their own pinned maps.
//! - [`maglev`]: weighted Maglev tables, identical on every node for identical input.
//! - [`mailbox`]: the mailbox map (table, back-ends' reports, consistent hashing): which
//!   back-end holds each mailbox, for the proxy and the relay.
//! - [`maps`]: the one writer of the BPF maps (back-ends, rings, VIPs), and counter reads.
//! - [`dataplane`]: loading the eBPF object, pinning maps and links, attaching XDP programs
//!   (balancer, `decap` for dsr-ipip back-ends, `pass` for veth peers).
//! - [`neighbours`]: back-end MACs and this node's addresses from rtnetlink.
//! - [`health`]: SMTP/POP3/IMAP/TCP probes (pure dialogue + one bounded async probe), rise/fall.
//! - [`policy`]: agent reports and response times → weight share, overload drains with hysteresis.
//! - [`prober`]: one probe task per back-end and service in `mxlb run`, verdicts to the controller.
//! - [`control`]: the [`control::Controller`] that owns desired state, and the Unix socket the
//!   CLI uses to reach a running agent.
//! - [`metrics`]: Prometheus `/metrics` and the status behind `mxlb status`.
//! - [`vippath`]: probing the VIP path in DSR modes (a crafted SYN through the back-end).
//! - [`vrrp`]: VRRPv3 between LB nodes, keepalived-compatible: codec, state machine, sockets,
//!   VIP hand-over (addresses, GARP/NA, standby in the data path), tracking, sync groups.
//! - [`statefile`]: crash-safe JSON files and the lock in the state directory.
//! - [`tls`]: PEM loading for every TLS user (probes, STARTTLS, the mirror channel).
//! - [`sockmap`]: kernel byte relaying for logged-in plaintext POP3/IMAP sessions (sock hash +
//!   sk_skb verdict): [`sockmap::Splicer::splice`].
//! - [`shed`]: the tempfail responder (SMTP 421, POP3 -ERR [SYS/TEMP], IMAP * BYE) for full VIPs.
//! - [`relay`]: the store-and-forward SMTP relay with a mirrored queue (see its layout).
//! - [`proxy`]: the POP3/IMAP proxy with mailbox affinity: the pre-login dialogues, the login
//!   replayed to the mailbox's owner, then relaying (see its layout).
//! - [`report`]: listings and rates shown by the CLI (`--json` prints the same structs).
//!
//! The XDP program itself is in the `lb-ebpf` crate; the types both sides share are in
//! `lb-common`.
pub mod afpacket;
pub mod agent;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod desired;
pub mod edge;
pub mod maglev;
pub mod mailbox;
pub mod maps;
pub mod metrics;
pub mod health;
pub mod neighbours;
pub mod policy;
pub mod prober;
pub mod proxy;
pub mod relay;
pub mod report;
pub mod shed;
pub mod sockmap;
pub mod statefile;
pub mod tls;
pub mod vrrp;
pub mod vippath;

/// The compiled eBPF object (the XDP programs, the splice verdict program, and their maps), embedded at build time by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
