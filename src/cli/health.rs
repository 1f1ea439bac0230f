//! `agentreg health`: whether every member serves and their tables agree, like `etcdctl
//! endpoint health --cluster`; exit status 5 when not (docs/operations.md).

use std::collections::BTreeMap;

use super::status::short_digest;
use super::{AdminArgs, AdminClient};
use crate::node::{AdminRequest, NodeHealth, NodeStatus};

/// One member's verdict.
#[derive(Debug, serde::Serialize)]
struct Row {
    id: u64,
    addr: String,
    healthy: bool,
    problems: Vec<String>,
}

pub async fn run(args: &AdminArgs, json: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(args)?;
    let members = super::status::members(&client, args).await;
    let mut rows = Vec::new();
    let mut statuses = Vec::new();
    for (id, addr, status) in members.as_deref().unwrap_or_default() {
        let mut problems = Vec::new();
        let mut ready = false;
        match status {
            Err(e) => problems.push(format!("unreachable: {e}")),
            Ok(status) => {
                statuses.push(status.clone());
                match client.call(addr, &AdminRequest::Health).await {
                    Ok(v) => match serde_json::from_value::<NodeHealth>(v["health"].clone()) {
                        Ok(h) => {
                            ready = h.ready;
                            problems.extend(h.problems);
                        }
                        Err(e) => problems.push(format!("malformed health answer: {e}")),
                    },
                    // A node of a build before `health` refuses the request.
                    Err(e) => problems.push(format!("cannot tell: {e:#}")),
                }
            }
        }
        rows.push(Row {
            id: *id,
            addr: addr.clone(),
            healthy: ready && problems.is_empty(),
            problems,
        });
    }
    client.close().await;
    members?;
    for (id, problem) in diverged(&statuses) {
        if let Some(row) = rows.iter_mut().find(|r| r.id == id) {
            row.healthy = false;
            row.problems.push(problem);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<4} {:<22} {:<10} PROBLEMS", "ID", "ADDRESS", "HEALTH");
        for r in &rows {
            let health = if r.healthy { "healthy" } else { "unhealthy" };
            println!(
                "{:<4} {:<22} {:<10} {}",
                r.id,
                r.addr,
                health,
                r.problems.join("; ")
            );
        }
    }
    if rows.iter().any(|r| !r.healthy) {
        std::process::exit(super::exit::UNHEALTHY);
    }
    Ok(())
}

/// Members whose tables differ from another's at the same applied index (the digests of
/// `status`), each with what to say.
fn diverged(statuses: &[NodeStatus]) -> Vec<(u64, String)> {
    let mut by_index: BTreeMap<u64, Vec<&NodeStatus>> = BTreeMap::new();
    for s in statuses {
        if let Some(index) = s.applied_index {
            by_index.entry(index).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for (index, group) in by_index {
        // Where most agree, the others diverged; with no majority, every one is named.
        let most = group.iter().find(|s| {
            2 * group
                .iter()
                .filter(|o| o.state_digest == s.state_digest)
                .count()
                > group.len()
        });
        for s in &group {
            if most.is_some_and(|m| m.state_digest == s.state_digest) {
                continue;
            }
            let other = most.copied().or_else(|| {
                group
                    .iter()
                    .find(|o| o.state_digest != s.state_digest)
                    .copied()
            });
            if let Some(other) = other {
                out.push((
                    s.node_id,
                    format!(
                        "its tables differ from node {}'s at the same applied index {index} \
                         (digest {} against {}): one of them diverged; replace it (docs/operations.md, \
                         \"Add or replace a node\")",
                        other.node_id,
                        short_digest(&s.state_digest),
                        short_digest(&other.state_digest)
                    ),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u64, applied: u64, digest: &str) -> NodeStatus {
        serde_json::from_value(serde_json::json!({
            "node_id": id, "cluster_id": "c", "role": "follower", "leader": 1, "term": 1,
            "last_log_index": applied, "applied_index": applied, "state_digest": digest,
            "snapshot_index": null, "purged_index": null, "members": [],
            "tables": {"claims": 0, "sessions": 0, "revocations": 0, "keys": 1},
            "heartbeat": {"agents_connected": 0, "pings_sent": 0, "pings_missed": 0,
                          "evictions_proposed": 0, "evictions_committed": 0},
        }))
        .unwrap()
    }

    #[test]
    fn members_at_the_same_applied_index_must_have_the_same_tables() {
        // Different indexes cannot be compared; the same index and digest agree.
        let agree = [
            status(1, 7, "aaaa"),
            status(2, 7, "aaaa"),
            status(3, 9, "bbbb"),
        ];
        assert!(diverged(&agree).is_empty());
        // Two agree: the third is named.
        let one_apart = [
            status(1, 7, "aaaa"),
            status(2, 7, "cccc"),
            status(3, 7, "aaaa"),
        ];
        let found = diverged(&one_apart);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, 2);
        assert!(
            found[0].1.contains("node 1's at the same applied index 7"),
            "{found:?}"
        );
        // No majority: both are named.
        let split = [status(1, 7, "aaaa"), status(2, 7, "cccc")];
        let ids: Vec<u64> = diverged(&split).iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [1, 2]);
    }
}
