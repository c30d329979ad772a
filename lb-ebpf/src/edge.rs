//! Edge protection: source block list, allow list and per-source SYN token buckets.
//!
//! Only two places call into this module, both after the VIP lookup (traffic to anything but a
//! configured VIP:port never touches these maps, blocked source or not):
//!
//! - [`check_syn`] for every SYN (SYN set, ACK clear) to a VIP: allow list → pass; block list →
//!   `drop_blocked`; otherwise one token from the source's bucket, or `drop_rate_limited`.
//! - [`blocked`] for a non-SYN TCP packet that found no conntrack entry (it would create a flow
//!   from the ring): a blocked source cannot open flows with bare ACKs either.
//!
//! An established flow (conntrack hit) is never checked: its fast path stays exactly as before,
//! and blocking a source stops its *new* connections while sessions already running finish
//! (a mail transaction in flight is not cut in half). ICMP errors are never checked (they come
//! from routers on the path, not from the client).
//!
//! The bucket is shared by the CPUs (a plain LRU hash, not per-CPU, so the limit is per source
//! and not per source and CPU); its read-modify-write is not atomic, so two SYNs of one source
//! on two CPUs at the same instant may both take the last token. That error is at most one SYN
//! per CPU per race and does not accumulate.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Reason, SYN_IDLE_FULL_NS, SynBucket, TOKEN_SCALE};

use crate::{
    maps::{ALLOW, BLOCK, EDGE_CONFIG, GROUPS, SYN_BUCKETS},
    parse::{Key, Verdict},
};

/// An LPM lookup key (`bpf_lpm_trie_key` + 16 bytes) held as aligned words: prefix length 128,
/// then the address words (see `parse::Key` for why words).
#[repr(C, align(8))]
struct LpmWords([u32; 5]);

impl LpmWords {
    #[inline(always)]
    fn host(a: [u32; 4]) -> Self {
        Self([128, a[0], a[1], a[2], a[3]])
    }

    #[inline(always)]
    fn key(&self) -> &aya_ebpf::maps::lpm_trie::Key<[u32; 4]> {
        // SAFETY: Key<[u32; 4]> is packed (alignment 1), 20 bytes: u32 then 16 bytes, exactly
        // these words.
        unsafe { &*(self as *const LpmWords as *const aya_ebpf::maps::lpm_trie::Key<[u32; 4]>) }
    }
}

/// The client address of `key` (words 0..4).
#[inline(always)]
fn src(key: &Key) -> [u32; 4] {
    [key.0[0], key.0[1], key.0[2], key.0[3]]
}

/// The minimum VIP capacity (percent) the source's client group needs to be served (0 when it
/// is in no group).
#[inline(always)]
pub fn group_min_capacity(key: &Key) -> u32 {
    let k = LpmWords::host(src(key));
    GROUPS.get(k.key()).copied().unwrap_or(0)
}

/// Whether the source of `key` is in the block list and not in the allow list.
#[inline(always)]
pub fn blocked(key: &Key) -> bool {
    let k = LpmWords::host(src(key));
    BLOCK.get(k.key()).is_some() && ALLOW.get(k.key()).is_none()
}

/// Admission of a SYN from the source of `key` (`v6`: the packet is IPv6, so the bucket is
/// the source's /64).
#[inline(always)]
pub fn check_syn(key: &Key, v6: bool) -> Result<(), Verdict> {
    let a = src(key);
    let k = LpmWords::host(a);
    let is_blocked = BLOCK.get(k.key()).is_some();
    let (rate, burst) = match EDGE_CONFIG.get_ptr(0) {
        // SAFETY: pointer from a successful map lookup.
        Some(c) => unsafe { ((*c).syn_rate as u64, (*c).syn_burst as u64) },
        None => (0, 0),
    };
    let limit = rate != 0 && burst != 0;
    if !is_blocked && !limit {
        return Ok(());
    }
    if ALLOW.get(k.key()).is_some() {
        return Ok(());
    }
    if is_blocked {
        return Err(Verdict::drop(Reason::DropBlocked));
    }
    take_token(if v6 { [a[0], a[1], 0, 0] } else { a }, rate, burst)
}

/// Takes one token from bucket `who`, refilled at `rate`/s up to `burst`.
#[inline(always)]
fn take_token(who: [u32; 4], rate: u64, burst: u64) -> Result<(), Verdict> {
    let now = unsafe { bpf_ktime_get_ns() };
    let full = burst * TOKEN_SCALE;
    match SYN_BUCKETS.get_ptr_mut(&who) {
        Some(b) => {
            // SAFETY: pointer from a successful map lookup (see the module docs on races).
            let (tokens, last) = unsafe { ((*b).tokens, (*b).last_ns) };
            let elapsed = now.wrapping_sub(last);
            let mut credit = if elapsed >= SYN_IDLE_FULL_NS {
                // Also a timestamp in the future (wrapped): treat as idle, not as an overflow.
                full
            } else {
                tokens + elapsed * rate
            };
            if credit > full {
                credit = full;
            }
            let ok = credit >= TOKEN_SCALE;
            if ok {
                credit -= TOKEN_SCALE;
            }
            // SAFETY: as above.
            unsafe {
                (*b).tokens = credit;
                (*b).last_ns = now;
            }
            if ok {
                Ok(())
            } else {
                Err(Verdict::drop(Reason::DropRateLimited))
            }
        }
        None => {
            // First SYN seen from this source: a full bucket minus this SYN. A failed insert
            // only forgets the source (it is admitted).
            let b = SynBucket {
                tokens: full - TOKEN_SCALE,
                last_ns: now,
            };
            let _ = SYN_BUCKETS.insert(&who, &b, 0);
            Ok(())
        }
    }
}
