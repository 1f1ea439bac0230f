//! Development helpers: TLS material and configs for a local cluster.

use std::path::Path;

use anyhow::Context;

use crate::transport::tls;

pub fn certs(out: &Path, nodes: &[u64], sans: &[String], force: bool) -> anyhow::Result<()> {
    let written = tls::write_dev_material(out, nodes, sans, force)?;
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Writes `dir/tls/*` and `dir/node<N>.toml` for `n` nodes on 127.0.0.1, keeping what exists.
pub fn cluster(dir: &Path, n: u64, base_port: u16) -> anyhow::Result<()> {
    anyhow::ensure!((1..=7).contains(&n), "a local cluster has 1 to 7 nodes");
    let ids: Vec<u64> = (1..=n).collect();
    let tls_dir = dir.join("tls");
    if tls_dir.join("ca.pem").exists() {
        println!("keeping TLS material in {}", tls_dir.display());
    } else {
        tls::write_dev_material(&tls_dir, &ids, &[], false)?;
        println!("wrote TLS material to {}", tls_dir.display());
    }
    let port = |id: u64| u64::from(base_port) + id - 1;
    let peers: String = ids
        .iter()
        .map(|id| format!("  {{ id = {id}, addr = \"127.0.0.1:{}\" }},\n", port(*id)))
        .collect();
    for id in &ids {
        let path = dir.join(format!("node{id}.toml"));
        if path.exists() {
            println!("keeping {}", path.display());
            continue;
        }
        let text = format!(
            r#"# agentreg node {id} of a local development cluster (see docs/configuration.md)
cluster_id = "agentreg-local"
node_id = {id}
listen = "127.0.0.1:{port}"
data_dir = "data/node{id}"
peers = [
{peers}]

[metrics]
listen = "127.0.0.1:{metrics_port}"

[tls]
ca = "tls/ca.pem"
cert = "tls/node{id}.pem"
key = "tls/node{id}.key"
"#,
            port = port(*id),
            metrics_port = port(*id) + 1000
        );
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
