//! Latency samples, the cells of the table, and the table.

use std::time::Duration;

/// Operations completed in a timed window, with each one's latency.
#[derive(Debug, Clone, Default)]
pub struct Rate {
    pub ok: usize,
    pub failed: usize,
    /// The first failure's message, if any failed.
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut v = self.latencies.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i]
    }

    pub fn merge(&mut self, other: Rate) {
        self.ok += other.ok;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.extend(other.latencies);
    }
}

#[derive(Debug, Clone)]
pub enum Cell {
    Rate(Rate),
    /// Repeated measurements of one duration; the median is shown.
    Times(Vec<Duration>),
    /// Bytes of resident memory per agent (or lease), and a note.
    BytesPer(f64, String),
    NotApplicable,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Cell::Rate(r) => format!(
                "{:>8.0}/s p50 {:>6} p99 {:>7} max {:>7} ms{}",
                r.per_sec(),
                ms(r.percentile(0.5)),
                ms(r.percentile(0.99)),
                ms(r.percentile(1.0)),
                if r.failed > 0 {
                    format!(" ({} failed)", r.failed)
                } else {
                    String::new()
                }
            ),
            Cell::Times(v) => format!(
                "median {} ms (runs: {})",
                ms(median(v)),
                v.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
            ),
            Cell::BytesPer(b, note) => format!("{:.1} KiB/agent {note}", b / 1024.0),
            Cell::NotApplicable => "n/a".into(),
        }
    }

    /// The number the ratio column compares (higher is better for rates, lower for times
    /// and memory).
    fn key(&self) -> Option<f64> {
        match self {
            Cell::Rate(r) => Some(r.per_sec()),
            Cell::Times(v) => Some(median(v).as_secs_f64()),
            Cell::BytesPer(b, _) => Some(*b),
            Cell::NotApplicable => None,
        }
    }
}

pub struct Row {
    pub name: String,
    pub agentreg: Cell,
    pub etcd: Cell,
}

impl Row {
    /// agentreg/etcd for rates (throughput), etcd/agentreg for times and memory, so that
    /// above 1 always means agentreg is better.
    fn ratio(&self) -> String {
        match (self.agentreg.key(), self.etcd.key()) {
            (Some(a), Some(e)) if a > 0.0 && e > 0.0 => {
                let r = match self.agentreg {
                    Cell::Rate(_) => a / e,
                    _ => e / a,
                };
                format!("{r:.2}x")
            }
            _ => "-".into(),
        }
    }
}

pub fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "| {:<40} | {:<58} | {:<58} | {:>7} |\n|{}|{}|{}|{}|\n",
        "workload",
        "agentreg",
        "etcd 3.4",
        "better",
        "-".repeat(42),
        "-".repeat(60),
        "-".repeat(60),
        "-".repeat(9)
    );
    for r in rows {
        out.push_str(&format!(
            "| {:<40} | {:<58} | {:<58} | {:>7} |\n",
            r.name,
            r.agentreg.text(),
            r.etcd.text(),
            r.ratio()
        ));
    }
    out.push_str(
        "\n'better' is how many times better agentreg is: throughput agentreg/etcd; \
         times and memory etcd/agentreg.\n",
    );
    out
}

pub fn to_json(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "workload": r.name,
                    "agentreg": r.agentreg.text(),
                    "etcd": r.etcd.text(),
                    "better": r.ratio(),
                })
            })
            .collect(),
    )
}
