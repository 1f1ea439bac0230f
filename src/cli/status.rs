//! `agentreg status`: every member's view, like `etcdctl endpoint status --cluster`.

use anyhow::Context;

use super::{AdminArgs, AdminClient};
use crate::node::{AdminRequest, ClockStatus, NodeStatus};

/// Every member's status, or why it gave none: (id, address, status), in id order. The
/// members are those of the first endpoint that answers.
pub(super) async fn members(
    client: &AdminClient,
    args: &AdminArgs,
) -> anyhow::Result<Vec<(u64, String, Result<NodeStatus, String>)>> {
    let (_, first) = client
        .call_any(&args.endpoints, &AdminRequest::Status)
        .await?;
    let first: NodeStatus =
        serde_json::from_value(first["status"].clone()).context("malformed status")?;
    let mut rows = Vec::new();
    for m in &first.members {
        let status = if m.id == first.node_id {
            Ok(first.clone())
        } else {
            match client.call(&m.addr, &AdminRequest::Status).await {
                Ok(v) => serde_json::from_value(v["status"].clone())
                    .map_err(|e| format!("malformed status: {e}")),
                Err(e) => Err(format!("{e:#}")),
            }
        };
        rows.push((m.id, m.addr.clone(), status));
    }
    Ok(rows)
}

pub async fn run(args: &AdminArgs, json: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(args)?;
    let rows = members(&client, args).await;
    client.close().await;
    let rows = rows?;
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(id, addr, s)| match s {
                Ok(s) => serde_json::json!({"id": id, "addr": addr, "status": s}),
                Err(e) => serde_json::json!({"id": id, "addr": addr, "error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<22} {:<10} {:<7} {:<6} {:>9} {:>9} {:<12} {:>7} {:>9} {:>12} {:>5} {:>7} {:>8} {:>7} {:>8} {:>7} {:<9}  CLOCK",
        "ID",
        "ADDRESS",
        "ROLE",
        "LEADER",
        "TERM",
        "LAST LOG",
        "APPLIED",
        "DIGEST",
        "CLAIMS",
        "SESSIONS",
        "REVOCATIONS",
        "KEYS",
        "AGENTS",
        "PINGS",
        "MISSED",
        "EVICTED",
        "CERT",
        "BUILD"
    );
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for (id, addr, s) in rows {
        match s {
            Ok(s) => println!(
                "{:<4} {:<22} {:<10} {:<7} {:<6} {:>9} {:>9} {:<12} {:>7} {:>9} {:>12} {:>5} {:>7} {:>8} {:>7} {:>8} {:>7} {:<9}  {}",
                id,
                addr,
                s.role,
                opt(s.leader),
                s.term,
                opt(s.last_log_index),
                opt(s.applied_index),
                short_digest(&s.state_digest),
                s.tables.claims,
                s.tables.sessions,
                s.tables.revocations,
                s.tables.keys,
                s.heartbeat.agents_connected,
                s.heartbeat.pings_sent,
                s.heartbeat.pings_missed,
                s.heartbeat.evictions_committed,
                s.tls_valid_until.map_or("-".to_owned(), crate::node::time_left),
                s.build
                    .as_ref()
                    .map_or("-".to_owned(), |b| format!("{} f{}", b.version, b.log_format)),
                clock_cell(s.clock.as_ref())
            ),
            Err(e) => println!("{id:<4} {addr:<22} unreachable: {e}"),
        }
    }
    Ok(())
}

/// The first 12 hex digits of a tables digest, as the DIGEST column shows it.
pub(super) fn short_digest(digest: &str) -> &str {
    &digest[..12.min(digest.len())]
}

/// The CLOCK column: whether the node vouches for its clock, and its peer furthest off.
fn clock_cell(clock: Option<&ClockStatus>) -> String {
    let Some(clock) = clock else {
        return "-".to_owned();
    };
    let widest = clock
        .widest_offset_secs()
        .map(|o| format!(" {o:+.3}s"))
        .unwrap_or_default();
    match &clock.refused {
        None => format!("ok{widest}"),
        Some(why) => format!("REFUSING{widest} ({why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_column_says_whether_the_node_serves_and_how_far_off_its_peers_are() {
        assert_eq!(
            clock_cell(None),
            "-",
            "a node of a build before clock probes"
        );
        let mut clock = ClockStatus {
            refused: None,
            peer_offsets_secs: Default::default(),
        };
        assert_eq!(clock_cell(Some(&clock)), "ok");
        clock.peer_offsets_secs.insert(2, 0.0042);
        clock.peer_offsets_secs.insert(3, -0.0125);
        assert_eq!(clock_cell(Some(&clock)), "ok -0.013s");
        clock.peer_offsets_secs.insert(3, -7200.0);
        clock.refused = Some("7200.0 s ahead of node 3's".into());
        assert_eq!(
            clock_cell(Some(&clock)),
            "REFUSING -7200.000s (7200.0 s ahead of node 3's)"
        );
    }
}
