//! "This workflow job is done", delivered on commit: the statement that
//! records a workflow job's result also notifies [`CHANNEL`] (see
//! `convert::finish`), Postgres delivers it when that transaction commits,
//! and `serve` wakes the convert-now request waiting for that job at once,
//! instead of each request polling the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The notification channel; the payload is the job id.
pub const CHANNEL: &str = "leadconv_workflow_finished";

/// The requests waiting for jobs to finish, woken by one listening
/// connection per `serve` process.
#[derive(Default)]
pub struct Waiters {
    jobs: Mutex<HashMap<Uuid, Vec<oneshot::Sender<()>>>>,
}

impl Waiters {
    /// Listens until `stop` (see [`listen`]). A notification missed while
    /// reconnecting costs the waiter only its fallback poll.
    pub fn start(pool: PgPool, stop: CancellationToken) -> Arc<Waiters> {
        let waiters = Arc::new(Waiters::default());
        let w = waiters.clone();
        tokio::spawn(async move { listen(&pool, &stop, |job| w.wake(job)).await });
        waiters
    }

    fn wake(&self, job: Uuid) {
        for tx in self.jobs.lock().expect("waiters lock").remove(&job).unwrap_or_default() {
            let _ = tx.send(());
        }
    }

    /// Registers interest in `job`: its `woken` fires when the job
    /// finishes. Dropping it (answered, timed out, or the client went away)
    /// forgets the registration, so the map never keeps dead entries.
    pub fn wait(self: &Arc<Self>, job: Uuid) -> Waiting {
        let (tx, rx) = oneshot::channel();
        self.jobs.lock().expect("waiters lock").entry(job).or_default().push(tx);
        Waiting { woken: Some(rx), waiters: self.clone(), job }
    }

    fn forget(&self, job: Uuid) {
        self.jobs.lock().expect("waiters lock").remove(&job);
    }
}

/// One request's registration (see [`Waiters::wait`]); `woken` is taken
/// once it fired.
pub struct Waiting {
    pub woken: Option<oneshot::Receiver<()>>,
    waiters: Arc<Waiters>,
    job: Uuid,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waiters.forget(self.job);
    }
}

/// Hands each job id notified on [`CHANNEL`] to `each` until `stop`, on a
/// listening connection of its own, listening again a second after the
/// connection is lost. Notifications sent while it reconnects are missed:
/// whoever listens has a slower way to learn the same.
pub async fn listen(pool: &PgPool, stop: &CancellationToken, each: impl Fn(Uuid)) {
    while !stop.is_cancelled() {
        let listening = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener.listen(CHANNEL).await?;
            loop {
                if let Ok(job) = listener.recv().await?.payload().parse::<Uuid>() {
                    each(job);
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            lost = listening => {
                let lost: sqlx::Result<()> = lost;
                tracing::debug!(error = ?lost.err(), "finished-job listener lost its connection; listening again");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
