//! Per-connection token bucket for client messages, in integer milli-tokens (no floats, no
//! clock of its own: the caller passes the shard's millisecond clock).

/// A token bucket.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBucket {
    milli_tokens: u64,
    last_ms: u64,
}

/// A bucket's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// Give back a token taken in vain.
    pub fn give_back(&mut self, rate: Rate) {
        if rate.per_second > 0 {
            self.milli_tokens = (self.milli_tokens + 1000).min(u64::from(rate.burst) * 1000);
        }
    }

    /// Take one token; when none is left, how many milliseconds until one is.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        self.take_n(rate, now_ms, 1)
    }

    /// Take `n` tokens (bytes, say); when there are fewer, how many milliseconds until
    /// there are enough (never, for more than the burst: the caller keeps `n` within it).
    pub fn take_n(&mut self, rate: Rate, now_ms: u64, n: u64) -> Result<(), u64> {
        if rate.per_second == 0 {
            return Ok(());
        }
        let per_ms = u64::from(rate.per_second); // milli-tokens per millisecond
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = now_ms;
        self.milli_tokens =
            (self.milli_tokens + elapsed * per_ms).min(u64::from(rate.burst) * 1000);
        let wanted = n.saturating_mul(1000);
        if self.milli_tokens >= wanted {
            self.milli_tokens -= wanted;
            Ok(())
        } else {
            Err((wanted - self.milli_tokens).div_ceil(per_ms))
        }
    }
}

impl TokenBucket {
    /// Whether it would be full at `now_ms` (nothing taken that has not come back).
    pub fn is_full(&self, rate: Rate, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.milli_tokens + elapsed * u64::from(rate.per_second) >= u64::from(rate.burst) * 1000
    }
}

/// Token buckets per source address, bounded: past `capacity` addresses, a new one is not
/// held back (a flood from that many addresses is not what a per-address limit stops) until
/// [`PerAddress::forget_idle`] makes room.
#[derive(Debug)]
pub struct PerAddress {
    buckets: std::collections::HashMap<std::net::IpAddr, TokenBucket>,
    capacity: usize,
}

impl PerAddress {
    /// Room for `capacity` addresses.
    pub fn new(capacity: usize) -> Self {
        Self {
            buckets: Default::default(),
            capacity,
        }
    }

    /// Take one of `address`'s tokens; when none is left, how many milliseconds until one is.
    pub fn take(&mut self, address: std::net::IpAddr, rate: Rate, now_ms: u64) -> Result<(), u64> {
        if rate.per_second == 0 {
            return Ok(());
        }
        let full = self.buckets.len() >= self.capacity;
        match self.buckets.get_mut(&address) {
            Some(bucket) => bucket.take(rate, now_ms),
            None if full => Ok(()),
            None => {
                let mut bucket = TokenBucket::full(rate, now_ms);
                let taken = bucket.take(rate, now_ms);
                self.buckets.insert(address, bucket);
                taken
            }
        }
    }

    /// Forget the addresses whose buckets are full again: they would start full anyway.
    pub fn forget_idle(&mut self, rate: Rate, now_ms: u64) {
        self.buckets.retain(|_, b| !b.is_full(rate, now_ms));
    }

    /// Addresses held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_bucket_and_the_table_is_bounded() {
        let rate = Rate {
            per_second: 2,
            burst: 2,
        };
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        let b: std::net::IpAddr = [10, 0, 0, 2].into();
        let mut table = PerAddress::new(2);
        assert_eq!(table.take(a, rate, 0), Ok(()));
        assert_eq!(table.take(a, rate, 0), Ok(()));
        assert_eq!(table.take(a, rate, 0), Err(500));
        assert_eq!(table.take(b, rate, 0), Ok(()));
        // Full: a third address is let through, not held.
        let c: std::net::IpAddr = [10, 0, 0, 3].into();
        for _ in 0..5 {
            assert_eq!(table.take(c, rate, 0), Ok(()));
        }
        assert_eq!(table.len(), 2);
        // A second later both buckets are full again: forgotten, room for others.
        table.forget_idle(rate, 999);
        assert_eq!(table.len(), 1, "a is not full yet at 999 ms, b is");
        table.forget_idle(rate, 1_000);
        assert!(table.is_empty());
        assert_eq!(table.take(a, rate, 1_000), Ok(()));
    }

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
    fn bytes_are_taken_by_size() {
        let rate = Rate {
            per_second: 1_000,
            burst: 2_000,
        };
        let mut bucket = TokenBucket::full(rate, 0);
        assert_eq!(bucket.take_n(rate, 0, 1_500), Ok(()));
        assert_eq!(bucket.take_n(rate, 0, 600), Err(100));
        assert_eq!(bucket.take_n(rate, 100, 600), Ok(()));
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
