//! `mxlb_balancer`: VIP lookup, back-end selection (conntrack, else Maglev ring), forwarding.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    vip_flags,
    Backend, FlowState, MAX_RINGS, RING_SIZE, Reason, VipMeta, flow_hash_words, mode, state,
};

use crate::{
    edge, encap,
    maps::{BACKEND_STATS, BACKENDS, CONNTRACK, RINGS, VIP_SLOTS, VIP_STATS, VIPS, count, count_reason, maybe_vip},
    parse::{
        ETH_P_IP, ETH_P_IPV6, Key, L2, Pkt, Res, TCP_ACK, TCP_RST, TCP_SYN, Verdict, VipKeyWords,
        frame_len, parse_l2, parse_v4, parse_v6, ptr_at,
    },
};

/// Program body: one verdict, one reason counter.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let len = frame_len(ctx) as u64;
    let v = match try_balance(ctx, len) {
        Ok(v) | Err(v) => v,
    };
    count_reason(v.reason, len);
    v.action
}

/// The chosen back-end.
struct Choice {
    id: u32,
    /// Its `MXLB_BACKENDS` entry (map memory; not copied: only a few bytes of it are needed).
    backend: *const Backend,
    /// The ring picked it (as opposed to conntrack).
    new_flow: bool,
    /// The flow hash, when the ring was consulted (0 otherwise: conntrack hits skip it).
    hash: u32,
}

#[inline(always)]
fn try_balance(ctx: &XdpContext, len: u64) -> Res<Verdict> {
    let l2 = parse_l2(ctx)?;
    let pkt = match l2.proto {
        ETH_P_IP => parse_v4(ctx, l2.l3)?,
        ETH_P_IPV6 => parse_v6(ctx, l2.l3)?,
        _ => return Ok(Verdict::pass(Reason::PassNonIp)),
    };
    // Port 0 is the address-level marker, never a VIP:port. Transit traffic stops at the
    // filter, before any hash lookup.
    if pkt.key.dport() == 0 || !maybe_vip(pkt.key.dst()) {
        return Ok(Verdict::pass(Reason::PassNonVip));
    }
    // For ICMP errors the VIP is the quoted packet's source, i.e. the reversed key's dst.
    let vkey = VipKeyWords::tcp(pkt.key.dst(), pkt.key.dport());
    let syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // Conntrack first: a SYN always selects afresh, anything else may belong to a tracked
    // flow. This is the only conntrack lookup of the packet; `choose` reuses its result.
    let flow = if syn { None } else { CONNTRACK.get_ptr(pkt.key.flow_key()) };
    let (meta, choice) = match flow.and_then(|st| tracked(st, &vkey)) {
        Some(hit) => hit,
        None => {
            let meta = match vip(&pkt, &vkey, syn, len) {
                Ok(meta) => meta,
                Err(v) => return Ok(v),
            };
            let rst = pkt.tcp_flags & TCP_RST != 0;
            match choose(&pkt.key, &meta, flow, syn, !rst && !pkt.icmp, !pkt.icmp) {
                Ok(c) => (meta, c),
                Err(v) => {
                    count(&VIP_STATS, meta.id, len, 0);
                    return Err(v);
                }
            }
        }
    };
    forward(ctx, &l2, &pkt, &meta, &choice, len)
}

/// The established fast path: a conntrack entry whose VIP slot is this packet's VIP:port, in
/// a DSR mode, not on standby, pinned to a back-end that is UP or DRAINING. Anything else
/// (`None`) takes the full path through `MXLB_VIPS`, which decides it exactly as if this
/// shortcut did not exist: standby passes, a dead back-end is replaced from the ring, a slot
/// that belongs to another VIP (ids are reused after a removal) is ignored.
#[inline(always)]
fn tracked(st: *const FlowState, vkey: &VipKeyWords) -> Option<(VipMeta, Choice)> {
    // SAFETY: pointer from a successful map lookup.
    let vip_id = unsafe { (*st).vip };
    let slot = VIP_SLOTS.get_ptr(vip_id)?;
    // SAFETY: pointer from a successful map lookup; the slot's key is its first 20 bytes,
    // and array values are 8-byte aligned.
    let owner = unsafe { &*(slot as *const VipKeyWords) };
    if !owner.same_as(vkey) {
        return None;
    }
    // SAFETY: as above.
    let meta = unsafe { (*slot).meta };
    if meta.flags & vip_flags::STANDBY != 0 || !is_dsr(meta.mode) {
        return None;
    }
    Some((meta, pinned(st)?))
}

/// The back-end a conntrack entry pins its flow to, if it may still serve it (UP, or DRAINING:
/// a draining back-end keeps its established flows).
#[inline(always)]
fn pinned(st: *const FlowState) -> Option<Choice> {
    // SAFETY: pointer from a successful map lookup.
    let id = unsafe { (*st).backend };
    let backend = BACKENDS.get_ptr(id)?;
    // SAFETY: as above.
    let state = unsafe { (*backend).state };
    if state != state::UP && state != state::DRAINING {
        return None;
    }
    Some(Choice {
        id,
        backend,
        new_flow: false,
        hash: 0,
    })
}

/// The VIP entry of a packet that is not on the fast path, after the checks that come before
/// back-end selection: standby, edge protection, local mode. `Err` is the final verdict.
#[inline(always)]
fn vip(pkt: &Pkt, vkey: &VipKeyWords, syn: bool, len: u64) -> Result<VipMeta, Verdict> {
    let meta: VipMeta = match VIPS.get_ptr(vkey.vip_key()) {
        // SAFETY: pointer from a successful map lookup.
        Some(m) => unsafe { *m },
        None => return Err(Verdict::pass(Reason::PassNonVip)),
    };
    // Another LB node is the VRRP master for this VIP: not ours to balance (nor to count
    // against the sender's SYN bucket).
    if meta.flags & vip_flags::STANDBY != 0 {
        count(&VIP_STATS, meta.id, len, 0);
        return Err(Verdict::pass(Reason::PassStandby));
    }
    // Edge protection ([`edge`]): SYNs only, after the VIP lookup (non-VIP traffic never
    // pays for it), before the mode (local VIPs are protected too). ICMP has no flags.
    if syn {
        if let Err(v) = edge::check_syn(&pkt.key, pkt.v6) {
            count(&VIP_STATS, meta.id, len, 0);
            return Err(v);
        }
    }
    if meta.mode == mode::LOCAL {
        count(&VIP_STATS, meta.id, len, 0);
        return Err(Verdict::pass(Reason::PassLocal));
    }
    if !is_dsr(meta.mode) {
        return Err(Verdict::pass(Reason::PassNonVip));
    }
    Ok(meta)
}

/// A mode this program forwards in (unknown modes pass rather than guess).
#[inline(always)]
fn is_dsr(m: u8) -> bool {
    m == mode::DSR_L2 || m == mode::DSR_IPIP
}

/// Sends the packet to the chosen back-end in the VIP's mode and counts it.
#[inline(always)]
fn forward(ctx: &XdpContext, l2: &L2, pkt: &Pkt, meta: &VipMeta, choice: &Choice, len: u64) -> Res<Verdict> {
    let v = if meta.mode == mode::DSR_L2 {
        rewrite_l2(ctx, choice.backend)
    } else {
        // Only an IPv6 outer header (flow label) needs the hash; the ring may have computed it.
        let hash = if choice.new_flow || encap::outer_v4(choice.backend) {
            choice.hash
        } else {
            flow_hash_words(&pkt.key.0)
        };
        let job = encap::Job {
            vlan: l2.vlan,
            v6: pkt.v6,
            tos: pkt.tos,
            ip_len: pkt.ip_len,
            hash,
            backend: choice.id,
        };
        let mut out = Verdict::drop(Reason::DropEncap);
        encap::ipip(ctx, &job, &mut out);
        out
    };
    if v.action == xdp_action::XDP_TX || v.action == xdp_action::XDP_REDIRECT {
        let new = (choice.new_flow && !pkt.icmp) as u64;
        count(&VIP_STATS, meta.id, len, new);
        count(&BACKEND_STATS, choice.id, len, new);
        let reason = if pkt.icmp {
            Reason::IcmpForwarded
        } else {
            Reason::Forwarded
        };
        Ok(Verdict {
            action: v.action,
            reason,
        })
    } else {
        count(&VIP_STATS, meta.id, len, 0);
        Ok(v)
    }
}

/// Conntrack (`flow`, looked up by the caller unless SYN), else the VIP's ring; `insert`
/// stores a ring choice.
///
/// The flow hash is only computed for the ring: an established flow never needs it (dsr-l2).
/// `tcp`: the packet is a segment of the flow (not an ICMP error about it), so a non-SYN that
/// would start a flow from the ring is subject to the block list (SYNs were checked before).
#[inline(always)]
fn choose(key: &Key, meta: &VipMeta, flow: Option<*const FlowState>, syn: bool, insert: bool, tcp: bool) -> Res<Choice> {
    if let Some(c) = flow.and_then(pinned) {
        return Ok(c);
    }
    if !syn && tcp && edge::blocked(key) {
        return Err(Verdict::drop(Reason::DropBlocked));
    }
    // Shedding: a TCP flow no back-end may take goes, on a shedding VIP, to this node's tempfail
    // responder (a polite "try later") instead of timing out. That is every new flow when the
    // ring has no live back-end, and, while the VIP runs below full capacity, new flows from a
    // client group whose minimum is above what is left (premium groups, with a lower minimum,
    // keep service longest). Every packet of such a flow takes this path (none is tracked), so
    // it stays on this node; established flows are untouched.
    let shed = tcp && meta.flags & vip_flags::SHED != 0;
    if shed && meta.capacity < 100 && (meta.capacity as u32) < edge::group_min_capacity(key) {
        return Err(Verdict::pass(Reason::PassShed));
    }
    let no_backend = if shed { Verdict::pass(Reason::PassShed) } else { Verdict::drop(Reason::DropNoBackend) };
    if meta.ring >= MAX_RINGS {
        return Err(no_backend);
    }
    let hash = flow_hash_words(&key.0);
    let slot = meta.ring * RING_SIZE + hash % RING_SIZE;
    let id = match RINGS.get_ptr(slot) {
        // SAFETY: pointer from a successful map lookup.
        Some(p) => unsafe { *p },
        None => return Err(no_backend),
    };
    if id == 0 {
        return Err(no_backend);
    }
    let backend = match BACKENDS.get_ptr(id) {
        Some(b) => b,
        None => return Err(no_backend),
    };
    // SAFETY: as above.
    if unsafe { (*backend).state } != state::UP {
        return Err(no_backend);
    }
    if insert {
        let st = FlowState {
            backend: id,
            vip: meta.id,
        };
        // Failure (e.g. -ENOMEM) only costs stickiness; the packet is still forwarded.
        let _ = CONNTRACK.insert(key.flow_key(), &st, 0);
    }
    Ok(Choice {
        id,
        backend,
        new_flow: true,
        hash,
    })
}

/// dsr-l2: destination MAC = back-end, source MAC = our own (the frame's old destination).
#[inline(always)]
fn rewrite_l2(ctx: &XdpContext, backend: *const Backend) -> Verdict {
    // SAFETY: pointer from a successful map lookup.
    let mac = unsafe { (*backend).mac };
    if mac == [0u8; 6] {
        return Verdict::drop(Reason::DropNoRoute);
    }
    match ptr_at::<[u8; 12]>(ctx, 0) {
        Some(p) => {
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                let old = *p;
                let m = mac;
                *p = [
                    m[0], m[1], m[2], m[3], m[4], m[5], old[0], old[1], old[2], old[3], old[4],
                    old[5],
                ];
            }
            Verdict {
                action: xdp_action::XDP_TX,
                reason: Reason::Forwarded,
            }
        }
        None => Verdict::pass(Reason::PassMalformed),
    }
}
