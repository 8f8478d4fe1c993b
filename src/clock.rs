//! Time as the core sees it. The I/O edge reads the clock once at each entry into a shard
//! (a client message, a mesh batch, a storage outcome, a sweep) and passes it in; the shard
//! logic never reads a clock itself, so tests drive it with a clock of their own.
//!
//! (Latency histograms still read the real clock: they measure, they do not decide.)

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A moment, on both clocks the core needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for intervals and expiry.
    pub instant: Instant,
    /// Milliseconds since the Unix epoch, for what is stamped with the date (decision ids
    /// and their `createdAt`).
    pub unix_ms: u64,
}

impl Now {
    /// The real clocks, now.
    pub fn read() -> Self {
        Self {
            instant: Instant::now(),
            unix_ms: unix_ms(),
        }
    }

    /// The same clocks `by` later (a test's clock moving on).
    pub fn later(self, by: Duration) -> Self {
        Self {
            instant: self.instant + by,
            unix_ms: self.unix_ms + by.as_millis() as u64,
        }
    }
}

/// Milliseconds since the Unix epoch, from the real clock (0 before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
