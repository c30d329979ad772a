//! dsr-ipip: prepend an outer IPv4 or IPv6 header addressed to the back-end.
//!
//! The outer family is the back-end's address family (IPv4-mapped → IPv4), independent of the
//! inner one: 4in4 and 6in4 use IP protocol 4/41 in an IPv4 header, 4in6 and 6in6 next header
//! 4/41 in an IPv6 header. Outer IPv4: TTL 64, DF, id 0, checksum computed. Outer IPv6: hop
//! limit 64, flow label from the flow hash (so ECMP on the way keeps a flow on one path). The
//! inner DSCP/ECN byte is copied to the outer header. A VLAN tag on the frame is kept.
//!
//! The next hop comes from `bpf_fib_lookup` on the ingress interface: on success its MACs are
//! used and the frame leaves by XDP_TX (same interface) or `bpf_redirect`. Without a route or
//! neighbour entry the back-end's configured MAC is used as next hop (XDP_TX); without that the
//! packet is dropped (`drop_no_route`). All decisions are taken before the frame is grown.

use core::mem;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{Backend, Reason};

use crate::{
    maps::{BACKENDS, CONFIG},
    parse::{
        ETH_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_LEN, IPV6_LEN,
        MAPPED_W2, VLAN_LEN, Verdict, ptr_at,
    },
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// TTL / hop limit of the outer header.
const OUTER_TTL: u8 = 64;

/// What [`ipip`] needs from the parser and the back-end choice.
pub struct Job {
    /// The frame has a VLAN tag (kept); the IP header is at 18 instead of 14.
    pub vlan: bool,
    /// Inner family is IPv6.
    pub v6: bool,
    /// Inner DSCP/ECN.
    pub tos: u8,
    /// Length of the inner IP packet.
    pub ip_len: u16,
    /// Flow hash: the IPv6 outer flow label (may be 0 for an IPv4 outer header: not computed).
    pub hash: u32,
    /// Chosen back-end id (looked up again here: map memory is word-aligned, so addresses are
    /// handled as four `u32` words instead of sixteen spilled bytes).
    pub backend: u32,
}

/// Encapsulates the frame for `job.backend` and stores the verdict (XDP_TX / XDP_REDIRECT, or
/// a drop with its reason) in `out`.
///
/// Not inlined: a BPF-to-BPF call keeps this frame (fib parameters) apart from the parser's
/// (the verdict goes through `out` because BPF calls take at most five register arguments).
#[inline(never)]
pub fn ipip(ctx: &XdpContext, job: &Job, out: &mut Verdict) {
    *out = ipip_inner(ctx, job);
}

/// Whether the back-end's address is IPv4(-mapped), i.e. the outer header is IPv4.
#[inline(always)]
pub fn outer_v4(be: *const Backend) -> bool {
    // SAFETY: `be` points to a map value (8-byte aligned) and Backend.addr is at offset 0.
    let dst = unsafe { &*(be as *const [u32; 4]) };
    dst[0] == 0 && dst[1] == 0 && dst[2] == MAPPED_W2
}

#[inline(always)]
fn ipip_inner(ctx: &XdpContext, job: &Job) -> Verdict {
    let Some(be) = BACKENDS.get_ptr(job.backend) else {
        return Verdict::drop(Reason::DropNoBackend);
    };
    let Some(cfg) = CONFIG.get_ptr(0) else {
        return Verdict::drop(Reason::DropEncap);
    };
    // SAFETY: map values are 8-byte aligned; Backend.addr is at offset 0, LbConfig.src_v4 at 0
    // and src_v6 at 4, so all of these are aligned u32 words inside the values.
    let (dst, src) = unsafe { (&*(be as *const [u32; 4]), &*(cfg as *const [u32; 5])) };
    let outer_v4 = dst[0] == 0 && dst[1] == 0 && dst[2] == MAPPED_W2;
    if (outer_v4 && src[0] == 0) || (!outer_v4 && (src[1] | src[2] | src[3] | src[4]) == 0) {
        return Verdict::drop(Reason::DropEncap);
    }
    let inner_proto = if job.v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
    let hlen = if outer_v4 { IPV4_LEN } else { IPV6_LEN };

    // Next hop, before touching the frame.
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: plain-old-data bindgen struct; all-zero is a valid value.
    let mut fib: FibParams = unsafe { mem::zeroed() };
    fib.ifindex = ingress;
    fib.l4_protocol = inner_proto;
    fib.__bindgen_anon_1.tot_len = job.ip_len + hlen as u16;
    if outer_v4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = src[0];
        fib.__bindgen_anon_4.ipv4_dst = dst[3];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = [src[1], src[2], src[3], src[4]];
        fib.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: helper call with a valid context and a stack buffer of the right size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    // SAFETY: Backend.mac follows the 16-byte address in map memory.
    let be_mac = unsafe { (*be).mac };
    let (fib_ok, egress) = if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        (true, fib.ifindex)
    } else if be_mac != [0u8; 6] {
        (false, ingress)
    } else {
        return Verdict::drop(Reason::DropNoRoute);
    };

    // The old Ethernet header: its destination is our own MAC; keep the VLAN TCI.
    let Some(old) = ptr_at::<[u8; 16]>(ctx, 0) else {
        return Verdict::pass(Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at (a frame that reached here has an IP header after it).
    let (own_hi, own_lo, tci) = unsafe {
        let p = old as *const u8;
        (
            (p as *const u32).read_unaligned(),
            (p.add(4) as *const u16).read_unaligned(),
            (p.add(14) as *const u16).read_unaligned(),
        )
    };

    // SAFETY: helper call with a valid context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(hlen as i32)) } != 0 {
        return Verdict::drop(Reason::DropEncap);
    }
    let Some(e) = ptr_at::<[u8; 18]>(ctx, 0) else {
        return Verdict::drop(Reason::DropEncap);
    };
    let e = e as *mut u8;
    // SAFETY: 18 bytes checked by ptr_at (the grown frame holds at least hlen + 14 + 20).
    unsafe {
        if fib_ok {
            *(e as *mut [u8; 6]) = fib.dmac;
            *(e.add(6) as *mut [u8; 6]) = fib.smac;
        } else {
            *(e as *mut [u8; 6]) = be_mac;
            (e.add(6) as *mut u32).write_unaligned(own_hi);
            (e.add(10) as *mut u16).write_unaligned(own_lo);
        }
        let ethertype = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 };
        if job.vlan {
            (e.add(12) as *mut u16).write_unaligned(ETH_P_8021Q.to_be());
            (e.add(14) as *mut u16).write_unaligned(tci);
            (e.add(16) as *mut u16).write_unaligned(ethertype.to_be());
        } else {
            (e.add(12) as *mut u16).write_unaligned(ethertype.to_be());
        }
    }

    // A constant per branch (not a value read back from the caller's stack) keeps the
    // verifier's packet range exact.
    let l3 = if job.vlan {
        ETH_LEN + VLAN_LEN
    } else {
        ETH_LEN
    };
    let ok = if outer_v4 {
        write_v4(ctx, l3, job, inner_proto, src[0], dst[3])
    } else {
        write_v6(
            ctx,
            l3,
            job,
            inner_proto,
            &[src[1], src[2], src[3], src[4]],
            dst,
        )
    };
    if !ok {
        return Verdict::drop(Reason::DropEncap);
    }

    if egress == ingress {
        Verdict {
            action: xdp_action::XDP_TX,
            reason: Reason::Forwarded,
        }
    } else {
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(egress, 0) } as u32;
        Verdict {
            action,
            reason: Reason::Forwarded,
        }
    }
}

/// Adds the two 16-bit halves of a memory-order address word to a checksum sum.
#[inline(always)]
fn sum_word(w: u32) -> u32 {
    let b = w.to_ne_bytes();
    u16::from_be_bytes([b[0], b[1]]) as u32 + u16::from_be_bytes([b[2], b[3]]) as u32
}

/// Writes the outer IPv4 header at `off` (the frame has been grown already). `s`/`d` are the
/// addresses in memory (network) order.
#[inline(always)]
fn write_v4(ctx: &XdpContext, off: usize, job: &Job, proto: u8, s: u32, d: u32) -> bool {
    let Some(h) = ptr_at::<[u8; IPV4_LEN]>(ctx, off) else {
        return false;
    };
    let tot = job.ip_len + IPV4_LEN as u16;
    // One's-complement sum of the ten header words (checksum word zero, id zero).
    let mut sum: u32 = 0x4500 + job.tos as u32; // version/IHL, TOS
    sum += tot as u32;
    sum += 0x4000; // flags DF, offset 0
    sum += ((OUTER_TTL as u32) << 8) | proto as u32;
    sum += sum_word(s) + sum_word(d);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = !(sum as u16);
    let h = h as *mut u8;
    // SAFETY: 20 bytes checked by ptr_at.
    unsafe {
        *h = 0x45;
        *h.add(1) = job.tos;
        (h.add(2) as *mut u16).write_unaligned(tot.to_be());
        (h.add(4) as *mut u32).write_unaligned(u32::from_ne_bytes([0, 0, 0x40, 0])); // id 0, DF
        *h.add(8) = OUTER_TTL;
        *h.add(9) = proto;
        (h.add(10) as *mut u16).write_unaligned(check.to_be());
        (h.add(12) as *mut u32).write_unaligned(s);
        (h.add(16) as *mut u32).write_unaligned(d);
    }
    true
}

/// Writes the outer IPv6 header at `off` (the frame has been grown already).
#[inline(always)]
fn write_v6(
    ctx: &XdpContext,
    off: usize,
    job: &Job,
    proto: u8,
    s: &[u32; 4],
    d: &[u32; 4],
) -> bool {
    let Some(h) = ptr_at::<[u8; IPV6_LEN]>(ctx, off) else {
        return false;
    };
    let vcf = (6u32 << 28) | ((job.tos as u32) << 20) | (job.hash & 0x000f_ffff);
    let h = h as *mut u8;
    // SAFETY: 40 bytes checked by ptr_at.
    unsafe {
        (h as *mut u32).write_unaligned(vcf.to_be());
        (h.add(4) as *mut u16).write_unaligned(job.ip_len.to_be());
        *h.add(6) = proto;
        *h.add(7) = OUTER_TTL;
        let mut i = 0;
        while i < 4 {
            (h.add(8 + 4 * i) as *mut u32).write_unaligned(s[i]);
            (h.add(24 + 4 * i) as *mut u32).write_unaligned(d[i]);
            i += 1;
        }
    }
    true
}
