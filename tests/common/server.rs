//! `leadconv serve` (and `leadconv worker --metrics`) as real processes, for
//! tests with a real HTTP client.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::broker::{amqp_url, TestBroker};
use super::TestDb;

pub struct Server {
    pub base: String,
    pub child: Child,
}

/// Starts `leadconv serve` on a free port and waits until it listens.
pub async fn serve(db: &TestDb, broker: &TestBroker) -> Server {
    serve_with(db, broker, &[]).await
}

/// [`serve`] with more flags.
pub async fn serve_with(db: &TestDb, broker: &TestBroker, flags: &[&str]) -> Server {
    let mut child = Command::new(super::leadconv_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(flags)
        .env("DATABASE_URL", db.url())
        .env("AMQP_URL", amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().expect("serve prints its address");
    let base = first.strip_prefix("listening on ").expect("listening on http://…").trim().to_owned();
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server { base, child }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
