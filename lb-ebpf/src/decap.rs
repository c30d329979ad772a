//! `mxlb_decap`: strips the outer IPv4/IPv6 header that dsr-ipip added, on the back-end.
//!
//! Accepted: IPv4 (any IHL, not a fragment) with protocol 4 or 41, and IPv6 whose next header
//! is directly 4 or 41 (no extension headers), carrying an inner header of the announced
//! family. The Ethernet header (and a VLAN tag) is moved forward over the outer header, its
//! EtherType set to the inner family, and the packet passed to the stack, which then sees the
//! VIP as destination. Everything else, malformed tunnels included, is passed untouched. Only
//! `decapsulated` is counted: on a back-end every other packet is ordinary traffic.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::Reason;

use crate::{
    maps::count_reason,
    parse::{
        ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_LEN, IPV6_LEN,
        frame_len, parse_l2, ptr_at, read,
    },
};

/// Program body.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let len = frame_len(ctx) as u64;
    if try_decap(ctx).is_some() {
        count_reason(Reason::Decapsulated, len);
    }
    xdp_action::XDP_PASS
}

/// Returns `Some` when the frame was decapsulated, `None` when it was left alone.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Option<()> {
    let l2 = parse_l2(ctx).ok()?;
    let avail = frame_len(ctx) - l2.l3;
    let (hlen, proto) = match l2.proto {
        ETH_P_IP => {
            let h = read::<10>(ctx, l2.l3).ok()?;
            let hlen = ((h[0] & 0x0f) as usize) * 4;
            let tot = u16::from_be_bytes([h[2], h[3]]) as usize;
            if h[0] >> 4 != 4 || hlen < IPV4_LEN || tot < hlen || tot > avail {
                return None;
            }
            // A fragment's payload is not a whole inner packet.
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return None;
            }
            (hlen, h[9])
        }
        ETH_P_IPV6 => {
            let h = read::<8>(ctx, l2.l3).ok()?;
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            if h[0] >> 4 != 6 || IPV6_LEN + plen > avail {
                return None;
            }
            (IPV6_LEN, h[6])
        }
        _ => return None,
    };
    let (inner_et, version) = match proto {
        IPPROTO_IPIP => (ETH_P_IP, 4),
        IPPROTO_IPV6 => (ETH_P_IPV6, 6),
        _ => return None,
    };
    // The inner header must be there, whole, and of the announced family. (Whole-header
    // pointer checks rather than a 1-byte read: the verifier gives no range to a `pkt + var <
    // pkt_end` comparison at offset 0, which is what LLVM makes of a 1-byte bounds check.)
    let inner = l2.l3 + hlen;
    let first = if version == 4 {
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*ptr_at::<[u8; IPV4_LEN]>(ctx, inner)?)[0] }
    } else {
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*ptr_at::<[u8; IPV6_LEN]>(ctx, inner)?)[0] }
    };
    if first >> 4 != version {
        return None;
    }

    // Save the Ethernet header (MACs and VLAN TCI) before the outer header disappears.
    let macs = read::<12>(ctx, 0).ok()?;
    let tci = if l2.vlan {
        read::<2>(ctx, 14).ok()?
    } else {
        [0, 0]
    };

    // SAFETY: helper call with a valid context; hlen is 20..=60.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, hlen as i32) } != 0 {
        return None;
    }
    let m = macs;
    let et = inner_et.to_be_bytes();
    if l2.vlan {
        let e = ptr_at::<[u8; 18]>(ctx, 0)?;
        let tag = ETH_P_8021Q.to_be_bytes();
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *e = [
                m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11], tag[0],
                tag[1], tci[0], tci[1], et[0], et[1],
            ];
        }
    } else {
        let e = ptr_at::<[u8; 14]>(ctx, 0)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            *e = [
                m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11], et[0],
                et[1],
            ];
        }
    }
    Some(())
}
