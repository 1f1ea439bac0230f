//! The binary's log output: level from `RUST_LOG` (default `info,openraft=warn`), text or JSON
//! on stderr, and openraft's repeated messages thinned out. Text is coloured only when stderr
//! is a terminal: a file, journald or a container's log driver gets plain lines.
//!
//! While a peer is down, openraft reports every failed AppendEntries (every heartbeat
//! interval, 50 ms by default) as an ERROR: twenty lines a second for as long as the peer is
//! gone, burying everything else. Each of openraft's message sites is shown at most once per
//! [`OPENRAFT_REPEAT_PERIOD`]; agentreg's own messages are never thinned.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use super::LogFormat;

/// The level filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,openraft=warn";

/// How often one openraft message site may log.
pub const OPENRAFT_REPEAT_PERIOD: Duration = Duration::from_secs(10);

/// Installs the binary's logger.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let colours = wants_colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let subscriber = subscriber(format, filter, std::io::stderr, colours);
    // Only fails when a logger is already installed, and then that one stays.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Whether text lines get terminal colours: only on a terminal, and not when `NO_COLOR` is set
/// to anything (<https://no-color.org>). Escape codes in a file or a log collector are noise
/// that every search through the lines has to step around.
pub fn wants_colours(is_terminal: bool, no_color: Option<OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The logger [`init`] installs, writing to `writer`, with terminal colours if `colours`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    colours: bool,
) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(colours);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let throttle = Throttle::new("openraft", OPENRAFT_REPEAT_PERIOD);
    // One filter, both conditions: a site the level filter turns off stays off for good
    // (two stacked per-layer filters would sum "never" and "always" to "sometimes", and the
    // registry would then build every one of openraft's debug spans on the write path).
    tracing_subscriber::registry().with(fmt.with_filter(filter.and(throttle)))
}

/// Lets each message site (`K`) whose target starts with `prefix` log at most once per
/// `period`.
struct Throttle<K = Identifier> {
    prefix: &'static str,
    period: Duration,
    last: Mutex<HashMap<K, Instant>>,
}

impl<K: std::hash::Hash + Eq> Throttle<K> {
    fn new(prefix: &'static str, period: Duration) -> Self {
        Throttle {
            prefix,
            period,
            last: Mutex::new(HashMap::new()),
        }
    }

    fn applies(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && meta.target().starts_with(self.prefix)
    }

    /// Whether `site` may log at `now`; if so, its period starts again.
    fn allow(&self, site: K, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(&site) {
            Some(t) if now.saturating_duration_since(*t) < self.period => false,
            _ => {
                last.insert(site, now);
                true
            }
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Filter<S> for Throttle {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        !self.applies(meta) || self.allow(meta.callsite(), Instant::now())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // Asked again for every event of a thinned site; everything else is always let through.
        if self.applies(meta) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &Captured) -> Vec<String> {
        String::from_utf8(out.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_repeated_openraft_message_is_shown_once_per_period_and_ours_always() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = Captured::default();
            let writer = out.clone();
            let subscriber = subscriber(
                format,
                EnvFilter::new(DEFAULT_FILTER),
                move || writer.clone(),
                false,
            );
            tracing::subscriber::with_default(subscriber, || {
                for i in 0..20 {
                    tracing::error!(target: "openraft::replication", attempt = i, "RPCError timeout");
                    tracing::warn!(target: "openraft::core", attempt = i, "vote changed");
                    tracing::warn!(target: "agentreg::node", attempt = i, "ours");
                    // Below openraft's level: never shown, and takes no turn from the site.
                    tracing::info!(target: "openraft::replication", attempt = i, "chatter");
                }
            });
            let lines = lines(&out);
            let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
            assert_eq!(count("RPCError timeout"), 1, "{format:?}: {lines:#?}");
            assert_eq!(count("vote changed"), 1, "{format:?}: {lines:#?}");
            assert_eq!(count("ours"), 20, "{format:?}: {lines:#?}");
            assert_eq!(count("chatter"), 0, "{format:?}: {lines:#?}");
            if let LogFormat::Json = format {
                assert!(
                    lines
                        .iter()
                        .any(|l| l.contains("RPCError timeout") && l.contains(r#""attempt":0"#)),
                    "the first one is shown: {lines:#?}"
                );
            }
        }
    }

    #[test]
    fn sites_below_the_level_cost_nothing() {
        // openraft wraps its write path in debug spans; a span the level turns off must not
        // be built at all (it was, once, for every claim).
        let subscriber = subscriber(
            LogFormat::Text,
            EnvFilter::new(DEFAULT_FILTER),
            Captured::default,
            false,
        );
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..2 {
                let span = tracing::debug_span!(target: "openraft::core", "append_to_log");
                assert!(span.is_disabled(), "openraft's debug span is built");
                let span = tracing::debug_span!(target: "agentreg::node", "ours");
                assert!(span.is_disabled(), "our debug span is built");
                assert!(!tracing::enabled!(target: "openraft::core", tracing::Level::INFO));
                let span = tracing::warn_span!(target: "openraft::core", "shown");
                assert!(!span.is_disabled(), "a span at the level is built");
            }
        });
    }

    #[test]
    fn lines_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(wants_colours(true, None));
        assert!(
            wants_colours(true, Some("".into())),
            "an empty NO_COLOR is unset"
        );
        assert!(!wants_colours(true, Some("1".into())));
        assert!(
            !wants_colours(false, None),
            "a file or a pipe gets plain lines"
        );
        for colours in [false, true] {
            let out = Captured::default();
            let writer = out.clone();
            let subscriber = subscriber(
                LogFormat::Text,
                EnvFilter::new(DEFAULT_FILTER),
                move || writer.clone(),
                colours,
            );
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(target: "audit", event = "claim", agent_id = "a", "identity event");
            });
            let lines = lines(&out);
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert_eq!(lines[0].contains('\x1b'), colours, "{lines:?}");
            if !colours {
                assert!(
                    lines[0].ends_with(r#"audit: identity event event="claim" agent_id="a""#),
                    "{lines:?}"
                );
            }
        }
    }

    #[test]
    fn a_site_logs_again_once_its_period_has_passed() {
        let throttle = Throttle::<u32>::new("openraft", Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(throttle.allow(1, at(0)));
        assert!(!throttle.allow(1, at(1)));
        assert!(throttle.allow(2, at(1)), "another site has its own period");
        assert!(!throttle.allow(1, at(9_999)));
        assert!(throttle.allow(1, at(10_000)));
        assert!(!throttle.allow(1, at(10_001)), "the period starts again");
        assert!(throttle.allow(1, at(20_000)));
    }
}
