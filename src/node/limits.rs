//! What one source may ask of a node (`[limits]`): claims per hour, and agent connections
//! (see [`ConnectionLimits`]).
//!
//! Claims per source address: `claims_per_hour_per_address`.
//!
//! Every claim is an entry in the log and, for a new id, a row kept for the certificate's
//! lifetime (a day by default), so one client that claims ids as fast as it can grows every
//! node's tables and log without bound. Each node gives every source address a token
//! bucket: `claim_burst` claims at once, then the hourly rate. Agents have no identity
//! before they claim, so the address is what there is; an IPv6 address counts by its /64
//! (one host usually has a whole /64 to draw from). The buckets are this node's own, kept
//! in memory: a source that spreads its claims over the three nodes gets three times the
//! rate, and a restarted node starts afresh. None of this is in the log; apply never sees it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::LimitsConfig;

/// Sources tracked at most; beyond this (after forgetting the buckets that are full again)
/// new sources share one bucket, so that memory stays bounded under a spread attack.
const MAX_SOURCES: usize = 100_000;

/// Where requests come from, as far as limits go: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

/// The bucket shared by sources beyond [`MAX_SOURCES`]: no agent connects from 0.0.0.0.
const OVERFLOW: Source = Source(IpAddr::V4(Ipv4Addr::UNSPECIFIED));

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A claim refused for its source's rate: when one would be accepted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limited {
    pub(crate) retry_after: Duration,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// Whether this run of refusals was logged (once per run, not per claim).
    warned: bool,
}

pub(crate) struct ClaimLimits {
    /// Tokens per second; 0: no limit.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Source, Bucket>>,
}

impl ClaimLimits {
    pub(crate) fn new(config: &LimitsConfig) -> ClaimLimits {
        ClaimLimits {
            rate: config.claims_per_hour_per_address as f64 / 3600.0,
            burst: config.claim_burst.max(1) as f64,
            buckets: Mutex::default(),
        }
    }

    /// Takes a claim from `source`'s bucket, or says when there will be one.
    pub(crate) fn admit(&self, source: Source) -> Result<(), Limited> {
        self.admit_at(source, Instant::now())
    }

    fn admit_at(&self, source: Source, now: Instant) -> Result<(), Limited> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = source;
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&source) {
            // A full bucket is the same as none.
            buckets.retain(|_, b| self.refilled(b, now) < self.burst);
            if buckets.len() >= MAX_SOURCES {
                key = OVERFLOW;
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            warned: false,
        });
        bucket.tokens = self.refilled(bucket, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.warned = false;
            return Ok(());
        }
        if !bucket.warned {
            bucket.warned = true;
            tracing::warn!(
                source = %key,
                per_hour = (self.rate * 3600.0).round() as u64,
                burst = self.burst as u64,
                "refusing claims from a source over [limits] claims_per_hour_per_address"
            );
        }
        Err(Limited {
            retry_after: Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate),
        })
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.burst)
    }

    /// Sources with a bucket (tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// A count limit of `[limits]`: 0 means none.
pub(crate) fn limit(n: u64) -> usize {
    match n {
        0 => usize::MAX,
        n => usize::try_from(n).unwrap_or(usize::MAX),
    }
}

/// How many of something (connections, handshakes) each source holds; a source that holds
/// none is not kept, so the map is as large as the sources holding something.
#[derive(Default)]
pub(crate) struct PerSource(HashMap<Source, usize>);

impl PerSource {
    pub(crate) fn get(&self, source: Source) -> usize {
        self.0.get(&source).copied().unwrap_or(0)
    }

    pub(crate) fn add(&mut self, source: Source) {
        *self.0.entry(source).or_insert(0) += 1;
    }

    /// Gives back one that [`PerSource::add`] counted.
    pub(crate) fn release(&mut self, source: Source) {
        if let Some(n) = self.0.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&source);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Agent connections this node holds, in all (`max_agent_connections`) and per source
/// address (`max_agent_connections_per_address`). Each connection costs tens of kilobytes
/// (quinn's state, its streams), so without a bound a flood of connections, from one
/// address or many, would take the node's memory and every agent on it with it. A
/// connection over a limit is closed unread with `close_code::BUSY`, and the agent connects
/// to another node.
pub(crate) struct ConnectionLimits {
    max_total: usize,
    max_per_source: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    /// Only while a limit per source is set; sources with no connection are removed.
    per_source: PerSource,
    /// Whether the node is at its total limit (warned once per time it gets there).
    full: bool,
}

/// Why a connection was refused; its text is the close reason the agent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Node,
    Source,
}

impl Full {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Full::Node => {
                "node at its limit of agent connections; nothing on this connection was read; \
                 connect to another node"
            }
            Full::Source => {
                "too many connections from this address; nothing on this connection was read; \
                 connect to another node"
            }
        }
    }
}

/// A connection counted against the limits until dropped.
pub(crate) struct Admitted<'a> {
    limits: &'a ConnectionLimits,
    source: Source,
}

impl ConnectionLimits {
    pub(crate) fn new(config: &LimitsConfig) -> ConnectionLimits {
        ConnectionLimits {
            max_total: limit(config.max_agent_connections),
            max_per_source: limit(config.max_agent_connections_per_address),
            held: Mutex::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `source`, unless a limit is reached.
    pub(crate) fn admit(&self, source: Source) -> Result<Admitted<'_>, Full> {
        let mut held = self.held();
        if held.total >= self.max_total {
            if !held.full {
                held.full = true;
                tracing::warn!(
                    max_agent_connections = self.max_total,
                    "refusing new agent connections: the node holds as many as it may"
                );
            }
            return Err(Full::Node);
        }
        if self.max_per_source != usize::MAX {
            if held.per_source.get(source) >= self.max_per_source {
                return Err(Full::Source);
            }
            held.per_source.add(source);
        }
        held.total += 1;
        Ok(Admitted {
            limits: self,
            source,
        })
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let limits = self.limits;
        let mut held = limits.held();
        held.total -= 1;
        if held.total < limits.max_total {
            held.full = false;
        }
        held.per_source.release(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_hour: u64, burst: u64) -> ClaimLimits {
        ClaimLimits::new(&LimitsConfig {
            claims_per_hour_per_address: per_hour,
            claim_burst: burst,
            ..LimitsConfig::default()
        })
    }

    fn connections(total: u64, per_address: u64) -> ConnectionLimits {
        ConnectionLimits::new(&LimitsConfig {
            max_agent_connections: total,
            max_agent_connections_per_address: per_address,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn connections_count_until_dropped_in_all_and_per_address() {
        let l = connections(3, 2);
        let a1 = l.admit(v4("10.0.0.1")).unwrap();
        let a2 = l.admit(v4("10.0.0.1")).unwrap();
        assert_eq!(l.admit(v4("10.0.0.1")).err(), Some(Full::Source));
        let b1 = l.admit(v4("10.0.0.2")).unwrap();
        assert_eq!(l.admit(v4("10.0.0.3")).err(), Some(Full::Node));
        drop(a1);
        // A place again, for the address too.
        let a3 = l.admit(v4("10.0.0.1")).unwrap();
        drop((a2, a3, b1));
        assert_eq!(l.held().total, 0);
        assert!(
            l.held().per_source.is_empty(),
            "nothing kept for gone sources"
        );
        // 0: no limit, and nothing kept per source.
        let open = connections(0, 0);
        let many: Vec<_> = (0..1000)
            .map(|_| open.admit(v4("10.0.0.1")).unwrap())
            .collect();
        assert!(open.held().per_source.is_empty());
        drop(many);
    }

    fn v4(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    #[test]
    fn a_source_gets_its_burst_then_the_hourly_rate() {
        let l = limits(3600, 3); // one a second
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit_at(v4("10.0.0.1"), t0), Ok(()));
        }
        let refused = l.admit_at(v4("10.0.0.1"), t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        // Another address is not held up.
        assert_eq!(l.admit_at(v4("10.0.0.2"), t0), Ok(()));
        // Half a second later, half a claim: still refused, for the other half.
        let t = t0 + Duration::from_millis(500);
        let refused = l.admit_at(v4("10.0.0.1"), t).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(
            l.admit_at(v4("10.0.0.1"), t0 + Duration::from_secs(1)),
            Ok(())
        );
        // A long pause refills the burst, no more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(l.admit_at(v4("10.0.0.1"), later), Ok(()));
        }
        assert!(l.admit_at(v4("10.0.0.1"), later).is_err());
    }

    #[test]
    fn no_rate_means_no_limit() {
        let l = limits(0, 1);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(l.admit_at(v4("10.0.0.1"), t0), Ok(()));
        }
        assert_eq!(l.tracked(), 0, "nothing is kept");
    }

    #[test]
    fn an_ipv6_source_counts_by_its_64_and_a_mapped_ipv4_as_the_ipv4() {
        let a = Source::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Source::of("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = Source::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            Source::of("::ffff:10.0.0.1".parse().unwrap()),
            v4("10.0.0.1")
        );
    }

    #[test]
    fn memory_stays_bounded_when_sources_are_many() {
        let l = limits(1, 1); // one an hour: a bucket stays empty for an hour
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.admit_at(Source::of(ip), t0), Ok(()));
        }
        assert_eq!(l.tracked(), MAX_SOURCES);
        // Every bucket is empty: newcomers share the overflow bucket.
        let newcomer = |n: u32| Source::of(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + n)));
        assert_eq!(l.admit_at(newcomer(1), t0), Ok(()));
        assert!(
            l.admit_at(newcomer(2), t0).is_err(),
            "the overflow bucket is shared"
        );
        assert_eq!(l.tracked(), MAX_SOURCES + 1);
        // An hour on, the full buckets are forgotten and newcomers get their own again.
        let later = t0 + Duration::from_secs(3601);
        assert_eq!(l.admit_at(newcomer(3), later), Ok(()));
        assert!(l.tracked() <= 2, "{}", l.tracked());
    }
}
