//! The deployment files under `deploy/` against the application itself:
//! the Grafana dashboard and the Prometheus alerts use only metrics that a
//! live `leadconv serve` and `leadconv worker --metrics` really export, and
//! the RabbitMQ definitions file declares exactly the topology that
//! `Topology::declare` declares (a mismatch in queue arguments makes the
//! broker refuse the application's declaration).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use common::broker::{amqp_url, wait_for, TestBroker};
use common::server::{free_port, serve};
use common::*;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use leadconv::queue::{Lane, Topology, RETRY_DELAYS};
use serde_json::{json, Value};

fn deploy_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Metric names in a PromQL expression: identifiers outside string literals
/// that start with `leadconv_` (every application metric does).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            // Skip the string literal, honouring backslash escapes.
            while let Some((_, d)) = chars.next() {
                if d == '\\' {
                    chars.next();
                } else if d == c {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let ident = &expr[i..end];
            if ident.starts_with("leadconv_") {
                out.insert(ident.to_owned());
            }
        }
    }
    out
}

/// Every PromQL expression of the dashboard, with its panel's title.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&deploy_file("grafana/leadconv.json")).expect("dashboard is JSON");
    let mut out = Vec::new();
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    p["title"].as_str().unwrap_or("").to_owned(),
                    t["expr"].as_str().expect("a PromQL target").to_owned(),
                ));
            }
            walk(p["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]), out);
        }
    }
    walk(d["panels"].as_array().expect("panels"), &mut out);
    out
}

/// Every alert expression of deploy/prometheus/alerts.yml. (YAML block
/// scalars read without a YAML parser: the `expr:` lines and the indented
/// lines under `expr: |`.)
fn alert_exprs() -> Vec<(String, String)> {
    let text = deploy_file("prometheus/alerts.yml");
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(rest) = t.strip_prefix("expr:") {
            let rest = rest.trim();
            if rest == "|" || rest == ">" {
                let indent = line.len() - t.len();
                let mut expr = String::new();
                while let Some(next) = lines.peek() {
                    let nt = next.trim_start();
                    if !nt.is_empty() && next.len() - nt.len() <= indent {
                        break;
                    }
                    expr.push_str(nt);
                    expr.push('\n');
                    lines.next();
                }
                out.push((alert.clone(), expr));
            } else {
                out.push((alert.clone(), rest.to_owned()));
            }
        }
    }
    out
}

/// Metric names in a scrape, and which of them are histograms.
fn scraped(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid Prometheus text");
    let mut names = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for s in &scrape.samples {
        names.insert(s.metric.clone());
        if matches!(s.value, prometheus_parse::Value::Histogram(_)) {
            histograms.insert(s.metric.clone());
        }
    }
    (names, histograms)
}

/// Metrics that only exist after an event this test cannot cause cheaply
/// (a retry needs a transient failure: Postgres or RabbitMQ lost mid-
/// conversion, as tests/faults.rs does). They are checked against
/// `leadconv::metrics::ALL` instead of the live scrape.
const NOT_IN_LIVE_SCRAPE: &[&str] = &[leadconv::metrics::RETRIES];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_the_application_exports() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let server = serve(&crm.db, &broker).await;
    let http = reqwest::Client::new();
    let rep = crm.user("Rep", json!({})).await;
    let token = leadconv::store::auth::create_token(crm.pool(), rep, "deploy-test").await.unwrap();

    // A small job: three leads converted, one skipped (converted elsewhere
    // meanwhile: a failure code), and one unreadable message (a dead letter).
    let mut leads = Vec::new();
    for i in 0..4 {
        leads.push(crm.lead(json!({"owner_id": rep, "last_name": format!("D{i}"), "email": format!("d{i}@example.com"), "company": "Acme"})).await);
    }
    let resp = http
        .post(format!("{}/v1/jobs", server.base))
        .bearer_auth(&token)
        .json(&json!({"criteria": {"ids": leads}, "options": with_deal()}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "job accepted: {}", resp.status());
    let job_id = resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
    crm.convert(rep, json!({}), leads[3]).await;
    broker.publish_raw(Lane::Bulk, b"not a lead message").await;

    let port = free_port();
    let _worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_leadconv"))
        .args(["worker", "--concurrency", "2", "--metrics", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", crm.url())
        .env("AMQP_URL", amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let worker_url = format!("http://127.0.0.1:{port}/metrics");
    let job_url = format!("{}/v1/jobs/{job_id}", server.base);
    wait_for("the job completes and the unreadable message is parked", Duration::from_secs(60), || async {
        let job: Value = match http.get(&job_url).bearer_auth(&token).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => return false,
        };
        job["status"] == "completed" && broker.depth(&broker.topology.dead_queue()).await == 1
    })
    .await;
    // The worker's gauges (queue depth, jobs) are refreshed by its
    // maintenance tick: wait until a scrape has them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let worker_text = loop {
        let text = match http.get(&worker_url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(leadconv::metrics::QUEUE_DEPTH) && text.contains(leadconv::metrics::DEAD_LETTERS) {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "the worker's scrape lacks its gauges:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let serve_text = http.get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();

    let (mut live, mut histograms) = scraped(&worker_text);
    let (serve_names, serve_histograms) = scraped(&serve_text);
    live.extend(serve_names);
    histograms.extend(serve_histograms);
    let exported: BTreeSet<&str> = leadconv::metrics::ALL.iter().copied().collect();

    let mut used = Vec::new();
    for (title, expr) in dashboard_exprs() {
        used.push((format!("dashboard panel {title:?}"), expr));
    }
    let dashboard_count = used.len();
    assert!(dashboard_count >= 10, "the dashboard has its panels ({dashboard_count} expressions)");
    for (alert, expr) in alert_exprs() {
        used.push((format!("alert {alert}"), expr));
    }
    assert!(used.len() > dashboard_count + 3, "the alerts were read");

    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (place, expr) in &used {
        let names = metric_names(expr);
        if names.is_empty() && !expr.contains("up{") {
            problems.push(format!("{place}: no leadconv metric in {expr:?}"));
        }
        for name in names {
            // A histogram's series: name_bucket, name_sum, name_count.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix).filter(|b| histograms.contains(*b) || exported.contains(b))
                })
                .unwrap_or(&name)
                .to_owned();
            if base != name && !histograms.contains(&base) && !NOT_IN_LIVE_SCRAPE.contains(&base.as_str()) {
                problems.push(format!(
                    "{place}: {name} used as a histogram series, but {base} is not a histogram in the scrape"
                ));
            }
            if !exported.contains(base.as_str()) {
                problems.push(format!("{place}: {name} is not in leadconv::metrics::ALL"));
            }
            if !live.contains(&base) && !NOT_IN_LIVE_SCRAPE.contains(&base.as_str()) {
                problems.push(format!("{place}: {name} is not in the live scrape of serve or worker"));
            }
            seen.insert(base);
        }
    }
    assert!(problems.is_empty(), "metric problems:\n{}", problems.join("\n"));
    // The dashboard and alerts cover what the issue asks for.
    for m in [
        leadconv::metrics::CONVERSIONS,
        leadconv::metrics::FAILURES,
        leadconv::metrics::CONVERSION_SECONDS,
        leadconv::metrics::END_TO_END_SECONDS,
        leadconv::metrics::QUEUE_DEPTH,
        leadconv::metrics::JOBS,
        leadconv::metrics::DEAD_LETTERS,
        leadconv::metrics::IN_FLIGHT,
    ] {
        assert!(seen.contains(m), "the dashboard or alerts use {m}");
    }
    // Sanity of the check itself: the scrape really had the job's series.
    assert!(
        live.contains(leadconv::metrics::CONVERSIONS) && histograms.contains(leadconv::metrics::CONVERSION_SECONDS),
        "{worker_text}"
    );
}

/// An AMQP argument as the JSON value the definitions file states.
fn amqp_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::LongString(s) => Value::String(s.to_string()),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::Boolean(b) => json!(b),
        other => panic!("queue argument of a type the definitions file cannot state: {other:?}"),
    }
}

/// A definitions-file argument as the AMQP value leadconv sends.
fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::String(s) => AMQPValue::LongString(s.clone().into()),
        Value::Number(n) => AMQPValue::LongLongInt(n.as_i64().expect("integer argument")),
        Value::Bool(b) => AMQPValue::Boolean(*b),
        other => panic!("unexpected argument {other}"),
    }
}

fn args_to_json(args: &FieldTable) -> BTreeMap<String, Value> {
    args.inner().iter().map(|(k, v)| (k.to_string(), amqp_to_json(v))).collect()
}

fn definitions() -> Value {
    serde_json::from_str(&deploy_file("rabbitmq/definitions.json")).expect("definitions.json is JSON")
}

/// Exchanges, queues and bindings of the definitions file; the vhost of
/// every entry is "/" (the application's default AMQP_URL).
#[test]
fn rabbitmq_definitions_declare_what_the_application_declares() {
    let defs = definitions();
    let t = Topology::new("leadconv");

    // Queues: the same names, durable, not auto-deleted, and exactly the
    // same arguments (names, values and kinds).
    let expected: BTreeMap<String, BTreeMap<String, Value>> =
        t.queues().iter().map(|(name, args)| (name.clone(), args_to_json(args))).collect();
    let mut declared = BTreeMap::new();
    for q in defs["queues"].as_array().expect("queues") {
        assert_eq!(q["vhost"], "/", "{q}");
        assert_eq!(q["durable"], true, "{q}: leadconv declares every queue durable");
        assert_eq!(q["auto_delete"], false, "{q}");
        let args: BTreeMap<String, Value> =
            q["arguments"].as_object().expect("arguments").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert!(declared.insert(q["name"].as_str().unwrap().to_owned(), args).is_none(), "queue listed twice: {q}");
    }
    assert_eq!(declared.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "queue names");
    for (name, args) in &expected {
        assert_eq!(&declared[name], args, "arguments of {name}");
        for (k, v) in args {
            // Same JSON kind too: 20 and "20" are different arguments to RabbitMQ.
            assert_eq!(
                std::mem::discriminant(&declared[name][k]),
                std::mem::discriminant(v),
                "{name} {k}: {} vs {v}",
                declared[name][k]
            );
        }
    }

    // Exchanges: as `declare` makes them (durable, not auto-deleted).
    let expected_exchanges: BTreeSet<(String, &str)> =
        [(t.convert_exchange(), "topic"), (t.retry_exchange(), "topic"), (t.dead_exchange(), "fanout")]
            .into_iter()
            .collect();
    let mut exchanges = BTreeSet::new();
    for x in defs["exchanges"].as_array().expect("exchanges") {
        assert_eq!(x["vhost"], "/", "{x}");
        assert_eq!(x["durable"], true, "{x}");
        assert_eq!(x["auto_delete"], false, "{x}");
        assert_eq!(x["internal"], false, "{x}");
        assert_eq!(x["arguments"], json!({}), "{x}");
        exchanges.insert((x["name"].as_str().unwrap().to_owned(), x["type"].as_str().unwrap()));
    }
    assert_eq!(exchanges, expected_exchanges);

    // Bindings: as `declare` makes them.
    let mut expected_bindings = BTreeSet::new();
    for lane in [Lane::Workflow, Lane::Bulk] {
        expected_bindings.insert((t.convert_exchange(), t.work_queue(lane), format!("{}.#", lane.as_str())));
    }
    for level in 0..RETRY_DELAYS.len() {
        expected_bindings.insert((t.retry_exchange(), t.retry_queue(level), format!("*.r{}", level + 1)));
    }
    expected_bindings.insert((t.dead_exchange(), t.dead_queue(), String::new()));
    let mut bindings = BTreeSet::new();
    for b in defs["bindings"].as_array().expect("bindings") {
        assert_eq!(b["vhost"], "/", "{b}");
        assert_eq!(b["destination_type"], "queue", "{b}");
        assert_eq!(b["arguments"], json!({}), "{b}");
        bindings.insert((
            b["source"].as_str().unwrap().to_owned(),
            b["destination"].as_str().unwrap().to_owned(),
            b["routing_key"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(bindings, expected_bindings);

    // The broker can log in with the file's user, who may use the vhost.
    let user = defs["users"][0]["name"].as_str().expect("a user");
    assert!(defs["permissions"].as_array().unwrap().iter().any(|p| p["user"] == user && p["vhost"] == "/"));
}

/// Topic-exchange matching (`*` one word, `#` zero or more).
fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((w, rest)) => k.first() == Some(w) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() { vec![] } else { key.split('.').collect() };
    go(&p, &k)
}

/// Against the real broker: the topology the application declared accepts
/// the definitions file's queue declarations (same arguments, or RabbitMQ
/// answers PRECONDITION_FAILED), and routes every routing key the
/// application publishes with to the queue the file's bindings name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_definitions_agree_with_the_declared_topology_on_the_broker() {
    let defs = definitions();
    let broker = TestBroker::new().await; // declared by Topology::declare
    let prefix = broker.prefix().to_owned();
    let rename = |name: &str| format!("{prefix}{}", name.strip_prefix("leadconv").expect("leadconv.* names"));

    for q in defs["queues"].as_array().unwrap() {
        let mut args = FieldTable::default();
        for (k, v) in q["arguments"].as_object().unwrap() {
            // Names of exchanges in arguments follow the prefix too.
            let v = match (k.as_str(), v) {
                ("x-dead-letter-exchange", Value::String(s)) => Value::String(rename(s)),
                _ => v.clone(),
            };
            args.insert(k.as_str().into(), json_to_amqp(&v));
        }
        let ch = broker.conn.create_channel().await.unwrap();
        let name = rename(q["name"].as_str().unwrap());
        ch.queue_declare(&name, QueueDeclareOptions { durable: true, ..Default::default() }, args)
            .await
            .unwrap_or_else(|e| panic!("the broker refuses the definitions file's declaration of {name}: {e}"));
        let _ = ch.close(200, "ok").await;
    }

    // Routing: every key leadconv publishes with, through the file's bindings
    // and through the broker's (as the application declared them).
    let ch = broker.conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let t = &broker.topology;
    let mut sends = Vec::new();
    for lane in [Lane::Bulk, Lane::Workflow] {
        sends.push(("leadconv.convert", Topology::routing_key(lane, None), lane));
        for level in 0..RETRY_DELAYS.len() {
            sends.push(("leadconv.retry", Topology::routing_key(lane, Some(level)), lane));
        }
    }
    sends.push(("leadconv.dead", String::new(), Lane::Bulk));
    let all_queues: Vec<String> = t.queues().into_iter().map(|(n, _)| n).collect();
    for (exchange, key, lane) in sends {
        let kind =
            defs["exchanges"].as_array().unwrap().iter().find(|x| x["name"] == exchange).expect("exchange in the file")
                ["type"]
                .as_str()
                .unwrap()
                .to_owned();
        let predicted: Vec<String> = defs["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| {
                b["source"] == exchange && (kind == "fanout" || topic_matches(b["routing_key"].as_str().unwrap(), &key))
            })
            .map(|b| rename(b["destination"].as_str().unwrap()))
            .collect();
        assert_eq!(predicted.len(), 1, "{exchange} {key:?} routes to exactly one queue by the file: {predicted:?}");
        let target = predicted[0].clone();
        ch.basic_publish(&rename(exchange), &key, BasicPublishOptions::default(), b"{}", BasicProperties::default())
            .await
            .unwrap()
            .await
            .unwrap();
        // A message in a retry queue expires into its lane's work queue
        // (1 s for the first level): found there, it went through the retry
        // queue first.
        let after_expiry = if exchange == "leadconv.retry" { Some(t.work_queue(lane)) } else { None };
        wait_for(&format!("{exchange} {key:?} lands in {target}"), Duration::from_secs(10), || async {
            broker.depth(&target).await == 1 || matches!(&after_expiry, Some(q) if broker.depth(q).await == 1)
        })
        .await;
        for q in &all_queues {
            let n = broker.depth(q).await;
            assert!(n == 0 || *q == target || Some(q) == after_expiry.as_ref(), "{exchange} {key:?} also reached {q}");
            ch.queue_purge(q, QueuePurgeOptions::default()).await.unwrap();
        }
    }
}
