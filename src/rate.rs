//! Per-connection token bucket for client messages, in integer milli-tokens (no floats, no
//! clock of its own: the caller passes the shard's millisecond clock).

/// A token bucket.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBucket {
    milli_tokens: u64,
    last_ms: u64,
}

/// A bucket's settings.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Tokens added per second (0: unlimited).
    pub per_second: u32,
    /// Most tokens held.
    pub burst: u32,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: Rate, now_ms: u64) -> Self {
        Self {
            milli_tokens: u64::from(rate.burst) * 1000,
            last_ms: now_ms,
        }
    }

    /// Take one token; when none is left, how many milliseconds until one is.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        if rate.per_second == 0 {
            return Ok(());
        }
        let per_ms = u64::from(rate.per_second); // milli-tokens per millisecond
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = now_ms;
        self.milli_tokens =
            (self.milli_tokens + elapsed * per_ms).min(u64::from(rate.burst) * 1000);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            Ok(())
        } else {
            Err((1000 - self.milli_tokens).div_ceil(per_ms))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_burst_then_refills_at_rate() {
        let rate = Rate {
            per_second: 10,
            burst: 3,
        };
        let mut bucket = TokenBucket::full(rate, 0);
        for _ in 0..3 {
            assert_eq!(bucket.take(rate, 0), Ok(()));
        }
        assert_eq!(bucket.take(rate, 0), Err(100));
        assert_eq!(bucket.take(rate, 50), Err(50));
        assert_eq!(bucket.take(rate, 100), Ok(()));
        // A long pause refills only up to the burst.
        for _ in 0..3 {
            assert_eq!(bucket.take(rate, 10_000), Ok(()));
        }
        assert!(bucket.take(rate, 10_000).is_err());
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let rate = Rate {
            per_second: 0,
            burst: 0,
        };
        let mut bucket = TokenBucket::full(rate, 0);
        assert!((0..1000).all(|_| bucket.take(rate, 0).is_ok()));
    }
}
