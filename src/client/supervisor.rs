//! What the client does on its own: keep the registration alive across node failures, and
//! renew the certificate before it expires.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::{ClientError, ClientEvent, Shared};
use crate::node::close_code;

pub(super) fn spawn(shared: Arc<Shared>) {
    tokio::spawn(keep_registered(shared.clone()));
    tokio::spawn(keep_renewed(shared));
}

/// Watches the connection; when it is lost while registered, reconnects to another node and
/// registers again with the certificate.
async fn keep_registered(shared: Arc<Shared>) {
    loop {
        let Some(conn) = shared.conns.current() else {
            // Not connected yet (a call will connect); look again shortly.
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        };
        let reason = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = conn.closed() => r,
        };
        let wanted = shared
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(wanted) = wanted else {
            // Nothing registered: the next call reconnects by itself.
            wait_for_new_connection(&shared, &conn).await;
            continue;
        };
        if let quinn::ConnectionError::ApplicationClosed(close) = &reason {
            let code = close.error_code.into_inner();
            if code == u64::from(close_code::TAKEN_OVER) || code == u64::from(close_code::REVOKED) {
                let why = String::from_utf8_lossy(&close.reason).into_owned();
                tracing::warn!(agent_id = %wanted.agent_id, reason = %why, "session ended by the cluster; not reconnecting");
                *shared.wanted.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *shared.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
                shared.emit(ClientEvent::SessionLost { reason: why });
                continue;
            }
        }
        tracing::info!(agent_id = %wanted.agent_id, reason = %reason, "connection lost; reconnecting");
        let mut pause = shared.config.reconnect_min;
        loop {
            if shared.shutdown.is_cancelled() {
                return;
            }
            let attempt = async {
                shared.conns.ensure().await?;
                shared.register_now(&wanted, true).await
            };
            match attempt.await {
                Ok(reg) => {
                    let node = shared.conns.current_addr().unwrap_or_default();
                    tracing::info!(agent_id = %wanted.agent_id, %node, session_id = reg.session_id, "registered again");
                    shared.emit(ClientEvent::Reconnected {
                        node,
                        session_id: reg.session_id,
                    });
                    break;
                }
                Err(ClientError::Refused(e)) if e.code.is_certificate() => {
                    shared.emit(ClientEvent::SessionLost { reason: e.error });
                    *shared.wanted.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reconnection attempt failed");
                    shared.emit(ClientEvent::Trouble {
                        error: e.to_string(),
                    });
                }
            }
            // Full jitter: a crowd of agents that lost the same node does not return in step.
            let sleep = rand::thread_rng().gen_range(Duration::ZERO..=pause);
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(sleep) => {}
            }
            pause = (pause * 2).min(shared.config.reconnect_max);
        }
    }
}

async fn wait_for_new_connection(shared: &Shared, old: &quinn::Connection) {
    loop {
        if shared
            .conns
            .current()
            .is_some_and(|c| c.stable_id() != old.stable_id())
            || shared
                .wanted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        {
            return;
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Renews the certificate once `renew_fraction` of its lifetime has passed; after renewal
/// the registration is refreshed with the new certificate.
async fn keep_renewed(shared: Arc<Shared>) {
    loop {
        let wait = match shared.cert() {
            None => Duration::from_secs(3600),
            Some(c) => {
                let life = c.expires_at.saturating_sub(c.issued_at) as f64;
                let due = c.issued_at as f64 + life * shared.config.renew_fraction;
                let now = crate::node::unix_now_f64();
                Duration::from_secs_f64((due - now).max(0.0))
            }
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = shared.cert_changed.notified() => continue,
            _ = tokio::time::sleep(wait) => {}
        }
        match shared.cert() {
            None => continue,
            // Expired: nothing to renew with; wait for a new certificate.
            Some(c) if c.expires_at <= crate::node::unix_now_f64() as u64 => {
                shared.emit(ClientEvent::Trouble {
                    error: format!("certificate of {} expired; claim the id again", c.agent_id),
                });
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = shared.cert_changed.notified() => {}
                }
                continue;
            }
            Some(_) => {}
        }
        match shared.renew().await {
            Ok(c) => {
                tracing::info!(agent_id = %c.agent_id, serial = c.serial, "certificate renewed");
                shared.emit(ClientEvent::Renewed {
                    serial: c.serial,
                    expires_at: c.expires_at,
                });
                let wanted = shared
                    .wanted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let Some(w) = wanted.filter(|w| w.agent_id == c.agent_id) {
                    if let Err(e) = shared.register_now(&w, true).await {
                        shared.emit(ClientEvent::Trouble {
                            error: e.to_string(),
                        });
                    }
                }
            }
            Err(e) => {
                // A node that limits claims says when the next one goes through: sooner would
                // be refused again (and counted), so the wait is the node's when it gave one.
                let pause = match &e {
                    ClientError::Refused(r) => r.retry_after_ms.map(Duration::from_millis),
                    _ => None,
                }
                .unwrap_or(shared.config.reconnect_max);
                tracing::warn!(
                    error = %e,
                    retry_in_ms = pause.as_millis() as u64,
                    "certificate renewal failed; retrying"
                );
                shared.emit(ClientEvent::Trouble {
                    error: e.to_string(),
                });
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = shared.cert_changed.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}
