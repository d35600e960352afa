//! Workflow conversions first. A convert-now caller waits on its answer; a
//! bulk job does not notice a few milliseconds. On a small machine both
//! lanes share the same cores (and the same Postgres), so while any
//! workflow conversion is in flight, bulk conversions start only while
//! fewer than the bulk *floor* of them run. The bulk job keeps moving at
//! its floor, so a storm of workflow calls slows it down but never stops it.
//!
//! Workflow calls come one after another from each caller, with gaps of a
//! round trip between them: the lane counts as busy for [`GRACE`] after
//! its last conversion, so those gaps do not let a wave of bulk batches in.
//! Convert-now leads are converted by `serve`, in another process: their
//! commits, heard through Postgres, count as workflow conversions ending
//! ([`Priority::workflow_ended_elsewhere`]).
//! While it is busy, bulk batches are also smaller ([`Priority::batch_size`]):
//! a short bulk transaction holds its rows and keys briefly, so a workflow
//! lead that shares a company with it waits little.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;

/// The two lanes' conversions in flight, and who may start.
pub struct Priority {
    running: Mutex<Running>,
    changed: Notify,
    bulk_floor: usize,
}

/// How long the workflow lane counts as busy after its last conversion.
pub const GRACE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Running {
    workflow: usize,
    bulk: usize,
    /// When the last workflow conversion ended.
    workflow_ended: Option<Instant>,
}

impl Running {
    fn workflow_busy(&self) -> bool {
        self.workflow > 0 || self.workflow_ended.is_some_and(|t| t.elapsed() < GRACE)
    }
}

impl Priority {
    /// `bulk_floor`: bulk conversions that may run beside workflow ones
    /// (at least 1).
    pub fn new(bulk_floor: usize) -> Priority {
        Priority { running: Mutex::new(Running::default()), changed: Notify::new(), bulk_floor: bulk_floor.max(1) }
    }

    /// The floor for a worker converting `concurrency` bulk leads at once:
    /// a quarter of them, at least one.
    pub fn floor_for(concurrency: u16) -> usize {
        usize::from(concurrency / 4).max(1)
    }

    /// A workflow conversion starts at once; the turn ends when dropped.
    pub fn workflow_turn(self: &Arc<Self>) -> Turn {
        self.running.lock().expect("priority lock").workflow += 1;
        Turn { priority: self.clone(), workflow: true }
    }

    /// Waits until a bulk conversion may start: no workflow conversion in
    /// flight, or fewer bulk ones running than the floor.
    pub async fn bulk_turn(self: &Arc<Self>) -> Turn {
        loop {
            // Created before the look, so a change made between the look
            // and the wait still wakes it.
            let changed = self.changed.notified();
            {
                let mut running = self.running.lock().expect("priority lock");
                if !running.workflow_busy() || running.bulk < self.bulk_floor {
                    running.bulk += 1;
                    return Turn { priority: self.clone(), workflow: false };
                }
            }
            // The grace period ends without a notification: look again then.
            let _ = tokio::time::timeout(GRACE, changed).await;
        }
    }

    /// A workflow conversion ended in another process (`serve` converts
    /// convert-now leads itself): the lane counts as busy for [`GRACE`]
    /// from now, as after one of this process's own.
    pub fn workflow_ended_elsewhere(&self) {
        let mut running = self.running.lock().expect("priority lock");
        running.workflow_ended = Some(Instant::now());
    }

    /// The most leads a bulk batch should take now: `full`, or half of it
    /// while the workflow lane is busy. Smaller batches hold a company's
    /// key for less time when a convert-now lead shares it, but cost more
    /// CPU a lead: a quarter kept a third of the bulk job's pace beside 20
    /// convert-now callers, half 40 %, full batches 46 % (BENCHMARKS.md).
    pub fn batch_size(&self, full: usize) -> usize {
        if self.running.lock().expect("priority lock").workflow_busy() {
            (full / 2).max(1)
        } else {
            full
        }
    }

    fn end(&self, workflow: bool) {
        {
            let mut running = self.running.lock().expect("priority lock");
            if workflow {
                running.workflow -= 1;
                running.workflow_ended = Some(Instant::now());
            } else {
                running.bulk -= 1;
            }
        }
        self.changed.notify_waiters();
    }
}

/// One conversion's place in its lane; dropping it ends the turn.
pub struct Turn {
    priority: Arc<Priority>,
    workflow: bool,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.priority.end(self.workflow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// True when `f` is still waiting after one poll (its wake-ups come
    /// only from `Priority`'s own notifications, so no time is involved).
    async fn still_waiting<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        tokio::select! {
            biased;
            _ = f => false,
            _ = tokio::task::yield_now() => true,
        }
    }

    #[tokio::test]
    async fn bulk_runs_freely_without_workflow_work() {
        let p = Arc::new(Priority::new(1));
        let _a = p.bulk_turn().await;
        let _b = p.bulk_turn().await;
        let _c = p.bulk_turn().await;
    }

    // Paused time: the grace period passes when every task waits, with no
    // real waiting and no dependence on the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn bulk_beyond_the_floor_waits_while_a_workflow_conversion_runs() {
        let p = Arc::new(Priority::new(2));
        let first = p.bulk_turn().await;
        let wf = p.workflow_turn();
        // One more fits under the floor of two …
        let second = p.bulk_turn().await;
        // … a third waits for the workflow conversion to end.
        let mut third = Box::pin(p.bulk_turn());
        assert!(still_waiting(&mut third).await, "a third bulk conversion started beside a workflow one");
        drop(first);
        // Back under the floor: it may start.
        let third_turn =
            tokio::time::timeout(Duration::from_secs(1), &mut third).await.expect("it starts under the floor");
        let mut fourth = Box::pin(p.bulk_turn());
        assert!(still_waiting(&mut fourth).await);
        drop(wf);
        // Within the grace period the next workflow call may come: still
        // waiting …
        assert!(still_waiting(&mut fourth).await, "bulk rushed in between two workflow calls");
        // … after it, no workflow work: bulk runs freely.
        tokio::time::timeout(GRACE * 2, &mut fourth).await.expect("no workflow work: bulk runs freely");
        drop((second, third_turn));
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_batches_are_smaller_while_the_workflow_lane_is_busy() {
        let p = Arc::new(Priority::new(1));
        assert_eq!(p.batch_size(200), 200);
        let wf = p.workflow_turn();
        assert_eq!(p.batch_size(200), 100);
        assert_eq!(p.batch_size(1), 1, "never empty");
        drop(wf);
        assert_eq!(p.batch_size(200), 100, "busy for the grace period after the last call");
        tokio::time::sleep(GRACE).await;
        assert_eq!(p.batch_size(200), 200);
    }

    // `serve` converts convert-now leads itself: their commits, heard by
    // the worker, hold its bulk batches back as its own workflow work does.
    #[tokio::test(start_paused = true)]
    async fn a_workflow_conversion_elsewhere_holds_bulk_to_its_floor_for_the_grace_period() {
        let p = Arc::new(Priority::new(1));
        let first = p.bulk_turn().await;
        p.workflow_ended_elsewhere();
        assert_eq!(p.batch_size(200), 100);
        let mut second = Box::pin(p.bulk_turn());
        assert!(still_waiting(&mut second).await, "a bulk batch above the floor started beside convert-now calls");
        tokio::time::sleep(GRACE / 2).await;
        p.workflow_ended_elsewhere();
        tokio::time::sleep(GRACE / 2).await;
        assert!(still_waiting(&mut second).await, "the next call's commit renews the grace period");
        tokio::time::timeout(GRACE * 2, &mut second).await.expect("calls stopped: bulk runs freely");
        assert_eq!(p.batch_size(200), 200);
        drop(first);
    }

    #[test]
    fn the_floor_is_a_quarter_and_never_zero() {
        assert_eq!(Priority::floor_for(8), 2);
        assert_eq!(Priority::floor_for(2), 1);
        assert_eq!(Priority::floor_for(0), 1);
    }
}
