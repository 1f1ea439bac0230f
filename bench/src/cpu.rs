//! CPU time, from /proc: what the servers of the side being measured (the bench's child
//! processes: three agentreg nodes or three etcd members, never both at once) and the bench
//! itself (the client) spent during a row. On a machine where client and servers share the
//! cores, CPU per operation is what bounds throughput, and it moves much less with the
//! machine's noise than the throughput does.

use std::time::Duration;

/// CPU spent by the servers and by the bench since some earlier point.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub servers: Duration,
    pub client: Duration,
}

/// Cumulative CPU time of the servers and of the bench at one moment.
pub struct Sample(Cpu);

impl Sample {
    pub fn now() -> Sample {
        let me = std::process::id();
        let mut servers = 0;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some((ppid, ticks)) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .and_then(stat)
                {
                    if ppid == me {
                        servers += ticks;
                    }
                }
            }
        }
        let client = stat(me).map_or(0, |(_, ticks)| ticks);
        Sample(Cpu {
            servers: from_ticks(servers),
            client: from_ticks(client),
        })
    }

    /// What was spent between `earlier` and this sample.
    pub fn since(&self, earlier: &Sample) -> Cpu {
        Cpu {
            servers: self.0.servers.saturating_sub(earlier.0.servers),
            client: self.0.client.saturating_sub(earlier.0.client),
        }
    }
}

/// Parent pid and user + system CPU ticks (all threads) of process `pid`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<(u32, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces: fields are
    // counted from the last ')'. After it: state (3), ppid (4), ... utime (14), stime (15).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn from_ticks(ticks: u64) -> Duration {
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = u64::try_from(per_sec)
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Duration::from_nanos(ticks * 1_000_000_000 / per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let line = "4242 (tokio (rt) x) S 17 4242 17 0 -1 4194560 812 0 0 0 \
                    150 35 0 0 20 0 9 0 1234 56789 321 18446744073709551615";
        assert_eq!(parse_stat(line), Some((17, 185)));
        assert_eq!(parse_stat("4242 (cut short) S 17"), None);
    }

    #[test]
    fn this_process_is_seen_and_its_time_only_grows() {
        let me = std::process::id();
        let (ppid, before) = stat(me).expect("own /proc entry");
        assert_eq!(ppid, std::os::unix::process::parent_id());
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let (_, after) = stat(me).unwrap();
        assert!(
            after > before,
            "{before} -> {after} ticks after 200 ms of work ({x})"
        );
    }
}
