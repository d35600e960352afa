//! A TCP proxy that can cut every connection passing through it, to show
//! that the worker survives losing Postgres and RabbitMQ.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    cut: watch::Sender<u64>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = upstream.to_owned();
        let (cut, cut_rx) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                let upstream = upstream.clone();
                let mut cut_rx = cut_rx.clone();
                cut_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Dropping both sockets resets the connection.
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, accepted }
    }

    /// Drops every connection open now; new ones are accepted again.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}
