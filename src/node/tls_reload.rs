//! Renewed TLS material, taken up while the node serves.
//!
//! Every `[tls] reload_check_secs` the node looks whether its CA, certificate or key file
//! changed, and on SIGHUP (`Node::reload_tls`) it reloads them whatever they hold. Material
//! that loads and checks (the key fits the certificate, which chains to the CA and is a node
//! certificate for the cluster's server name) is used for every connection from then on
//! (see `LiveTls`); anything else is refused with the reason and the node goes on with what
//! it has, so a half-written renewal (the certificate written, the key not yet) costs
//! nothing and is taken up once it is whole. A certificate close to its expiry is warned
//! about, and its expiry is in `/metrics` and `agentreg status`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::Inner;
use crate::transport::tls::{NodeTls, TlsError, TlsFiles};

/// A certificate that expires sooner than this is warned about.
const WARN_BEFORE_SECS: u64 = 7 * 86_400;
/// How often that warning repeats.
const WARN_EVERY: Duration = Duration::from_secs(3_600);

/// What the node knows of its TLS files: a digest of their contents at the last look.
pub(crate) struct Watched {
    digest: Mutex<Option<[u8; 32]>>,
}

impl Watched {
    /// Remembers `files` as they are now (when they were loaded at start).
    pub(crate) fn seen(files: &TlsFiles) -> Watched {
        Watched {
            digest: Mutex::new(Some(digest(files))),
        }
    }
}

/// Digest of the three files' contents; a file that cannot be read counts as its error.
fn digest(files: &TlsFiles) -> [u8; 32] {
    let mut h = Sha256::new();
    for path in [&files.ca, &files.cert, &files.key] {
        match std::fs::read(path) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_be_bytes());
                h.update(&bytes);
            }
            Err(e) => h.update(format!("unreadable: {:?}", e.kind())),
        }
    }
    h.finalize().into()
}

/// Loads the TLS files and takes them up (see the module doc); returns until when the new
/// certificate chain verifies (seconds since the Unix epoch).
pub(super) fn reload(inner: &Inner) -> Result<u64, TlsError> {
    let files = inner.config.tls.files();
    *inner
        .tls_files
        .digest
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(digest(&files));
    let result = NodeTls::load(&files).and_then(|tls| {
        tls.check_node_certificate(&inner.config.tls.server_name)?;
        inner.tls.replace(&tls)
    });
    match &result {
        Ok(until) => tracing::info!(
            cert = %files.cert.display(),
            expires_in = %left(*until),
            "TLS material reloaded: new connections use it"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "TLS material not reloaded: the node goes on with the material it has"
        ),
    }
    result
}

/// Looks at the files every `reload_check_secs` and reloads them when they changed; warns
/// while the certificate in use is close to its expiry.
pub(super) fn spawn_watch(inner: Arc<Inner>) {
    let every = inner.config.tls.reload_check_secs;
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        // Without polling, the expiry is still looked at.
        let period = Duration::from_secs(if every == 0 { 60 } else { every });
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if every > 0 {
                let now = digest(&inner.config.tls.files());
                let before = *inner
                    .tls_files
                    .digest
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if before != Some(now) {
                    // Refused material is reported once, not at every look.
                    let inner = inner.clone();
                    let _ = tokio::task::spawn_blocking(move || reload(&inner)).await;
                }
            }
            let until = inner.tls.valid_until();
            if expires_soon(until) && warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
                warned = Some(tokio::time::Instant::now());
                tracing::warn!(
                    cert = %inner.config.tls.cert.display(),
                    expires_in = %left(until),
                    "this node's TLS certificate expires soon: renew it (the node takes up \
                     new files by itself, see [tls] reload_check_secs, or at SIGHUP)"
                );
            }
        }
    });
}

/// Whether a certificate valid until `until` (seconds since the Unix epoch) is warned about.
pub(super) fn expires_soon(until: u64) -> bool {
    until.saturating_sub(super::duties::unix_now_f64() as u64) < WARN_BEFORE_SECS
}

/// How long until `until` (seconds since the Unix epoch), as an operator reads it.
pub(crate) fn left(until: u64) -> String {
    let now = super::duties::unix_now_f64() as u64;
    let Some(secs) = until.checked_sub(now).filter(|s| *s > 0) else {
        return "expired".to_owned();
    };
    match secs {
        s if s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s >= 2 * 3_600 => format!("{}h", s / 3_600),
        s => format!("{}m", s.div_ceil(60)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_reads_in_days_hours_or_minutes() {
        let now = super::super::duties::unix_now_f64() as u64;
        assert_eq!(left(now + 89 * 86_400 + 600), "89d");
        assert_eq!(left(now + 2 * 86_400 + 600), "2d");
        assert_eq!(left(now + 47 * 3_600 + 600), "47h");
        assert_eq!(left(now + 90), "2m");
        assert_eq!(left(now.saturating_sub(5)), "expired");
        assert_eq!(left(0), "expired");
    }
}
