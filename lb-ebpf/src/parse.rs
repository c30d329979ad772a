//! Header parsing for the balancer and the decapsulator.
//!
//! Everything reads the packet through [`ptr_at`], the one bounds-checked accessor; offsets are
//! always bounded (Ethernet 14/18, IHL ≤ 60, fixed IPv6/TCP/ICMP sizes), which is what lets the
//! verifier follow them.

use core::mem;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FlowKey, Reason, VipKey};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::maps::{VIPS, maybe_vip};

/// Ethernet header length (no tag).
pub const ETH_LEN: usize = 14;
/// One 802.1Q tag.
pub const VLAN_LEN: usize = 4;
/// IPv4 header without options.
pub const IPV4_LEN: usize = 20;
/// IPv6 fixed header.
pub const IPV6_LEN: usize = 40;
/// TCP header without options.
pub const TCP_LEN: usize = 20;
/// ICMP / ICMPv6 header (type, code, checksum, 4 bytes of rest-of-header).
pub const ICMP_LEN: usize = 8;

/// EtherType IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;

/// IP protocol numbers used here.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What to do with a packet and why.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub reason: Reason,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(reason: Reason) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            reason,
        }
    }
    #[inline(always)]
    pub const fn drop(reason: Reason) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            reason,
        }
    }
}

/// Parsing result: either the value or the verdict that ends processing.
pub type Res<T> = Result<T, Verdict>;

/// `ctx->data` / `ctx->data_end`, loaded with volatile reads.
///
/// Volatile on purpose: LLVM otherwise combines scalar length checks (`l3 + tot_len <=
/// data_end - data`) with later pointer checks and drops the latter as redundant, and the
/// verifier, which only trusts `pkt + off <= pkt_end` comparisons, rejects the access.
#[inline(always)]
fn bounds(ctx: &XdpContext) -> (usize, usize) {
    // SAFETY: ctx.ctx points to the program's xdp_md.
    unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    }
}

/// The single bounds-checked accessor: a pointer to a `T` at `offset` bytes into the frame, or
/// `None` if the frame is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = bounds(ctx);
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads `N` bytes at `offset`, or fails with `pass_malformed`.
#[inline(always)]
pub fn read<const N: usize>(ctx: &XdpContext, offset: usize) -> Res<[u8; N]> {
    match ptr_at::<[u8; N]>(ctx, offset) {
        // SAFETY: bounds checked by ptr_at; [u8; N] has alignment 1.
        Some(p) => Ok(unsafe { *p }),
        None => Err(Verdict::pass(Reason::PassMalformed)),
    }
}

/// Frame length (what the byte counters count).
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    let (start, end) = bounds(ctx);
    end - start
}

/// Layer 2: where the IP header starts and what it is.
#[derive(Clone, Copy)]
pub struct L2 {
    /// Offset of the L3 header: 14, or 18 with a VLAN tag.
    pub l3: usize,
    /// EtherType of the L3 header (host order).
    pub proto: u16,
    /// The frame carries one 802.1Q tag (kept on rewrite).
    pub vlan: bool,
}

/// Parses Ethernet and at most one 802.1Q tag.
#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Res<L2> {
    let et = u16::from_be_bytes(read::<2>(ctx, 12)?);
    if et == ETH_P_8021Q {
        let inner = u16::from_be_bytes(read::<2>(ctx, ETH_LEN + 2)?);
        Ok(L2 {
            l3: ETH_LEN + VLAN_LEN,
            proto: inner,
            vlan: true,
        })
    } else {
        Ok(L2 {
            l3: ETH_LEN,
            proto: et,
            vlan: false,
        })
    }
}

/// A [`FlowKey`] held as its ten 32-bit words in memory order, 8-byte aligned.
///
/// Why words: the packet and the header structs have alignment 1, so a `FlowKey` assembled
/// from byte arrays is built, copied and hashed one byte at a time (plus `memset` calls for
/// the IPv4-mapped zeros), several dozen BPF instructions per packet. Words 0..4 are the client
/// address, 4..8 the VIP address, 8 is `sport | dport << 16` (both still in network order, as
/// they sit in the packet), 9 the protocol (padding zero).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Key(pub [u32; 10]);

impl Key {
    /// The key as the map type.
    #[inline(always)]
    pub fn flow_key(&self) -> &FlowKey {
        // SAFETY: same size (40 bytes), stricter alignment; FlowKey is plain integers.
        unsafe { &*(self as *const Key as *const FlowKey) }
    }

    /// The VIP (destination) address.
    #[inline(always)]
    pub fn dst(&self) -> [u32; 4] {
        [self.0[4], self.0[5], self.0[6], self.0[7]]
    }

    /// The destination port in memory order (`FlowKey::dport`), as the low half of a word.
    #[inline(always)]
    pub fn dport(&self) -> u32 {
        self.0[8] >> 16
    }
}

/// A [`VipKey`] held as five 32-bit words (see [`Key`] for why): the address, then
/// `port | proto << 16` (padding zero).
#[repr(C, align(8))]
pub struct VipKeyWords([u32; 5]);

impl VipKeyWords {
    /// TCP `port` (memory order, low half) on `addr`; port 0 is the address-level marker.
    #[inline(always)]
    pub fn tcp(addr: [u32; 4], port: u32) -> Self {
        Self([
            addr[0],
            addr[1],
            addr[2],
            addr[3],
            port | (IPPROTO_TCP as u32) << 16,
        ])
    }

    /// Same address, port and protocol (word by word; the padding is zero in both).
    #[inline(always)]
    pub fn same_as(&self, other: &VipKeyWords) -> bool {
        let (a, b) = (&self.0, &other.0);
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
    }

    /// The key as the map type.
    #[inline(always)]
    pub fn vip_key(&self) -> &VipKey {
        // SAFETY: VipKey is the first 20 of these 24 bytes, plain integers, alignment 2 ≤ 8.
        unsafe { &*(self as *const VipKeyWords as *const VipKey) }
    }
}

/// Word 2 of an IPv4-mapped address (`00 00 ff ff`) in memory order.
pub const MAPPED_W2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4-mapped form of an IPv4 address (the map encoding), as words.
#[inline(always)]
pub fn v4_mapped(a: [u8; 4]) -> [u32; 4] {
    [0, 0, MAPPED_W2, u32::from_ne_bytes(a)]
}

/// A 16-byte address as words in memory order.
#[inline(always)]
pub fn addr_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Whether `addr` carries the address-level VIP marker (`port 0, proto 6`).
#[inline(always)]
pub fn is_vip_addr(addr: [u32; 4]) -> bool {
    maybe_vip(addr) && VIPS.get_ptr(VipKeyWords::tcp(addr, 0).vip_key()).is_some()
}

/// A TCP packet (or an ICMP error quoting one) that may belong to a VIP.
pub struct Pkt {
    /// Client → VIP direction of the flow (reversed from the quoted header for ICMP errors).
    pub key: Key,
    /// TCP flags (0 for ICMP errors).
    pub tcp_flags: u8,
    /// An ICMP error about the flow rather than a segment of it.
    pub icmp: bool,
    /// The packet's IP family is IPv6.
    pub v6: bool,
    /// Length of the whole IP packet (from its header), what an outer header must carry.
    pub ip_len: u16,
    /// DSCP/ECN byte (IPv4 TOS, IPv6 traffic class), copied to an outer header.
    pub tos: u8,
}

/// Flow key from the first four bytes of a TCP header (`ports`), reversed for ICMP quotes.
#[inline(always)]
fn flow_key(src: [u32; 4], dst: [u32; 4], ports: [u8; 4], reversed: bool) -> Key {
    let ports = u32::from_ne_bytes(ports);
    Key([
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        // Memory order: the halves are (sport, dport); a quoted header has them swapped.
        if reversed {
            ports.rotate_left(16)
        } else {
            ports
        },
        IPPROTO_TCP as u32,
    ])
}

/// Parses an IPv4 packet at `l3` up to the flow key.
#[inline(always)]
pub fn parse_v4(ctx: &XdpContext, l3: usize) -> Res<Pkt> {
    let malformed = Verdict::pass(Reason::PassMalformed);
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(malformed)?;
    // SAFETY (all dereferences below): pointers come from ptr_at, which checked the bounds;
    // the header structs are byte arrays (alignment 1).
    let vihl = unsafe { (*ip).vihl };
    if vihl >> 4 != 4 {
        return Err(malformed);
    }
    let hlen = ((vihl & 0x0f) as usize) * 4;
    if hlen < IPV4_LEN {
        return Err(malformed);
    }
    let tot = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    if tot < hlen || l3 + tot > frame_len(ctx) {
        return Err(malformed);
    }
    let dst = v4_mapped(unsafe { (*ip).dst_addr });
    if u16::from_be_bytes(unsafe { (*ip).frags }) & 0x3fff != 0 {
        return Err(fragment(dst));
    }
    let src = v4_mapped(unsafe { (*ip).src_addr });
    let tos = unsafe { (*ip).tos };
    let l4 = l3 + hlen;
    match unsafe { (*ip).proto } {
        IPPROTO_TCP => {
            if tot < hlen + TCP_LEN {
                return Err(malformed);
            }
            let t: *const [u8; TCP_LEN] = ptr_at(ctx, l4).ok_or(malformed)?;
            let (ports, flags) = unsafe { ([(*t)[0], (*t)[1], (*t)[2], (*t)[3]], (*t)[13]) };
            Ok(Pkt {
                key: flow_key(src, dst, ports, false),
                tcp_flags: flags,
                icmp: false,
                v6: false,
                ip_len: tot as u16,
                tos,
            })
        }
        IPPROTO_ICMP => {
            let icmp: *const [u8; ICMP_LEN] = ptr_at(ctx, l4).ok_or(malformed)?;
            if unsafe { (*icmp)[0] } != 3 {
                return Err(Verdict::pass(Reason::PassNonVip));
            }
            let inner: *const Ipv4Hdr = ptr_at(ctx, l4 + ICMP_LEN).ok_or(malformed)?;
            let ivihl = unsafe { (*inner).vihl };
            let ihl = ((ivihl & 0x0f) as usize) * 4;
            if ivihl >> 4 != 4 || ihl < IPV4_LEN {
                return Err(malformed);
            }
            if unsafe { (*inner).proto } != IPPROTO_TCP {
                return Err(Verdict::pass(Reason::PassNonVip));
            }
            let p: *const [u8; 4] = ptr_at(ctx, l4 + ICMP_LEN + ihl).ok_or(malformed)?;
            // The quoted packet went VIP → client: reverse it to get the client → VIP flow.
            let vip = v4_mapped(unsafe { (*inner).src_addr });
            let client = v4_mapped(unsafe { (*inner).dst_addr });
            Ok(Pkt {
                key: flow_key(client, vip, unsafe { *p }, true),
                tcp_flags: 0,
                icmp: true,
                v6: false,
                ip_len: tot as u16,
                tos,
            })
        }
        _ => Err(Verdict::pass(Reason::PassNonVip)),
    }
}

/// Parses an IPv6 packet at `l3` up to the flow key.
#[inline(always)]
pub fn parse_v6(ctx: &XdpContext, l3: usize) -> Res<Pkt> {
    let malformed = Verdict::pass(Reason::PassMalformed);
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(malformed)?;
    // SAFETY (all dereferences below): pointers come from ptr_at, which checked the bounds;
    // the header structs are byte arrays (alignment 1).
    let vcf = unsafe { (*ip).vcf };
    if vcf[0] >> 4 != 6 {
        return Err(malformed);
    }
    let plen = u16::from_be_bytes(unsafe { (*ip).payload_len }) as usize;
    if l3 + IPV6_LEN + plen > frame_len(ctx) {
        return Err(malformed);
    }
    let tos = (vcf[0] << 4) | (vcf[1] >> 4);
    let l4 = l3 + IPV6_LEN;
    match unsafe { (*ip).next_hdr } {
        IPPROTO_TCP => {
            if plen < TCP_LEN {
                return Err(malformed);
            }
            let t: *const [u8; TCP_LEN] = ptr_at(ctx, l4).ok_or(malformed)?;
            let (ports, flags) = unsafe { ([(*t)[0], (*t)[1], (*t)[2], (*t)[3]], (*t)[13]) };
            let (src, dst) = unsafe { (addr_words(&(*ip).src_addr), addr_words(&(*ip).dst_addr)) };
            Ok(Pkt {
                key: flow_key(src, dst, ports, false),
                tcp_flags: flags,
                icmp: false,
                v6: true,
                ip_len: (IPV6_LEN + plen) as u16,
                tos,
            })
        }
        IPPROTO_ICMPV6 => {
            let icmp: *const [u8; ICMP_LEN] = ptr_at(ctx, l4).ok_or(malformed)?;
            let ty = unsafe { (*icmp)[0] };
            if ty != 1 && ty != 2 {
                return Err(Verdict::pass(Reason::PassNonVip));
            }
            let inner: *const Ipv6Hdr = ptr_at(ctx, l4 + ICMP_LEN).ok_or(malformed)?;
            if unsafe { (*inner).vcf[0] } >> 4 != 6 {
                return Err(malformed);
            }
            if unsafe { (*inner).next_hdr } != IPPROTO_TCP {
                return Err(Verdict::pass(Reason::PassNonVip));
            }
            let p: *const [u8; 4] = ptr_at(ctx, l4 + ICMP_LEN + IPV6_LEN).ok_or(malformed)?;
            // The quoted packet went VIP → client: reverse it to get the client → VIP flow.
            let (vip, client) = unsafe {
                (
                    addr_words(&(*inner).src_addr),
                    addr_words(&(*inner).dst_addr),
                )
            };
            Ok(Pkt {
                key: flow_key(client, vip, unsafe { *p }, true),
                tcp_flags: 0,
                icmp: true,
                v6: true,
                ip_len: (IPV6_LEN + plen) as u16,
                tos,
            })
        }
        IPPROTO_FRAGMENT => Err(fragment(addr_words(unsafe { &(*ip).dst_addr }))),
        nh if is_ipv6_ext(nh) => Err(if is_vip_addr(addr_words(unsafe { &(*ip).dst_addr })) {
            Verdict::pass(Reason::PassIpv6Ext)
        } else {
            Verdict::pass(Reason::PassNonVip)
        }),
        _ => Err(Verdict::pass(Reason::PassNonVip)),
    }
}

/// Verdict for a fragment sent to `dst`.
#[inline(always)]
fn fragment(dst: [u32; 4]) -> Verdict {
    if is_vip_addr(dst) {
        Verdict::drop(Reason::DropFragment)
    } else {
        Verdict::pass(Reason::PassNonVip)
    }
}

/// IPv6 extension headers other than Fragment (RFC 8200 §4 and the IANA registry).
#[inline(always)]
fn is_ipv6_ext(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}
