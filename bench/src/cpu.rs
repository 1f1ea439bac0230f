//! CPU time and context switches, from /proc: what the servers of the side being measured
//! (the bench's child processes: three agentreg nodes or three etcd members, never both at
//! once) and the bench itself (the client) spent during a row. On a machine where client
//! and servers share the cores, CPU per operation is what bounds throughput, and it moves
//! much less with the machine's noise than the throughput does. Context switches say how
//! much of it went on threads going to sleep and being woken (or pushed off a core): on a
//! virtual machine each costs tens of microseconds.

use std::collections::HashMap;
use std::time::Duration;

/// CPU spent, and context switches made, by the servers and by the bench since some
/// earlier point.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub servers: Duration,
    pub client: Duration,
    /// Voluntary and involuntary, of every thread of the servers and of the bench.
    pub switches: u64,
}

/// Cumulative CPU time of the servers and of the bench at one moment, and the context
/// switches of each of their threads.
pub struct Sample {
    cpu: Cpu,
    /// Per server thread (pid, tid): threads come and go (tokio's blocking pool), so a
    /// row counts each thread's own growth, not the difference of two sums.
    server_threads: HashMap<(u32, u32), u64>,
    client_switches: u64,
}

impl Sample {
    pub fn now() -> Sample {
        let me = std::process::id();
        let mut servers = 0;
        let mut server_threads = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if let Some((ppid, ticks)) = stat(pid) {
                    if ppid == me {
                        servers += ticks;
                        for (tid, n) in thread_switches(pid) {
                            server_threads.insert((pid, tid), n);
                        }
                    }
                }
            }
        }
        let client = stat(me).map_or(0, |(_, ticks)| ticks);
        Sample {
            cpu: Cpu {
                servers: from_ticks(servers),
                client: from_ticks(client),
                switches: 0,
            },
            server_threads,
            client_switches: own_switches(),
        }
    }

    /// What was spent between `earlier` and this sample. A server thread that ended in
    /// between takes its switches of the row with it (tokio's idle blocking threads end
    /// after 10 s without work: a few switches at most).
    pub fn since(&self, earlier: &Sample) -> Cpu {
        let servers: u64 = self
            .server_threads
            .iter()
            .map(|(thread, n)| n.saturating_sub(*earlier.server_threads.get(thread).unwrap_or(&0)))
            .sum();
        Cpu {
            servers: self.cpu.servers.saturating_sub(earlier.cpu.servers),
            client: self.cpu.client.saturating_sub(earlier.cpu.client),
            switches: servers + self.client_switches.saturating_sub(earlier.client_switches),
        }
    }
}

/// Context switches (voluntary + involuntary) of each thread of process `pid`, by tid.
fn thread_switches(pid: u32) -> Vec<(u32, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            Some((tid, parse_switches(&status)?))
        })
        .collect()
}

/// The sum of `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` in a
/// /proc/.../status text.
fn parse_switches(status: &str) -> Option<u64> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(field("voluntary_ctxt_switches")? + field("nonvoluntary_ctxt_switches")?)
}

/// Context switches of every thread the bench has had, ended ones included.
fn own_switches() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    u64::try_from(usage.ru_nvcsw).unwrap_or(0) + u64::try_from(usage.ru_nivcsw).unwrap_or(0)
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
    fn switches_are_both_kinds_summed() {
        let status = "Name:\ttokio-rt-worker\nState:\tS (sleeping)\n\
                      voluntary_ctxt_switches:\t5203\nnonvoluntary_ctxt_switches:\t1830\n";
        assert_eq!(parse_switches(status), Some(7033));
        assert_eq!(parse_switches("voluntary_ctxt_switches:\t12\n"), None);
    }

    #[test]
    fn a_thread_that_sleeps_is_counted_switching() {
        let me = std::process::id();
        let before_self = own_switches();
        let (slept, stay) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let sleeper = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = u32::try_from(unsafe { libc::gettid() }).unwrap();
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            slept.0.send(tid).unwrap();
            let _ = stay.1.recv();
        });
        let tid = slept.1.recv().unwrap();
        // Seen per thread in /proc, as the servers' threads are: each of its 20 sleeps gave
        // up the core.
        let seen = thread_switches(me);
        let n = seen.iter().find(|(t, _)| *t == tid).map(|(_, n)| *n);
        assert!(
            n.is_some_and(|n| n >= 20),
            "thread {tid}: {n:?} in {seen:?}"
        );
        stay.0.send(()).unwrap();
        sleeper.join().unwrap();
        // And by getrusage, as the bench's own are, after the thread has ended.
        let grew = own_switches() - before_self;
        assert!(grew >= 20, "{grew} switches after 20 sleeps");
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
