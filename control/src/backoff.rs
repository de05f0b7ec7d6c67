//! Exponential backoff between retries, shared by everything that talks to etcd.

use std::time::Duration;

/// Exponential backoff between retries: `initial`, doubling up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// A fresh sequence of delays.
    pub fn delays(&self) -> Delays {
        Delays {
            policy: *self,
            next: self.initial,
        }
    }
}

/// The running state of a [`Backoff`].
#[derive(Clone, Debug)]
pub struct Delays {
    policy: Backoff,
    next: Duration,
}

impl Delays {
    /// The delay to wait now; the following one is twice as long, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next.min(self.policy.max);
        self.next = (now * 2).min(self.policy.max);
        now
    }

    /// Start again from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut d = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
        }
        .delays();
        let seen: Vec<u64> = (0..5).map(|_| d.next_delay().as_secs()).collect();
        assert_eq!(seen, [1, 2, 4, 5, 5]);
        d.reset();
        assert_eq!(d.next_delay().as_secs(), 1);
    }
}
