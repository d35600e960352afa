//! RabbitMQ for tests: each test gets its own queue prefix, and its queues
//! and exchanges are deleted when it ends.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use leadconv::queue::{self, Topology};

pub fn amqp_url() -> String {
    std::env::var("LEADCONV_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A test's own slice of the broker.
pub struct TestBroker {
    pub topology: Topology,
    pub conn: lapin::Connection,
    pub channel: lapin::Channel,
}

impl TestBroker {
    pub async fn new() -> TestBroker {
        let prefix = format!("leadconv_t_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let topology = Topology::new(prefix);
        let conn = queue::connect(&amqp_url()).await.expect("connect to RabbitMQ (is it running? see README)");
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        topology.declare(&channel).await.unwrap();
        TestBroker { topology, conn, channel }
    }

    pub fn prefix(&self) -> &str {
        &self.topology.prefix
    }

    /// Messages ready in one of this test's queues.
    pub async fn depth(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let n = self.topology.depth(&ch, queue).await.unwrap();
        let _ = ch.close(200, "done").await;
        n
    }

    /// Publishes raw bytes to the work queue of `lane`, confirmed.
    pub async fn publish_raw(&self, lane: queue::Lane, body: &[u8]) {
        self.channel
            .basic_publish(
                &self.topology.convert_exchange(),
                &Topology::routing_key(lane, None),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

impl TestBroker {
    /// Seeds `leads` sample leads (30 % duplicates, from `rng_seed`) into
    /// `crm` and publishes one bulk job over all of them, with deals, to this
    /// test's queues. Returns the job's id.
    pub async fn seeded_bulk_job(&self, crm: &super::Crm, leads: usize, rng_seed: u64) -> uuid::Uuid {
        use leadconv::queue::producer;
        use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
        let spec = leadconv_sample::SeedSpec { leads, duplicates: 0.3, rng_seed };
        let s = leadconv_sample::seed(crm.pool(), &spec).await.unwrap();
        let new = NewJob {
            criteria: serde_json::json!({"all_leads": true}),
            options: super::with_deal(),
            requested_by: s.acting_user,
            trigger: Trigger::Manual,
        };
        let checked = job::check(crm.pool(), new).await.unwrap();
        let lease = producer::Lease::new(Duration::from_secs(30));
        let created = job::create(crm.pool(), &checked, Dispatch::Queue { lease }).await.unwrap();
        producer::publish_job(
            crm.pool(),
            &self.channel,
            &self.topology,
            created.id,
            queue::Lane::Bulk,
            &lease,
            producer::BATCH,
        )
        .await
        .unwrap();
        created.id
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(conn) = queue::connect(&amqp_url()).await {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = tokio::time::timeout(Duration::from_secs(10), topology.delete(&ch)).await;
                    }
                    let _ = conn.close(200, "bye").await;
                }
            })
        })
        .join();
    }
}

/// Waits until `check` holds, polling, or panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
