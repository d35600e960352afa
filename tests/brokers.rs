//! Several addresses of one RabbitMQ cluster in `AMQP_URL` (issue 23):
//! each connection tries them in turn from where the last one left off, so
//! processes spread over the nodes and a process whose node is lost goes on
//! to another; a dead address is skipped. The "second node" here is a TCP
//! relay to the one local broker, on a port of its own.

mod common;

use std::collections::HashSet;

use common::broker::{amqp_url, TestBroker};
use common::server::free_port;
use common::*;
use leadconv::queue;
use serde_json::json;

/// Relays every connection made to the returned port to `target`.
async fn relay(target: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// The broker's URL with another port: another address of the "cluster".
fn at_port(port: u16) -> (String, String) {
    let live = amqp_url();
    let uri: lapin::uri::AMQPUri = live.parse().unwrap();
    let here = format!("{}:{}", uri.authority.host, uri.authority.port);
    let there = format!("127.0.0.1:{port}");
    let url = if live.contains(&here) {
        live.replacen(&here, &there, 1)
    } else {
        live.replacen(&format!("@{}/", uri.authority.host), &format!("@{there}/"), 1)
    };
    (url, there)
}

fn live_node() -> String {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_go_round_the_live_nodes_and_skip_a_dead_one() {
    let (relayed, relay_node) = at_port(relay(live_node()).await);
    let (dead, dead_node) = at_port(free_port());
    let list = format!("{},{dead},{relayed}", amqp_url());
    let mut seen = HashSet::new();
    for _ in 0..4 {
        let (conn, node) = queue::connect_to(&list).await.expect("a live node answers");
        assert_ne!(node, dead_node);
        seen.insert(node);
        conn.close(200, "bye").await.unwrap();
    }
    assert_eq!(seen, HashSet::from([live_node(), relay_node]), "each connection starts after the last one's node");

    // Every node down: the error names each, never a password.
    let (other_dead, other_node) = at_port(free_port());
    let e = queue::connect_to(&format!("{dead},{other_dead}")).await.unwrap_err().to_string();
    assert!(e.contains(&format!("{dead_node} connection refused")) && e.contains(&other_node), "{e}");
    assert!(!e.contains("guest:guest"), "{e}");
}

/// `enqueue`, `worker` and `doctor` take the list as `AMQP_URL`: a job is
/// published and converted with its first address dead, and doctor names
/// the node it reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_work_through_a_list_whose_first_node_is_down() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let mut leads = Vec::new();
    for i in 0..3 {
        leads.push(
            crm.lead(json!({"owner_id": rep, "last_name": format!("Nguyễn {i}"), "email": format!("n{i}@example.vn")}))
                .await,
        );
    }
    let (dead, _) = at_port(free_port());
    let list = format!("{dead},{}", amqp_url());
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = leadconv_command(&crm.url(), broker.prefix(), &args);
        c.env("AMQP_URL", &list);
        c.output()
    };
    let out = run(vec![
        "enqueue".into(),
        "--criteria".into(),
        json!({ "ids": leads }).to_string(),
        "--requested-by".into(),
        rep.to_string(),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(vec!["worker".into(), "--exit-when-idle".into()]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await, 3);

    let out = run(vec!["doctor".into()]).await.unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains(&format!("reachable; connected to {}", live_node())), "{report}");
}

/// Upgrading from the classic back-off queues (`{p}.retry.N`) of earlier
/// versions: a worker's connection unbinds them, so retries go to the
/// quorum `{p}.backoff.N` only; one still holding a message keeps it until
/// it expires into the work queue, as before, and is deleted once empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_back_off_queues_of_an_earlier_version_drain_and_go() {
    use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use leadconv::queue::{Lane, Topology};
    let broker = TestBroker::new().await;
    let t = &broker.topology;
    let classic = |level: usize| format!("{}.retry.{}", t.prefix, level + 1);
    for (level, ttl) in [(0usize, 5_000i64), (1, 5_000)] {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("classic".into()));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(t.convert_exchange().into()));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        broker.channel.queue_declare(&classic(level), durable, args).await.unwrap();
        let key = format!("*.r{}", level + 1);
        let bind = QueueBindOptions::default();
        broker
            .channel
            .queue_bind(&classic(level), &t.retry_exchange(), &key, bind, FieldTable::default())
            .await
            .unwrap();
    }
    // A lead waiting out its first back-off in the old queue.
    async fn publish(broker: &TestBroker) {
        let t = &broker.topology;
        let key = Topology::routing_key(Lane::Bulk, Some(0));
        let (exchange, props) = (t.retry_exchange(), queue::properties(1));
        let confirm = broker.channel.basic_publish(&exchange, &key, BasicPublishOptions::default(), b"{}", props);
        confirm.await.unwrap().await.unwrap();
    }
    async fn exists(broker: &TestBroker, name: String) -> bool {
        let ch = broker.conn.create_channel().await.unwrap();
        broker.topology.state(&ch, &name).await.is_ok()
    }
    publish(&broker).await;
    assert_eq!(broker.depth(&classic(0)).await, 1);

    t.retire_classic_retry_queues(&broker.conn).await.unwrap();
    assert!(!exists(&broker, classic(1)).await, "the empty one is deleted");
    assert!(exists(&broker, classic(0)).await, "the one holding a message stays until it is empty");
    publish(&broker).await;
    assert_eq!(broker.depth(&classic(0)).await, 1, "a new retry no longer goes to the old queue");
    // The first message went to both (the new topology was declared beside
    // the old): three in all reach the work queue.
    let bulk = t.work_queue(Lane::Bulk);
    common::broker::wait_for("all expired into the work queue", std::time::Duration::from_secs(60), || async {
        broker.depth(&bulk).await == 3
    })
    .await;
    assert_eq!(broker.depth(&classic(0)).await, 0);
    t.retire_classic_retry_queues(&broker.conn).await.unwrap();
    assert!(!exists(&broker, classic(0)).await, "deleted once empty");
    let _ = broker.channel.queue_delete(&classic(0), QueueDeleteOptions::default()).await;
}
