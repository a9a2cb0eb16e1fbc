//! A token bucket for background copies (re-replication and resync): `--recovery-bandwidth`.
//!
//! Copies take tokens after the fact (a chunk's bytes are known once it is read): the balance
//! may go negative and the next copy waits until it is paid back, so the long-run rate is the
//! configured one and a burst is at most `burst` bytes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The pure bucket (unit-tested with explicit times).
#[derive(Debug, Clone)]
pub struct Bucket {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate: u64, now: Instant) -> Bucket {
        // A quarter second of traffic, at least one 4 MiB chunk.
        let burst = (rate as f64 / 4.0).max((4u64 << 20) as f64);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Adds `delta` tokens (negative: takes them), capped at the burst.
    pub fn adjust(&mut self, delta: f64) {
        if self.rate != 0 {
            self.tokens = (self.tokens + delta).min(self.burst);
        }
    }

    /// Takes `n` bytes at `now`; returns how long the caller must wait before the next copy.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

/// The bucket shared by every copy of this daemon.
pub struct Throttle(Mutex<Bucket>);

impl Throttle {
    pub fn new(rate: u64) -> Throttle {
        Throttle(Mutex::new(Bucket::new(rate, Instant::now())))
    }

    /// Accounts `n` copied bytes and sleeps as long as the rate asks.
    pub async fn take(&self, n: u64) {
        let wait = self.0.lock().unwrap().take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Reserves `n` bytes before a copy and sleeps until they are paid for: copies running
    /// in several tasks queue behind each other instead of each copying first and paying
    /// after (which let every task add a chunk to the burst). [`settle`](Self::settle)
    /// corrects the reservation once the copy's size is known.
    pub async fn reserve(&self, n: u64) {
        let wait = {
            let mut b = self.0.lock().unwrap();
            let now = Instant::now();
            // The balance after taking `n`: the wait is what pays it back to zero.
            b.take(n, now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// After a copy of `actual` bytes that reserved `reserved`: gives back what was not
    /// used, or takes the rest (without waiting; the next reservation waits for it).
    pub fn settle(&self, reserved: u64, actual: u64) {
        let mut b = self.0.lock().unwrap();
        b.adjust(reserved as f64 - actual as f64);
    }
}

/// Parses `100MiB/s`, `1G/s`, `50M` (per second either way); `0`, `none` or `unlimited`: no limit.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") || t.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    crate::chunkstore::parse_size(t).map_err(|e| format!("recovery-bandwidth: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100 << 20, t0);
        // The burst (25 MiB) passes at once, then 4 MiB more costs 40 ms.
        assert_eq!(b.take(25 << 20, t0), Duration::ZERO);
        let w = b.take(4 << 20, t0);
        assert!((w.as_secs_f64() - 0.04).abs() < 1e-6, "{w:?}");
        // 100 ms later 10 MiB came back: 6 MiB of credit left.
        assert_eq!(
            b.take(6 << 20, t0 + Duration::from_millis(140)),
            Duration::ZERO
        );
        // Idle time refills no more than the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take(25 << 20, later), Duration::ZERO);
        assert!(b.take(1 << 20, later) > Duration::ZERO);
        // Unlimited never waits.
        let mut u = Bucket::new(0, t0);
        assert_eq!(u.take(u64::MAX, t0), Duration::ZERO);
    }

    #[test]
    fn bandwidth_syntax() {
        assert_eq!(parse_bandwidth("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_bandwidth("1G/s"), Ok(1 << 30));
        assert_eq!(parse_bandwidth("50M"), Ok(50 << 20));
        assert_eq!(parse_bandwidth("none"), Ok(0));
        assert_eq!(parse_bandwidth("0"), Ok(0));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("-1M/s").is_err());
    }
}
