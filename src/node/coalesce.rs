//! Many callers, one round: callers that ask while earlier rounds are in flight share the
//! next one.
//!
//! Used for the read index (`read.rs`): each round is one confirmation of leadership by a
//! quorum (on the leader) or one call to the leader (on a follower), however many
//! validations wait for it. A caller only ever joins a round that starts after it asked, so
//! what the round learns (the log position every write acknowledged so far has reached) is
//! as fresh as the caller needs.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::propose::{free_slot, next_batch};

/// Rounds in flight at once; callers that come meanwhile wait for the next free one.
const IN_FLIGHT: usize = 2;

/// Handle to a coalescing task. Clones share it.
#[derive(Clone)]
pub(crate) struct Coalescer<T> {
    tx: mpsc::UnboundedSender<oneshot::Sender<T>>,
}

impl<T: Clone + Send + 'static> Coalescer<T> {
    /// Starts the task; `round()` is one round, `rounds` counts them. The task stops when
    /// `stop` is cancelled.
    pub(crate) fn start<F, Fut>(
        round: F,
        rounds: prometheus_client::metrics::counter::Counter,
        stop: CancellationToken,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<T>>();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            loop {
                let Some(slot) = free_slot(&slots, &stop).await else {
                    return;
                };
                // Taken only once a slot is free: whoever asked before this point shares
                // the round that starts now.
                let Some(waiters) =
                    next_batch(&mut rx, &stop, || usize::MAX, usize::MAX, |_| 0).await
                else {
                    return;
                };
                rounds.inc();
                let this_round = round();
                tokio::spawn(async move {
                    let answer = this_round.await;
                    for w in waiters {
                        let _ = w.send(answer.clone());
                    }
                    drop(slot);
                });
            }
        });
        Coalescer { tx }
    }

    /// Waits for the next round to start and finish; `None` once the task has stopped.
    pub(crate) async fn get(&self) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).ok()?;
        rx.await.ok()
    }
}
