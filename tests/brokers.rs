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
