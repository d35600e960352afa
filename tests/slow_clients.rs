//! `leadconv serve` against slow and idle clients, as a real process over
//! real sockets: half-sent request heads, request bodies that trickle in,
//! kept-alive connections left idle, and clients that stop reading (or read
//! too slowly) a large CSV export are each closed by their deadline; the
//! probes and the API answer within a second all along, and the memory the
//! connections held comes back. Above the connection cap the probes still
//! answer; on SIGTERM a request in flight still gets its answer.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::broker::{wait_for, TestBroker};
use common::server::{serve_with, Server};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// Short deadlines, so that the test takes seconds; passed as serve's flags.
const HEADER: Duration = Duration::from_secs(2);
const BODY: Duration = Duration::from_secs(3);
const IDLE: Duration = Duration::from_secs(2);
const WRITE: Duration = Duration::from_secs(3);
/// How late after its deadline a connection may be closed: the accept
/// queue and a machine busy with thousands of connections.
const SLACK: Duration = Duration::from_secs(5);

/// The tests measure latency and memory: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn short_deadlines() -> Vec<String> {
    let secs = |d: Duration| d.as_secs().to_string();
    [
        ("--header-timeout-secs", secs(HEADER)),
        ("--body-timeout-secs", secs(BODY)),
        ("--idle-timeout-secs", secs(IDLE)),
        ("--write-timeout-secs", secs(WRITE)),
    ]
    .into_iter()
    .flat_map(|(flag, v)| [flag.to_owned(), v])
    .collect()
}

/// A server and a token of a user who may convert.
struct Setup {
    server: Server,
    crm: Crm,
    _broker: TestBroker,
    token: String,
    user: i64,
}

impl Setup {
    async fn new(flags: &[String]) -> Setup {
        let crm = Crm::new().await;
        let broker = TestBroker::new().await;
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let server = serve_with(&crm.db, &broker, &flags).await;
        let user = crm.user("Ada Admin", json!({"is_admin": true})).await;
        let token = leadconv::store::auth::create_token(crm.pool(), user, "t").await.unwrap();
        Setup { server, crm, _broker: broker, token, user }
    }

    fn addr(&self) -> String {
        self.server.base.strip_prefix("http://").unwrap().to_owned()
    }

    fn pid(&self) -> u32 {
        self.server.child.id().unwrap()
    }

    /// Serve's counters and gauges, from `/metrics`.
    async fn metrics(&self) -> prometheus_parse::Scrape {
        let text = reqwest::get(format!("{}/metrics", self.server.base)).await.unwrap().text().await.unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }
}

/// The value of `name` with label `phase` (any, when `None`) in `scrape`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, phase: Option<&str>) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && phase.is_none_or(|p| s.labels.get("phase") == Some(p)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a number"),
        })
        .unwrap_or_else(|| panic!("{name} {phase:?} is not in the scrape"))
}

/// Serve's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Reads until the peer closes (end of stream or reset), by `deadline`:
/// how long after `from` that was, and the bytes read; `Err` when still
/// open at the deadline.
async fn closed_by(
    s: &mut (impl AsyncRead + Unpin),
    from: Instant,
    deadline: Instant,
) -> Result<(Duration, Vec<u8>), String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return Err(format!("still open {:?} after it started", deadline - from)),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((from.elapsed(), got)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Connects (one of many: they wait their turn at `gate`, as a real crowd
/// arrives over some time rather than in one instant).
async fn connect(addr: &str, gate: &tokio::sync::Semaphore) -> Result<TcpStream, String> {
    let _turn = gate.acquire().await.unwrap();
    let started = Instant::now();
    let s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    // A connection refused by a full accept queue is retried by the kernel
    // after a second: worth knowing when the probes are slow.
    SLOWEST_CONNECT_MS.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    Ok(s)
}

static SLOWEST_CONNECT_MS: AtomicU64 = AtomicU64::new(0);

/// Half a request head, then nothing: closed by the header deadline.
async fn half_sent(addr: String, gate: Arc<tokio::sync::Semaphore>) -> Result<Duration, String> {
    let mut s = connect(&addr, &gate).await?;
    // The server's deadline counts from its accept, which comes after this.
    let from = Instant::now();
    s.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: test\r\nAccept: appl").await.map_err(|e| e.to_string())?;
    let (after, got) = closed_by(&mut s, from, from + HEADER + SLACK).await?;
    if !got.is_empty() {
        return Err(format!("got an answer to half a head: {}", String::from_utf8_lossy(&got)));
    }
    Ok(after)
}

/// A whole head announcing 100,000 bytes of body, then a byte every half
/// second: closed by the body deadline, however steadily it trickles.
async fn slow_body(addr: String, token: String, gate: Arc<tokio::sync::Semaphore>) -> Result<Duration, String> {
    let s = connect(&addr, &gate).await?;
    let (mut rd, mut wr) = s.into_split();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
    );
    wr.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    let from = Instant::now();
    let trickle = async move {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            every.tick().await;
            if wr.write_all(b" ").await.is_err() {
                // Closed: the reading side says when and how.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        closed = closed_by(&mut rd, from, from + BODY + SLACK) => closed.map(|(after, _)| after),
        () = trickle => unreachable!(),
    }
}

/// One whole `GET /healthz`, its answer read, then nothing: closed by the
/// idle deadline.
async fn idle_keep_alive(addr: String, gate: Arc<tokio::sync::Semaphore>) -> Result<Duration, String> {
    let mut s = connect(&addr, &gate).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let answered_by = Instant::now() + Duration::from_secs(10);
    while !got.ends_with(br#"{"status":"ok"}"#) {
        match timeout_at(answered_by, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => return Err(format!("no answer to GET /healthz ({other:?}): {}", String::from_utf8_lossy(&got))),
        }
    }
    let from = Instant::now();
    let (after, more) = closed_by(&mut s, from, from + IDLE + SLACK).await?;
    if !more.is_empty() {
        return Err(format!("more after the answer: {}", String::from_utf8_lossy(&more)));
    }
    Ok(after)
}

/// The slowest answers of `/healthz` and of an authenticated `/v1/jobs`
/// while the test runs, each on a new connection (as a new client would
/// come), and serve's largest memory seen.
#[derive(Debug, Default)]
struct Probed {
    rounds: u32,
    slowest_health: Duration,
    slowest_jobs: Duration,
    failures: Vec<String>,
    peak_rss_kib: u64,
}

async fn probe(base: String, token: String, pid: u32, stop: CancellationToken) -> Probed {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(10)).build().unwrap();
    let mut probed = Probed::default();
    let mut every = tokio::time::interval(Duration::from_millis(200));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return probed,
            _ = every.tick() => {}
        }
        for path in ["/healthz", "/v1/jobs"] {
            let started = Instant::now();
            let answer = http.get(format!("{base}{path}")).bearer_auth(&token).send().await;
            let answer = match answer {
                Ok(r) if r.status() == 200 => r.text().await.map_err(|e| e.to_string()),
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            let took = started.elapsed();
            if let Err(e) = answer {
                probed.failures.push(format!("{path}: {e}"));
            }
            let slowest = if path == "/healthz" { &mut probed.slowest_health } else { &mut probed.slowest_jobs };
            *slowest = (*slowest).max(took);
        }
        probed.rounds += 1;
        probed.peak_rss_kib = probed.peak_rss_kib.max(rss_kib(pid));
    }
}

/// Slowest and failed clients of one kind.
fn summary(kind: &str, results: Vec<Result<Duration, String>>, limit: Duration) -> (Duration, Vec<String>) {
    let mut slowest = Duration::ZERO;
    let mut problems = Vec::new();
    for r in results {
        match r {
            Ok(after) if after <= limit => slowest = slowest.max(after),
            Ok(after) => problems.push(format!("{kind}: closed after {after:?}, more than {limit:?}")),
            Err(e) => problems.push(format!("{kind}: {e}")),
        }
    }
    // The first few problems say enough.
    if problems.len() > 5 {
        let more = problems.len() - 5;
        problems.truncate(5);
        problems.push(format!("{kind}: and {more} more"));
    }
    (slowest, problems)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_slow_bodies_and_idle_connections_are_closed_while_serve_keeps_answering() {
    let _one = ONE_AT_A_TIME.lock().await;
    // 4,100 sockets of the clients here, and the probes'.
    let files = leadconv::http::listener::raise_fd_limit(12_000);
    assert!(files >= 12_000, "the test needs 12,000 open files, the limit is {files}");
    let setup = Setup::new(&short_deadlines()).await;
    let (addr, pid) = (setup.addr(), setup.pid());

    let stop = CancellationToken::new();
    let prober = tokio::spawn(probe(setup.server.base.clone(), setup.token.clone(), pid, stop.clone()));
    // The baseline, once the API has answered a few times: its database
    // connections are open, and only the hostile clients' memory counts.
    let http = reqwest::Client::new();
    for _ in 0..10 {
        let r = http.get(format!("{}/v1/jobs", setup.server.base)).bearer_auth(&setup.token).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    drop(http);
    let before = rss_kib(pid);

    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let started = Instant::now();
    let half: Vec<_> = (0..3000).map(|_| tokio::spawn(half_sent(addr.clone(), gate.clone()))).collect();
    let slow: Vec<_> =
        (0..100).map(|_| tokio::spawn(slow_body(addr.clone(), setup.token.clone(), gate.clone()))).collect();
    let idle: Vec<_> = (0..1000).map(|_| tokio::spawn(idle_keep_alive(addr.clone(), gate.clone()))).collect();
    let mut results = Vec::new();
    for (kind, tasks, limit) in [("half-sent head", half, HEADER), ("slow body", slow, BODY), ("idle", idle, IDLE)] {
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        results.push((kind, summary(kind, done, limit + SLACK)));
    }
    let all_closed_after = started.elapsed();

    // The memory they held comes back (allocator permitting: the binary's
    // global allocator returns freed pages to the system).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = rss_kib(pid);
    while after > before + 30 * 1024 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = rss_kib(pid);
    }
    stop.cancel();
    let probed = prober.await.unwrap();
    let scrape = setup.metrics().await;
    eprintln!(
        "RSS before {before} KiB, peak {} KiB, after {after} KiB; all closed after {all_closed_after:?}; \
         slowest closes {:?}; slowest connect {} ms; probes {probed:?}",
        probed.peak_rss_kib,
        results.iter().map(|(k, (slowest, _))| format!("{k}: {slowest:?}")).collect::<Vec<_>>(),
        SLOWEST_CONNECT_MS.load(Ordering::Relaxed),
    );

    let problems: Vec<&String> = results.iter().flat_map(|(_, (_, p))| p).collect();
    assert!(problems.is_empty(), "clients not closed in time: {problems:#?}");
    assert!(probed.rounds >= 5, "the probes ran all along: {probed:?}");
    assert!(probed.failures.is_empty(), "probes failed: {:?}", probed.failures);
    assert!(
        probed.slowest_health < Duration::from_secs(1) && probed.slowest_jobs < Duration::from_secs(1),
        "the probes answered within a second: {probed:?}"
    );
    assert!(
        after <= before + 30 * 1024,
        "serve's memory came back within 30 MiB: {before} KiB before, {after} KiB after (peak {} KiB)",
        probed.peak_rss_kib
    );
    // Each closed by its own deadline; the probes' connections by none.
    let timed_out = |phase| value(&scrape, "leadconv_http_connections_timed_out_total", Some(phase));
    assert_eq!(timed_out("header"), 3000.0);
    assert_eq!(timed_out("body"), 100.0);
    assert_eq!(timed_out("idle"), 1000.0);
    assert_eq!(timed_out("write") + timed_out("response"), 0.0);
    assert_eq!(value(&scrape, "leadconv_http_connections_refused_total", None), 0.0);
    // None is left open but the scrape's own (once serve has seen the last
    // probe's connection close).
    wait_for("one connection open", Duration::from_secs(5), || async {
        value(&setup.metrics().await, "leadconv_http_connections", None) == 1.0
    })
    .await;
}

/// A job whose CSV export is about 40 MB: one real result, and 40,000 more
/// rows with a long error message (results need no lead behind them).
async fn job_with_a_large_export(setup: &Setup) -> uuid::Uuid {
    let lead = setup.crm.lead(json!({"owner_id": setup.user, "last_name": "Big", "company": "Acme"})).await;
    let checked = leadconv::store::job::check(
        setup.crm.pool(),
        leadconv::store::job::NewJob {
            criteria: json!({"ids": [lead]}),
            options: json!({}),
            requested_by: setup.user,
            trigger: leadconv::store::job::Trigger::Manual,
        },
    )
    .await
    .unwrap();
    let lease = leadconv::queue::producer::Lease::new(Duration::from_secs(30));
    let job = leadconv::store::job::create(setup.crm.pool(), &checked, leadconv::store::job::Dispatch::Queue { lease })
        .await
        .unwrap()
        .id;
    sqlx::query(
        "INSERT INTO conversion_results (job_id, lead_id, outcome, error_code, error_message)
         SELECT $1, 1000000 + g, 'failed', 'internal_error', repeat('slow reader ', 85) FROM generate_series(1, 40000) g",
    )
    .bind(job)
    .execute(setup.crm.pool())
    .await
    .unwrap();
    job
}

/// The console's session cookie for the setup's user.
async fn console_cookie(setup: &Setup) -> String {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = http
        .post(format!("{}/console/login", setup.server.base))
        .form(&[("token", setup.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned()
}

/// A socket with a small receive buffer, so that the server's writes wait
/// soon when it does not read.
async fn small_window(addr: &str) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.connect(addr.parse().unwrap()).await.unwrap()
}

/// Waits until serve has counted `n` connections closed in `phase`, by
/// `deadline`; returns when.
async fn timed_out_by(setup: &Setup, phase: &str, n: f64, deadline: Instant) -> Result<Instant, f64> {
    loop {
        let seen = value(&setup.metrics().await, "leadconv_http_connections_timed_out_total", Some(phase));
        if seen >= n {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(seen);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a chunked response was cut off: no last chunk.
fn cut_off(got: &[u8]) -> bool {
    !got.ends_with(b"\r\n0\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_or_reads_too_slowly_is_cut_off() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A whole response may take 6 s here: a slow but steady reader is cut
    // off by that, one that stops reading by the write deadline first.
    let mut flags = short_deadlines();
    flags.extend(["--response-timeout-secs".to_owned(), "6".to_owned()]);
    let setup = Setup::new(&flags).await;
    let job = job_with_a_large_export(&setup).await;
    let cookie = console_cookie(&setup).await;
    let request = format!("GET /console/jobs/{job}/results.csv HTTP/1.1\r\nHost: test\r\nCookie: {cookie}\r\n\r\n");

    // A client that never reads.
    let mut stalled = small_window(&setup.addr()).await;
    stalled.write_all(request.as_bytes()).await.unwrap();
    let asked = Instant::now();
    let counted = timed_out_by(&setup, "write", 1.0, asked + WRITE + SLACK).await;
    let counted = counted.unwrap_or_else(|seen| panic!("no write timeout counted after {:?} ({seen})", WRITE + SLACK));
    // Its connection is gone: what it has not read yet ends short of the
    // export's end.
    let (_, got) = closed_by(&mut stalled, asked, Instant::now() + Duration::from_secs(10)).await.unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&got[..got.len().min(200)]));
    assert!(cut_off(&got), "the export was cut off ({} bytes read)", got.len());
    eprintln!("a client that stopped reading was cut off {:?} after asking", counted - asked);

    // A client that reads 1 MB/s: the 40 MB export would take 40 s.
    let mut slow = small_window(&setup.addr()).await;
    slow.write_all(request.as_bytes()).await.unwrap();
    let asked = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut every = tokio::time::interval(Duration::from_millis(16));
    let ended = loop {
        every.tick().await;
        match timeout_at(asked + Duration::from_secs(6) + SLACK, slow.read(&mut buf)).await {
            Err(_) => panic!("still open {:?} after asking", asked.elapsed()),
            Ok(Ok(0)) | Ok(Err(_)) => break asked.elapsed(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    assert!(cut_off(&got), "the export was cut off ({} bytes read)", got.len());
    assert!(ended >= Duration::from_secs(6), "cut off by the response deadline, not before: {ended:?}");
    let scrape = setup.metrics().await;
    let timed_out = |phase| value(&scrape, "leadconv_http_connections_timed_out_total", Some(phase));
    assert_eq!((timed_out("write"), timed_out("response")), (1.0, 1.0));
    eprintln!("a client reading 1 MB/s was cut off after {ended:?}, {} bytes read", got.len());

    // A reader that keeps up gets the whole export.
    let r = reqwest::Client::new()
        .get(format!("{}/console/jobs/{job}/results.csv", setup.server.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let csv = r.text().await.unwrap();
    assert_eq!(csv.lines().count(), 1 + 40_001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_connection_cap_the_probes_still_answer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let flags: Vec<String> = [
        "--max-connections",
        "50",
        "--reserved-connections",
        "5",
        "--header-timeout-secs",
        "30",
        "--idle-timeout-secs",
        "60",
    ]
    .map(str::to_owned)
    .to_vec();
    let setup = Setup::new(&flags).await;
    let addr = setup.addr();

    // 50 kept-alive connections, each after one GET /healthz: the cap.
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(br#"{"status":"ok"}"#) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before its answer: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        held.push(s);
    }
    // 5 silent connections fill the reserve; 5 more are closed at once.
    let opened = Instant::now();
    let mut reserve = Vec::new();
    for _ in 0..5 {
        reserve.push(TcpStream::connect(&addr).await.unwrap());
    }
    for _ in 0..5 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let from = Instant::now();
        let (after, got) = closed_by(&mut s, from, from + Duration::from_secs(1)).await.expect("refused at once");
        assert!(got.is_empty(), "refused without an answer");
        assert!(after < Duration::from_secs(1));
    }
    // The reserve's header deadline is short: it frees itself.
    for mut s in reserve {
        let (after, _) = closed_by(&mut s, opened, opened + Duration::from_secs(2) + SLACK).await.unwrap();
        assert!(after < Duration::from_secs(2) + SLACK);
    }

    // The probes answer; the API says it is overloaded, and closes.
    let http = reqwest::Client::new();
    let r = http.get(format!("{}/healthz", setup.server.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(format!("{}/v1/jobs", setup.server.base)).bearer_auth(&setup.token).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["connection"], "close");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert_eq!(body["error"]["field"], "");
    // 5 closed at once and one 503; open, the 50 held and the scrape's own
    // (once the probes' connections, closed after their answer, are gone).
    wait_for("the cap's metrics", Duration::from_secs(5), || async {
        let scrape = setup.metrics().await;
        value(&scrape, "leadconv_http_connections_refused_total", None) == 6.0
            && value(&scrape, "leadconv_http_connections", None) == 51.0
    })
    .await;
    // The held ones are still served.
    let s = &mut held[0];
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&buf[..n]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_a_request_in_flight_gets_its_answer_and_idle_connections_close() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut setup = Setup::new(&[]).await;
    let lead = setup.crm.lead(json!({"owner_id": setup.user, "last_name": "Late", "company": "Acme"})).await;
    // An idle kept-alive connection.
    let mut idle = TcpStream::connect(setup.addr()).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    // A convert-now call whose lead another transaction holds: it waits its
    // 3 s, then says 202 (and `serve`, once the lock wait times out, hands
    // the lead to the workers before it exits).
    let mut holder = setup.crm.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM leads WHERE id = $1 FOR UPDATE").bind(lead).execute(&mut *holder).await.unwrap();
    let call = reqwest::Client::new()
        .post(format!("{}/v1/leads/{lead}/convert", setup.server.base))
        .bearer_auth(&setup.token)
        .json(&json!({"timeout_ms": 3000}))
        .send();
    let call = tokio::spawn(call);
    wait_for("the call's job exists", Duration::from_secs(10), || async {
        setup.crm.count("SELECT count(*) FROM conversion_jobs").await == 1
    })
    .await;
    let pid = setup.pid().to_string();
    let term = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(term.success());
    let from = Instant::now();
    let (after, _) = closed_by(&mut idle, from, from + Duration::from_secs(2)).await.expect("the idle one closes");
    eprintln!("an idle connection closed {after:?} after SIGTERM");
    let r = call.await.unwrap().expect("the call in flight is answered");
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "pending");
    let exit = tokio::time::timeout(Duration::from_secs(20), setup.server.child.wait()).await.expect("serve exits");
    assert_eq!(exit.unwrap().code(), Some(0));
    holder.rollback().await.unwrap();
}
