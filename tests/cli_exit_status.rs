//! The `agentreg` command as scripts read it (docs/operations.md): its exit status (0 done,
//! 1 refused on its merits, 3 `agent validate` found the certificate invalid, 4 the cluster
//! could not answer, worth retrying later, 5 `health` found a member that does not serve)
//! and its lists, as a table or JSON. The binary runs against an in-process cluster.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

/// Runs `agentreg` with `args` (bounded: a hung command fails the test).
async fn agentreg(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentreg"))
        .args(args)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("agentreg ends within 60 s")
        .expect("agentreg runs")
}

fn said(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// The operator's TLS options.
fn operator_tls(admin: &agentreg::cli::AdminArgs) -> [&str; 6] {
    [
        "--ca",
        path(&admin.ca),
        "--cert",
        path(&admin.cert),
        "--key",
        path(&admin.key),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_statuses_tell_done_refused_invalid_and_unavailable_apart() {
    let (cluster, _) = TestCluster::ready(Options::default()).await;
    let admin = cluster.admin_args();
    let endpoints = admin.endpoints.join(",");
    let tls = operator_tls(&admin);
    let agent = ["agent", "--endpoints", &endpoints, "--ca", path(&admin.ca)];
    let cert = cluster.dir.path().join("cli-cert.json");

    // Done.
    let out =
        agentreg(&[&agent[..], &["claim", "--id", "cli", "--out", path(&cert)]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let out = agentreg(&[&agent[..], &["validate", "--cert", path(&cert)]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));

    // Refused on its merits: 1, and the operator's command asks no other endpoint.
    let other = cluster.dir.path().join("cli-other.json");
    let out =
        agentreg(&[&agent[..], &["claim", "--id", "cli", "--out", path(&other)]].concat()).await;
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("already claimed"), "{}", said(&out));
    let show = ["claims", "--endpoints", &endpoints];
    let out = agentreg(&[&show[..], &tls, &["show", "nobody"]].concat()).await;
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("neither claimed nor connected"), "{stderr}");
    assert!(!stderr.contains("next endpoint"), "{stderr}");

    // Not valid: 3.
    let out = agentreg(&[&agent[..], &["release", "--cert", path(&cert)]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let out = agentreg(&[&agent[..], &["validate", "--cert", path(&cert)]].concat()).await;
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(said(&out).contains("revoked"), "{}", said(&out));

    // Nobody there: 4, for the agent side and the operator's alike.
    let nowhere = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().to_string()
    };
    let out = agentreg(&[
        "agent",
        "--endpoints",
        &nowhere,
        "--ca",
        path(&admin.ca),
        "validate",
        "--cert",
        path(&cert),
    ])
    .await;
    assert_eq!(out.status.code(), Some(4), "{}", said(&out));
    let out = agentreg(&[&["status", "--endpoints", &nowhere][..], &tls].concat()).await;
    assert_eq!(out.status.code(), Some(4), "{}", said(&out));
    assert!(
        said(&out).contains("no endpoint answered"),
        "{}",
        said(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_print_every_row_as_a_table_or_one_json_array() {
    let (cluster, leader) = TestCluster::ready(Options::default()).await;
    for id in ["li-b", "li-a", "li-c", "other"] {
        claim_ok(cluster.node(leader), id).await;
    }
    let admin = cluster.admin_args();
    let endpoints = admin.endpoints.join(",");
    let tls = operator_tls(&admin);
    let claims = [&["claims", "--endpoints", &endpoints][..], &tls].concat();

    let out = agentreg(
        &[
            &claims[..],
            &["--json", "list", "--prefix", "li-", "--limit", "2"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["li-a", "li-b"]);
    assert!(said(&out).contains("(1 more not shown"), "{}", said(&out));

    let out = agentreg(&[&claims[..], &["list"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let firsts: Vec<&str> = stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        firsts,
        ["AGENT", "li-a", "li-b", "li-c", "other"],
        "{stdout}"
    );

    let agents = [&["agents", "--endpoints", &endpoints][..], &tls].concat();
    let out = agentreg(&[&agents[..], &["--json", "list"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[]\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_names_the_member_that_does_not_serve_and_exits_5() {
    let (mut cluster, _) = TestCluster::ready(Options::default()).await;
    let admin = cluster.admin_args();
    let endpoints = admin.endpoints.join(",");
    let tls = operator_tls(&admin);
    let health = [&["health", "--json", "--endpoints", &endpoints][..], &tls].concat();
    // The verdict on member `id` in a `health --json` answer.
    let row = |out: &Output, id: u64| -> serde_json::Value {
        let rows: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", said(out)));
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no row for node {id}: {}", said(out)))
    };

    let out = agentreg(&health).await;
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    for id in 1..=3 {
        assert_eq!(row(&out, id)["healthy"], true, "{}", said(&out));
    }

    // A node whose clock is off does not serve: it is named, with why, and the others are
    // healthy.
    let skewed = cluster.follower().await;
    cluster.node(skewed).shift_clock_for_tests(2 * 86_400_000);
    let out = wait_for("health to see the clock", TIMEOUT, || async {
        let out = agentreg(&health).await;
        (out.status.code() == Some(5)).then_some(out)
    })
    .await;
    let bad = row(&out, skewed);
    assert_eq!(bad["healthy"], false);
    assert!(
        bad["problems"][0]
            .as_str()
            .unwrap()
            .contains("cannot vouch for its clock"),
        "{}",
        said(&out)
    );
    for id in cluster.others(skewed) {
        assert_eq!(row(&out, id)["healthy"], true, "{}", said(&out));
    }
    cluster.node(skewed).shift_clock_for_tests(0);

    // A node down is named unreachable; the table says so too.
    cluster.crash(skewed).await;
    let table = [&["health", "--endpoints", &endpoints][..], &tls].concat();
    let out = agentreg(&table).await;
    assert_eq!(out.status.code(), Some(5), "{}", said(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&skewed.to_string()))
        .unwrap_or_else(|| panic!("{}", said(&out)));
    assert!(
        line.contains("unhealthy") && line.contains("unreachable"),
        "{}",
        said(&out)
    );
}
