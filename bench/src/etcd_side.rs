//! The etcd side: three etcd 3.4 members on loopback (own data dirs, fsync on, as shipped;
//! plaintext, or with `--etcd-tls` mutual TLS between members and TLS to clients), driven
//! through the etcd-client crate (gRPC). A claim is a txn put-if-absent with a lease;
//! a registration grants a lease and puts the session key if absent; a takeover swaps the
//! session key's value if it still names the old owner; a validation is a get; a heartbeat is
//! a lease keepalive; an eviction is a lease expiring.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, TlsOptions,
    Txn, TxnOp,
};

use crate::stats::Cell;
use crate::Args;

struct Member {
    name: String,
    client_url: String,
    child: Option<Child>,
}

pub struct Cluster {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bin: PathBuf,
    members: Vec<Member>,
    initial: String,
    peer_urls: Vec<String>,
    /// With `--etcd-tls`: what clients trust (the dev CA), checking the name `localhost`.
    tls: Option<TlsOptions>,
    /// `GOMAXPROCS` of every member (`--threads-per-server`).
    threads: Option<u16>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    async fn start(args: &Args) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_owned();
        let tls = if args.etcd_tls {
            // The nodes' kind of dev material: member i has node i's certificate (names
            // localhost and 127.0.0.1, for serving and for dialing its peers).
            agentreg::transport::tls::write_dev_material(
                &path.join("tls"),
                &[1, 2, 3],
                &[],
                false,
            )?;
            let ca = std::fs::read(path.join("tls/ca.pem"))?;
            Some(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::new();
        let mut peer_urls = Vec::new();
        for i in 1..=3 {
            members.push(Member {
                name: format!("e{i}"),
                client_url: format!("{scheme}://127.0.0.1:{}", free_tcp()),
                child: None,
            });
            peer_urls.push(format!("{scheme}://127.0.0.1:{}", free_tcp()));
        }
        let initial = members
            .iter()
            .zip(&peer_urls)
            .map(|(m, p)| format!("{}={p}", m.name))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            _dir: dir,
            path,
            bin: args.etcd.clone(),
            members,
            initial,
            peer_urls,
            tls,
            threads: args.threads_per_server,
        };
        for i in 0..3 {
            c.spawn(i)?;
        }
        c.wait_ready().await?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &self.members[i];
        let log = std::fs::File::create(self.path.join(format!("{}.log", m.name)))?;
        let mut cmd = Command::new(&self.bin);
        if self.tls.is_some() {
            let tls = self.path.join("tls");
            let cert = tls.join(format!("node{}.pem", i + 1));
            let key = tls.join(format!("node{}.key", i + 1));
            let ca = tls.join("ca.pem");
            for (flag, file) in [
                ("--cert-file", &cert),
                ("--key-file", &key),
                ("--peer-cert-file", &cert),
                ("--peer-key-file", &key),
                ("--peer-trusted-ca-file", &ca),
            ] {
                cmd.arg(flag).arg(file);
            }
            cmd.arg("--peer-client-cert-auth");
        }
        if let Some(n) = self.threads {
            cmd.env("GOMAXPROCS", n.to_string());
        }
        let child = cmd
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &self.path.join(&m.name).display().to_string(),
                "--listen-client-urls",
                &m.client_url,
                "--advertise-client-urls",
                &m.client_url,
                "--listen-peer-urls",
                &self.peer_urls[i],
                "--initial-advertise-peer-urls",
                &self.peer_urls[i],
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "bench",
                // Its default level (info), as shipped, like agentreg's nodes.
                "--logger",
                "zap",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    async fn client(&self, urls: &[String]) -> anyhow::Result<Client> {
        Ok(Client::connect(urls, self.options()).await?)
    }

    fn options(&self) -> Option<ConnectOptions> {
        self.tls.clone().map(|t| ConnectOptions::new().with_tls(t))
    }

    /// Index of the leader among the members, from a running member's status.
    async fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_secs(1),
                self.client(std::slice::from_ref(&m.client_url)),
            )
            .await
            else {
                continue;
            };
            let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await else {
                continue;
            };
            let leader = s.leader();
            let Ok(list) = c.member_list().await else {
                continue;
            };
            for mem in list.members() {
                if mem.id() == leader {
                    return self.members.iter().position(|x| x.name == mem.name());
                }
            }
        }
        None
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.leader().await {
                if self.members[l].child.is_some() {
                    let mut ok = true;
                    for m in self.members.iter().filter(|m| m.child.is_some()) {
                        ok &= match self.client(std::slice::from_ref(&m.client_url)).await {
                            Ok(mut c) => c.get("ready", None).await.is_ok(),
                            Err(_) => false,
                        };
                    }
                    if ok {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("etcd cluster not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn rss_bytes(&self) -> u64 {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref())
            .map(|c| crate::rss_of(c.id()))
            .sum()
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// TTL of a lease that outlives every row using it: the claims' leases (one per operation
/// in flight, and the failover row's) and the registration rows' sessions.
const LONG_LEASE_SECS: i64 = 600;

/// A claim: put `key` with `lease` if it does not exist.
async fn claim(c: &mut Client, key: &str, lease: i64) -> Result<(), String> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            "owner",
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let r = c.txn(txn).await.map_err(|e| e.to_string())?;
    if r.succeeded() {
        Ok(())
    } else {
        Err("already claimed".into())
    }
}

pub async fn run(args: &Args) -> anyhow::Result<Vec<(String, Cell)>> {
    let mut e = Cluster::start(args).await?;
    let mut rows = Vec::new();
    let urls = e.urls();
    let (clients, leases) = e.clients_and_leases().await?;
    let ttl = args.agent_timeout().as_secs().max(1) as i64;
    if args.runs("claims") {
        for inflight in [1usize, 64, 256] {
            let (clients, leases) = (clients.clone(), leases.clone());
            let rate = crate::drive(inflight, args.duration(), move |slot| {
                let mut c = clients[slot % clients.len()].clone();
                let lease = leases[slot % leases.len()];
                async move { claim(&mut c, &fresh("/claims/claim"), lease).await }
            })
            .await;
            rows.push((format!("claim, {inflight} in flight"), Cell::Rate(rate)));
        }
    }
    if args.runs("validate") {
        let key = fresh("/claims/v");
        claim(&mut clients[0].clone(), &key, leases[0])
            .await
            .map_err(anyhow::Error::msg)?;
        for (name, serializable) in [("linearizable", false), ("local/serializable", true)] {
            let clients = clients.clone();
            let key = key.clone();
            let rate = crate::drive(64, args.duration(), move |slot| {
                let mut c = clients[slot % clients.len()].clone();
                let key = key.clone();
                async move {
                    let opts = serializable.then(|| GetOptions::new().with_serializable());
                    let r = c.get(key, opts).await.map_err(|e| e.to_string())?;
                    if r.kvs().is_empty() {
                        Err("missing".into())
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
            rows.push((format!("validate, {name}, 64 in flight"), Cell::Rate(rate)));
        }
    }
    if args.runs("register") {
        // On a cluster of its own, as agentreg's (see `registrations`).
        let own = Cluster::start(args).await?;
        let (clients, leases) = own.clients_and_leases().await?;
        registrations(&clients, &leases, &mut rows).await;
    }
    if args.runs("agents") {
        // On a cluster of its own, so the memory it reports is the leases' alone.
        let fresh = Cluster::start(args).await?;
        let own = fresh.clients().await?;
        held_leases(args, &fresh, &own, &mut rows).await?;
    }
    if args.runs("eviction") {
        // A lease with the eviction timeout that is never kept alive; time until its key is gone.
        let mut times = Vec::new();
        let mut c = clients[0].clone();
        for _ in 0..args.repeat {
            let lease = c.lease_grant(ttl, None).await?.id();
            let key = fresh("/sessions/silent");
            claim(&mut c, &key, lease)
                .await
                .map_err(anyhow::Error::msg)?;
            let silent_since = Instant::now();
            loop {
                if c.get(key.as_str(), None).await?.kvs().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            times.push(silent_since.elapsed());
        }
        rows.push((
            format!(
                "eviction after silence (timeout {} ms)",
                args.agent_timeout().as_millis()
            ),
            Cell::Times(times),
        ));
    }
    if args.runs("failover") {
        // Leader killed -> next acknowledged claim, through a survivor.
        let mut times = Vec::new();
        for _ in 0..args.repeat {
            e.wait_ready().await?;
            let leader = e.leader().await.context("no etcd leader")?;
            let survivor = (leader + 1) % 3;
            let mut c = e.client(&[urls[survivor].clone()]).await?;
            let lease = c.lease_grant(LONG_LEASE_SECS, None).await?.id();
            claim(&mut c, &fresh("/claims/pre"), lease)
                .await
                .map_err(anyhow::Error::msg)?;
            let killed = Instant::now();
            e.kill(leader);
            times.push(
                crate::first_success(killed, Duration::from_millis(20), || {
                    let mut c = c.clone();
                    async move { claim(&mut c, &fresh("/claims/fo"), lease).await.is_ok() }
                })
                .await,
            );
            e.spawn_existing(leader)?;
        }
        rows.push((
            "leader killed -> next acknowledged claim".into(),
            Cell::Times(times),
        ));
        // Leader stopped gracefully (SIGTERM; etcd hands its leadership over) -> the longest
        // a claim through a survivor waited.
        let mut times = Vec::new();
        for _ in 0..args.repeat {
            e.wait_ready().await?;
            let leader = e.leader().await.context("no etcd leader")?;
            let survivor = (leader + 1) % 3;
            let c = e.client(&[urls[survivor].clone()]).await?;
            let lease = c.clone().lease_grant(LONG_LEASE_SECS, None).await?.id();
            let mut child = e.members[leader]
                .child
                .take()
                .context("leader not running")?;
            times.push(
                crate::longest_gap(
                    || {
                        let mut c = c.clone();
                        async move { claim(&mut c, &fresh("/claims/gs"), lease).await.is_ok() }
                    },
                    || crate::terminate(&child),
                )
                .await,
            );
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            e.spawn_existing(leader)?;
        }
        rows.push((
            "leader stopped (SIGTERM) -> longest wait between claims".into(),
            Cell::Times(times),
        ));
    }
    Ok(rows)
}

/// Registration of a new agent: its own lease, then its session key if absent. Takeover:
/// replace the owner if it is still the old one.
///
/// Neither side's heartbeats figure in these rows (both run on clusters of their own, and
/// agentreg's has the shipped 30 s heartbeat interval: `Args::with_shipped_heartbeat`): the
/// sessions' leases last [`LONG_LEASE_SECS`], longer than both rows, and are not kept alive.
/// Until 2026-12-07 they had the eviction timeout (3 s by default): on a slow machine the
/// first sessions expired while registrations still ran, and 1,384 of 3,000 takeovers then
/// failed the owner check at once.
async fn registrations(
    clients: &Arc<Vec<Client>>,
    leases: &Arc<Vec<i64>>,
    rows: &mut Vec<(String, Cell)>,
) {
    let n = crate::REGISTRATIONS;
    let ids: Arc<Vec<String>> = Arc::new((0..n).map(|_| fresh("/sessions/reg")).collect());
    let slots = Arc::new(AtomicU64::new(0));
    let rate = {
        let (clients, ids, slots) = (clients.clone(), ids.clone(), slots.clone());
        crate::drive_count(64, n, move |slot| {
            let mut c = clients[slot % clients.len()].clone();
            let i = slots.fetch_add(1, Ordering::Relaxed) as usize;
            let key = ids[i].clone();
            async move {
                let lease = c
                    .lease_grant(LONG_LEASE_SECS, None)
                    .await
                    .map_err(|e| e.to_string())?
                    .id();
                claim(&mut c, &key, lease).await
            }
        })
        .await
    };
    rows.push((
        "register (new agent), 64 in flight".into(),
        Cell::Rate(rate),
    ));
    let slots = Arc::new(AtomicU64::new(0));
    let rate = {
        let (clients, ids, leases) = (clients.clone(), ids.clone(), leases.clone());
        crate::drive_count(64, n, move |slot| {
            let mut c = clients[slot % clients.len()].clone();
            let i = slots.fetch_add(1, Ordering::Relaxed) as usize;
            let key = ids[i].clone();
            let lease = leases[slot % leases.len()];
            async move {
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, "owner")])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        "new-owner",
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                let r = c.txn(txn).await.map_err(|e| e.to_string())?;
                if r.succeeded() {
                    Ok(())
                } else {
                    Err("not the owner".into())
                }
            }
        })
        .await
    };
    rows.push(("takeover, 64 in flight".into(), Cell::Rate(rate)));
}

/// One lease per agent with its session key, kept alive for three heartbeat intervals:
/// memory per lease, and whether every keepalive was answered.
async fn held_leases(
    args: &Args,
    e: &Cluster,
    clients: &Arc<Vec<Client>>,
    rows: &mut Vec<(String, Cell)>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    // Long leases: what is measured is holding them, not expiring them when a keepalive
    // round runs late.
    let ttl = 60;
    let before = e.rss_bytes();
    let keepers: Vec<
        anyhow::Result<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    > = futures::stream::iter(0..args.agents)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            async move {
                let lease = c.lease_grant(ttl, None).await?.id();
                claim(&mut c, &fresh("/sessions/held"), lease)
                    .await
                    .map_err(anyhow::Error::msg)?;
                Ok(c.lease_keep_alive(lease).await?)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut keepers: Vec<_> = keepers.into_iter().collect::<anyhow::Result<_>>()?;
    let rounds = 3;
    let mut answered = 0usize;
    let mut missed = 0usize;
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        let round_start = Instant::now();
        let results: Vec<bool> = futures::stream::iter(keepers.iter_mut())
            .map(|(k, s)| async move {
                k.keep_alive().await.is_ok()
                    && matches!(s.message().await, Ok(Some(r)) if r.ttl() > 0)
            })
            .buffer_unordered(256)
            .collect()
            .await;
        answered += results.iter().filter(|ok| **ok).count();
        missed += results.iter().filter(|ok| !**ok).count();
        slowest = slowest.max(round_start.elapsed());
        let left = Duration::from_millis(args.heartbeat_ms).saturating_sub(round_start.elapsed());
        tokio::time::sleep(left).await;
    }
    let per = e.rss_bytes().saturating_sub(before) as f64 / args.agents as f64;
    rows.push((
        format!("agents held with heartbeats ({})", args.agents),
        Cell::BytesPer(per, format!(
            "(leases; {rounds} keepalive rounds: {answered} answered, {missed} missed, slowest round {} ms)",
            slowest.as_millis()
        )),
    ));
    Ok(())
}

impl Cluster {
    /// The clients of the rows: 48 connections spread over the members.
    async fn clients(&self) -> anyhow::Result<Arc<Vec<Client>>> {
        let urls = self.urls();
        let mut clients = Vec::new();
        for i in 0..48 {
            clients.push(self.client(&[urls[i % 3].clone()]).await?);
        }
        Ok(Arc::new(clients))
    }

    /// The clients of the rows and a long lease for each of up to 256 operations in flight.
    async fn clients_and_leases(&self) -> anyhow::Result<(Arc<Vec<Client>>, Arc<Vec<i64>>)> {
        let clients = self.clients().await?;
        let mut leases = Vec::new();
        for i in 0..256 {
            let mut c = clients[i % clients.len()].clone();
            leases.push(c.lease_grant(LONG_LEASE_SECS, None).await?.id());
        }
        Ok((clients, Arc::new(leases)))
    }

    /// Restarts a killed member on its data dir.
    fn spawn_existing(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `--etcd-tls` really puts etcd behind TLS (a plaintext client gets nothing), and
    /// `--threads-per-server` reaches the members' environment.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_tls_members_answer_tls_clients_only() {
        let args = Args::parse_from(["bench", "--etcd-tls", "--threads-per-server", "1"]);
        if !args.etcd.exists() {
            eprintln!("SKIPPED: no etcd at {}", args.etcd.display());
            return;
        }
        let c = Cluster::start(&args)
            .await
            .expect("an etcd cluster with TLS");
        let url = c.urls()[0].clone();
        assert!(url.starts_with("https://"), "{url}");
        let mut tls = c
            .client(std::slice::from_ref(&url))
            .await
            .expect("TLS client");
        tls.put("k", "v", None).await.expect("put over TLS");

        let plain = url.replacen("https://", "http://", 1);
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut p = Client::connect([plain], None).await?;
            p.get("k", None).await
        })
        .await;
        assert!(
            !matches!(attempt, Ok(Ok(_))),
            "a plaintext client was answered"
        );

        let pid = c.members[0].child.as_ref().expect("running").id();
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("member's environment");
        assert!(
            env.split(|b| *b == 0).any(|v| v == b"GOMAXPROCS=1"),
            "GOMAXPROCS not set on the member"
        );
    }
}
