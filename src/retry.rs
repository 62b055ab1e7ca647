//! How nixcache retries a request to a server (a bucket, an upstream cache): a few attempts
//! with growing, jittered pauses, about 8 s in all.

use std::time::Duration;

/// Tries per request before the failure is the answer.
pub const ATTEMPTS: u32 = 6;

/// The pause after failed attempt `attempt` (1-based): 0.25 s, 0.5 s, 1 s, 2 s, 4 s, with
/// up to half again of jitter, so that many clients retrying do not arrive together.
pub fn pause(attempt: u32) -> Duration {
    let base = 250u64 << attempt.saturating_sub(1).min(5);
    let jitter = u64::from(std::process::id() ^ attempt).wrapping_mul(2654435761) % (base / 2 + 1);
    Duration::from_millis(base + jitter)
}

/// Whether an HTTP status is worth asking again: the server is overloaded or failing.
pub fn retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_and_stay_bounded() {
        let p: Vec<Duration> = (1..ATTEMPTS).map(pause).collect();
        assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
        let total: Duration = p.iter().sum();
        assert!(total >= Duration::from_millis(7750) && total <= Duration::from_secs(12), "{total:?}");
        assert!(retryable(500) && retryable(503) && retryable(429));
        assert!(!retryable(404) && !retryable(403) && !retryable(200));
    }
}
