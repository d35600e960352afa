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
    /// Listens until `stop`, reconnecting after errors. A notification
    /// missed while reconnecting costs the waiter only its fallback poll.
    pub fn start(pool: PgPool, stop: CancellationToken) -> Arc<Waiters> {
        let waiters = Arc::new(Waiters::default());
        let w = waiters.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Err(e) = w.listen(&pool, &stop).await {
                    tracing::debug!(error = %e, "finished-job listener lost its connection; reconnecting");
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        });
        waiters
    }

    async fn listen(&self, pool: &PgPool, stop: &CancellationToken) -> sqlx::Result<()> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = listener.recv() => n?,
            };
            if let Ok(job) = n.payload().parse::<Uuid>() {
                for tx in self.jobs.lock().expect("waiters lock").remove(&job).unwrap_or_default() {
                    let _ = tx.send(());
                }
            }
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
