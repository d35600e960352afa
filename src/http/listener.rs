//! The HTTP/1 listener of `serve` and `worker --metrics`: an accept loop of
//! its own, so that a slow or idle client holds a connection (and the memory
//! behind it) for a bounded time, and so that the number of connections is
//! capped with room left for the probes.
//!
//! `axum::serve` has no deadline at all: 3,000 clients that each sent half a
//! request head and stopped were all still connected a minute later, and
//! serve's memory had grown from 12 to 151 MiB. Hyper's own
//! `header_read_timeout` covers the first request head only: not an idle
//! kept-alive connection, a trickling body or a client that stops reading.
//!
//! Deadlines, per connection ([`Limits`], each a flag of `serve`):
//!
//! - **header**: from the accept, or from the first byte of a kept-alive
//!   connection's next request, until the request head is read;
//! - **body**: from the request head until its body is read to the end: a
//!   total, however slowly the body trickles in;
//! - **write**: a response write that makes no progress this long (a
//!   client that stopped reading);
//! - **response**: from the request head until the response's last byte: a
//!   total, so that a client reading just fast enough cannot hold a response
//!   for ever, and long enough for a large CSV export;
//! - **idle**: a kept-alive connection with no request in flight, nothing
//!   left to write and no byte of a next request.
//!
//! How: the socket ([`Watched`]) notes reads and writes, the service
//! ([`Routed`]) a request's start and its response body's end (or drop), the
//! request body ([`WatchedRequest`]) its end; all of them write into the
//! connection's [`Clock`]. The connection's task races hyper's connection
//! future against the earliest deadline the clock names, woken by a
//! `Notify` when a change may bring that deadline forward. When it passes,
//! the connection is dropped, with the handler running in it, and counted
//! in `leadconv_http_connections_timed_out_total{phase}`.
//!
//! Connection cap: `max_connections` connections are served in full. Above
//! it a reserve of `reserved_connections` more is accepted for the probes:
//! `/healthz`, `/readyz` and `/metrics` are answered, anything else gets 503
//! `overloaded`; one request per connection (`Connection: close`) and a
//! header deadline of at most [`RESERVE_HEADER`], so that a client cannot
//! camp in the reserve. Beyond both, a connection is closed as soon as it
//! is accepted. Both count in `leadconv_http_connections_refused_total`.
//! A reserve on the one port rather than a separate operations port: the
//! probes and Prometheus already use the API's port (deploy/), and keep
//! working with no new configuration.
//!
//! HTTP/1 only, as `axum::serve` was here (axum's `http2` feature is off).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use metrics::{counter, gauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{HTTP_CONNECTIONS, HTTP_REFUSED, HTTP_TIMED_OUT};

/// What a client may hold: the deadlines of the module doc, and the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header: Duration,
    pub body: Duration,
    pub write: Duration,
    pub response: Duration,
    pub idle: Duration,
    pub max_connections: usize,
    pub reserved_connections: usize,
}

impl Limits {
    /// `serve`'s defaults (its flags say the same; a test checks), and
    /// `worker --metrics`'s limits.
    pub const DEFAULT: Limits = Limits {
        header: Duration::from_secs(10),
        body: Duration::from_secs(30),
        write: Duration::from_secs(30),
        // A million-lead job's CSV export is a few hundred MB: minutes to a
        // client at a few MB/s.
        response: Duration::from_secs(600),
        idle: Duration::from_secs(30),
        // Room for thousands of hostile connections beside the real ones:
        // an idle connection costs a few KiB here.
        max_connections: 8192,
        reserved_connections: 64,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// The longest idle keep-alive timeout `serve` accepts: longer, and idle
/// connections pile up; load balancers expect a minute at most.
pub const MAX_IDLE: Duration = Duration::from_secs(60);

/// The header deadline of a connection in the reserve, when `header` is
/// longer: a probe sends its request at once.
pub const RESERVE_HEADER: Duration = Duration::from_secs(2);

/// How long requests in flight may go on after shutdown begins. Kubernetes
/// kills the pod 30 s after SIGTERM (deploy/k8s/serve.yaml); a convert-now
/// call waits 5 s by default.
pub const DRAIN: Duration = Duration::from_secs(20);

/// Files the process needs beside its connections: the Postgres pool,
/// RabbitMQ, the runtime's own, stdio.
const OTHER_FILES: u64 = 256;

/// The paths a connection in the reserve is served.
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Connections the kernel completes and queues before they are accepted.
/// Tokio's default, 1,024, overflowed under a burst of 4,100 connections:
/// the kernel then drops new clients' SYNs, and a probe waits a second for
/// its retry. Linux caps it at `net.core.somaxconn` (4,096 by default).
const BACKLOG: u32 = 4096;

/// A listening socket on `addr` with a backlog for bursts of connections.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As `TcpListener::bind`: a restarted serve binds its port again while
    // its old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `app` on `listener` until `stop` is cancelled, then lets requests
/// in flight finish (at most [`DRAIN`]) and returns.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) -> io::Result<()> {
    provide_files(&limits);
    let gate = Arc::new(Gate::default());
    let mut over_cap = Every::new(Duration::from_secs(60));
    let mut accept_failed = Every::new(Duration::from_secs(10));
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // That one client is gone already; the next accept is unaffected.
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of file descriptors (EMFILE) and the like: the next
                // accept would fail the same way at once, so wait for some
                // connections to close instead of spinning.
                if accept_failed.due() {
                    tracing::error!(error = %e, "cannot accept HTTP connections");
                }
                tokio::select! {
                    () = &mut stopped => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        // Only this loop adds connections, so the count cannot grow between
        // this look and `enter` below.
        let open = gate.open.load(Ordering::Acquire);
        let reserve = open >= limits.max_connections;
        if reserve && over_cap.due() {
            tracing::warn!(
                open,
                max_connections = limits.max_connections,
                reserved_connections = limits.reserved_connections,
                "HTTP connection cap reached: new connections get /healthz, /readyz and /metrics only, \
                 and beyond the reserve are closed (leadconv_http_connections_refused_total counts them)"
            );
        }
        if open >= limits.max_connections + limits.reserved_connections {
            counter!(HTTP_REFUSED).increment(1);
            drop(stream);
            continue;
        }
        // Responses go out in one write or a few large ones: no reason to
        // let Nagle's algorithm hold back the last segment.
        let _ = stream.set_nodelay(true);
        let slot = gate.enter();
        tokio::spawn(connection(stream, slot, app.clone(), limits, reserve, stop.clone()));
    }
    drop(listener);
    // Every connection ends by itself at most DRAIN after `stop`.
    let _ = tokio::time::timeout(DRAIN + Duration::from_secs(1), gate.all_closed()).await;
    let cut = gate.cut.load(Ordering::Relaxed);
    if cut > 0 {
        tracing::warn!(cut, "HTTP requests still running {DRAIN:?} after shutdown began were cut off");
    }
    Ok(())
}

/// Accept errors that concern one connection only.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}

/// One connection, from accept to close: hyper's connection raced against
/// the connection's deadlines and against shutdown.
async fn connection(
    stream: TcpStream,
    slot: Slot,
    app: Router,
    limits: Limits,
    reserve: bool,
    stop: CancellationToken,
) {
    let mut limits = limits;
    if reserve {
        limits.header = limits.header.min(RESERVE_HEADER);
    }
    let gate = slot.0.clone();
    let clock = Arc::new(Clock::new(limits, Instant::now()));
    let io = TokioIo::new(Watched { _slot: slot, stream, clock: clock.clone() });
    let service = Routed { app, clock: clock.clone(), reserve };
    let conn = hyper::server::conn::http1::Builder::new().keep_alive(!reserve).serve_connection(io, service);
    tokio::pin!(conn);
    let wake = tokio::time::sleep_until(Instant::now());
    tokio::pin!(wake);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let mut drain_until: Option<Instant> = None;
    loop {
        let (due, _) = clock.due();
        wake.as_mut().reset(drain_until.map_or(due, |d| d.min(due)));
        tokio::select! {
            biased;
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = clock.changed.notified() => {}
            () = &mut stopped, if drain_until.is_none() => {
                // Idle connections close now, busy ones after their response.
                conn.as_mut().graceful_shutdown();
                drain_until = Some(Instant::now() + DRAIN);
            }
            () = &mut wake => {
                let now = Instant::now();
                if drain_until.is_some_and(|d| d <= now) {
                    gate.cut.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // The clock may have moved on since the sleep was set.
                let (due, phase) = clock.due();
                if due <= now {
                    if matches!(phase, Timeout::Write | Timeout::Response) {
                        clock.reset_on_close();
                    }
                    counter!(HTTP_TIMED_OUT, "phase" => phase.as_str()).increment(1);
                    tracing::debug!(phase = phase.as_str(), "HTTP connection closed by its deadline");
                    return;
                }
            }
        }
    }
}

/// Which deadline closed a connection: the `phase` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    Header,
    Body,
    Write,
    Response,
    Idle,
}

impl Timeout {
    pub const ALL: [Timeout; 5] = [Timeout::Header, Timeout::Body, Timeout::Write, Timeout::Response, Timeout::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::Header => "header",
            Timeout::Body => "body",
            Timeout::Write => "write",
            Timeout::Response => "response",
            Timeout::Idle => "idle",
        }
    }
}

/// Where a connection is between requests, with the instants its deadlines
/// count from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head, since the accept or its first byte.
    Head { since: Instant },
    /// Request `seq` in flight since its head was read: its body still
    /// being read (`body_open`), and bytes of a next request read since
    /// `next_head` (pipelined, or a client that sends before the answer).
    Request { seq: u64, started: Instant, body_open: bool, next_head: Option<Instant> },
    /// Between requests, since the last response's end or its last byte
    /// written.
    Idle { since: Instant },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Since when a write has been waiting for the client to read, with no
    /// byte written since.
    write_waiting: Option<Instant>,
    /// Requests started on this connection.
    requests: u64,
}

/// A connection's progress, written by its socket, service and bodies, read
/// by its task.
struct Clock {
    limits: Limits,
    state: Mutex<State>,
    /// Told when a deadline may have come forward; a deadline that moves
    /// back needs no word (the task wakes, looks again, sleeps again).
    changed: Notify,
    /// Close with a reset (see [`Clock::reset_on_close`]).
    reset: AtomicBool,
}

impl Clock {
    fn new(limits: Limits, accepted: Instant) -> Clock {
        let state = State { phase: Phase::Head { since: accepted }, write_waiting: None, requests: 0 };
        Clock { limits, state: Mutex::new(state), changed: Notify::new(), reset: AtomicBool::new(false) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the state half-changed: each
        // change is one assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The earliest deadline, and which it is.
    fn due(&self) -> (Instant, Timeout) {
        let s = self.state();
        let l = &self.limits;
        let mut due = match s.phase {
            Phase::Head { since } => (since + l.header, Timeout::Header),
            Phase::Request { started, body_open, .. } => {
                let response = (started + l.response, Timeout::Response);
                let body = (started + l.body, Timeout::Body);
                if body_open && body.0 < response.0 {
                    body
                } else {
                    response
                }
            }
            Phase::Idle { since } => match s.write_waiting {
                None => (since + l.idle, Timeout::Idle),
                // Not idle but slow to read the last response: the write
                // deadline decides.
                Some(waiting) => (waiting + l.write, Timeout::Write),
            },
        };
        if let Some(since) = s.write_waiting {
            if since + l.write < due.0 {
                due = (since + l.write, Timeout::Write);
            }
        }
        due
    }

    /// Closes the socket with a reset rather than a FIN: what a client that
    /// does not read has not received is thrown away at once, instead of the
    /// kernel holding it (and the socket) for minutes trying to deliver it.
    fn reset_on_close(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }

    /// Bytes came in.
    fn read(&self) {
        let now = Instant::now();
        let mut s = self.state();
        match &mut s.phase {
            Phase::Idle { .. } => {
                s.phase = Phase::Head { since: now };
                drop(s);
                self.changed.notify_one();
            }
            Phase::Request { body_open: false, next_head: next @ None, .. } => *next = Some(now),
            _ => {}
        }
    }

    /// Bytes went out.
    fn wrote(&self) {
        let mut s = self.state();
        s.write_waiting = None;
        if let Phase::Idle { since } = &mut s.phase {
            *since = Instant::now();
        }
    }

    /// A write found the socket's buffer full.
    fn write_waits(&self) {
        let mut s = self.state();
        if s.write_waiting.is_none() {
            s.write_waiting = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    /// A request head was read; returns the request's number.
    fn request_started(&self, body_open: bool) -> u64 {
        let mut s = self.state();
        s.requests += 1;
        let seq = s.requests;
        s.phase = Phase::Request { seq, started: Instant::now(), body_open, next_head: None };
        drop(s);
        self.changed.notify_one();
        seq
    }

    /// Request `seq`'s body was read to its end, failed, or was dropped.
    fn body_finished(&self, seq: u64) {
        if let Phase::Request { seq: current, body_open, .. } = &mut self.state().phase {
            if *current == seq {
                *body_open = false;
            }
        }
    }

    /// Request `seq`'s response body ended or was dropped.
    fn response_finished(&self, seq: u64) {
        let mut s = self.state();
        if let Phase::Request { seq: current, next_head, .. } = s.phase {
            if current == seq {
                s.phase = match next_head {
                    Some(since) => Phase::Head { since },
                    None => Phase::Idle { since: Instant::now() },
                };
                drop(s);
                self.changed.notify_one();
            }
        }
    }
}

/// The accepted socket, noting its reads and writes on the clock.
struct Watched {
    /// First, so that it is dropped before the socket closes: a client that
    /// sees the close and connects again finds the connection counted out.
    _slot: Slot,
    stream: TcpStream,
    clock: Arc<Clock>,
}

impl Watched {
    fn note_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self.clock.wrote(),
            Poll::Pending => self.clock.write_waits(),
            _ => {}
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.clock.reset.load(Ordering::Relaxed) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, data);
        this.note_write(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.note_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router as hyper's service for one connection: notes each request's
/// start, and its body's and response's ends, on the clock.
#[derive(Clone)]
struct Routed {
    app: Router,
    clock: Arc<Clock>,
    /// A connection in the reserve: probes only.
    reserve: bool,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<WatchedResponse>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Routed {
    type Response = Response<WatchedResponse>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        use http_body::Body as _;
        let body_open = !req.body().is_end_stream();
        let seq = self.clock.request_started(body_open);
        let end = ResponseEnd { clock: self.clock.clone(), seq };
        let clock = self.clock.clone();
        let req = req.map(|inner| Body::new(WatchedRequest { inner, clock, seq, open: body_open }));
        if self.reserve && !PROBES.contains(&req.uri().path()) {
            counter!(HTTP_REFUSED).increment(1);
            let mut res = super::ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "",
                "the server has as many connections as it serves; try again shortly",
            )
            .into_response();
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Box::pin(std::future::ready(Ok(res.map(|inner| WatchedResponse { inner, _end: end }))));
        }
        let mut app = self.app.clone();
        Box::pin(async move {
            use tower_service::Service;
            let ready = std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut app, cx)).await;
            let res = match ready {
                Ok(()) => app.call(req).await,
                Err(e) => Err(e),
            };
            let res = res.unwrap_or_else(|e| match e {});
            Ok(res.map(|inner| WatchedResponse { inner, _end: end }))
        })
    }
}

/// Tells the clock that a response ended when dropped: with its body read to
/// the end, or cut off.
struct ResponseEnd {
    clock: Arc<Clock>,
    seq: u64,
}

impl Drop for ResponseEnd {
    fn drop(&mut self) {
        self.clock.response_finished(self.seq);
    }
}

/// A response body; hyper drops it once it has its last frame.
struct WatchedResponse {
    inner: Body,
    _end: ResponseEnd,
}

impl http_body::Body for WatchedResponse {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that tells the clock when it has been read to its end
/// (or failed, or was dropped unread): its deadline stops counting.
struct WatchedRequest {
    inner: Incoming,
    clock: Arc<Clock>,
    seq: u64,
    open: bool,
}

impl WatchedRequest {
    fn finish(&mut self) {
        if std::mem::take(&mut self.open) {
            self.clock.body_finished(self.seq);
        }
    }
}

impl http_body::Body for WatchedRequest {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &r {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.finish();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedRequest {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The open connections: counted for the cap and the gauge, awaited at
/// shutdown.
#[derive(Default)]
struct Gate {
    open: AtomicUsize,
    all_closed: Notify,
    /// Connections cut off at the end of the drain.
    cut: AtomicUsize,
}

impl Gate {
    fn enter(self: &Arc<Self>) -> Slot {
        self.open.fetch_add(1, Ordering::AcqRel);
        gauge!(HTTP_CONNECTIONS).increment(1.0);
        Slot(self.clone())
    }

    async fn all_closed(&self) {
        loop {
            let closed = self.all_closed.notified();
            tokio::pin!(closed);
            // Registered before looking, so that a close in between wakes it.
            closed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// One open connection; counted out when dropped.
struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        gauge!(HTTP_CONNECTIONS).decrement(1.0);
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// True at most once per period: a flood of refused connections must not
/// become a flood of log lines.
struct Every {
    period: Duration,
    last: Option<Instant>,
}

impl Every {
    fn new(period: Duration) -> Every {
        Every { period, last: None }
    }

    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + self.period) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Makes room for the cap's connections in the limit on open files, and
/// warns when the hard limit does not allow it.
fn provide_files(limits: &Limits) {
    let wanted = (limits.max_connections + limits.reserved_connections) as u64 + OTHER_FILES;
    let allowed = raise_fd_limit(wanted);
    if allowed < wanted {
        tracing::warn!(
            max_connections = limits.max_connections,
            reserved_connections = limits.reserved_connections,
            open_files_limit = allowed,
            "--max-connections {} and --reserved-connections {} need about {wanted} open files, but this \
             process may open only {allowed} (its hard limit, `ulimit -Hn`): connections past that fail to \
             be accepted until others close; raise the limit or lower --max-connections",
            limits.max_connections,
            limits.reserved_connections,
        );
    }
}

/// Raises this process's soft limit on open files towards its hard limit,
/// as far as `wanted` (never lowers it); returns the soft limit in force.
pub fn raise_fd_limit(wanted: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    // None: unlimited.
    let soft = now.current.unwrap_or(u64::MAX);
    let target = now.maximum.map_or(wanted, |hard| hard.min(wanted));
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: now.maximum }) {
        Ok(()) => target,
        Err(e) => {
            tracing::warn!(error = %e, soft, wanted = target, "could not raise the limit on open files");
            soft
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header: Duration::from_secs(10),
            body: Duration::from_secs(30),
            write: Duration::from_secs(5),
            response: Duration::from_secs(600),
            idle: Duration::from_secs(20),
            ..Limits::DEFAULT
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn every_phase_is_a_label_of_the_timeout_counter() {
        let labels: Vec<&str> = Timeout::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(labels, crate::metrics::HTTP_TIMEOUT_PHASES);
    }

    /// A connection's deadline through a request's life: head, body,
    /// response, a stalled write, idle, the next request's first byte.
    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_deadline() {
        let t0 = Instant::now();
        let clock = Clock::new(limits(), t0);
        assert_eq!(clock.due(), (t0 + secs(10), Timeout::Header));
        // Bytes of the head do not push its deadline back.
        tokio::time::advance(secs(3)).await;
        clock.read();
        assert_eq!(clock.due(), (t0 + secs(10), Timeout::Header));

        let t1 = Instant::now();
        let seq = clock.request_started(true);
        assert_eq!(clock.due(), (t1 + secs(30), Timeout::Body));
        // Body bytes do not push the body's deadline back either.
        tokio::time::advance(secs(20)).await;
        clock.read();
        assert_eq!(clock.due(), (t1 + secs(30), Timeout::Body));
        clock.body_finished(seq);
        assert_eq!(clock.due(), (t1 + secs(600), Timeout::Response));

        // A write that waits: the write deadline, until a byte goes out.
        let t2 = Instant::now();
        clock.write_waits();
        tokio::time::advance(secs(2)).await;
        clock.write_waits();
        assert_eq!(clock.due(), (t2 + secs(5), Timeout::Write));
        clock.wrote();
        assert_eq!(clock.due(), (t1 + secs(600), Timeout::Response));

        // The response ends: idle from then, and from each byte written after.
        tokio::time::advance(secs(1)).await;
        let t3 = Instant::now();
        clock.response_finished(seq);
        assert_eq!(clock.due(), (t3 + secs(20), Timeout::Idle));
        tokio::time::advance(secs(1)).await;
        clock.wrote();
        assert_eq!(clock.due(), (t3 + secs(21), Timeout::Idle));
        // Its last bytes waiting on a client that does not read: the write
        // deadline, not the idle one.
        clock.write_waits();
        assert_eq!(clock.due(), (t3 + secs(1) + secs(5), Timeout::Write));
        clock.wrote();

        // The next request's first byte starts its header deadline.
        tokio::time::advance(secs(4)).await;
        let t4 = Instant::now();
        clock.read();
        assert_eq!(clock.due(), (t4 + secs(10), Timeout::Header));
    }

    /// Bytes read after a request's body, before its response ended, are
    /// the next request's head: its deadline counts from them.
    #[tokio::test(start_paused = true)]
    async fn a_pipelined_head_counts_from_its_first_byte() {
        let clock = Clock::new(limits(), Instant::now());
        let seq = clock.request_started(false);
        tokio::time::advance(secs(1)).await;
        let early = Instant::now();
        clock.read();
        tokio::time::advance(secs(3)).await;
        clock.response_finished(seq);
        assert_eq!(clock.due(), (early + secs(10), Timeout::Header));
    }

    /// The end of an earlier request's body or response does not touch the
    /// one in flight.
    #[tokio::test(start_paused = true)]
    async fn a_late_end_of_an_earlier_request_changes_nothing() {
        let clock = Clock::new(limits(), Instant::now());
        let first = clock.request_started(false);
        clock.response_finished(first);
        let t = Instant::now();
        let second = clock.request_started(true);
        clock.body_finished(first);
        clock.response_finished(first);
        assert_eq!(clock.due(), (t + secs(30), Timeout::Body));
        clock.body_finished(second);
        assert_eq!(clock.due(), (t + secs(600), Timeout::Response));
    }

    #[test]
    fn every_says_yes_once_per_period() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let mut every = Every::new(secs(60));
            assert!(every.due());
            assert!(!every.due());
            tokio::time::advance(secs(59)).await;
            assert!(!every.due());
            tokio::time::advance(secs(1)).await;
            assert!(every.due());
        });
    }
}
