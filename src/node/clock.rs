//! This node's wall clock, and how far it is from its peers'.
//!
//! Time enters the replicated tables only as the `at` of the commands nodes propose, stamped
//! by the node that serves the request, and apply judges expiry by it: a claim whose
//! certificate expired before `at` is free, and revocations of certificates expired (plus a
//! grace) before `at` are dropped. So a node whose clock ran a day ahead would, with its
//! next write, free ids still claimed and drop revocations of certificates still valid
//! elsewhere; one running behind would issue certificates already old, and judge expired
//! certificates valid. Every node therefore asks each peer for its clock every
//! [`PROBE_INTERVAL`] (`PeerRequest::Clock`), and a node whose clock is more than
//! `max_clock_skew_ms` from its peers' — not within it of enough of them to make a majority
//! of the voters with itself — neither stamps writes nor judges certificates until it is
//! again ([`Clock::checked_secs`]; agents are answered `clock_skew`). A peer without a
//! recent sample (unreachable, or of a build before clock probes) counts neither for nor
//! against it, and a node with no sample at all once its first round of probes is over
//! judges itself fine: without a quorum it commits nothing anyway. Before that round is
//! over a node with peers vouches for nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::Inner;
use crate::raft::network::{PeerRequest, PeerResponse};
use crate::raft::types::NodeId;

/// How often each peer's clock is asked for.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe answered later than this is dropped: its error would be too large to judge by.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a peer's sample counts.
const FRESH_FOR: Duration = Duration::from_secs(10);

/// Offsets of the peers' clocks from this node's, for `/metrics`.
pub(crate) type OffsetGauges = Family<PeerLabel, Gauge<f64, AtomicU64>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct PeerLabel {
    peer: String,
}

impl PeerLabel {
    pub(crate) fn of(peer: NodeId) -> PeerLabel {
        PeerLabel {
            peer: peer.to_string(),
        }
    }
}

pub(crate) struct Clock {
    /// Added to the system clock, in milliseconds: a node given a wrong clock, in tests.
    shift_ms: AtomicI64,
    max_skew_ms: u64,
    /// Each peer's clock minus this node's, in milliseconds, and when it was measured.
    samples: Mutex<BTreeMap<NodeId, (i64, Instant)>>,
    /// Whether the first round of probes is over: until then a node that has peers does not
    /// know whether its clock agrees with theirs (a node restarted with a wrong clock would
    /// otherwise stamp the registrations of its agents reconnecting at once).
    asked: AtomicBool,
    gauges: OffsetGauges,
}

/// A node's clock in `agentreg status` (`NodeStatus::clock`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClockStatus {
    /// Why this node stamps no writes and judges no certificates (its agents are answered
    /// `clock_skew`); absent while it does.
    pub refused: Option<String>,
    /// Each peer's clock minus this node's, in seconds, where a probe answered in the last
    /// ten seconds.
    pub peer_offsets_secs: BTreeMap<NodeId, f64>,
}

impl ClockStatus {
    /// The peer offset furthest from zero, in seconds.
    pub fn widest_offset_secs(&self) -> Option<f64> {
        self.peer_offsets_secs
            .values()
            .copied()
            .max_by(|a, b| a.abs().total_cmp(&b.abs()))
    }
}

/// This node's clock is too far from its peers' to stamp a write or judge a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this node cannot vouch for its clock ({0}); it stamps no writes and judges no \
     certificates until it agrees with its peers: check its time synchronisation, or send the \
     request to another node"
)]
pub struct ClockSkew(String);

impl Clock {
    pub(crate) fn new(max_skew_ms: u64, gauges: OffsetGauges) -> Clock {
        Clock {
            shift_ms: AtomicI64::new(0),
            max_skew_ms,
            samples: Mutex::default(),
            asked: AtomicBool::new(false),
            gauges,
        }
    }

    /// This node's wall clock, in milliseconds since the Unix epoch.
    pub(crate) fn unix_millis(&self) -> u64 {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        system.saturating_add_signed(self.shift_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock `ms` away from the system's (tests).
    pub(crate) fn shift(&self, ms: i64) {
        self.shift_ms.store(ms, Ordering::Relaxed);
    }

    /// This node's time in seconds, to stamp a command with or to judge expiry by, unless
    /// its clock disagrees with its peers' (see the module doc). `voters`: how many voters
    /// the cluster has, this node included (asked only before the first round of probes
    /// is over, or when some peer disagrees).
    pub(crate) fn checked_secs(&self, voters: impl Fn() -> usize) -> Result<u64, ClockSkew> {
        if !self.asked.load(Ordering::Acquire) && voters() > 1 {
            return Err(ClockSkew(
                "its peers' clocks are not known yet: it has just started".to_owned(),
            ));
        }
        let fresh: Vec<(NodeId, i64)> = {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = samples
                .iter()
                .filter(|(_, (_, taken))| taken.elapsed() < FRESH_FOR);
            if fresh
                .clone()
                .all(|(_, (offset, _))| offset.unsigned_abs() <= self.max_skew_ms)
            {
                return Ok(self.unix_millis() / 1000);
            }
            fresh.map(|(peer, (offset, _))| (*peer, *offset)).collect()
        };
        judge(&fresh, voters(), self.max_skew_ms)?;
        Ok(self.unix_millis() / 1000)
    }

    /// This node's clock as `agentreg status` shows it: whether it vouches for it now, and
    /// the offsets of the peers' clocks measured in the last [`FRESH_FOR`].
    pub(crate) fn status(&self, voters: impl Fn() -> usize) -> ClockStatus {
        let refused = self.checked_secs(voters).err().map(|e| e.0);
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let peer_offsets_secs = samples
            .iter()
            .filter(|(_, (_, taken))| taken.elapsed() < FRESH_FOR)
            .map(|(peer, (offset, _))| (*peer, *offset as f64 / 1000.0))
            .collect();
        ClockStatus {
            refused,
            peer_offsets_secs,
        }
    }

    /// Drops what is known of peers that are no longer voters: their samples and their
    /// gauges, which would otherwise stay in `/metrics` with their last value.
    fn forget_all_but(&self, voters: &[NodeId]) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.retain(|peer, _| {
            let keep = voters.contains(peer);
            if !keep {
                self.gauges.remove(&PeerLabel {
                    peer: peer.to_string(),
                });
            }
            keep
        });
    }

    fn record(&self, peer: NodeId, offset_ms: i64) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let before = samples.insert(peer, (offset_ms, Instant::now()));
        let was_off = before.is_some_and(|(o, _)| o.unsigned_abs() > self.max_skew_ms);
        let is_off = offset_ms.unsigned_abs() > self.max_skew_ms;
        if is_off && !was_off {
            tracing::warn!(
                peer,
                offset_secs = offset_ms as f64 / 1000.0,
                max_skew_ms = self.max_skew_ms,
                "a peer's clock differs from this node's by more than max_clock_skew_ms"
            );
        } else if was_off && !is_off {
            tracing::info!(peer, "a peer's clock agrees with this node's again");
        }
        self.gauges
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .set(offset_ms as f64 / 1000.0);
    }
}

/// Whether a node whose peers' clocks are `offsets` from its own (milliseconds) may trust
/// its clock: yes unless some peer is further than `max_skew_ms` and fewer than half the
/// other voters are within it (with itself, not a majority of `voters`).
fn judge(offsets: &[(NodeId, i64)], voters: usize, max_skew_ms: u64) -> Result<(), ClockSkew> {
    let (agree, disagree): (Vec<_>, Vec<_>) = offsets
        .iter()
        .partition(|(_, o)| o.unsigned_abs() <= max_skew_ms);
    if disagree.is_empty() || agree.len() >= voters / 2 {
        return Ok(());
    }
    let said: Vec<String> = disagree
        .iter()
        .map(|(peer, o)| {
            let secs = o.unsigned_abs() as f64 / 1000.0;
            let side = if *o > 0 { "behind" } else { "ahead of" };
            format!("{secs:.1} s {side} node {peer}'s")
        })
        .collect();
    Err(ClockSkew(said.join(", ")))
}

/// Asks every other voter for its clock, every [`PROBE_INTERVAL`], until the node stops.
pub(super) fn spawn_probes(inner: Arc<Inner>) {
    spawn_rounds(inner, true, |inner, peers| async move {
        let ids: Vec<NodeId> = peers.iter().map(|(id, _)| *id).collect();
        inner.clock.forget_all_but(&ids);
        let probes = peers.iter().map(|(id, addr)| probe(&inner, *id, addr));
        futures::future::join_all(probes).await;
        inner.clock.asked.store(true, Ordering::Release);
    });
}

/// Runs `round` over the other members, as (id, address), every [`PROBE_INTERVAL`] until
/// the node stops: the voters only, or the learners too.
pub(super) fn spawn_rounds<F, Fut>(inner: Arc<Inner>, voters_only: bool, round: F)
where
    F: Fn(Arc<Inner>, Vec<(NodeId, String)>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let peers: Vec<(NodeId, String)> = {
                let metrics = inner.raft.metrics();
                let m = metrics.borrow();
                let membership = m.membership_config.membership();
                membership
                    .nodes()
                    .filter(|(id, _)| **id != inner.id)
                    .filter(|(id, _)| !voters_only || membership.voter_ids().any(|v| v == **id))
                    .map(|(id, node)| (*id, node.addr.clone()))
                    .collect()
            };
            round(inner.clone(), peers).await;
        }
    });
}

/// One probe of `peer`'s clock: its answer, taken as read halfway through the round trip.
async fn probe(inner: &Inner, peer: NodeId, addr: &str) {
    let client = inner.peers.client(peer, addr);
    let (sent, started) = (inner.clock.unix_millis(), Instant::now());
    if let Ok(PeerResponse::Clock(theirs)) = client.call(&PeerRequest::Clock, PROBE_TIMEOUT).await {
        let half_trip = (started.elapsed().as_millis() / 2) as u64;
        let ours = sent + half_trip;
        inner.clock.record(peer, theirs as i64 - ours as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Until its first round of probes is over, a node with peers vouches for nothing.
    #[test]
    fn a_node_with_peers_waits_for_its_first_round_of_probes() {
        let clock = Clock::new(5_000, OffsetGauges::default());
        assert!(
            clock.checked_secs(|| 1).is_ok(),
            "a lone voter has no one to ask"
        );
        let early = clock.checked_secs(|| 3).unwrap_err();
        assert!(early.to_string().contains("not known yet"), "{early}");
        clock.asked.store(true, Ordering::Release);
        assert!(clock.checked_secs(|| 3).is_ok());
    }

    #[test]
    fn a_clock_is_trusted_while_a_majority_of_the_voters_agree_with_it() {
        let max = 5_000;
        // Three voters: one peer within the bound is enough, whatever the other says.
        assert!(judge(&[], 3, max).is_ok(), "no samples: nothing to go by");
        assert!(judge(&[(2, 10), (3, 90_000_000)], 3, max).is_ok());
        assert!(judge(&[(2, -4_999), (3, 5_000)], 3, max).is_ok());
        // Both peers off, or the only one heard from: not trusted.
        let both = judge(&[(2, 86_400_000), (3, 86_400_100)], 3, max).unwrap_err();
        assert!(
            both.to_string().contains("86400.0 s behind node 2's")
                && both.to_string().contains("86400.1 s behind node 3's"),
            "{both}"
        );
        let ahead = judge(&[(3, -6_000)], 3, max).unwrap_err();
        assert!(
            ahead.to_string().contains("6.0 s ahead of node 3's"),
            "{ahead}"
        );
        // Five voters: two peers within the bound make a majority with this node.
        assert!(judge(&[(2, 0), (3, 0), (4, 9_000), (5, 9_000)], 5, max).is_ok());
        assert!(judge(&[(2, 0), (3, 9_000), (4, 9_000), (5, 9_000)], 5, max).is_err());
        // A single voter has no one to disagree with.
        assert!(judge(&[], 1, max).is_ok());
    }
}
