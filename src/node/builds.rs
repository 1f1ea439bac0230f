//! Which kinds of log entry each member can read, asked every 2 s (`PeerRequest::Build`, at
//! the clock probes' [`PROBE_INTERVAL`](super::clock::PROBE_INTERVAL)). A member that cannot
//! decode an entry stops following at it, and with two voters of three stopped the cluster
//! commits nothing more; so the leader writes an entry of a kind newer than every build
//! reads ([`crate::registry::Op::log_format`]) only once every member has said it reads
//! that kind. A rolling upgrade can then go in any order: until the last member is
//! upgraded, the cluster does without what the new kind does (today: forgetting expired
//! claims, which waits).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::clock::{PeerLabel, PROBE_TIMEOUT};
use super::Inner;
use crate::raft::network::{PeerError, PeerRequest, PeerResponse};
use crate::raft::types::NodeId;

/// What a member that refuses `PeerRequest::Build` unread reads: it is of a build before
/// build probes, which read every kind of entry up to claim tokens and none after.
const FORMAT_OF_EARLIER_BUILDS: u32 = 1;

pub(crate) type FormatGauges = Family<PeerLabel, Gauge>;

/// The log format each peer last said it reads.
#[derive(Debug, Default)]
pub(crate) struct PeerFormats {
    known: Mutex<BTreeMap<NodeId, u32>>,
    gauges: FormatGauges,
}

impl PeerFormats {
    pub(crate) fn new(gauges: FormatGauges) -> PeerFormats {
        PeerFormats {
            known: Mutex::default(),
            gauges,
        }
    }

    fn record(&self, peer: NodeId, format: u32) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.insert(peer, format) != Some(format) {
            tracing::info!(peer, log_format = format, "a peer's log format");
        }
        self.gauges
            .get_or_create(&PeerLabel::of(peer))
            .set(i64::from(format));
    }

    /// Forgets what members no longer in the cluster said.
    fn retain(&self, members: &[NodeId]) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|peer, _| {
            let keep = members.contains(peer);
            if !keep {
                self.gauges.remove(&PeerLabel::of(*peer));
            }
            keep
        });
    }

    /// Whether every one of `members` other than `me` has said it reads entries of
    /// `format`; if not, the first that has not (and what it said, if anything).
    pub(crate) fn all_read(
        &self,
        me: NodeId,
        members: impl IntoIterator<Item = NodeId>,
        format: u32,
    ) -> Result<(), (NodeId, Option<u32>)> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        for peer in members.into_iter().filter(|p| *p != me) {
            match known.get(&peer) {
                Some(f) if *f >= format => {}
                said => return Err((peer, said.copied())),
            }
        }
        Ok(())
    }
}

/// Whether every member of the cluster (voters and learners) reads log entries of
/// `format`; if not, which does not, in words.
pub(super) fn members_read(inner: &Inner, format: u32) -> Result<(), String> {
    if format <= FORMAT_OF_EARLIER_BUILDS {
        return Ok(());
    }
    let members: Vec<NodeId> = {
        let metrics = inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    };
    inner
        .peer_formats
        .all_read(inner.id, members, format)
        .map_err(|(peer, said)| match said {
            Some(f) => format!("node {peer} reads log format {f}, not {format}: upgrade it"),
            None => format!("node {peer} has not said which log format it reads"),
        })
}

/// Asks every other member which log format it reads, every
/// [`PROBE_INTERVAL`](super::clock::PROBE_INTERVAL), until the node stops. A member that does
/// not answer keeps what it said last.
pub(super) fn spawn_probes(inner: Arc<Inner>) {
    super::clock::spawn_rounds(inner, false, |inner, peers| async move {
        let ids: Vec<NodeId> = peers.iter().map(|(id, _)| *id).collect();
        inner.peer_formats.retain(&ids);
        let probes = peers.iter().map(|(id, addr)| probe(&inner, *id, addr));
        futures::future::join_all(probes).await;
    });
}

async fn probe(inner: &Inner, peer: NodeId, addr: &str) {
    let client = inner.peers.client(peer, addr);
    match client.call(&PeerRequest::Build, PROBE_TIMEOUT).await {
        Ok(PeerResponse::Build(info)) => inner.peer_formats.record(peer, info.log_format),
        Err(PeerError::Refused { .. }) => inner.peer_formats.record(peer, FORMAT_OF_EARLIER_BUILDS),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_is_written_only_once_every_other_member_has_said_it_reads_it() {
        let formats = PeerFormats::default();
        assert_eq!(formats.all_read(1, [1], 2), Ok(()), "alone");
        assert_eq!(formats.all_read(1, [1, 2, 3], 2), Err((2, None)));
        formats.record(2, 2);
        assert_eq!(formats.all_read(1, [1, 2, 3], 2), Err((3, None)));
        formats.record(3, FORMAT_OF_EARLIER_BUILDS);
        assert_eq!(formats.all_read(1, [1, 2, 3], 2), Err((3, Some(1))));
        assert_eq!(formats.all_read(1, [1, 2, 3], 1), Ok(()));
        formats.record(3, 2);
        assert_eq!(formats.all_read(1, [1, 2, 3], 2), Ok(()));
        // A member downgraded says so at the next probe.
        formats.record(2, 1);
        assert_eq!(formats.all_read(1, [1, 2, 3], 2), Err((2, Some(1))));
    }
}
