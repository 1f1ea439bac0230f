//! QUIC handshakes in progress (`[limits] max_handshakes`, `retry_after_handshakes`,
//! `handshake_timeout_ms`).
//!
//! A connection costs the node before it is anything: the first packet of a handshake
//! (1200 bytes, sent from any address, spoofed or not) makes the node build TLS state,
//! sign, and send up to three times as much back, and the half-done handshake is kept until
//! it finishes or times out. The connection limits (`limits.rs`) count connections only once
//! they are made, so a flood of first packets gets past them. Here, before any TLS work:
//!
//! - once `retry_after_handshakes` handshakes are in progress, a new one from an address
//!   not yet validated is sent a QUIC Retry (a token bound to the address, no state kept):
//!   a client at a real address answers it at the cost of a round trip, a spoofed one never
//!   does;
//! - at `max_handshakes` in progress, a new one is refused outright (the client learns at
//!   once and tries another node), and so is one from a validated address that already has
//!   `max_handshakes_per_address` in progress (validated only: a spoofed source could
//!   otherwise use up another address's share);
//! - a handshake not done within `handshake_timeout_ms` is dropped, rather than kept for the
//!   idle timeout (agents' is `agent_timeout_ms`, a minute and a half by default).
//!
//! Peers' and operators' connections pass through the same gate: they too answer Retries,
//! and reconnect if refused. But a validated address at which this node has met another node
//! (see `NodeAddresses`) is taken on even when the node is full, and one not yet validated is
//! sent a Retry there rather than refused: a flood of handshakes must not keep a node's peers
//! from reconnecting, which would split the cluster. An address is not an identity (the
//! peer's certificate is known only once the handshake is done), so this lets through
//! whoever shares a node's address, and only once it has proved it receives there.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::limits::{limit, PerSource, Source};
use crate::config::LimitsConfig;
use crate::raft::network::NodeAddresses;

/// What becomes of a new connection's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Accept,
    /// Ask the client to prove its address first (QUIC Retry).
    Retry,
    Refuse,
}

/// The handshake gauges and counters in /metrics.
#[derive(Clone, Default)]
pub(crate) struct HandshakeMetrics {
    pub(crate) in_progress: Gauge,
    pub(crate) retried: Counter,
    pub(crate) refused: Counter,
    pub(crate) timed_out: Counter,
    /// Taken on past a maximum, from a node's address.
    pub(crate) let_through: Counter,
}

pub(crate) struct Handshakes {
    max: usize,
    max_per_source: usize,
    retry_after: usize,
    timeout: Duration,
    metrics: HandshakeMetrics,
    /// Handshakes in progress from validated addresses, when there is a limit per address.
    per_source: Arc<Mutex<PerSource>>,
}

/// A handshake counted as in progress until dropped.
pub(crate) struct InProgress {
    gauge: Gauge,
    /// Where it is counted per address too.
    source: Option<(Source, Arc<Mutex<PerSource>>)>,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.gauge.dec();
        if let Some((source, per_source)) = &self.source {
            per_source
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(*source);
        }
    }
}

impl Handshakes {
    pub(crate) fn new(config: &LimitsConfig, metrics: HandshakeMetrics) -> Handshakes {
        Handshakes {
            max: limit(config.max_handshakes),
            max_per_source: limit(config.max_handshakes_per_address),
            // 0 here is "always", not "no limit".
            retry_after: usize::try_from(config.retry_after_handshakes).unwrap_or(usize::MAX),
            timeout: Duration::from_millis(config.handshake_timeout_ms),
            metrics,
            per_source: Arc::default(),
        }
    }

    /// How long a handshake may take before it is dropped.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `from_source`: handshakes in progress from the same validated address (None: the
    /// address is not validated); `from_node`: the address is one of a node's.
    fn decide(&self, in_progress: usize, from_source: Option<usize>, from_node: bool) -> Admission {
        match from_source {
            Some(_) if from_node => Admission::Accept,
            None if in_progress >= self.retry_after => Admission::Retry,
            None if from_node && in_progress >= self.max => Admission::Retry,
            _ if in_progress >= self.max => Admission::Refuse,
            Some(n) if n >= self.max_per_source => Admission::Refuse,
            _ => Admission::Accept,
        }
    }

    /// Sends the Retry or the refusal `incoming` gets, or hands it back to be accepted,
    /// counted as in progress. Called from the one accept loop, so the count it reads is
    /// not raised behind its back.
    pub(crate) fn admit(
        &self,
        incoming: quinn::Incoming,
        nodes: &NodeAddresses,
    ) -> Option<(quinn::Incoming, InProgress)> {
        let in_progress = usize::try_from(self.metrics.in_progress.get()).unwrap_or(0);
        let validated = incoming.remote_address_validated();
        let from_node = nodes.contains(incoming.remote_address().ip());
        // Counted per address only where there is a limit, and only once validated. Only
        // this loop adds to the counts, so they cannot rise between the check and the add.
        let source = (validated && self.max_per_source != usize::MAX)
            .then(|| Source::of(incoming.remote_address().ip()));
        let from_source = match source {
            Some(s) => Some(self.per_source().get(s)),
            None => validated.then_some(0),
        };
        match self.decide(in_progress, from_source, from_node) {
            Admission::Accept => {
                if from_node && self.decide(in_progress, from_source, false) == Admission::Refuse {
                    self.metrics.let_through.inc();
                }
                self.metrics.in_progress.inc();
                if let Some(s) = source {
                    self.per_source().add(s);
                }
                Some((
                    incoming,
                    InProgress {
                        gauge: self.metrics.in_progress.clone(),
                        source: source.map(|s| (s, self.per_source.clone())),
                    },
                ))
            }
            Admission::Retry => {
                self.metrics.retried.inc();
                // Not validated means a Retry may be sent (quinn guarantees it); refused if not.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                None
            }
            Admission::Refuse => {
                self.metrics.refused.inc();
                tracing::debug!(
                    remote = %incoming.remote_address(),
                    in_progress,
                    from_address = from_source,
                    "handshake refused: as many in progress as the node takes (in all or from the address)"
                );
                incoming.refuse();
                None
            }
        }
    }

    fn per_source(&self) -> std::sync::MutexGuard<'_, PerSource> {
        self.per_source.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a handshake given up for taking longer than the timeout.
    pub(crate) fn timed_out(&self) {
        self.metrics.timed_out.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshakes(max: u64, retry_after: u64, per_address: u64) -> Handshakes {
        Handshakes::new(
            &LimitsConfig {
                max_handshakes: max,
                retry_after_handshakes: retry_after,
                max_handshakes_per_address: per_address,
                ..LimitsConfig::default()
            },
            HandshakeMetrics::default(),
        )
    }

    #[test]
    fn unvalidated_addresses_are_retried_under_load_and_all_refused_at_the_maximum() {
        use Admission::*;
        let h = handshakes(10, 4, 0);
        let at = |n: usize| (h.decide(n, None, false), h.decide(n, Some(n), false));
        assert_eq!(at(0), (Accept, Accept));
        assert_eq!(at(3), (Accept, Accept));
        // From the threshold on, an address must prove itself; one that has is accepted.
        assert_eq!(at(4), (Retry, Accept));
        assert_eq!(at(9), (Retry, Accept));
        // At the maximum a validated address is refused; an unvalidated one still only
        // costs a Retry (no state), and comes back validated to be refused or accepted.
        assert_eq!(at(10), (Retry, Refuse));
        assert_eq!(at(1_000_000), (Retry, Refuse));

        // 0: every new address proves itself; no maximum.
        let h = handshakes(0, 0, 0);
        assert_eq!(h.decide(0, None, false), Retry);
        assert_eq!(
            h.decide(usize::MAX - 1, Some(usize::MAX - 1), false),
            Accept
        );
    }

    #[test]
    fn a_validated_address_is_refused_at_its_share_and_an_unvalidated_one_is_not_counted() {
        use Admission::*;
        let h = handshakes(100, 10, 3);
        assert_eq!(h.decide(5, Some(2), false), Accept);
        assert_eq!(h.decide(5, Some(3), false), Refuse);
        // Not validated, under the Retry threshold: taken on (the threshold bounds them all).
        assert_eq!(h.decide(5, None, false), Accept);
        assert_eq!(h.decide(10, None, false), Retry);
    }

    #[test]
    fn a_nodes_address_is_taken_on_when_full_once_validated() {
        use Admission::*;
        let h = handshakes(10, 4, 3);
        // Validated: taken on past the maximum and past its address's share.
        assert_eq!(h.decide(1_000, Some(1_000), true), Accept);
        // Not validated: a Retry first,
        assert_eq!(h.decide(1_000, None, true), Retry);
        // also where anyone else would be refused (no Retry before the maximum here).
        let h = handshakes(10, 100, 0);
        assert_eq!(h.decide(10, None, true), Retry);
        assert_eq!(h.decide(10, None, false), Refuse);
        assert_eq!(h.decide(5, None, true), Accept);
    }
}
