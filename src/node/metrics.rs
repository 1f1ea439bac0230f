//! Observability over HTTP: Prometheus `/metrics`, `/healthz` (the process serves) and
//! `/readyz` (caught up and part of a quorum: a read-index barrier succeeds).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use openraft::ServerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::Inner;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    command: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    log_format: String,
}

type HistogramFamily = Family<CommandLabel, Histogram, fn() -> Histogram>;

/// The node's metrics. Request metrics are recorded as requests finish; the rest is read
/// from Raft and the tables when scraped.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    role: Family<RoleLabel, Gauge>,
    gauges: Vec<(&'static str, Gauge)>,
    pings_sent: Counter,
    pings_missed: Counter,
    evictions_proposed: Counter,
    evictions_committed: Counter,
    forwarding: Forwarding,
    read_index: ReadIndex,
    clock_offsets: super::clock::OffsetGauges,
    /// The members' log formats (`builds.rs`).
    pub(crate) peer_log_formats: super::builds::FormatGauges,
    /// Claims refused for their source's rate (`limits.rs`).
    pub(crate) claims_limited: Counter,
    /// Agent connections closed unread at a connection limit (`limits.rs`).
    pub(crate) connections_refused: Counter,
    /// Handshakes in progress, retried, refused, given up (`handshakes.rs`).
    pub(crate) handshakes: super::handshakes::HandshakeMetrics,
    /// Leadership hand-overs done and given up (`handover.rs`).
    pub(crate) handovers: Handovers,
}

/// Counters of the leadership hand-overs this node tried as leader (on stopping, or asked
/// by `agentreg members move-leader`); one refused before anything was done is not counted.
#[derive(Clone, Default)]
pub(crate) struct Handovers {
    pub(crate) handed: Counter,
    pub(crate) failed: Counter,
}

/// Counters of the writes a follower forwards to the leader: calls below writes means the
/// forwarder batches.
#[derive(Clone, Default)]
pub(crate) struct Forwarding {
    pub(crate) writes: Counter,
    pub(crate) calls: Counter,
}

/// Counters of the read index that linearizable validations wait for: rounds below reads
/// means the rounds are shared.
#[derive(Clone, Default)]
pub(crate) struct ReadIndex {
    pub(crate) reads: Counter,
    pub(crate) rounds: Counter,
}

/// Gauges filled at scrape time, by name.
const GAUGES: &[(&str, &str)] = &[
    ("agentreg_term", "Current Raft term"),
    (
        "agentreg_last_log_index",
        "Index of the last entry in this node's log",
    ),
    (
        "agentreg_commit_index",
        "Index of the last entry this node knows committed",
    ),
    (
        "agentreg_applied_index",
        "Index of the last entry applied to the tables",
    ),
    (
        "agentreg_leader_id",
        "Node id of the current leader (0 when unknown)",
    ),
    (
        "agentreg_agents_connected",
        "Agents registered on this node's connections",
    ),
    ("agentreg_claims", "Claims in the replicated table"),
    (
        "agentreg_sessions",
        "Sessions in the replicated table, all nodes",
    ),
    (
        "agentreg_revocations",
        "Revocations kept until their certificates expire",
    ),
    ("agentreg_signing_keys", "Keys in the signing keyring"),
    (
        "agentreg_tls_certificate_expiry_timestamp_seconds",
        "When this node's TLS certificate chain stops verifying (the earliest expiry of the \
         certificate and its intermediates), seconds since the Unix epoch",
    ),
    (
        "agentreg_data_dir_bytes",
        "Bytes in the files under this node's data dir",
    ),
    (
        "agentreg_data_dir_available_bytes",
        "Bytes the node may still write on its data dir's filesystem",
    ),
    (
        "agentreg_clock_refused",
        "1 while this node stamps no writes and judges no certificates: its clock disagrees \
         with its peers' (agents are answered clock_skew)",
    ),
    (
        "agentreg_expired_claims_held_back",
        "1 while this node leads and expired claims are due to be forgotten, but a member \
         has not said it reads the log entry that forgets them (mid-upgrade)",
    ),
];

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "agentreg_requests",
            "Agent requests by command and outcome",
            requests.clone(),
        );
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "agentreg_request_duration_seconds",
            "Agent request latency by command",
            latency.clone(),
        );
        let role = Family::<RoleLabel, Gauge>::default();
        registry.register(
            "agentreg_role",
            "1 for this node's current Raft role",
            role.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        let this = crate::raft::network::BuildInfo::this();
        build
            .get_or_create(&BuildLabels {
                version: this.version,
                log_format: this.log_format.to_string(),
            })
            .set(1);
        registry.register(
            "agentreg_build_info",
            "1, labelled with this node's version and the newest kind of log entry it reads",
            build,
        );
        let gauges: Vec<(&'static str, Gauge)> = GAUGES
            .iter()
            .map(|(name, help)| {
                let g = Gauge::default();
                registry.register(*name, *help, g.clone());
                (*name, g)
            })
            .collect();
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let pings_sent = counter("agentreg_pings_sent", "Pings sent to this node's agents");
        let pings_missed = counter("agentreg_pings_missed", "Pings unanswered or timed out");
        let evictions_proposed = counter(
            "agentreg_evictions_proposed",
            "Evictions this node proposed",
        );
        let evictions_committed = counter(
            "agentreg_evictions_committed",
            "Sessions this node's evictions removed",
        );
        let forwarding = Forwarding {
            writes: counter(
                "agentreg_forwarded_writes",
                "Writes this node forwarded to the leader",
            ),
            calls: counter(
                "agentreg_forward_calls",
                "Calls to the leader that carried them (one per batch)",
            ),
        };
        let read_index = ReadIndex {
            reads: counter(
                "agentreg_read_index_reads",
                "Linearizable reads (validations) that waited for a read index",
            ),
            rounds: counter(
                "agentreg_read_index_rounds",
                "Rounds that fetched one for them (a leadership confirmation or a call to the leader)",
            ),
        };
        let claims_limited = counter(
            "agentreg_claims_rate_limited",
            "Claims refused because their source address was over [limits] claims_per_hour_per_address",
        );
        let connections_refused = counter(
            "agentreg_agent_connections_refused",
            "Agent connections closed unread because the node was at [limits] max_agent_connections or max_agent_connections_per_address",
        );
        let handovers = Handovers {
            handed: counter(
                "agentreg_leadership_handovers",
                "Times this node, leading, handed its leadership to another node (on stopping, or by members move-leader)",
            ),
            failed: counter(
                "agentreg_leadership_handovers_failed",
                "Leadership hand-overs this node tried and gave up (the cluster then elects as after a crash)",
            ),
        };
        let handshakes = super::handshakes::HandshakeMetrics {
            retried: counter(
                "agentreg_handshakes_retried",
                "New connections sent a QUIC Retry to prove their address (handshakes at [limits] retry_after_handshakes)",
            ),
            refused: counter(
                "agentreg_handshakes_refused",
                "New connections refused before their handshake (handshakes at [limits] max_handshakes)",
            ),
            timed_out: counter(
                "agentreg_handshakes_timed_out",
                "Handshakes dropped unfinished after [limits] handshake_timeout_ms",
            ),
            let_through: counter(
                "agentreg_handshakes_let_through",
                "New connections from an address where this node has met another node, taken on past [limits] max_handshakes or max_handshakes_per_address",
            ),
            in_progress: Gauge::default(),
        };
        registry.register(
            "agentreg_handshakes_in_progress",
            "QUIC handshakes this node has accepted and not yet finished",
            handshakes.in_progress.clone(),
        );
        let clock_offsets = super::clock::OffsetGauges::default();
        registry.register(
            "agentreg_peer_clock_offset_seconds",
            "How far each peer's wall clock is ahead of this node's (negative: behind)",
            clock_offsets.clone(),
        );
        let peer_log_formats = super::builds::FormatGauges::default();
        registry.register(
            "agentreg_peer_log_format",
            "The newest kind of log entry each other member said it reads (1 for a build \
             before build probes)",
            peer_log_formats.clone(),
        );
        Metrics {
            peer_log_formats,
            claims_limited,
            connections_refused,
            handshakes,
            handovers,
            registry,
            requests,
            latency,
            role,
            gauges,
            pings_sent,
            pings_missed,
            evictions_proposed,
            evictions_committed,
            forwarding,
            read_index,
            clock_offsets,
        }
    }

    /// The peers' clock offsets, for the clock probes to set.
    pub(crate) fn clock_offsets(&self) -> super::clock::OffsetGauges {
        self.clock_offsets.clone()
    }

    /// The read-index counters.
    pub(crate) fn read_index(&self) -> ReadIndex {
        self.read_index.clone()
    }

    /// The forwarding counters, for the forwarder to count with.
    pub(crate) fn forwarding(&self) -> Forwarding {
        self.forwarding.clone()
    }

    /// Records one agent request.
    pub(crate) fn request(&self, command: &str, ok: bool, took: Duration) {
        let command = command.to_owned();
        self.requests
            .get_or_create(&RequestLabels {
                command: command.clone(),
                outcome: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.latency
            .get_or_create(&CommandLabel { command })
            .observe(took.as_secs_f64());
    }

    fn gauge(&self, name: &str, v: u64) {
        if let Some((_, g)) = self.gauges.iter().find(|(n, _)| *n == name) {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    fn counter_to(c: &Counter, v: u64) {
        let now = c.get();
        if v > now {
            c.inc_by(v - now);
        }
    }
}

fn render(inner: &Inner) -> String {
    let m = &inner.metrics;
    let raft = inner.raft.metrics().borrow().clone();
    for role in ["leader", "follower", "candidate", "learner", "shutdown"] {
        let current = match raft.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        m.role
            .get_or_create(&RoleLabel {
                role: role.to_owned(),
            })
            .set(i64::from(role == current));
    }
    let (applied, sizes) = {
        let a = inner.state.read();
        (a.last_applied.map_or(0, |l| l.index), a.state.sizes())
    };
    m.gauge("agentreg_term", raft.current_term);
    m.gauge("agentreg_last_log_index", raft.last_log_index.unwrap_or(0));
    m.gauge(
        "agentreg_commit_index",
        inner.log.committed_index().unwrap_or(0),
    );
    m.gauge("agentreg_applied_index", applied);
    m.gauge("agentreg_leader_id", raft.current_leader.unwrap_or(0));
    m.gauge("agentreg_agents_connected", inner.conns.agents() as u64);
    m.gauge("agentreg_claims", sizes.claims as u64);
    m.gauge("agentreg_sessions", sizes.sessions as u64);
    m.gauge("agentreg_revocations", sizes.revocations as u64);
    m.gauge("agentreg_signing_keys", sizes.keys as u64);
    m.gauge(
        "agentreg_tls_certificate_expiry_timestamp_seconds",
        inner.tls.valid_until(),
    );
    let disk = super::DiskUsage::of(&inner.config.data_dir);
    m.gauge("agentreg_data_dir_bytes", disk.used_bytes);
    if let Some(available) = disk.available_bytes {
        m.gauge("agentreg_data_dir_available_bytes", available);
    }
    m.gauge(
        "agentreg_clock_refused",
        u64::from(super::write::now_checked(inner).is_err()),
    );
    m.gauge(
        "agentreg_expired_claims_held_back",
        u64::from(super::duties::forgetting_held_back(inner).is_some()),
    );
    let c = &inner.counters;
    Metrics::counter_to(&m.pings_sent, c.pings_sent.load(Relaxed));
    Metrics::counter_to(&m.pings_missed, c.pings_missed.load(Relaxed));
    Metrics::counter_to(&m.evictions_proposed, c.evictions_proposed.load(Relaxed));
    Metrics::counter_to(&m.evictions_committed, c.evictions_committed.load(Relaxed));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

async fn metrics(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(&inner),
    )
}

async fn healthz(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    let running = inner.raft.metrics().borrow().running_state.is_ok();
    if running && !inner.shutdown.is_cancelled() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "raft stopped\n".to_owned())
    }
}

async fn readyz(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    match super::admin::readiness(&inner).await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

/// Serves the HTTP endpoints on `listener` until the node shuts down.
pub(super) fn spawn(inner: Arc<Inner>, listener: tokio::net::TcpListener) {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(inner.clone());
    let stop = inner.shutdown.clone();
    inner.tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
}
