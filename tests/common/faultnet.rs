//! A UDP proxy in front of every node's peer address, so tests can cut node-to-node traffic
//! across the real QUIC transport (like raft-rs's test network: `cut`, `isolate`, `heal`).
//!
//! Node k's peers reach it through proxy k. A datagram from node a to node b is dropped while
//! (a, b) is cut; agents connect to the nodes directly and are never cut.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

#[derive(Default)]
struct Rules {
    /// Real address of each node's socket -> node id.
    ids: HashMap<SocketAddr, u64>,
    /// (from, to) pairs whose datagrams are dropped.
    cut: Mutex<HashSet<(u64, u64)>>,
}

impl Rules {
    fn allows(&self, from: Option<u64>, to: Option<u64>) -> bool {
        match (from, to) {
            (Some(a), Some(b)) => !self.cut.lock().unwrap().contains(&(a, b)),
            _ => true,
        }
    }
}

pub struct FaultNet {
    rules: Arc<Rules>,
    /// Node id -> proxy address (what the cluster's membership names).
    pub proxies: BTreeMap<u64, SocketAddr>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl FaultNet {
    /// Starts one proxy per node in `nodes` (node id -> the node's real address).
    pub fn start(nodes: &BTreeMap<u64, SocketAddr>) -> FaultNet {
        let rules = Arc::new(Rules {
            ids: nodes.iter().map(|(id, a)| (*a, *id)).collect(),
            cut: Mutex::default(),
        });
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let mut proxies = BTreeMap::new();
        for (id, target) in nodes {
            let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            std.set_nonblocking(true).unwrap();
            proxies.insert(*id, std.local_addr().unwrap());
            let listen = Arc::new(UdpSocket::from_std(std).unwrap());
            let h = tokio::spawn(forward(listen, *target, *id, rules.clone(), tasks.clone()));
            tasks.lock().unwrap().push(h.abort_handle());
        }
        FaultNet {
            rules,
            proxies,
            tasks,
        }
    }

    /// Drops traffic between `a` and `b`, both ways.
    pub fn cut(&self, a: u64, b: u64) {
        let mut cut = self.rules.cut.lock().unwrap();
        cut.insert((a, b));
        cut.insert((b, a));
    }

    /// Drops traffic from `from` to `to` only: `to` hears nothing of `from` (no answers, no
    /// acknowledgements) while `from` still hears `to`.
    #[allow(dead_code)] // not every test binary that includes this file uses it
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.rules.cut.lock().unwrap().insert((from, to));
    }

    /// Cuts `node` off from every other node.
    pub fn isolate(&self, node: u64) {
        for other in self.proxies.keys().filter(|o| **o != node) {
            self.cut(node, *other);
        }
    }

    pub fn heal(&self) {
        self.rules.cut.lock().unwrap().clear();
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Relays datagrams arriving at `listen` to node `to` at `target`, one upstream socket per
/// source, and the answers back.
async fn forward(
    listen: Arc<UdpSocket>,
    target: SocketAddr,
    to: u64,
    rules: Arc<Rules>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, src)) = listen.recv_from(&mut buf).await else {
            return;
        };
        let from = rules.ids.get(&src).copied();
        let up = upstreams.entry(src).or_insert_with(|| {
            let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            std.set_nonblocking(true).unwrap();
            std.connect(target).unwrap();
            let up = Arc::new(UdpSocket::from_std(std).unwrap());
            let h = tokio::spawn(backward(
                up.clone(),
                listen.clone(),
                src,
                from,
                to,
                rules.clone(),
            ));
            tasks.lock().unwrap().push(h.abort_handle());
            up
        });
        if rules.allows(from, Some(to)) {
            let _ = up.send(&buf[..n]).await;
        }
    }
}

async fn backward(
    up: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    src: SocketAddr,
    from: Option<u64>,
    to: u64,
    rules: Arc<Rules>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        // A connected UDP socket reports an ICMP "port unreachable" (the node is not up yet,
        // or was killed and is restarting) as an error on the next receive: not a reason to
        // stop relaying, or the link would stay cut after the node comes back.
        let n = match up.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        if rules.allows(Some(to), from) {
            let _ = listen.send_to(&buf[..n], src).await;
        }
    }
}
