//! The token bucket that caps how many datagrams the relay sends: one packet becomes one
//! copy per member host, so a storm from one container must not flood the underlay.

use std::time::{Duration, Instant};

/// A token bucket refilled at `rate` tokens per second up to `burst`; time is passed in. A
/// rate of 0 means no limit (as for `--icmp-rate-limit`).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    /// Tokens, in millionths, so that slow refills are not lost to rounding.
    micro_tokens: u64,
    last: Instant,
}

const MICRO: u64 = 1_000_000;

impl TokenBucket {
    /// A full bucket of `rate` tokens per second and a burst of a tenth of that (at least one);
    /// `rate` 0: no limit.
    pub fn new(rate: u32, now: Instant) -> Self {
        let burst = (rate / 10).max(1);
        Self {
            rate,
            burst,
            micro_tokens: u64::from(burst) * MICRO,
            last: now,
        }
    }

    /// The most tokens the bucket holds.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Take `n` tokens if the bucket holds them at `now`; otherwise take none.
    pub fn take(&mut self, n: u32, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now);
        let want = u64::from(n) * MICRO;
        if want <= self.micro_tokens {
            self.micro_tokens -= want;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.last)
            .min(Duration::from_secs(60));
        self.last = self.last.max(now);
        let added = elapsed.as_micros() as u64 * u64::from(self.rate);
        self.micro_tokens = (self.micro_tokens + added).min(u64::from(self.burst) * MICRO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, start);
        assert_eq!(bucket.burst(), 10);
        assert!(bucket.take(4, start));
        assert!(bucket.take(6, start));
        assert!(!bucket.take(1, start));
        // 100 per second: one token every 10 ms.
        assert!(!bucket.take(1, start + Duration::from_millis(9)));
        assert!(bucket.take(1, start + Duration::from_millis(10)));
        assert!(!bucket.take(2, start + Duration::from_millis(25)));
        assert!(bucket.take(1, start + Duration::from_millis(25)));
        // Never more than the burst, however long the pause.
        assert!(!bucket.take(11, start + Duration::from_secs(3600)));
        assert!(bucket.take(10, start + Duration::from_secs(3600)));
        // Time going backwards adds nothing.
        assert!(!bucket.take(1, start));
        assert!(
            TokenBucket::new(0, start).take(1, start),
            "a zero rate still has a burst of one"
        );
    }
}
