//! How long a worker keeps looking for packets before it goes to sleep.
//!
//! Waking a sleeping worker costs more than a packet's whole trip through it (tens of µs on a
//! virtual CPU), and a request/response flow crosses four workers per round trip. A worker
//! that looks again for a short while after it handled traffic catches a reply without being
//! woken. The window adapts the way the kernel's halt polling does, growing fast and shrinking slowly: after a sleep that ended
//! soon enough that a longer look would have caught its packet, and after a look that caught
//! one, the window grows; after a wait longer than the most it may look, looking was wasted
//! and the window shrinks, down to nothing. A worker only looks after it handled packets, so an idle one sleeps and costs
//! nothing, and a worker whose traffic comes in gaps longer than the limit stops looking.

use std::time::Duration;

/// The smallest window a growing one starts from.
const START_NS: u64 = 4_000;

/// The window of one worker, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    max_ns: u64,
    window_ns: u64,
}

impl PollWindow {
    /// A window that never grows beyond `max`; `Duration::ZERO` turns looking off.
    pub fn new(max: Duration) -> Self {
        Self {
            max_ns: u64::try_from(max.as_nanos()).unwrap_or(u64::MAX),
            window_ns: 0,
        }
    }

    /// How long to look for packets now, before sleeping.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns)
    }

    /// Work came `waited` after the worker ran out of it, looking and then (if the window
    /// passed) sleeping.
    pub fn woke(&mut self, waited: Duration) {
        let waited_ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        if self.max_ns == 0 {
            return;
        }
        if waited_ns <= self.max_ns {
            // Looking caught it, or looking a little longer would have.
            self.window_ns = self
                .window_ns
                .saturating_mul(2)
                .max(START_NS)
                .min(self.max_ns);
        } else {
            // Nothing came within the limit: looking only took CPU from others. Shrink slowly:
            // a responder's worker sees one long wait (for the next request) for every short
            // one (for the local answer), and the short ones are what looking is for.
            self.window_ns -= self.window_ns / 8;
            if self.window_ns < START_NS / 2 {
                self.window_ns = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn a_new_window_does_not_look() {
        assert_eq!(PollWindow::new(MAX).window(), Duration::ZERO);
    }

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_limit() {
        let mut window = PollWindow::new(MAX);
        let mut seen = Vec::new();
        for _ in 0..6 {
            window.woke(Duration::from_micros(10));
            seen.push(window.window().as_micros());
        }
        assert_eq!(seen, vec![4, 8, 16, 32, 50, 50]);
    }

    #[test]
    fn long_sleeps_shrink_the_window_to_nothing() {
        let mut window = PollWindow::new(MAX);
        for _ in 0..10 {
            window.woke(Duration::from_micros(1));
        }
        let mut last = window.window();
        let mut waits = 0;
        while window.window() > Duration::ZERO {
            window.woke(Duration::from_millis(10));
            assert!(window.window() < last);
            last = window.window();
            waits += 1;
        }
        // About 25 wasted looks, then none.
        assert!(
            (15..=30).contains(&waits),
            "{waits} long waits to stop looking"
        );
    }

    #[test]
    fn gaps_longer_than_the_limit_never_start_looking() {
        // A requester's worker: the reply comes a whole round trip later.
        let mut window = PollWindow::new(MAX);
        for _ in 0..100 {
            window.woke(Duration::from_micros(120));
            assert_eq!(window.window(), Duration::ZERO);
        }
    }

    #[test]
    fn a_zero_limit_never_looks() {
        let mut window = PollWindow::new(Duration::ZERO);
        for _ in 0..10 {
            window.woke(Duration::ZERO);
        }
        assert_eq!(window.window(), Duration::ZERO);
    }

    #[test]
    fn request_and_reply_gaps_settle_on_a_window_that_catches_the_reply() {
        // A responder's worker: the local reply comes 20 µs after the request was written,
        // the next request 200 µs after the reply left.
        let mut window = PollWindow::new(MAX);
        let reply_gap = Duration::from_micros(20);
        let mut caught = 0;
        for _ in 0..100 {
            if window.window() >= reply_gap {
                caught += 1;
            }
            window.woke(reply_gap);
            window.woke(Duration::from_micros(200));
        }
        assert!(caught >= 95, "{caught} replies caught by looking");
        assert!(window.window() <= MAX);
    }
}
