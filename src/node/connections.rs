//! The agent connections this node holds, and which agent each one registered.
//!
//! A connection carries at most one agent session, so "the connection of a session" and
//! "the session of a connection" are each one lookup. Connection ids are unique across
//! restarts of the node (a random base chosen at start plus a counter), so a session left
//! in the tables by a previous run never matches a connection of this one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio_util::task::TaskTracker;

/// One agent connection.
pub(crate) struct AgentConn {
    pub(crate) conn: quinn::Connection,
    /// The agent registered on it, if any.
    pub(crate) agent_id: Option<String>,
    /// Last request or ping answer from the agent.
    pub(crate) last_seen: Instant,
    /// The requests being served on it. Closed once the connection is to be closed (its
    /// session ended): requests that had begun still get their answers, later ones are
    /// refused (see [`Connections::detach`]).
    pub(crate) requests: TaskTracker,
}

pub(crate) struct Connections {
    next: AtomicU64,
    map: Mutex<HashMap<u64, AgentConn>>,
}

impl Connections {
    pub(crate) fn new() -> Self {
        use rand::Rng;
        // The top bits vary per run; the counter fills the rest.
        let base = rand::thread_rng().gen::<u64>() & !0xffff_ffff;
        Connections {
            next: AtomicU64::new(base),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AgentConn>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection; returns its id and the tracker its requests run under.
    pub(crate) fn add(&self, conn: quinn::Connection) -> (u64, TaskTracker) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let requests = TaskTracker::new();
        self.map().insert(
            id,
            AgentConn {
                conn,
                agent_id: None,
                last_seen: Instant::now(),
                requests: requests.clone(),
            },
        );
        (id, requests)
    }

    /// Forgets a connection; returns the agent that was registered on it.
    pub(crate) fn remove(&self, id: u64) -> Option<String> {
        self.map().remove(&id).and_then(|c| c.agent_id)
    }

    pub(crate) fn touch(&self, id: u64) {
        if let Some(c) = self.map().get_mut(&id) {
            c.last_seen = Instant::now();
        }
    }

    pub(crate) fn agent_of(&self, id: u64) -> Option<String> {
        self.map().get(&id).and_then(|c| c.agent_id.clone())
    }

    pub(crate) fn set_agent(&self, id: u64, agent_id: Option<String>) {
        if let Some(c) = self.map().get_mut(&id) {
            c.agent_id = agent_id;
        }
    }

    /// If connection `id` still carries `agent_id`, detaches the agent and marks the
    /// connection closing (its request tracker closed: requests beginning from now on are
    /// refused); returns the connection and its requests, to close it once they are answered.
    pub(crate) fn detach(
        &self,
        id: u64,
        agent_id: &str,
    ) -> Option<(quinn::Connection, TaskTracker)> {
        let mut map = self.map();
        let c = map.get_mut(&id)?;
        if c.agent_id.as_deref() != Some(agent_id) {
            return None;
        }
        c.agent_id = None;
        c.requests.close();
        Some((c.conn.clone(), c.requests.clone()))
    }

    /// Every connection with a registered agent: (conn id, agent id, connection, last seen).
    pub(crate) fn registered(&self) -> Vec<(u64, String, quinn::Connection, Instant)> {
        self.map()
            .iter()
            .filter_map(|(id, c)| {
                c.agent_id
                    .as_ref()
                    .map(|a| (*id, a.clone(), c.conn.clone(), c.last_seen))
            })
            .collect()
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.map().contains_key(&id)
    }

    /// Agents registered on this node's connections.
    pub(crate) fn agents(&self) -> usize {
        self.map().values().filter(|c| c.agent_id.is_some()).count()
    }

    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Closes every connection (node shutdown).
    pub(crate) fn close_all(&self, code: quinn::VarInt, reason: &[u8]) {
        for c in self.map().values() {
            c.conn.close(code, reason);
        }
    }
}
