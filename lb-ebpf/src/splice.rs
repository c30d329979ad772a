//! `mxlb_splice`: the kernel relay of the POP3/IMAP proxy (sk_skb stream verdict).
//!
//! Once a plaintext session is logged in, the proxy puts both of its sockets (client side and
//! back-end side) into [`SOCKS`] and records each one's peer in [`PEERS`]. From then on every
//! segment TCP queues on either socket runs this program, which sends it out of the peer socket
//! (`bpf_sk_redirect_hash` without `BPF_F_INGRESS` = the peer's egress), so the payload never
//! crosses into userspace. Userspace (`mxlb::sockmap`) handles what the kernel cannot: the end
//! of stream (a FIN is not relayed), errors, and the removal of the entries.
//!
//! - **Keyed by socket cookie.** `bpf_get_socket_cookie` is allowed for sk_skb programs (checked
//!   on 6.18: the verifier accepts it) and gives a unique, never-reused 64-bit id per socket,
//!   which userspace reads with `getsockopt(SO_COOKIE)`. A 4-tuple key would need both address
//!   families in the key and could collide across network namespaces.
//! - **No peer entry → SK_PASS.** A socket in [`SOCKS`] without a [`PEERS`] entry behaves like a
//!   normal socket (its bytes go to its own receive queue for userspace), so the proxy can
//!   stop the redirection (remove the peer entries first) without losing data.
//! - **No stream parser.** With only a verdict program attached (kernel >= 5.13, the
//!   `read_skb` path), each skb is judged as it arrives; a parser is only needed to cut the
//!   stream into application messages, which a byte relay does not do.
//! - **Empty skbs are dropped**: a bare FIN has no payload, and handing it on makes the kernel
//!   report EPIPE on a socket (see [`verdict`]).
//! - **Counting.** Each redirect adds the skb's length to the receiving socket's
//!   [`SplicePeer::bytes`], so userspace knows how much the kernel relayed (and what the peer
//!   must have queued before userspace forwards an end of stream).

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::map,
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use lb_common::{MAX_SPLICE_SOCKETS, SplicePeer};

/// `MXLB_SPLICE_SOCKS`: socket cookie → socket, both sides of every spliced session. The
/// verdict program is attached to this map. Not pinned: each proxy process loads its own.
#[map(name = "MXLB_SPLICE_SOCKS")]
pub static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICE_SOCKETS, 0);

/// `MXLB_SPLICE_PEERS`: socket cookie → where its bytes go ([`SplicePeer`]). Not pinned.
#[map(name = "MXLB_SPLICE_PEERS")]
pub static PEERS: HashMap<u64, SplicePeer> = HashMap::with_max_entries(MAX_SPLICE_SOCKETS, 0);

/// The verdict for one received skb: redirect to the peer's egress, or pass.
#[inline(always)]
pub fn verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the helper only reads skb->sk; the context pointer is the program's argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(peer) = PEERS.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: a pointer returned by a successful map lookup, valid for this program run;
    // SplicePeer is #[repr(C)] with 8-byte aligned u64 fields (map values are 8-byte aligned).
    let target = unsafe { (*peer).peer };
    let len = ctx.len() as u64;
    if len == 0 {
        // A bare FIN: no payload, and TCP has already shut this socket's read side. Both
        // other verdicts hand the empty skb to the psock backlog in some cases (redirect
        // always; pass when earlier skbs are still queued there), and the backlog treats a
        // send of 0 bytes as a hard error: it sets EPIPE on the socket (seen by userspace as
        // EPOLLERR, verified on 6.18). Dropping it loses nothing.
        return sk_action::SK_DROP;
    }
    let verdict = SOCKS.redirect_skb(ctx, target, 0) as u32;
    if verdict == sk_action::SK_PASS {
        // SAFETY: as above. A plain add is enough: the verdict of one socket runs under that
        // socket's lock (softirq or its backlog), so two runs never update the same entry at
        // once; userspace only reads the aligned 64-bit words.
        unsafe {
            (*peer).bytes += len;
            (*peer).segments += 1;
        }
    }
    // bpf_sk_redirect_hash returns SK_PASS when the peer is in SOCKS (the skb is then sent
    // out of it), SK_DROP when it is not. Userspace removes the PEERS entries before the
    // SOCKS entries, so a drop can only happen if the peer socket was closed under us (it is
    // then removed from SOCKS by the kernel), when its bytes have nowhere to go anyway.
    verdict
}
