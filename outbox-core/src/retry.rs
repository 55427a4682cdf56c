use std::time::Duration;

/// How failed deliveries are retried: exponential backoff with jitter, up to a number of
/// attempts, after which the event goes dead.
///
/// ```
/// use outbox_core::RetryPolicy;
/// use std::time::Duration;
/// let policy = RetryPolicy::exponential(Duration::from_millis(200))
///     .max_attempts(5)
///     .max_delay(Duration::from_secs(60));
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    base: Duration,
    pub(crate) max_delay: Duration,
    jitter: bool,
}

impl Default for RetryPolicy {
    /// 10 attempts, from 1 s doubling up to 5 min, with jitter.
    fn default() -> Self {
        Self::exponential(Duration::from_secs(1))
    }
}

impl RetryPolicy {
    /// Backoff starting at `base` and doubling per attempt; 10 attempts, at most 5 minutes apart.
    pub fn exponential(base: Duration) -> Self {
        Self {
            max_attempts: 10,
            base,
            max_delay: Duration::from_secs(300),
            jitter: true,
        }
    }

    /// Attempts before the event goes dead (at least 1). An attempt cut short by a relay crash
    /// counts too, so a message that crashes relays cannot loop forever.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The longest delay between two attempts.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Whether to randomise delays (default on): a random point in the upper half of the
    /// backoff, so that many events failing together do not retry together.
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The attempts allowed before an event goes dead.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// What to do after attempt number `attempt` (1-based) failed with `retry`: try again after
    /// the returned delay, or give up (`None`). Relays and consumers decide the same way.
    pub fn next_delay(&self, attempt: u32, retry: crate::Retry) -> Option<Duration> {
        match retry {
            crate::Retry::Never => None,
            // Not the event's fault: the attempt does not count.
            crate::Retry::Unavailable => Some(self.delay(1)),
            crate::Retry::NotAttempted => Some(Duration::ZERO),
            _ if attempt >= self.max_attempts => None,
            crate::Retry::Backoff => Some(self.delay(attempt)),
            crate::Retry::After(delay) => Some(delay),
        }
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        let full = self.base.saturating_mul(1u32 << exp).min(self.max_delay);
        if self.jitter {
            full / 2 + full.mul_f64(fastrand::f64() / 2.0)
        } else {
            full
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let p = RetryPolicy::exponential(Duration::from_millis(100))
            .max_delay(Duration::from_millis(1000))
            .jitter(false);
        let delays: Vec<u128> = (1..=6).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn gives_up_after_the_last_attempt_or_on_never() {
        use crate::Retry;
        let p = RetryPolicy::exponential(Duration::from_millis(100))
            .jitter(false)
            .max_attempts(3);
        assert_eq!(
            p.next_delay(1, Retry::Backoff),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            p.next_delay(2, Retry::After(Duration::from_secs(9))),
            Some(Duration::from_secs(9))
        );
        assert_eq!(p.next_delay(3, Retry::Backoff), None);
        assert_eq!(
            p.next_delay(30, Retry::Unavailable),
            Some(Duration::from_millis(100))
        );
        assert_eq!(p.next_delay(1, Retry::Never), None);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let p = RetryPolicy::exponential(Duration::from_millis(400));
        for _ in 0..1000 {
            let d = p.delay(2).as_millis();
            assert!((400..=800).contains(&d), "{d}");
        }
    }
}
