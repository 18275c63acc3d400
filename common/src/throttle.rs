//! A bandwidth limit shared by all of a run's jobs: each read reserves its bytes on one virtual
//! clock and waits until its turn, so the total rate stays under the limit however many files
//! are read at once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes per second over everything read through it.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: u64,
    /// When the bandwidth is free again.
    next: Mutex<Instant>,
}

impl Throttle {
    /// `None` when `bytes_per_sec` is 0 (unlimited).
    pub fn new(bytes_per_sec: u64) -> Option<Throttle> {
        (bytes_per_sec > 0).then(|| Throttle {
            bytes_per_sec,
            next: Mutex::new(Instant::now()),
        })
    }

    /// How long the reader of `n` bytes must wait before going on.
    pub fn delay(&self, n: usize) -> Duration {
        let now = Instant::now();
        let Ok(mut next) = self.next.lock() else {
            return Duration::ZERO;
        };
        if *next < now {
            *next = now;
        }
        let wait = *next - now;
        *next += Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        wait
    }
}

/// A blocking reader that keeps to a [`Throttle`].
pub struct ThrottledRead<'a, R> {
    pub inner: R,
    pub throttle: Option<&'a Throttle>,
}

impl<R: std::io::Read> std::io::Read for ThrottledRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(t) = self.throttle {
            std::thread::sleep(t.delay(n));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_to_the_rate() {
        let t = Throttle::new(1000).unwrap();
        assert_eq!(t.delay(500), Duration::ZERO, "the first read goes at once");
        let second = t.delay(500);
        assert!(second > Duration::from_millis(400), "{second:?}");
        let third = t.delay(1);
        assert!(third > Duration::from_millis(900), "{third:?}");
        assert!(Throttle::new(0).is_none());
    }
}
