//! How many ICMP errors a worker sends: a token bucket per worker, as RFC 1812 (4.3.2.8)
//! asks of routers, so that a flood of packets that each earn an error does not become a
//! flood of errors.
//!
//! Time is whatever the caller says it is (nanoseconds from a fixed origin), so the bucket is
//! tested without clocks; a worker reads its clock once per batch.

/// The rate ICMP errors are limited to, per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IcmpRateLimit {
    /// Errors per second in the long run; 0 means no limit.
    pub per_second: u32,
    /// Errors that may leave at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl IcmpRateLimit {
    /// Linux's own defaults for the ICMP errors a host sends (`icmp_msgs_per_sec`,
    /// `icmp_msgs_burst`).
    pub const DEFAULT: IcmpRateLimit = IcmpRateLimit {
        per_second: 1000,
        burst: 50,
    };

    /// `per_second` errors a second per worker (0: no limit), with the default burst.
    pub fn per_second(per_second: u32) -> IcmpRateLimit {
        IcmpRateLimit {
            per_second,
            ..IcmpRateLimit::DEFAULT
        }
    }

    /// No limit.
    pub const UNLIMITED: IcmpRateLimit = IcmpRateLimit {
        per_second: 0,
        burst: 0,
    };
}

impl Default for IcmpRateLimit {
    fn default() -> Self {
        IcmpRateLimit::DEFAULT
    }
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A token bucket: it fills at the limit's rate up to its burst, and each error it lets
/// through takes one token. Kept in nanoseconds of credit, so no fraction is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Nanoseconds of credit one token costs; 0 means no limit.
    cost: u64,
    /// The most credit the bucket holds.
    capacity: u64,
    credit: u64,
    /// When the credit was last brought up to date.
    updated: u64,
}

impl TokenBucket {
    /// A full bucket for `limit`.
    pub fn new(limit: IcmpRateLimit) -> Self {
        let cost = match limit.per_second {
            0 => 0,
            rate => (NANOS_PER_SECOND / u64::from(rate)).max(1),
        };
        let capacity = cost.saturating_mul(u64::from(limit.burst.max(1)));
        TokenBucket {
            cost,
            capacity,
            credit: capacity,
            updated: 0,
        }
    }

    /// Whether one more error may leave at `now` (taking a token if so). Time that goes
    /// backwards adds nothing.
    pub fn allow(&mut self, now: u64) -> bool {
        if self.cost == 0 {
            return true;
        }
        let elapsed = now.saturating_sub(self.updated);
        self.updated = self.updated.max(now);
        self.credit = self.credit.saturating_add(elapsed).min(self.capacity);
        if self.credit >= self.cost {
            self.credit -= self.cost;
            true
        } else {
            false
        }
    }
}

/// A worker's ICMP errors for one batch: its bucket, read at the batch's time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpGate {
    bucket: TokenBucket,
    now: u64,
}

impl IcmpGate {
    /// A gate for `limit`, full.
    pub fn new(limit: IcmpRateLimit) -> Self {
        IcmpGate {
            bucket: TokenBucket::new(limit),
            now: 0,
        }
    }

    /// A gate that lets every error through.
    pub fn unlimited() -> Self {
        IcmpGate::new(IcmpRateLimit::UNLIMITED)
    }

    /// The time of the batch about to be handled, in nanoseconds from the worker's origin.
    pub fn set_time(&mut self, now: u64) {
        self.now = now;
    }

    /// Whether one more error may leave now.
    pub fn admit(&mut self) -> bool {
        self.bucket.allow(self.now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_full_bucket_lets_a_burst_through_then_the_rate() {
        let mut bucket = TokenBucket::new(IcmpRateLimit {
            per_second: 1000,
            burst: 5,
        });
        let start = 10 * NANOS_PER_SECOND;
        let burst = (0..20).filter(|_| bucket.allow(start)).count();
        assert_eq!(burst, 5);
        // One token per millisecond afterwards.
        assert!(!bucket.allow(start + MS / 2));
        assert!(bucket.allow(start + MS));
        assert!(!bucket.allow(start + MS));
        // Over a second of steady asking, about the rate gets through.
        let mut sent = 0;
        for step in 1..=10_000u64 {
            if bucket.allow(start + MS + step * 100_000) {
                sent += 1;
            }
        }
        assert_eq!(sent, 1000);
    }

    #[test]
    fn a_quiet_spell_refills_no_more_than_the_burst() {
        let mut bucket = TokenBucket::new(IcmpRateLimit {
            per_second: 10,
            burst: 3,
        });
        let drained = (0..10).filter(|_| bucket.allow(0)).count();
        assert_eq!(drained, 3);
        let later = 3600 * NANOS_PER_SECOND;
        assert_eq!((0..10).filter(|_| bucket.allow(later)).count(), 3);
        // Time going backwards gives nothing.
        assert!(!bucket.allow(later - NANOS_PER_SECOND));
    }

    #[test]
    fn zero_means_no_limit_and_a_zero_burst_still_lets_one_through() {
        let mut unlimited = TokenBucket::new(IcmpRateLimit::UNLIMITED);
        assert!((0..100_000).all(|_| unlimited.allow(0)));
        let mut one = TokenBucket::new(IcmpRateLimit {
            per_second: 1,
            burst: 0,
        });
        assert!(one.allow(0));
        assert!(!one.allow(0));
        assert!(one.allow(NANOS_PER_SECOND));
        let mut fast = TokenBucket::new(IcmpRateLimit {
            per_second: u32::MAX,
            burst: u32::MAX,
        });
        assert!((0..1000).all(|_| fast.allow(0)));
    }

    #[test]
    fn a_gate_reads_its_bucket_at_the_batch_time() {
        let mut gate = IcmpGate::new(IcmpRateLimit {
            per_second: 2,
            burst: 1,
        });
        gate.set_time(NANOS_PER_SECOND);
        assert!(gate.admit());
        assert!(!gate.admit());
        gate.set_time(NANOS_PER_SECOND + NANOS_PER_SECOND / 2);
        assert!(gate.admit());
        assert!(IcmpGate::unlimited().admit());
    }
}
