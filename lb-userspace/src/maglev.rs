//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016, with the weighted fill order
//! Katran uses).
//!
//! A table is a pure function of the back-end set (address and weight), independent of the
//! order back-ends were configured or of local ids: that is what lets every LB node build the
//! same table and keep sessions through a VRRP failover without syncing state
//! (architecture principle 3). Back-ends are identified in the permutation by their address;
//! the slot values are this node's local back-end ids.

use std::net::IpAddr;

use xxhash_rust::xxh64::xxh64;

/// A back-end as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Local id written into the table (never 0; 0 means "no back-end").
    pub id: u32,
    /// Stable identity used for the permutation (same on every node).
    pub address: IpAddr,
    /// Relative weight; 0 takes no slots.
    pub weight: u32,
}

/// Builds a table of `size` slots (`size` must be prime). With no member of positive weight
/// every slot is 0, which the data path treats as "no back-end".
pub fn build(members: &[Member], size: u32) -> Vec<u32> {
    let m = size as u64;
    let mut live: Vec<(Member, u64, u64)> = members
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| {
            let key = lb_common::addr_to_key(b.address);
            // Two independent hashes (fixed seeds: the table must not vary between nodes or
            // releases) give each back-end its own permutation of the slots.
            let offset = xxh64(&key, 0x6d78_6c62_0001) % m;
            let skip = xxh64(&key, 0x6d78_6c62_0002) % (m - 1) + 1;
            (*b, offset, skip)
        })
        .collect();
    let mut table = vec![0u32; size as usize];
    if live.is_empty() {
        return table;
    }
    live.sort_by_key(|(b, _, _)| lb_common::addr_to_key(b.address));
    let max_weight = live.iter().map(|(b, _, _)| b.weight as u64).max().unwrap_or(1);
    let mut next = vec![0u64; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0u64;
    // Each round every back-end earns `weight` credit and claims one slot per `max_weight`
    // of credit, so slot counts end up proportional to weights.
    loop {
        for (i, (b, offset, skip)) in live.iter().enumerate() {
            credit[i] += b.weight as u64;
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let mut slot = (offset + next[i] * skip) % m;
            while table[slot as usize] != 0 {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            table[slot as usize] = b.id;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::RING_SIZE;
    use std::collections::HashMap;

    fn members(n: u32, weight: impl Fn(u32) -> u32) -> Vec<Member> {
        (1..=n)
            .map(|i| Member {
                id: i,
                address: IpAddr::from([198, 18, (i >> 8) as u8, i as u8]),
                weight: weight(i),
            })
            .collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_default() += 1;
        }
        c
    }

    /// Every back-end's share of slots is within 2% (relative) of its share of the weight.
    fn assert_distribution(ms: &[Member]) {
        let table = build(ms, RING_SIZE);
        let c = counts(&table);
        let total_w: u64 = ms.iter().map(|m| m.weight as u64).sum();
        for m in ms {
            let expected = RING_SIZE as f64 * m.weight as f64 / total_w as f64;
            let got = *c.get(&m.id).unwrap_or(&0) as f64;
            let err = (got - expected).abs() / expected;
            assert!(err <= 0.02, "{} back-ends: id {} weight {} got {got} expected {expected:.0}", ms.len(), m.id, m.weight);
        }
        assert!(!c.contains_key(&0), "every slot is filled");
    }

    #[test]
    fn equal_weights_spread_evenly_for_1_to_64_backends() {
        for n in 1..=64 {
            assert_distribution(&members(n, |_| 100));
        }
    }

    #[test]
    fn unequal_weights_follow_the_weights_for_1_to_64_backends() {
        for n in 1..=64 {
            assert_distribution(&members(n, |i| 10 + (i * 37) % 200));
        }
    }

    #[test]
    fn same_input_same_table_whatever_the_order_or_ids() {
        let a = members(10, |i| i * 10);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(build(&a, RING_SIZE), build(&b, RING_SIZE));
        assert_eq!(build(&a, RING_SIZE), build(&a, RING_SIZE));
        // Another node may number its back-ends differently: the table maps slots to the same
        // addresses.
        let renumbered: Vec<Member> = a.iter().map(|m| Member { id: m.id + 100, ..*m }).collect();
        let t1 = build(&a, RING_SIZE);
        let t2 = build(&renumbered, RING_SIZE);
        assert!(t1.iter().zip(&t2).all(|(x, y)| x + 100 == *y));
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        for n in [3u32, 5, 10, 32, 64] {
            let all = members(n, |_| 100);
            let before = build(&all, RING_SIZE);
            let removed = n / 2 + 1;
            let rest: Vec<Member> = all.iter().copied().filter(|m| m.id != removed).collect();
            let after = build(&rest, RING_SIZE);
            let moved_others = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != removed && b != a)
                .count();
            // Slots of the removed back-end must move; Maglev keeps almost all others.
            assert!(
                (moved_others as f64) < 0.03 * RING_SIZE as f64,
                "{n} back-ends: {moved_others} slots of surviving back-ends moved"
            );
            // Adding it back restores the original table exactly.
            assert_eq!(build(&all, RING_SIZE), before);
        }
    }

    #[test]
    fn adding_one_backend_takes_slots_mostly_from_others_fairly() {
        for n in [2u32, 4, 16] {
            let before = build(&members(n, |_| 100), RING_SIZE);
            let after = build(&members(n + 1, |_| 100), RING_SIZE);
            let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let ideal = RING_SIZE as f64 / (n + 1) as f64;
            assert!((changed as f64) < ideal * 1.1, "{n}+1: {changed} changed, ideal {ideal:.0}");
        }
    }

    #[test]
    fn zero_weight_takes_no_slots_and_empty_set_is_all_zero() {
        let ms = members(3, |i| if i == 2 { 0 } else { 100 });
        assert!(!build(&ms, RING_SIZE).contains(&2));
        assert!(build(&[], RING_SIZE).iter().all(|&x| x == 0));
        assert!(build(&members(2, |_| 0), RING_SIZE).iter().all(|&x| x == 0));
    }
}
