//! agentreg and etcd 3.4 side by side, in one run on one machine: three agentreg processes
//! and three etcd members on loopback, the same workloads against both, and a table with
//! the ratio agentreg/etcd per row. See docs/benchmarks.md.
//!
//! etcd plays the registry the way operators would build it: a claim is a txn
//! put-if-absent with a lease, a heartbeat is a lease keepalive, a validation is a get
//! (serializable or linearizable), an eviction is a lease expiring.

mod agentreg_side;
mod cpu;
mod etcd_side;
mod floor;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use stats::{Cell, Row};

/// Agents registered, then taken over, in the registration rows (each on a connection of its
/// own on agentreg's side: twice as many connections). Until 2026-12-07 there were 3,000,
/// about a second of each row, so that a second of a slow host moved the row.
pub const REGISTRATIONS: usize = 10_000;

#[derive(Debug, Clone, Parser)]
#[command(about = "agentreg and etcd 3.4 side by side (see docs/benchmarks.md)")]
pub struct Args {
    /// The agentreg binary (release build).
    #[arg(long, default_value = "target/release/agentreg")]
    pub agentreg: PathBuf,
    /// The etcd 3.4 server binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd: PathBuf,
    /// Seconds each throughput row runs.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Agents held connected with heartbeats (and etcd leases kept alive).
    #[arg(long, default_value_t = 5000)]
    pub agents: usize,
    /// Repetitions of the failover and eviction rows (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Heartbeat interval of the agentreg nodes; an agent is evicted after three silent
    /// intervals, and etcd's leases get that TTL (rounded up to whole seconds).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Run only these groups (comma-separated): floor, claims, validate, register, agents,
    /// eviction, failover. All by default.
    #[arg(long, value_delimiter = ',', value_parser = [
        "floor", "claims", "validate", "register", "agents", "eviction", "failover",
    ])]
    pub only: Vec<String>,
    /// Run both sides this many times, alternating (agentreg, etcd, agentreg, ...): the
    /// tables show each side's middle round, and each throughput row's rounds are listed
    /// with the ratio of each pair, which a machine whose speed drifts affects less.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Run etcd with the transport security agentreg always has: peers with mutual TLS,
    /// clients over TLS checking the members' certificates (dev material like the nodes').
    /// Without it etcd runs plaintext, as in the runs before 2026-12-04.
    #[arg(long)]
    pub etcd_tls: bool,
    /// Threads each server process schedules its work on: `worker_threads` for every
    /// agentreg node, `GOMAXPROCS` for every etcd member. By default both as shipped (one
    /// per core). The bench's own client is unchanged.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads_per_server: Option<u16>,
    /// Skip etcd (agentreg rows only).
    #[arg(long)]
    pub no_etcd: bool,
    /// Also write the table as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Args {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.secs)
    }

    /// Whether the group of rows `name` runs.
    pub fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    /// These arguments with the node's shipped heartbeat interval (30 s): the registration
    /// rows run on clusters of their own with it, so that they measure registering and taking
    /// over, not the heartbeats of the sessions they leave behind (pings at 1 s for thousands
    /// of sessions are as many messages a second as the rows' own requests; the held-agents
    /// row measures heartbeats).
    pub fn with_shipped_heartbeat(&self) -> Args {
        Args {
            heartbeat_ms: agentreg::config::HeartbeatConfig::default().interval_ms,
            ..self.clone()
        }
    }

    /// The eviction timeout both systems are given.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(3 * self.heartbeat_ms)
    }
}

/// Keeps `inflight` operations going for `duration`; `op(slot)` is one operation.
pub async fn drive<F, Fut>(inflight: usize, duration: Duration, op: F) -> stats::Rate
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let end = std::time::Instant::now() + duration;
    drive_while(inflight, move || std::time::Instant::now() < end, op).await
}

/// Runs `count` operations, `inflight` at a time; `op(slot)` takes the next one.
pub async fn drive_count<F, Fut>(inflight: usize, count: usize, op: F) -> stats::Rate
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let left = AtomicUsize::new(count);
    drive_while(
        inflight,
        move || {
            left.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
        },
        op,
    )
    .await
}

/// `inflight` workers each run `op(slot)` for as long as `more()` says so.
async fn drive_while<M, F, Fut>(inflight: usize, more: M, op: F) -> stats::Rate
where
    M: Fn() -> bool + Send + Sync + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let (more, op) = (std::sync::Arc::new(more), std::sync::Arc::new(op));
    let cpu_before = cpu::Sample::now();
    let start = std::time::Instant::now();
    let tasks: Vec<_> = (0..inflight)
        .map(|slot| {
            let (more, op) = (more.clone(), op.clone());
            tokio::spawn(async move {
                let mut r = stats::Rate::default();
                while more() {
                    let t = std::time::Instant::now();
                    match op(slot).await {
                        Ok(()) => {
                            r.ok += 1;
                            r.latencies.push(t.elapsed());
                        }
                        Err(e) => {
                            r.failed += 1;
                            r.first_error.get_or_insert(e);
                        }
                    }
                }
                r
            })
        })
        .collect();
    let mut total = stats::Rate::default();
    for t in tasks {
        total.merge(t.await.expect("bench task"));
    }
    total.elapsed = start.elapsed();
    total.cpu = Some(cpu::Sample::now().since(&cpu_before));
    total
}

/// Sends each request of `work` on its connection, `inflight` at a time.
pub async fn drive_list(
    inflight: usize,
    work: std::sync::Arc<Vec<(quinn::Connection, serde_json::Value)>>,
) -> stats::Rate {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = work.len();
    drive_count(inflight, n, move |_| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (conn, req) = work[i].clone();
        async move { agentreg_side::request(&conn, req).await.map(|_| ()) }
    })
    .await
}

/// Claims (`op`) sent one after another from before `stop` is called until at least
/// [`STOP_WINDOW`] after it: the longest time between two acknowledged ones, which is how
/// long writes paused. A claim that fails is sent again (after 5 ms). Gives up after 60 s.
pub async fn longest_gap<F, Fut>(op: F, stop: impl FnOnce()) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let attempt = || async {
        tokio::time::timeout(Duration::from_secs(60), op())
            .await
            .unwrap_or(false)
    };
    while !attempt().await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut last = std::time::Instant::now();
    stop();
    let stopped = std::time::Instant::now();
    let mut longest = Duration::ZERO;
    loop {
        let ok = attempt().await;
        let now = std::time::Instant::now();
        if ok {
            longest = longest.max(now - last);
            last = now;
            if now - stopped >= STOP_WINDOW {
                return longest;
            }
        } else if now - stopped >= Duration::from_secs(60) {
            return longest.max(now - last);
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// How long after a stop [`longest_gap`] goes on claiming: past a lost leader's election on
/// either system.
pub const STOP_WINDOW: Duration = Duration::from_secs(5);

/// Sends SIGTERM to `child` (a graceful stop), without waiting for it to exit.
pub fn terminate(child: &std::process::Child) {
    // SAFETY: kill(2) on the pid of a child not yet reaped (so not reused).
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// Starts an attempt `op()` every `every` (earlier ones keep going) until one succeeds;
/// returns when the first success completed, measured from `since`. Gives up after 60 s.
pub async fn first_success<F, Fut>(since: std::time::Instant, every: Duration, op: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tick = tokio::time::interval(every);
    let give_up = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let attempt = op();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if attempt.await {
                        let _ = tx.send(std::time::Instant::now());
                    }
                });
            }
            Some(done) = rx.recv() => return done.duration_since(since),
            _ = &mut give_up => return Duration::from_secs(60),
        }
    }
}

/// Resident memory of a process, from /proc.
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|a| a == floor::SERVE_FLAG) {
        let dir = argv.next().context("--serve-quic-echo needs the TLS dir")?;
        return floor::serve(std::path::Path::new(&dir)).await;
    }
    let args = Args::parse();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (mut a, mut e) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let of = if args.rounds > 1 {
            format!(" (round {round} of {})", args.rounds)
        } else {
            String::new()
        };
        eprintln!("bench: agentreg side{of}");
        a.push(agentreg_side::run(&args).await?);
        if !args.no_etcd {
            eprintln!("bench: etcd side{of}");
            e.push(etcd_side::run(&args).await?);
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // A row's cells in every round of one side, in the order the rounds ran.
    let cells = |side: &[Vec<(String, Cell)>], name: &str| -> Vec<Cell> {
        side.iter()
            .filter_map(|round| round.iter().find(|(n, _)| n == name))
            .map(|(_, c)| c.clone())
            .collect()
    };
    let rows: Vec<Row> = a[0]
        .iter()
        .map(|(name, _)| Row::from_rounds(name.clone(), cells(&a, name), cells(&e, name)))
        .collect();
    println!("{}", stats::render(&rows));
    println!("{}", stats::render_cpu(&rows));
    let rounds = stats::render_rounds(&rows);
    if !rounds.is_empty() {
        println!("{rounds}");
    }
    println!(
        "machine: {} cores; load average before {} after {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&stats::to_json(&rows))?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registration rows' clusters get the node's shipped heartbeat interval, and with
    /// it the eviction timeout; nothing else changes.
    #[test]
    fn the_shipped_heartbeat_changes_only_the_heartbeat() {
        let args = Args::parse_from(["bench", "--heartbeat-ms", "1000", "--secs", "7"]);
        let shipped = args.with_shipped_heartbeat();
        assert_eq!(shipped.heartbeat_ms, 30_000);
        assert_eq!(shipped.agent_timeout(), Duration::from_secs(90));
        assert_eq!(
            args.heartbeat_ms, 1000,
            "the rows' own arguments are unchanged"
        );
        assert_eq!(shipped.secs, 7);
    }
}
