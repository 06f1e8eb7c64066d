//! Limits on what one client may hold or ask for: long-lived streams per
//! client, and a request rate (token bucket) per credential.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits a server enforces on its callers.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Open streams (the methods a node declares streaming) one client may
    /// hold at once; a client is a credential at a peer address. 0: no limit.
    pub streams_per_client: usize,
    /// Calls per second per credential to the methods a node declares rate
    /// limited (sustained). 0: no limit.
    pub rate_per_sec: f64,
    /// Such calls a credential may make in a burst.
    pub rate_burst: f64,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_concurrent_streams_per_connection: u32,
    /// Serve `/metrics` without a credential.
    pub metrics_public: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            streams_per_client: 256,
            rate_per_sec: 100.0,
            rate_burst: 200.0,
            max_concurrent_streams_per_connection: 512,
            metrics_public: false,
        }
    }
}

type ClientKey = (String, Option<IpAddr>);

/// Counts open streams per client.
#[derive(Debug, Clone, Default)]
pub struct StreamLimiter {
    limit: usize,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

/// One open stream; dropping it frees its place.
#[derive(Debug)]
pub struct StreamPermit {
    key: Option<ClientKey>,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = open.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

impl StreamLimiter {
    /// At most `limit` streams per client (0: unlimited).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Arc::default(),
        }
    }

    /// A place for one more stream of `client` at `peer`, or why not.
    pub fn acquire(&self, client: &str, peer: Option<IpAddr>) -> Result<StreamPermit, String> {
        if self.limit == 0 {
            return Ok(StreamPermit {
                key: None,
                open: self.open.clone(),
            });
        }
        let key = (client.to_owned(), peer);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.limit {
            return Err(format!(
                "too many open streams: credential \"{client}\" already holds {} from this address (limit {})",
                *n, self.limit
            ));
        }
        *n += 1;
        Ok(StreamPermit {
            key: Some(key),
            open: self.open.clone(),
        })
    }

    /// Streams `client` at `peer` holds now.
    pub fn open(&self, client: &str, peer: Option<IpAddr>) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&(client.to_owned(), peer)).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per credential.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

impl RateLimiter {
    /// `rate` calls per second sustained, `burst` at once (rate 0: unlimited).
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate: rate.max(0.0),
            burst: burst.max(1.0),
            buckets: Arc::default(),
        }
    }

    /// Takes one call from `client`'s bucket, or says how long to wait.
    pub fn check(&self, client: &str) -> Result<(), Duration> {
        self.check_at(client, Instant::now())
    }

    fn check_at(&self, client: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(client.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_counted_per_client_and_freed_on_drop() {
        let l = StreamLimiter::new(2);
        let ip = Some(IpAddr::from([127, 0, 0, 1]));
        let a = l.acquire("edge", ip);
        let b = l.acquire("edge", ip);
        assert!(a.is_ok() && b.is_ok());
        let refused = l.acquire("edge", ip);
        assert!(refused.is_err_and(|e| e.contains("limit 2") && e.contains("edge")));
        // another credential, or the same from elsewhere, is counted apart
        assert!(l.acquire("other", ip).is_ok());
        assert!(
            l.acquire("edge", Some(IpAddr::from([127, 0, 0, 2])))
                .is_ok()
        );
        drop(a);
        assert_eq!(l.open("edge", ip), 1);
        assert!(l.acquire("edge", ip).is_ok());
        drop(b);
        assert_eq!(l.open("edge", ip), 0);
    }

    #[test]
    fn unlimited_streams_when_zero() {
        let l = StreamLimiter::new(0);
        let permits: Vec<_> = (0..1000).map(|_| l.acquire("x", None)).collect();
        assert!(permits.iter().all(Result::is_ok));
    }

    #[test]
    fn rate_limit_allows_a_burst_then_the_rate() {
        let l = RateLimiter::new(10.0, 5.0);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check_at("ops", t0).is_ok());
        }
        let wait = l.check_at("ops", t0);
        assert!(
            wait.is_err_and(|d| d > Duration::from_millis(90) && d <= Duration::from_millis(100))
        );
        // other credentials have their own bucket
        assert!(l.check_at("ci", t0).is_ok());
        // 100 ms later one more call fits, not two
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.check_at("ops", t1).is_ok());
        assert!(l.check_at("ops", t1).is_err());
        // a long pause refills only up to the burst
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(l.check_at("ops", t2).is_ok());
        }
        assert!(l.check_at("ops", t2).is_err());
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let l = RateLimiter::new(0.0, 1.0);
        assert!((0..10_000).all(|_| l.check("ops").is_ok()));
    }
}
