//! mxlb XDP data plane.
//!
//! Three XDP programs share one object and one set of maps (all pinned by name, see [`maps`]):
//!
//! - `mxlb_balancer` ([`balancer`]): the load balancer. Parses Ethernet (+ one 802.1Q tag),
//!   IPv4/IPv6 and TCP, lets transit traffic go after one bit test (`MXLB_VIP_FILTER`), picks a
//!   back-end (conntrack, else the VIP table and the VIP's Maglev ring) and forwards in
//!   direct-server-return mode, either by rewriting MACs (`dsr-l2`) or by prepending an outer
//!   IP header (`dsr-ipip`, [`encap`]).
//! - `mxlb_decap` ([`decap`]): runs on back-ends and strips the outer header again.
//! - `mxlb_pass`: a trivial XDP_PASS (benchmark baseline, veth-peer helper).
//! - `mxlb_splice` ([`splice`]): not XDP: the sk_skb stream verdict of the POP3/IMAP proxy's
//!   kernel relay, with its own two unpinned maps (`MXLB_SPLICE_*`). It lives in this object so
//!   there is one build and one embedded object; loading it creates the XDP maps too, which
//!   `mxlb::sockmap` keeps away from the agent's pins (see there).
//!
//! Every decision increments one [`lb_common::Reason`] slot, so `mxlb stats` can explain any
//! packet. All parsing goes through the single bounds-checked [`parse::ptr_at`]; there are no
//! loops over back-ends, and the cost per packet is fixed (a handful of map lookups, at most one
//! of them a hash lookup for transit traffic and established flows).
//!
//! # Design decisions
//!
//! - **Anything we do not understand is passed untouched.** Non-IP, non-TCP, non-VIP traffic and
//!   truncated or malformed headers (IHL < 5, total/payload length larger than the frame or
//!   smaller than the header, a frame that ends inside any header) get XDP_PASS with the packet
//!   bytes unmodified: the kernel stack is the right place to discard or answer them. A
//!   malformed packet is never forwarded to a back-end.
//! - **Fragments.** A fragment has no reliable L4 header (non-first fragments have none at all),
//!   so it cannot be hashed to the right back-end; TCP sets DF, so legitimate VIP traffic is not
//!   fragmented. IPv4 fragments (MF set or offset != 0) and IPv6 packets whose first next-header
//!   is a Fragment header (44) are dropped (`drop_fragment`) when their destination address has
//!   the address-level marker entry in `MXLB_VIPS` (`VipKey { port: 0, proto: 6 }`), whatever
//!   their protocol; fragments to any other address are passed (`pass_non_vip`). Userspace
//!   decides which addresses carry the marker.
//! - **IPv4 options.** Any IHL from 5 to 15 is accepted; the options are skipped to find TCP and
//!   left untouched. dsr-l2 forwards the packet as is; dsr-ipip carries it, options included,
//!   inside the outer header.
//! - **IPv6 extension headers.** Only a fixed header followed directly by TCP (6) or ICMPv6 (58)
//!   is balanced. Walking an extension-header chain would need a loop of variable cost and
//!   real VIP traffic never carries one, so a packet to a VIP address whose first next-header is
//!   an extension header (hop-by-hop, routing, destination options, AH, ESP, mobility, HIP,
//!   shim6, experimental) is passed untouched (`pass_ipv6_ext`), except the Fragment header
//!   (see above). To other addresses it is `pass_non_vip`.
//! - **Cost per packet: at most one hash lookup for the common cases.** Transit traffic (a
//!   destination whose `MXLB_VIP_FILTER` bit is clear) is passed after an array lookup. A
//!   segment of a tracked flow (the *established fast path*) is forwarded after one conntrack
//!   lookup: the flow's `FlowState::vip` id leads, through the `MXLB_VIP_SLOTS` array, to its
//!   VIP's mode and flags, so `MXLB_VIPS` is not consulted. The slot is used only if it holds
//!   the packet's own VIP:port (ids are reused after a VIP is removed), is in a DSR mode and
//!   not on standby, and the back-end is UP or DRAINING; otherwise the packet takes the full
//!   path, which decides it exactly as if the shortcut did not exist. `MXLB_VIPS` stays the
//!   authority: userspace fills a slot after its entry exists and empties it before the entry
//!   goes, and sets a filter bit before and clears it after.
//! - **SYN, RST and conntrack.** A SYN (SYN set, ACK clear) always selects afresh from the ring
//!   and overwrites any conntrack entry, so a reused 4-tuple follows the current ring. A packet
//!   with RST is never inserted (an existing entry is used; otherwise the ring decides and
//!   nothing is stored), so a stray RST cannot fill the LRU. Any other packet without an entry
//!   selects from the ring and is inserted, which makes established flows survive an agent
//!   restart or a VRRP fail-over (the ring is the same on every node). An entry whose back-end
//!   is DOWN or UNUSED is replaced by a fresh ring selection; an entry pointing at a DRAINING
//!   back-end is kept.
//! - **ICMP errors** (ICMPv4 type 3, ICMPv6 types 1 and 2) that quote a TCP packet sent *from*
//!   a VIP:port are forwarded, whole, to the back-end that owns the quoted flow (conntrack,
//!   else the ring; never inserted), with the VIP's forwarding mode. This is what makes path
//!   MTU discovery work with DSR: the back-end, not the LB, must see "fragmentation needed".
//! - **Counters.** `bytes` counts the received frame length (before encapsulation).
//!   `new_flows` counts TCP packets for which the ring picked the back-end (SYN, first packet
//!   without conntrack, replacement of a dead entry, RST without entry); ICMP never counts a
//!   new flow. VIP counters count every packet that matched the VIP (also local and dropped
//!   ones), back-end counters only packets actually sent to that back-end.
//! - **dsr-l2 with a zero back-end MAC** is a configuration error: dropped as `drop_no_route`.
//! - **Standby VIPs.** A VIP whose VRRP instance is not master on this node carries
//!   `vip_flags::STANDBY`: its packets are passed untouched (`pass_standby`) before edge
//!   protection or any lookup, and userspace leaves out its address marker (fragments to it
//!   are `pass_non_vip`). The kernel does not hold the address on a backup either, so such
//!   stray packets (a client with a stale ARP entry) are routed like any other transit packet.
//! - **Port 0** in `MXLB_VIPS` is only the address marker: TCP to port 0 is `pass_non_vip`.
//! - **Unknown VIP modes** pass (`pass_non_vip`) rather than guess.
//! - **Edge protection** ([`edge`]) runs after the VIP lookup and only for SYNs (and for
//!   non-SYN segments that miss conntrack and would start a flow from the ring): allow list
//!   (`MXLB_ALLOW`) → admitted; block list (`MXLB_BLOCK`) → `drop_blocked`; else one token of the
//!   source's SYN bucket (`MXLB_SYN_BUCKET`, IPv4 address or IPv6 /64, rate and burst from
//!   `MXLB_EDGE_CFG`, burst 0 = off) or `drop_rate_limited`. Established flows (conntrack hit)
//!   and non-VIP traffic never touch these maps, so blocking stops new connections while
//!   sessions in progress finish, and the established fast path costs the same as before.
//!
//! # Verifier notes (kernel 6.18)
//!
//! - `ptr_at` loads `data`/`data_end` with volatile reads, so LLVM cannot fold a packet bounds
//!   check into an earlier scalar length check (which the verifier cannot follow).
//! - Offsets handed to `ptr_at` are always bounded (14/18 + IHL·4 ≤ 78, fixed sizes after);
//!   after `bpf_xdp_adjust_head` the encapsulator uses per-branch constant offsets.
//! - The 512-byte stack: `encap::ipip` is a separate BPF function (its `bpf_fib_lookup`
//!   parameters do not share a frame with the parser), and it handles addresses as `u32` words
//!   read from (aligned) map memory: byte-wise copies of 16-byte addresses spill every byte.
#![no_std]
#![no_main]

mod balancer;
mod decap;
mod edge;
mod encap;
mod maps;
mod parse;
mod splice;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{stream_verdict, xdp},
    programs::{SkBuffContext, XdpContext},
};

/// Trivial XDP_PASS: benchmark baseline and the veth-peer helper.
#[xdp]
pub fn mxlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The load balancer (attached on the LB node's interfaces). See [`balancer`].
#[xdp]
pub fn mxlb_balancer(ctx: XdpContext) -> u32 {
    balancer::run(&ctx)
}

/// IPIP / IP6IP6 / 4in6 / 6in4 decapsulation (attached on back-ends). See [`decap`].
#[xdp]
pub fn mxlb_decap(ctx: XdpContext) -> u32 {
    decap::run(&ctx)
}

/// The POP3/IMAP proxy's kernel relay (sk_skb stream verdict on `MXLB_SPLICE_SOCKS`): each
/// segment received on a spliced socket is sent out of its peer. See [`splice`].
#[stream_verdict]
pub fn mxlb_splice(ctx: SkBuffContext) -> u32 {
    splice::verdict(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
