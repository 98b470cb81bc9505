//! Retries that slow down: each failure in a row doubles the wait, up to
//! a cap; a success forgets them. A fixed short retry turned an error
//! that never heals (a 422 on an object nobody fixes) into 20 writes a
//! second, forever.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The wait after `failures` failures in a row (1 for the first):
/// `base`, `2 * base`, `4 * base`... never more than `cap`.
pub fn delay(base: Duration, cap: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << doublings).min(cap)
}

/// Failures in a row, per key (an object). Entries go with a success, and
/// ones not seen for `FORGET` go when the map grows: an object deleted
/// while failing leaves nothing behind for long.
#[derive(Debug)]
pub struct Backoff<K: Eq + Hash> {
    failures: Mutex<HashMap<K, (u32, Instant)>>,
}

impl<K: Eq + Hash> Default for Backoff<K> {
    fn default() -> Self {
        Backoff { failures: Mutex::new(HashMap::new()) }
    }
}

const FORGET: Duration = Duration::from_secs(600);
const PRUNE_ABOVE: usize = 10_000;

impl<K: Eq + Hash> Backoff<K> {
    /// Counts a failure of `key`; the wait before its next try.
    pub fn failed(&self, key: K, base: Duration, cap: Duration) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > PRUNE_ABOVE {
            map.retain(|_, (_, at)| at.elapsed() < FORGET);
        }
        let entry = map.entry(key).or_insert((0, Instant::now()));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = Instant::now();
        delay(base, cap, entry.0)
    }

    /// `key` worked: its next failure starts from `base` again.
    pub fn succeeded(&self, key: &K) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_a_success_starts_over() {
        let (base, cap) = (Duration::from_millis(50), Duration::from_secs(30));
        let b: Backoff<&str> = Backoff::default();
        let waits: Vec<u128> = (0..12).map(|_| b.failed("e", base, cap).as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        assert_eq!(b.failed("other", base, cap), base, "per key");
        b.succeeded(&"e");
        assert_eq!(b.failed("e", base, cap), base);
        assert_eq!(delay(base, cap, u32::MAX), cap, "no overflow");
        assert_eq!(delay(base, cap, 0), base);
    }
}
