//! Fault injection under load: three `agentreg` processes on loopback, a workload of
//! concurrent agents, kills, pauses and partitions, and a checker run on what the clients saw
//! and on the final tables of every node (see `checker` for the invariants).
//!
//! `short_run` runs in the suite. `long_run` is ignored by default and takes its seed and
//! duration from AGENTREG_FAULT_SEED and AGENTREG_FAULT_SECS: scripts/fault-run.sh.
//! Every run prints its seed; the seed fixes the fault schedule and every agent's choices
//! (the interleaving still depends on timing). AGENTREG_FAULT_LOG sets the nodes' log
//! filter (RUST_LOG syntax) and keeps their logs.

mod checker;
#[path = "../common/faultnet.rs"]
mod faultnet;
#[path = "../common/wait.rs"]
mod wait;
// Shared with tests/disk_fault.rs and tests/sighup.rs, which use parts this run does not.
#[allow(dead_code)]
mod harness;
mod history;
mod workload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

use harness::{wait_for, Cluster, NODES};
use history::{DigestSample, FaultWindow, FinalTables, History, OpKind, Ret, Serial};
use workload::Shared;

const WORKERS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    IsolateLeader,
    IsolateNode,
    CutLink,
    /// Traffic dropped in one direction only: a node (the leader half the time) that hears
    /// no peer while they still hear it, one whose peers hear nothing of it while it hears
    /// them, or a single link one way.
    OneWay,
    /// Every write of a node to a file fails from now on (a zero file-size limit, as a full
    /// disk): it must stop and exit with status 1 by itself; restarted without the limit.
    DiskFails,
    /// SIGTERM to a node (the leader half the time): it drains, hands its leadership over if
    /// it leads, and exits with status 0 by itself; restarted after the hold.
    Stop,
}

const FAULTS: [Fault; 8] = [
    Fault::Kill,
    Fault::Pause,
    Fault::IsolateLeader,
    Fault::IsolateNode,
    Fault::CutLink,
    Fault::OneWay,
    Fault::DiskFails,
    Fault::Stop,
];

/// A node whose disk failed did not stop and exit with status 1 by the end of the fault.
const DISK_FAULT_IGNORED: &str = "failing disk not acted on";
/// A node sent SIGTERM did not exit with status 0 by the end of the fault.
const STOP_UNFINISHED: &str = "graceful stop unfinished";
/// A node exited that no fault asked to (Raft stopped on an error the run did not cause).
const NODE_EXITED: &str = "node exited by itself";

/// The leader half the time (when one is known), else `victim`: the subject of a fault
/// that should hit the leader often.
async fn leader_half_the_time(cluster: &Cluster, rng: &mut StdRng, victim: u64) -> u64 {
    if rng.gen_bool(0.5) {
        cluster.leader().await.unwrap_or(victim)
    } else {
        victim
    }
}

struct Report {
    seed: u64,
    history: History,
    schedule: Vec<String>,
    violations: Vec<checker::Violation>,
    kept: Option<std::path::PathBuf>,
    elapsed: Duration,
}

impl Report {
    fn summary(&self) -> String {
        let mut out = format!(
            "fault run: seed {} ran {:.0?}, {} operations, {} faults, {} violations\n",
            self.seed,
            self.elapsed,
            self.history.ops.len(),
            self.schedule.len(),
            self.violations.len()
        );
        out.push_str("operations by kind and outcome:\n");
        for ((kind, outcome), n) in self.history.counts() {
            out.push_str(&format!("  {kind:<16} {outcome:<14} {n}\n"));
        }
        let mut by_fault: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.schedule {
            *by_fault
                .entry(
                    f.split_whitespace()
                        .nth(1)
                        .unwrap_or("?")
                        .trim_end_matches(':'),
                )
                .or_default() += 1;
        }
        out.push_str(&format!("faults injected: {by_fault:?}\n"));
        if let Some(dir) = &self.kept {
            out.push_str(&format!("node logs kept in {}\n", dir.display()));
        }
        let (faults, requests) = checker::availability_judged(&self.history);
        let stuck = checker::check_availability(&self.history);
        out.push_str(&format!(
            "availability, over {faults} faults with a quorum up: {requests} requests, {} without a definite answer\n",
            stuck.iter().map(|v| v.ops.len()).sum::<usize>()
        ));
        for v in &stuck {
            out.push_str(&v.render(&self.history).replacen("VIOLATION ", "", 1));
        }
        out
    }

    fn failure(&self) -> String {
        let mut out = format!(
            "FAULT RUN FAILED: reproduce with AGENTREG_FAULT_SEED={} scripts/fault-run.sh\n",
            self.seed
        );
        out.push_str("fault schedule:\n");
        for f in &self.schedule {
            out.push_str(&format!("  {f}\n"));
        }
        for v in &self.violations {
            out.push_str(&v.render(&self.history));
        }
        if let Some(dir) = &self.kept {
            for id in NODES {
                let log =
                    std::fs::read_to_string(dir.join(format!("node{id}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                out.push_str(&format!("--- last lines of node {id}'s log:\n"));
                for l in &lines[lines.len().saturating_sub(15)..] {
                    out.push_str(&format!("    {l}\n"));
                }
            }
            out.push_str(&format!("node logs and data kept in {}\n", dir.display()));
        }
        out
    }
}

async fn run(seed: u64, duration: Duration) -> Report {
    eprintln!("fault run: seed {seed}, {duration:?}");
    let started = Instant::now();
    let mut cluster = Cluster::start().await;
    wait_for("a leader", Duration::from_secs(30), || async {
        cluster.leader().await
    })
    .await;
    let shared = Shared::new(cluster.addrs.clone(), &cluster.ca_pem());

    // Samples of (applied index, digest) from every node, to catch divergence mid-run.
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            tokio::spawn(workload::run_worker(
                shared.clone(),
                i,
                seed.wrapping_mul(31).wrapping_add(i as u64),
            ))
        })
        .collect();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut schedule = Vec::new();
    let mut windows = Vec::new();
    let deadline = Instant::now() + duration;
    let mut round: Vec<Fault> = Vec::new();
    let mut harness_violations = Vec::new();
    while Instant::now() < deadline {
        let calm = Duration::from_millis(rng.gen_range(500..1500));
        sample(&cluster, &samples, calm).await;
        if round.is_empty() {
            round = FAULTS.to_vec();
            round.shuffle(&mut rng);
        }
        let fault = round.pop().expect("non-empty");
        // Long enough, often, for a quorum's answers to be judged after a takeover.
        let hold = Duration::from_millis(rng.gen_range(1000..4000));
        let victim = NODES[rng.gen_range(0..NODES.len())];
        // Availability is judged only for faults that hit a cluster settled on one leader;
        // waiting a little for that makes most of them count.
        let healthy = agree_on_a_leader(&cluster, Duration::from_secs(5)).await;
        let start = shared.micros();
        // The node the fault cuts off from the other two, which remain a quorum.
        let mut cut_off = Some(victim);
        // The node asked to stop, which then exits by itself.
        let mut stopped = None;
        let what = match fault {
            Fault::DiskFails => {
                cluster.limit_file_size(victim, 0);
                format!("node {victim}'s disk writes fail, restart after {hold:?}")
            }
            Fault::Stop => {
                let subject = leader_half_the_time(&cluster, &mut rng, victim).await;
                cut_off = Some(subject);
                stopped = Some(subject);
                cluster.terminate(subject);
                format!("SIGTERM node {subject}, restart after {hold:?}")
            }
            Fault::Kill => {
                cluster.kill(victim);
                format!("kill -9 node {victim}, restart after {hold:?}")
            }
            Fault::Pause => {
                cluster.pause(victim);
                format!("SIGSTOP node {victim}, SIGCONT after {hold:?}")
            }
            Fault::IsolateLeader => {
                let leader = cluster.leader().await.unwrap_or(victim);
                cluster.net.isolate(leader);
                cut_off = Some(leader);
                format!("isolate the leader (node {leader}) for {hold:?}")
            }
            Fault::IsolateNode => {
                cluster.net.isolate(victim);
                format!("isolate node {victim} for {hold:?}")
            }
            Fault::CutLink => {
                let other = NODES
                    .iter()
                    .copied()
                    .filter(|n| *n != victim)
                    .nth(rng.gen_range(0..2))
                    .unwrap();
                cluster.net.cut(victim, other);
                cut_off = None;
                format!("cut node {victim} <-> node {other} for {hold:?}")
            }
            Fault::OneWay => {
                let subject = leader_half_the_time(&cluster, &mut rng, victim).await;
                cut_off = Some(subject);
                let others = NODES.iter().copied().filter(|n| *n != subject);
                match rng.gen_range(0..3) {
                    0 => {
                        others.for_each(|o| cluster.net.cut_one_way(o, subject));
                        format!("node {subject} hears no peer (they hear it) for {hold:?}")
                    }
                    1 => {
                        others.for_each(|o| cluster.net.cut_one_way(subject, o));
                        format!("no peer hears node {subject} (it hears them) for {hold:?}")
                    }
                    _ => {
                        let other = others.collect::<Vec<_>>()[rng.gen_range(0..2)];
                        cluster.net.cut_one_way(subject, other);
                        cut_off = None;
                        format!("cut node {subject} -> node {other} one way for {hold:?}")
                    }
                }
            }
        };
        schedule.push(format!("{:>8.3}s {fault:?}: {what}", start as f64 / 1e6));
        sample(&cluster, &samples, hold).await;
        for id in NODES
            .iter()
            .filter(|id| fault != Fault::DiskFails || **id != victim)
            .filter(|id| Some(**id) != stopped)
        {
            if let Some(status) = cluster.exited(*id, Duration::ZERO).await {
                harness_violations.push(checker::Violation {
                    kind: NODE_EXITED,
                    message: format!("node {id} exited during \"{what}\": {status}"),
                    ops: vec![],
                });
            }
        }
        if fault == Fault::DiskFails {
            // Its next write (the workload's, or replicated to it) failed well before.
            match cluster.exited(victim, Duration::from_secs(10)).await {
                Some(status) if status.code() == Some(1) => {}
                other => {
                    harness_violations.push(checker::Violation {
                        kind: DISK_FAULT_IGNORED,
                        message: format!(
                            "node {victim}, whose disk writes fail, did not exit with status 1 \
                             within {hold:?} and 10 s: {other:?}"
                        ),
                        ops: vec![],
                    });
                    cluster.kill(victim);
                }
            }
        }
        if let Some(subject) = stopped {
            // A graceful stop takes a second or two (a drain, a hand-over, sled's flush).
            match cluster.exited(subject, Duration::from_secs(10)).await {
                Some(status) if status.success() => {}
                other => {
                    harness_violations.push(checker::Violation {
                        kind: STOP_UNFINISHED,
                        message: format!(
                            "node {subject}, sent SIGTERM, did not exit with status 0 within \
                             {hold:?} and 10 s: {other:?}"
                        ),
                        ops: vec![],
                    });
                    cluster.kill(subject);
                }
            }
        }
        cluster.restore_all();
        let quorum: Vec<u64> = NODES
            .iter()
            .copied()
            .filter(|n| Some(*n) != cut_off)
            .collect();
        windows.push(FaultWindow {
            what,
            start,
            end: shared.micros(),
            settled: start + harness::TAKEOVER.as_micros() as u64,
            quorum: if cut_off.is_some() && healthy {
                quorum
            } else {
                Vec::new()
            },
        });
    }

    // Let the workload see a healthy cluster for a moment, then stop it.
    sample(&cluster, &samples, Duration::from_secs(2)).await;
    shared.stop.cancel();
    for w in workers {
        // A worker's requests time out after 5 s, its connects after 3 s.
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a worker did not stop within 30 s"))
            .expect("worker panicked");
    }

    let mut history = std::mem::take(&mut *shared.history.lock().unwrap());
    history.samples = std::mem::take(&mut *samples.lock().unwrap());
    history.faults = windows;
    let mut violations = harness_violations;
    match final_tables(&cluster, &shared, &history).await {
        Ok(finals) => history.finals = finals,
        Err(e) => violations.push(checker::Violation {
            kind: checker::DIVERGENCE,
            message: e,
            ops: vec![],
        }),
    }
    violations.extend(checker::check(&history));
    // Asking for other node logs (AGENTREG_FAULT_LOG) means wanting to read them: kept too.
    let wanted = std::env::var_os("AGENTREG_FAULT_LOG").is_some();
    let kept = (!violations.is_empty() || wanted).then(|| cluster.keep());
    Report {
        seed,
        history,
        schedule,
        violations,
        kept,
        elapsed: started.elapsed(),
    }
}

/// Waits up to `patience` for every node to answer and name the same leader (the previous
/// fault's node may still be starting, or its return may have moved leadership); says
/// whether they did.
async fn agree_on_a_leader(cluster: &Cluster, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        let mut leaders = Vec::new();
        for id in NODES {
            leaders.push(cluster.status(id).await.and_then(|s| s.leader));
        }
        if leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Samples every reachable node's applied index and digest for `period`.
async fn sample(
    cluster: &Cluster,
    samples: &std::sync::Mutex<Vec<DigestSample>>,
    period: Duration,
) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        for id in NODES {
            if let Some(s) = cluster.status(id).await {
                if let Some(applied_index) = s.applied_index {
                    samples.lock().unwrap().push(DigestSample {
                        node: id,
                        applied_index,
                        digest: s.state_digest,
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Once healed and quiet, every node's tables: claims and sessions (after its read barrier),
/// and which of the certificates the workload tried to end it refuses as revoked.
async fn final_tables(
    cluster: &Cluster,
    shared: &Shared,
    history: &History,
) -> Result<BTreeMap<u64, FinalTables>, String> {
    let ended: Vec<Serial> = history
        .ops
        .iter()
        .filter(|o| !matches!(o.ret, Ret::Refused(_)))
        .filter_map(|o| match o.kind {
            OpKind::Release { cert } | OpKind::Revoke { cert } => Some(cert),
            _ => None,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let certs = shared.certs.lock().unwrap().clone();
    let client_config =
        agentreg::transport::tls::agent_client_config(&cluster.ca_pem()).expect("tls");
    // Quiet: all nodes at one applied index with one digest, twice in a row.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last: Option<Vec<(Option<u64>, String)>> = None;
    loop {
        let mut seen = Vec::new();
        for id in NODES {
            if let Some(s) = cluster.status(id).await {
                seen.push((s.applied_index, s.state_digest));
            }
        }
        let agreed = seen.len() == NODES.len() && seen.windows(2).all(|w| w[0] == w[1]);
        if agreed && last.as_ref() == Some(&seen) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the nodes did not converge within 60 s after healing: (applied index, digest) {seen:?}"
            ));
        }
        last = Some(seen);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Every call below is bounded: a node that stops answering is a finding, not a hang.
    let within = |what: String| move |_| format!("node {what}: no answer within 15 s");
    const PATIENCE: Duration = Duration::from_secs(15);
    let mut out = BTreeMap::new();
    for id in NODES {
        let status = cluster
            .status(id)
            .await
            .ok_or_else(|| format!("node {id} gave no status after healing"))?;
        let (claims, sessions) = tokio::time::timeout(PATIENCE, cluster.tables(id))
            .await
            .map_err(within(format!("{id}, claims and agents lists")))?
            .ok_or_else(|| format!("node {id} did not list its claims and agents"))?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(client_config.clone());
        let connecting = endpoint
            .connect(
                cluster.addrs[&id],
                agentreg::transport::tls::DEFAULT_SERVER_NAME,
            )
            .unwrap();
        let conn = tokio::time::timeout(PATIENCE, connecting)
            .await
            .map_err(within(format!("{id}, connect")))?
            .map_err(|e| format!("node {id}: connect for the final validations: {e}"))?;
        let mut revoked = std::collections::BTreeSet::new();
        for serial in &ended {
            let Some((_, cert)) = certs.get(serial) else {
                continue;
            };
            let req = json!({"type": "system_request", "command": "validate_certificate", "certificate": cert});
            let answer = tokio::time::timeout(PATIENCE, workload::request(&conn, &req))
                .await
                .map_err(within(format!("{id}, final validation")))?
                .map_err(|e| format!("node {id}: final validation: {e}"))?;
            if answer["code"] == "certificate_revoked" {
                revoked.insert(*serial);
            }
        }
        conn.close(quinn::VarInt::from_u32(0), b"done");
        out.insert(
            id,
            FinalTables {
                claims: claims.into_iter().map(|(k, v)| (k, Serial(v))).collect(),
                sessions,
                revoked,
                applied_index: status.applied_index.unwrap_or(0),
                digest: status.state_digest,
            },
        );
    }
    Ok(out)
}

/// `run`, but a run that has not finished five minutes after its faults stopped fails with
/// its seed instead of hanging the suite (the cluster is killed when the future is dropped).
async fn run_bounded(seed: u64, duration: Duration) -> Report {
    let limit = duration + Duration::from_secs(300);
    match tokio::time::timeout(limit, run(seed, duration)).await {
        Ok(report) => report,
        Err(_) => panic!(
            "FAULT RUN HUNG: seed {seed} did not finish within {limit:?}; \
             reproduce with AGENTREG_FAULT_SEED={seed} scripts/fault-run.sh"
        ),
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("AGENTREG_FAULT_SEED") {
        Ok(s) => s.parse().expect("AGENTREG_FAULT_SEED must be a number"),
        Err(_) => rand::random::<u32>().into(),
    }
}

fn assert_clean(report: &Report) {
    eprintln!("{}", report.summary());
    if let Ok(path) = std::env::var("AGENTREG_FAULT_SUMMARY") {
        std::fs::write(path, report.summary()).expect("write summary");
    }
    assert!(report.violations.is_empty(), "{}", report.failure());
}

/// About a minute of faults under load (every fault kind at least once: the first round of
/// the schedule takes each).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_run() {
    let secs = std::env::var("AGENTREG_FAULT_SHORT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let report = run_bounded(seed_from_env(), Duration::from_secs(secs)).await;
    // The run must have exercised something: operations of every outcome and every fault.
    let counts = report.history.counts();
    assert!(
        counts.keys().any(|(_, o)| o == "ok"),
        "no operation succeeded"
    );
    assert!(report.schedule.len() >= FAULTS.len());
    assert_clean(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: scripts/fault-run.sh"]
async fn long_run() {
    let secs: u64 = std::env::var("AGENTREG_FAULT_SECS")
        .map(|s| s.parse().expect("AGENTREG_FAULT_SECS must be a number"))
        .unwrap_or(300);
    let report = run_bounded(seed_from_env(), Duration::from_secs(secs)).await;
    assert_clean(&report);
}
