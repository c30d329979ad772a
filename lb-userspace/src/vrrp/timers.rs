//! RFC 5798 §6.1 timers, in centiseconds as on the wire (the advertisement interval is 12 bits
//! of centiseconds, at most 40.95 s).
use std::time::Duration;

/// Largest advertisement interval the 12-bit field holds.
pub const MAX_ADVER_CS: u16 = 4095;

/// Skew_Time = ((256 − Priority) × Master_Adver_Interval) / 256.
pub fn skew_time(priority: u8, master_adver_cs: u16) -> Duration {
    Duration::from_micros((256 - priority as u64) * master_adver_cs as u64 * 10_000 / 256)
}

/// Master_Down_Interval = 3 × Master_Adver_Interval + Skew_Time.
pub fn master_down_interval(priority: u8, master_adver_cs: u16) -> Duration {
    Duration::from_millis(3 * master_adver_cs as u64 * 10) + skew_time(priority, master_adver_cs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_rfc_and_keepalived_measurements() {
        // vrrp-reference.md: backup priority 100, advert 1 s → takeover 3.610 s after the last
        // advert of a crashed master; graceful (priority 0 advert) → Skew_Time 0.610 s.
        assert_eq!(skew_time(100, 100), Duration::from_micros(609_375));
        assert_eq!(master_down_interval(100, 100), Duration::from_micros(3_609_375));
        // advert 0.1 s → 0.361 s / 0.061 s.
        assert_eq!(master_down_interval(100, 10), Duration::from_micros(360_937));
        assert_eq!(skew_time(100, 10), Duration::from_micros(60_937));
        // The address owner (255) has the smallest skew; priority 1 the largest.
        assert!(skew_time(255, 100) < skew_time(1, 100));
    }
}
