//! A TCP proxy between a process and Postgres or RabbitMQ, for faults: it
//! can cut every connection passing through it (what a restart of the
//! server looks like to a client), and stop forwarding what clients send
//! (what a broker's flow control or a frozen network looks like), at once
//! or after a given number of bytes, to land the fault in the middle of a
//! run without depending on timing. It can also be repointed to another
//! server, as a virtual IP or a Kubernetes Service is after a failover.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<watch::Sender<u64>>,
    gate: Arc<Gate>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    /// Bytes forwarded from clients to the server so far.
    pub forwarded: Arc<AtomicU64>,
    /// Client connections open now (accepted and not yet closed).
    pub open: Arc<AtomicU64>,
    /// Where new connections go.
    upstream: Arc<Mutex<String>>,
}

/// What happens when the byte budget of client→server traffic runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Pause,
    Cut,
}

#[derive(Debug)]
struct GateState {
    /// Bytes clients may still send before `then` happens; `None`: no limit.
    budget: Option<u64>,
    paused: bool,
    then: Then,
}

struct Gate {
    state: Mutex<GateState>,
    changed: Notify,
}

impl Gate {
    /// How many of `want` bytes may pass now, waiting while paused. `None`:
    /// the connection is to be cut.
    async fn admit(&self, want: u64, cut: &watch::Sender<u64>) -> Option<u64> {
        loop {
            let notified = self.changed.notified();
            {
                let mut s = self.state.lock().unwrap();
                if !s.paused {
                    match s.budget {
                        None => return Some(want),
                        Some(0) => match s.then {
                            Then::Pause => s.paused = true,
                            Then::Cut => {
                                s.budget = None;
                                cut.send_modify(|n| *n += 1);
                                return None;
                            }
                        },
                        Some(left) => {
                            let n = want.min(left);
                            s.budget = Some(left - n);
                            return Some(n);
                        }
                    }
                }
            }
            notified.await;
        }
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream.to_owned()));
        let (cut, cut_rx) = watch::channel(0u64);
        let cut = Arc::new(cut);
        let gate = Arc::new(Gate {
            state: Mutex::new(GateState { budget: None, paused: false, then: Then::Pause }),
            changed: Notify::new(),
        });
        let accepted = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let (counter, cut_tx, g, fwd) = (accepted.clone(), cut.clone(), gate.clone(), forwarded.clone());
        let (open_now, to) = (open.clone(), upstream.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                let upstream = to.lock().unwrap().clone();
                let open_now = open_now.clone();
                let mut cut_rx = cut_rx.clone();
                cut_rx.borrow_and_update();
                let (cut_tx, gate, fwd) = (cut_tx.clone(), g.clone(), fwd.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    open_now.fetch_add(1, Ordering::SeqCst);
                    let _open = OnClose(open_now);
                    let (mut client_r, mut client_w) = client.into_split();
                    let (mut server_r, mut server_w) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = client_r.read(&mut buf).await.ok().filter(|&n| n > 0)?;
                            let mut off = 0;
                            while off < n {
                                let pass = gate.admit((n - off) as u64, &cut_tx).await? as usize;
                                server_w.write_all(&buf[off..off + pass]).await.ok()?;
                                fwd.fetch_add(pass as u64, Ordering::SeqCst);
                                off += pass;
                            }
                        }
                        #[allow(unreachable_code)]
                        Some(())
                    };
                    let down = tokio::io::copy(&mut server_r, &mut client_w);
                    // Dropping both sockets resets the connection.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, gate, accepted, forwarded, open, upstream }
    }

    /// Sends new connections to `upstream`; open ones stay where they are
    /// (cut them with [`Proxy::cut_all`]).
    pub fn repoint(&self, upstream: &str) {
        *self.upstream.lock().unwrap() = upstream.to_owned();
    }

    /// Client connections open through the proxy now.
    pub fn open_now(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    /// Drops every connection open now; new ones are accepted again.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Stops forwarding what clients send once `bytes` more have passed,
    /// until [`Proxy::resume`]: the connection stays open, the client's
    /// writes back up, as under a broker's flow control.
    pub fn pause_after(&self, bytes: u64) {
        let mut s = self.gate.state.lock().unwrap();
        *s = GateState { budget: Some(bytes), paused: false, then: Then::Pause };
        self.gate.changed.notify_waiters();
    }

    /// Cuts every connection once clients have sent `bytes` more.
    pub fn cut_after(&self, bytes: u64) {
        let mut s = self.gate.state.lock().unwrap();
        *s = GateState { budget: Some(bytes), paused: false, then: Then::Cut };
        self.gate.changed.notify_waiters();
    }

    /// Whether forwarding is stopped now (the budget of `pause_after` ran out).
    pub fn is_paused(&self) -> bool {
        self.gate.state.lock().unwrap().paused
    }

    /// Forwards everything again, with no limit.
    pub fn resume(&self) {
        let mut s = self.gate.state.lock().unwrap();
        *s = GateState { budget: None, paused: false, then: Then::Pause };
        self.gate.changed.notify_waiters();
    }
}

/// Counts a connection closed when its task ends, however it ends.
struct OnClose(Arc<AtomicU64>);

impl Drop for OnClose {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
