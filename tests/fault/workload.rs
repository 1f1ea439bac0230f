//! The workload: concurrent agents speaking the raw protocol to random nodes. They claim a
//! few contested ids (a fresh set every few seconds, so each id's history stays small
//! enough to check) and fresh ones, re-issue, register with and without certificates
//! (taking over sessions elsewhere), unregister, release, revoke, validate any certificate
//! seen so far, move to other nodes, and vanish. Every request is recorded with its
//! invocation and completion time and what came back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::history::{History, Op, OpKind, Ret, Serial};

/// Longer than the nodes' write timeout (3 s): a request with no answer by then has an
/// unknown outcome.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a set of contested ids lives.
const EPOCH: Duration = Duration::from_secs(8);

pub struct Shared {
    pub start: Instant,
    pub history: Mutex<History>,
    /// Every certificate any agent obtained: serial -> (agent id, certificate).
    pub certs: Mutex<BTreeMap<Serial, (String, Value)>>,
    next_conn: AtomicU64,
    addrs: BTreeMap<u64, SocketAddr>,
    client_config: quinn::ClientConfig,
    pub stop: CancellationToken,
}

impl Shared {
    pub fn new(addrs: BTreeMap<u64, SocketAddr>, ca_pem: &str) -> Arc<Shared> {
        Arc::new(Shared {
            start: Instant::now(),
            history: Mutex::new(History::default()),
            certs: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(1),
            addrs,
            client_config: agentreg::transport::tls::agent_client_config(ca_pem)
                .expect("client tls"),
            stop: CancellationToken::new(),
        })
    }

    pub fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn record(&self, conn: &Conn, agent_id: &str, kind: OpKind, invoked: u64, ret: Ret) {
        self.history.lock().unwrap().push(Op {
            index: 0,
            conn: conn.id,
            node: conn.node,
            agent_id: agent_id.to_owned(),
            kind,
            invoked,
            completed: self.micros(),
            ret,
        });
    }
}

struct Conn {
    id: u64,
    node: u64,
    conn: Option<quinn::Connection>,
    /// Ids this connection registered (as far as it knows).
    registered: BTreeSet<String>,
}

struct Worker {
    shared: Arc<Shared>,
    rng: StdRng,
    endpoint: quinn::Endpoint,
    conn: Conn,
    /// Certificates this agent holds: agent id -> (serial, certificate).
    held: BTreeMap<String, (Serial, Value)>,
    fresh: u64,
    name: usize,
}

/// Runs one agent until `shared.stop` is cancelled.
pub async fn run_worker(shared: Arc<Shared>, name: usize, seed: u64) {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    endpoint.set_default_client_config(shared.client_config.clone());
    let mut w = Worker {
        rng: StdRng::seed_from_u64(seed),
        endpoint,
        conn: Conn {
            id: 0,
            node: 0,
            conn: None,
            registered: BTreeSet::new(),
        },
        held: BTreeMap::new(),
        fresh: 0,
        name,
        shared,
    };
    w.reconnect(false).await;
    while !w.shared.stop.is_cancelled() {
        w.step().await;
        let pause = w.rng.gen_range(0..15);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    if let Some(c) = w.conn.conn.take() {
        c.close(quinn::VarInt::from_u32(0), b"done");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), w.endpoint.wait_idle()).await;
}

fn serial_of(cert: &Value) -> Serial {
    Serial(cert["serial"].as_u64().expect("certificate serial"))
}

impl Worker {
    /// Drops the current connection (abruptly when `vanish`) and connects to a random node.
    async fn reconnect(&mut self, vanish: bool) {
        if let Some(c) = self.conn.conn.take() {
            let code = if vanish { 7 } else { 0 };
            c.close(quinn::VarInt::from_u32(code), b"moving on");
        }
        let node = *self
            .shared
            .addrs
            .keys()
            .nth(self.rng.gen_range(0..self.shared.addrs.len()))
            .unwrap();
        self.conn = Conn {
            id: self.shared.next_conn.fetch_add(1, Ordering::Relaxed),
            node,
            conn: None,
            registered: BTreeSet::new(),
        };
        let connecting = self
            .endpoint
            .connect(
                self.shared.addrs[&node],
                agentreg::transport::tls::DEFAULT_SERVER_NAME,
            )
            .expect("connect");
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), connecting).await {
            agentreg::client::spawn_ping_answerer(c.clone());
            self.conn.conn = Some(c);
        }
    }

    /// Gives up on the current connection. It is closed, not just dropped: its ping
    /// answerer holds a handle and would keep it (and its sessions) alive, and the
    /// endpoint's `wait_idle` at the end of the run would wait for it forever.
    fn abandon(&mut self) {
        if let Some(c) = self.conn.conn.take() {
            c.close(quinn::VarInt::from_u32(8), b"gave up");
        }
    }

    fn contested(&mut self) -> String {
        let epoch = self.shared.start.elapsed().as_secs() / EPOCH.as_secs();
        format!("c{epoch}-{}", self.rng.gen_range(0..3))
    }

    fn any_id(&mut self) -> String {
        if self.rng.gen_bool(0.7) {
            self.contested()
        } else {
            self.fresh += 1;
            format!("f{}-{}", self.name, self.fresh)
        }
    }

    fn pick_held(&mut self) -> Option<(String, Serial, Value)> {
        if self.held.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.held.len());
        self.held
            .iter()
            .nth(i)
            .map(|(id, (s, c))| (id.clone(), *s, c.clone()))
    }

    fn pick_seen(&mut self) -> Option<(String, Serial, Value)> {
        let certs = self.shared.certs.lock().unwrap();
        if certs.is_empty() {
            return None;
        }
        // Mostly recent certificates: those are the ones still in play.
        let n = certs.len();
        let i = n - 1 - self.rng.gen_range(0..n.min(40));
        certs
            .iter()
            .nth(i)
            .map(|(s, (id, c))| (id.clone(), *s, c.clone()))
    }

    async fn step(&mut self) {
        if self.conn.conn.is_none() {
            self.reconnect(false).await;
            return;
        }
        match self.rng.gen_range(0..100) {
            0..=24 => {
                let id = self.any_id();
                self.claim(&id, None).await;
            }
            25..=29 => {
                if let Some((id, _, cert)) = self.pick_held() {
                    self.claim(&id, Some(cert)).await;
                }
            }
            30..=49 => {
                if let Some((id, serial, cert)) = self.pick_seen() {
                    let req = json!({"command": "validate_certificate", "certificate": cert});
                    self.call(&id, OpKind::Validate { cert: serial }, req, |a| {
                        Ret::Validated {
                            valid: a["valid"].as_bool().unwrap_or(false),
                            reason: a["reason"].as_str().map(str::to_owned),
                        }
                    })
                    .await;
                }
            }
            50..=64 => {
                let with_cert = if self.rng.gen_bool(0.6) {
                    self.pick_held()
                } else {
                    None
                };
                let (id, kind, req) = match with_cert {
                    Some((id, serial, cert)) => (
                        id.clone(),
                        OpKind::Register { cert: Some(serial) },
                        json!({"command": "register_agent", "agent_id": id, "certificate": cert}),
                    ),
                    None => {
                        let id = self.any_id();
                        (
                            id.clone(),
                            OpKind::Register { cert: None },
                            json!({"command": "register_agent", "agent_id": id}),
                        )
                    }
                };
                let ret = self
                    .call(&id, kind, req, |a| Ret::Registered {
                        session_id: a["session_id"].as_u64().unwrap_or(0),
                        took_over: a["took_over"].as_bool().unwrap_or(false),
                    })
                    .await;
                if ret.is_ok() {
                    self.conn.registered.insert(id);
                }
            }
            65..=72 => {
                let id = match self.conn.registered.iter().next() {
                    Some(id) => id.clone(),
                    None => self.contested(),
                };
                let req = json!({"command": "unregister_agent", "agent_id": id});
                self.call(&id, OpKind::Unregister, req, |_| Ret::Done).await;
                self.conn.registered.remove(&id);
            }
            73..=79 => {
                if let Some((id, serial, cert)) = self.pick_held() {
                    let req = json!({"command": "release_agent_id", "certificate": cert});
                    self.call(&id, OpKind::Release { cert: serial }, req, |_| Ret::Done)
                        .await;
                    self.held.remove(&id);
                }
            }
            80..=84 => {
                if let Some((id, serial, cert)) = self.pick_seen() {
                    let req = json!({"command": "revoke_certificate", "certificate": cert});
                    self.call(&id, OpKind::Revoke { cert: serial }, req, |_| Ret::Done)
                        .await;
                }
            }
            85..=89 => self.reconnect(true).await,
            _ => self.reconnect(false).await,
        }
    }

    async fn claim(&mut self, id: &str, proof: Option<Value>) {
        let force = proof.is_some();
        let kind = OpKind::Claim {
            force,
            proof: proof.as_ref().map(serial_of),
        };
        let mut req = json!({"command": "claim_agent_id", "agent_id": id, "force": force});
        if let Some(p) = &proof {
            req["certificate"] = p.clone();
        }
        let mut got = None;
        self.call(id, kind, req, |a| {
            let cert = a["certificate"].clone();
            let serial = serial_of(&cert);
            got = Some((serial, cert));
            Ret::Claimed(serial)
        })
        .await;
        if let Some((serial, cert)) = got {
            self.held.insert(id.to_owned(), (serial, cert.clone()));
            self.shared
                .certs
                .lock()
                .unwrap()
                .insert(serial, (id.to_owned(), cert));
        }
    }

    /// Sends one request on the current connection and records it; `ok` turns a successful
    /// answer into the recorded result.
    async fn call(
        &mut self,
        agent_id: &str,
        kind: OpKind,
        mut req: Value,
        ok: impl FnOnce(&Value) -> Ret,
    ) -> Ret {
        req["type"] = json!("system_request");
        let invoked = self.shared.micros();
        let conn = self.conn.conn.clone().expect("connected");
        let ret = match tokio::time::timeout(REQUEST_TIMEOUT, request(&conn, &req)).await {
            Ok(Ok(answer)) if answer["success"] == true => ok(&answer),
            Ok(Ok(answer)) => classify(&answer),
            Ok(Err(e)) => {
                self.abandon();
                Ret::Unknown(e)
            }
            Err(_) => {
                self.abandon();
                Ret::Unknown("no answer in time".into())
            }
        };
        self.shared
            .record(&self.conn, agent_id, kind, invoked, ret.clone());
        ret
    }
}

/// A refusal changed nothing; anything that may have been applied is unknown. Told apart
/// by the answer's code, as a client does (docs/protocol.md): a code that called an applied
/// write a refusal would show as a lost or phantom write in the checker.
fn classify(answer: &Value) -> Ret {
    let error = answer["error"].as_str().unwrap_or("").to_owned();
    match answer["code"].as_str() {
        Some("outcome_unknown" | "unavailable") => Ret::Unknown(error),
        Some(_) => Ret::Refused(error),
        None => panic!("a failure answer without a code: {answer}"),
    }
}

/// One request and its answer over a new stream.
pub async fn request(conn: &quinn::Connection, req: &Value) -> Result<Value, String> {
    // A stream's error says only "connection lost" when the connection ends under it; the
    // connection's reason tells a node that closed it on purpose (the session ended, which
    // the checker excuses) from a connection that was lost.
    let failed = |e: &dyn std::fmt::Display| match conn.close_reason() {
        Some(reason) => reason.to_string(),
        None => e.to_string(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
    let body = req.to_string().into_bytes();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    send.write_all(&frame).await.map_err(|e| failed(&e))?;
    let _ = send.finish();
    let answer = recv.read_to_end(1 << 20).await.map_err(|e| failed(&e))?;
    if answer.len() < 4 {
        return Err("stream closed without an answer".into());
    }
    serde_json::from_slice(&answer[4..]).map_err(|e| e.to_string())
}
