//! Latency samples, the cells of the table, and the table.

use std::time::Duration;

use crate::cpu::Cpu;

/// Operations completed in a timed window, with each one's latency.
#[derive(Debug, Clone, Default)]
pub struct Rate {
    pub ok: usize,
    pub failed: usize,
    /// The first failure's message, if any failed.
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    /// CPU the servers and the bench spent meanwhile.
    pub cpu: Option<Cpu>,
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
    /// The round in the middle (see [`middle`]) of each side.
    pub agentreg: Cell,
    pub etcd: Cell,
    /// Each round's throughput, agentreg's and etcd's, for throughput rows run in more
    /// than one round.
    pub rounds: Vec<(Option<f64>, Option<f64>)>,
}

/// Of one side's rounds of a row, the one in the middle by the number the ratio compares
/// (the upper of the two middle ones for an even count); n/a if there is none.
fn middle(mut cells: Vec<Cell>) -> Cell {
    cells.retain(|c| c.key().is_some());
    cells.sort_by(|a, b| a.key().unwrap_or(0.0).total_cmp(&b.key().unwrap_or(0.0)));
    let n = cells.len();
    if n == 0 {
        return Cell::NotApplicable;
    }
    cells.swap_remove(n / 2)
}

impl Row {
    /// The row `name` from the rounds of both sides (the rounds of one side in the order
    /// they ran; a side that did not run it, or no round of it, gives n/a).
    pub fn from_rounds(name: String, agentreg: Vec<Cell>, etcd: Vec<Cell>) -> Row {
        let throughput = |c: &Cell| match c {
            Cell::Rate(r) => Some(r.per_sec()),
            _ => None,
        };
        let n = agentreg.len().max(etcd.len());
        let rounds = if n > 1 {
            (0..n)
                .map(|i| {
                    (
                        agentreg.get(i).and_then(throughput),
                        etcd.get(i).and_then(throughput),
                    )
                })
                .filter(|(a, e)| a.is_some() || e.is_some())
                .collect()
        } else {
            Vec::new()
        };
        Row {
            name,
            agentreg: middle(agentreg),
            etcd: middle(etcd),
            rounds,
        }
    }

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

/// A markdown table of `lines` (workload, agentreg, etcd, better) under a header whose
/// first column is `first`, the two systems' columns `width` wide, then `footer`.
/// A table of four columns: the row's name, agentreg's cell, etcd's cell and the ratio.
/// The name column is at least 40 characters wide and the two cells at least `width`, and
/// each grows to its longest entry, so that every line has the same length.
fn table(first: &str, width: usize, lines: Vec<[String; 4]>, footer: &str) -> String {
    let widest = |i: usize, least: usize| {
        lines
            .iter()
            .map(|l| l[i].chars().count())
            .fold(least, usize::max)
    };
    let (name_w, a_w, e_w) = (widest(0, 40), widest(1, width), widest(2, width));
    let line = |[name, a, e, better]: [String; 4]| {
        format!("| {name:<name_w$} | {a:<a_w$} | {e:<e_w$} | {better:>7} |\n")
    };
    let mut out = line([first, "agentreg", "etcd 3.4", "better"].map(String::from));
    out.push_str(&format!(
        "|{}|{}|{}|{}|\n",
        "-".repeat(name_w + 2),
        "-".repeat(a_w + 2),
        "-".repeat(e_w + 2),
        "-".repeat(9)
    ));
    for l in lines {
        out.push_str(&line(l));
    }
    out.push('\n');
    out.push_str(footer);
    out
}

pub fn render(rows: &[Row]) -> String {
    let lines = rows
        .iter()
        .map(|r| [r.name.clone(), r.agentreg.text(), r.etcd.text(), r.ratio()])
        .collect();
    table(
        "workload",
        58,
        lines,
        "'better' is how many times better agentreg is: throughput agentreg/etcd; \
         times and memory etcd/agentreg.\n",
    )
}

/// CPU per completed operation of `cell` if it is a throughput row.
#[derive(Debug, Clone, Copy)]
struct PerOp {
    /// µs of the servers and of the bench client.
    servers: f64,
    client: f64,
    /// Cores the row kept busy: all CPU time over the row's wall time.
    cores: f64,
    /// Context switches of the servers' and the client's threads.
    switches: f64,
}

fn cpu_of(cell: &Cell) -> Option<PerOp> {
    let Cell::Rate(rate) = cell else {
        return None;
    };
    let cpu = rate.cpu?;
    let ops = rate.ok.max(1) as f64;
    Some(PerOp {
        servers: cpu.servers.as_secs_f64() * 1e6 / ops,
        client: cpu.client.as_secs_f64() * 1e6 / ops,
        cores: (cpu.servers + cpu.client).as_secs_f64() / rate.elapsed.as_secs_f64().max(1e-9),
        switches: cpu.switches as f64 / ops,
    })
}

/// The second table: CPU per operation of every throughput row, servers and bench client
/// apart, how many of the machine's cores the row kept busy, and the context switches per
/// operation.
pub fn render_cpu(rows: &[Row]) -> String {
    let cell = |c: Option<PerOp>| match c {
        Some(c) => format!(
            "{:>7.0} + {:>5.0} µs, {:.2} cores, {:>5.1} sw",
            c.servers, c.client, c.cores, c.switches
        ),
        None => "n/a".into(),
    };
    let lines = rows
        .iter()
        .filter_map(|r| {
            let (a, e) = (cpu_of(&r.agentreg), cpu_of(&r.etcd));
            let better = match (a, e) {
                (Some(a), Some(e)) if a.servers + a.client > 0.0 => {
                    format!("{:.2}x", (e.servers + e.client) / (a.servers + a.client))
                }
                _ => "-".into(),
            };
            (a.is_some() || e.is_some()).then(|| [r.name.clone(), cell(a), cell(e), better])
        })
        .collect();
    table(
        "CPU per operation: servers + client",
        40,
        lines,
        "CPU time (user + system, from /proc) of the three servers and of the bench process \
         while the row ran, per completed operation; 'sw': their threads' context switches \
         per operation (a thread going to sleep or pushed off its core); 'better' is etcd's \
         CPU total over agentreg's.\n",
    )
}

/// Each throughput row's rounds, when there was more than one: both systems' throughput,
/// the ratio of each round (its two sides ran one after the other, so the machine's
/// slower and faster minutes affect both alike) and the median of those ratios. Empty
/// with one round.
pub fn render_rounds(rows: &[Row]) -> String {
    let paired = |(a, e): (Option<f64>, Option<f64>)| Some(a? / e.filter(|e| *e > 0.0)?);
    let per_sec = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.rounds.is_empty()) {
        let each: Vec<String> = r
            .rounds
            .iter()
            .map(|&round| {
                let ratio = paired(round).map_or(String::new(), |x| format!(" {x:.2}x"));
                format!("{}/{}{ratio}", per_sec(round.0), per_sec(round.1))
            })
            .collect();
        out.push_str(&format!("- {}: {}", r.name, each.join("; ")));
        let mut ratios: Vec<f64> = r.rounds.iter().filter_map(|&round| paired(round)).collect();
        if !ratios.is_empty() {
            ratios.sort_by(f64::total_cmp);
            out.push_str(&format!("; median ratio {:.2}x", ratios[ratios.len() / 2]));
        }
        out.push('\n');
    }
    if out.is_empty() {
        return out;
    }
    format!(
        "Throughput per round (agentreg/etcd per second, and their ratio); the tables show \
         each side's middle round:\n{out}"
    )
}

fn cpu_json(cell: &Cell) -> Option<serde_json::Value> {
    cpu_of(cell).map(
        |c| serde_json::json!({"servers": c.servers, "client": c.client, "switches": c.switches}),
    )
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
                    "cpu_us_per_op": {
                        "agentreg": cpu_json(&r.agentreg),
                        "etcd": cpu_json(&r.etcd),
                    },
                    "rounds_per_sec": r.rounds.iter()
                        .map(|(a, e)| serde_json::json!({"agentreg": a, "etcd": e}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(ok: usize, servers_ms: u64, client_ms: u64) -> Cell {
        Cell::Rate(Rate {
            ok,
            elapsed: Duration::from_secs(1),
            latencies: vec![Duration::from_millis(2); ok],
            cpu: Some(Cpu {
                servers: Duration::from_millis(servers_ms),
                client: Duration::from_millis(client_ms),
                switches: 3 * ok as u64 + ok as u64 / 2,
            }),
            ..Rate::default()
        })
    }

    fn rows() -> Vec<Row> {
        vec![
            Row::from_rounds(
                "claim, 64 in flight".into(),
                vec![rate(1000, 300, 100)],
                vec![rate(250, 800, 200)],
            ),
            Row::from_rounds(
                "leader killed".into(),
                vec![Cell::Times(vec![Duration::from_millis(400)])],
                vec![],
            ),
        ]
    }

    #[test]
    fn both_tables_have_aligned_columns_and_the_cpu_table_only_throughput_rows() {
        let main = render(&rows());
        let lines: Vec<&str> = main.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "| {:<40} | {:<58} | {:<58} | {:>7} |",
                "workload", "agentreg", "etcd 3.4", "better"
            )
        );
        assert_eq!(lines[1].len(), lines[0].len(), "{main}");
        assert!(lines[2].starts_with("| claim, 64 in flight ") && lines[2].ends_with("   4.00x |"));
        assert!(lines[3].contains("median 400.00 ms") && lines[3].contains("n/a"));

        let cpu = render_cpu(&rows());
        let lines: Vec<&str> = cpu.lines().collect();
        assert_eq!(lines[1].chars().count(), lines[0].chars().count(), "{cpu}");
        // 300 + 100 ms over 1,000 claims against 800 + 200 ms over 250: 400 against 4,000 µs.
        assert_eq!(
            lines[2],
            format!(
                "| {:<40} | {:<40} | {:<40} | {:>7} |",
                "claim, 64 in flight",
                "    300 +   100 µs, 0.40 cores,   3.5 sw",
                "   3200 +   800 µs, 1.00 cores,   3.5 sw",
                "10.00x"
            )
        );
        let json = to_json(&rows());
        assert_eq!(json[0]["cpu_us_per_op"]["etcd"]["switches"], 3.5);
        assert!(!cpu.contains("leader killed"), "{cpu}");
    }

    /// A row name or a cell longer than its column widens the column for every line.
    #[test]
    fn long_names_and_cells_widen_their_column() {
        let mut rows = rows();
        rows.push(Row::from_rounds(
            "node killed -> its 100 agents registered elsewhere".into(),
            vec![Cell::Times(vec![Duration::from_millis(4032)])],
            vec![],
        ));
        rows.push(Row::from_rounds(
            "validate, local/serializable, 64 in flight".into(),
            vec![rate(1000, 300, 100)],
            vec![rate(250, 800, 200)],
        ));
        for text in [render(&rows), render_cpu(&rows)] {
            let lines: Vec<usize> = text
                .lines()
                .take_while(|l| l.starts_with('|'))
                .map(|l| l.chars().count())
                .collect();
            assert!(lines.len() >= 4, "{text}");
            assert!(lines.iter().all(|n| *n == lines[0]), "{lines:?}\n{text}");
        }
    }

    #[test]
    fn rounds_show_the_middle_round_of_each_side_and_every_rounds_ratio() {
        let row = Row::from_rounds(
            "claim, 64 in flight".into(),
            vec![rate(1200, 0, 0), rate(900, 0, 0), rate(1000, 0, 0)],
            vec![rate(400, 0, 0), rate(200, 0, 0), rate(250, 0, 0)],
        );
        let key = |c: &Cell| c.key().unwrap();
        assert_eq!(key(&row.agentreg), 1000.0);
        assert_eq!(key(&row.etcd), 250.0);
        let times = Row::from_rounds(
            "leader killed".into(),
            vec![
                Cell::Times(vec![Duration::from_millis(500)]),
                Cell::Times(vec![Duration::from_millis(300)]),
            ],
            vec![],
        );
        // Upper middle of two; no throughput, so no rounds line.
        assert_eq!(key(&times.agentreg), 0.5);
        assert!(matches!(times.etcd, Cell::NotApplicable));
        let text = render_rounds(&[row, times]);
        assert_eq!(
            text.lines().nth(1),
            Some("- claim, 64 in flight: 1200/400 3.00x; 900/200 4.50x; 1000/250 4.00x; median ratio 4.00x"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 2, "{text}");
        // One round: nothing to add.
        assert_eq!(render_rounds(&rows()), "");
    }
}
