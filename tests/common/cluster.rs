//! Private clusters for the failover tests (issue 23), started by the test
//! that uses them and never the shared services:
//! - [`RabbitCluster`]: three RabbitMQ nodes clustered on ports of their
//!   own, each behind a [`Proxy`] that stands for the node's address (so a
//!   test sees which node a process is connected to, and can hold a
//!   client's traffic to land a fault in the middle of a publish);
//! - [`PgPair`]: a Postgres primary with a streaming replica made by
//!   `pg_basebackup -R`, behind an endpoint the test repoints as Patroni's
//!   VIP or a Kubernetes Service would be after a failover; the replica
//!   streams through a relay of its own, so a test can stop replication and
//!   make the replica miss the last commits, as an asynchronous one does.
//!
//! The nodes run as the `rabbitmq` and `postgres` users of the Debian
//! packages (root runs them with `su`, anyone else with `sudo -u`).

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use super::proxy::Proxy;

/// Runs `script` with `sh` as `user`; its output, or a panic naming it.
async fn run_as(user: &str, script: &str) -> String {
    // su and sudo -H set HOME to the user's: RabbitMQ's tools find the
    // Erlang cookie there.
    let mut c = if is_root() {
        let mut c = tokio::process::Command::new("su");
        c.args([user, "-s", "/bin/sh", "-c", script]);
        c
    } else {
        let mut c = tokio::process::Command::new("sudo");
        c.args(["-n", "-H", "-u", user, "--", "sh", "-c", script]);
        c
    };
    let out = c
        .env("PATH", format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default()))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run as {user}: {script}: {e}"));
    assert!(
        out.status.success(),
        "as {user}: {script}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free port for a service the test stops and starts again, chosen below
/// the kernel's ephemeral range (32768 and up on Linux): while the service
/// is down, a port from that range may be handed to any outgoing connection
/// of the tests running beside it (or to their `free_port()`), and the
/// service then cannot listen again when it restarts ("rabbit_is_not_running"
/// after a rolling restart's start). No connection is ever given a port
/// below the range.
fn lasting_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread by process so that test binaries running at once start apart.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1_000) as u16 * 12;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// A directory of the test's own, removed when dropped.
struct ServiceDir(PathBuf);

impl ServiceDir {
    fn new() -> ServiceDir {
        let dir = std::env::temp_dir().join(format!(
            "leadconv-cluster-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        ServiceDir(dir)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Hands the directory (and what is in it now) to `user`.
    async fn give_to(&self, user: &str) {
        run_as("root", &format!("chown -R {user} {}", self.0.display())).await;
    }
}

impl Drop for ServiceDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// The node's address as clients are given it.
    pub proxy: Proxy,
}

impl RabbitNode {
    fn env(&self) -> String {
        let d = self.dir.display();
        format!(
            "RABBITMQ_NODENAME={} RABBITMQ_NODE_PORT={} RABBITMQ_DIST_PORT={} RABBITMQ_CONFIG_FILE={d}/rabbitmq.conf \
             RABBITMQ_ENABLED_PLUGINS_FILE={d}/enabled_plugins RABBITMQ_MNESIA_BASE={d}/mnesia \
             RABBITMQ_LOG_BASE={d}/log RABBITMQ_PID_FILE={d}/pid",
            self.name, self.port, self.dist_port
        )
    }

    fn pid_file(&self) -> String {
        format!("{}/pid", self.dir.display())
    }
}

/// Three RabbitMQ nodes in one cluster.
pub struct RabbitCluster {
    pub nodes: Vec<RabbitNode>,
    dir: ServiceDir,
    /// In the nodes' names, to find what is left of them.
    id: String,
}

impl RabbitCluster {
    pub async fn start() -> RabbitCluster {
        let dir = ServiceDir::new();
        let id = format!("{}_{}", std::process::id(), uuid::Uuid::new_v4().simple().to_string().get(..6).unwrap());
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let node_dir = dir.path().join(format!("n{i}"));
            let port = lasting_port();
            std::fs::create_dir_all(node_dir.join("mnesia")).unwrap();
            std::fs::create_dir_all(node_dir.join("log")).unwrap();
            std::fs::write(node_dir.join("rabbitmq.conf"), format!("listeners.tcp.default = 127.0.0.1:{port}\n"))
                .unwrap();
            // No management listener to clash with the shared node's.
            std::fs::write(node_dir.join("enabled_plugins"), "[].\n").unwrap();
            let proxy = Proxy::start(&format!("127.0.0.1:{port}")).await;
            nodes.push(RabbitNode {
                name: format!("leadconv_c{i}_{id}@localhost"),
                port,
                dist_port: lasting_port(),
                dir: node_dir,
                proxy,
            });
        }
        dir.give_to("rabbitmq").await;
        let cluster = RabbitCluster { nodes, dir, id };
        futures::future::join_all((0..3).map(|i| cluster.start_node(i))).await;
        for i in 1..3 {
            let n = &cluster.nodes[i].name;
            cluster
                .ctl_on(
                    i,
                    &format!(
                        "stop_app && rabbitmqctl -q -n {n} join_cluster {} && rabbitmqctl -q -n {n} start_app",
                        cluster.nodes[0].name
                    ),
                )
                .await;
        }
        cluster
    }

    /// `rabbitmqctl -q -n <node i> ARGS`.
    pub async fn ctl_on(&self, i: usize, args: &str) -> String {
        run_as("rabbitmq", &format!("rabbitmqctl -q -n {} {args}", self.nodes[i].name)).await
    }

    /// Starts node `i` (again) and waits until it runs.
    pub async fn start_node(&self, i: usize) {
        let n = &self.nodes[i];
        run_as("rabbitmq", &format!("{} rabbitmq-server -detached", n.env())).await;
        self.ctl_on(i, &format!("wait {} --timeout 180", n.pid_file())).await;
    }

    /// Stops node `i` and waits until its process has exited.
    pub async fn stop_node(&self, i: usize) {
        self.ctl_on(i, &format!("stop {}", self.nodes[i].pid_file())).await;
    }

    /// Waits until node `i` is back in the cluster and every quorum queue
    /// has a quorum besides it, so the next node may be stopped: the check
    /// a rolling upgrade makes.
    pub async fn await_safe_to_stop(&self, i: usize) {
        run_as(
            "rabbitmq",
            &format!("rabbitmq-upgrade -q -n {} await_online_quorum_plus_one -t 180", self.nodes[i].name),
        )
        .await;
    }

    /// Index of the node that leads `queue`, asked of node `via` (a running one).
    pub async fn leader_of(&self, via: usize, queue: &str) -> usize {
        let out = self.ctl_on(via, "list_queues --no-table-headers name leader").await;
        let leader = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .unwrap_or_else(|| panic!("no queue {queue} in {out}"));
        self.nodes.iter().position(|n| n.name == leader).unwrap_or_else(|| panic!("leader {leader} is not ours"))
    }

    /// `AMQP_URL` for the cluster: each node's address (its proxy).
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("amqp://guest:guest@{}/%2f", n.proxy.addr)).collect::<Vec<_>>().join(",")
    }

    /// One node's own port, past its proxy: for the test's own connections.
    pub fn direct_url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // The nodes' Erlang VMs, at once: the cluster is thrown away.
        for n in &self.nodes {
            if let Ok(pid) = std::fs::read_to_string(n.pid_file()) {
                let _ = std::process::Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &format!("leadconv_c[0-9]_{}@", self.id)])
            .status();
    }
}

/// The Postgres binaries of the newest installed major version.
fn pg_bin() -> PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("the Debian postgresql package (see scripts/services.sh)")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    PathBuf::from(format!("/usr/lib/postgresql/{}/bin", versions.last().expect("a Postgres version")))
}

pub struct PgServer {
    pub port: u16,
    pub data: PathBuf,
    log: PathBuf,
}

impl PgServer {
    /// `postgres://postgres@127.0.0.1:<port>/<db>`, past the endpoint.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    async fn pg_ctl(&self, args: &str) {
        run_as(
            "postgres",
            &format!("{}/pg_ctl -D {} -l {} -w {args}", pg_bin().display(), self.data.display(), self.log.display()),
        )
        .await;
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        let s = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        s.lines().next().unwrap().trim().parse().unwrap()
    }
}

/// A Postgres primary, its streaming replica, and the endpoint clients use.
pub struct PgPair {
    pub primary: PgServer,
    pub replica: PgServer,
    /// What clients connect to: the primary now, the replica after a failover.
    pub endpoint: Proxy,
    /// The replica's way to the primary: repointed nowhere, it stops
    /// replication.
    pub replication: Proxy,
    dir: ServiceDir,
}

pub const DB: &str = "leadconv";

impl PgPair {
    /// Both servers running, the replica streaming, and a database
    /// [`DB`] migrated on the primary.
    pub async fn start() -> PgPair {
        let dir = ServiceDir::new();
        dir.give_to("postgres").await;
        let bin = pg_bin();
        let server = |name: &str| PgServer {
            port: lasting_port(),
            data: dir.path().join(name),
            log: dir.path().join(format!("{name}.log")),
        };
        let (primary, replica) = (server("primary"), server("replica"));
        run_as(
            "postgres",
            &format!(
                "{}/initdb -D {} -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8",
                bin.display(),
                primary.data.display()
            ),
        )
        .await;
        // Durability off (fsync): the failover tests lose commits by
        // stopping replication, not by crashing the machine. WAL kept for a
        // replica that falls behind on purpose.
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = replica\n\
             max_wal_senders = 4\nwal_keep_size = '2GB'\nhot_standby = on\nfsync = off\nmax_connections = 100\n\
             wal_sender_timeout = '10s'\nwal_receiver_timeout = '10s'\n",
            primary.port,
            dir.path().display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(primary.data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .unwrap();
        primary.pg_ctl("start").await;

        let replication = Proxy::start(&format!("127.0.0.1:{}", primary.port)).await;
        run_as(
            "postgres",
            &format!(
                "{}/pg_basebackup -h 127.0.0.1 -p {} -U postgres -D {} -R -X stream",
                bin.display(),
                replication.addr.port(),
                replica.data.display()
            ),
        )
        .await;
        std::fs::OpenOptions::new()
            .append(true)
            .open(replica.data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("port = {}\n", replica.port).as_bytes()))
            .unwrap();
        replica.pg_ctl("start").await;

        let endpoint = Proxy::start(&format!("127.0.0.1:{}", primary.port)).await;
        let pair = PgPair { primary, replica, endpoint, replication, dir };
        let mut admin = pair.connect_direct(&pair.primary, "postgres").await.unwrap();
        sqlx::query(&format!(
            "CREATE DATABASE {DB} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&pair.url()).await.unwrap();
        leadconv::store::db::migrate(&pool).await.expect("migrations run");
        pool.close().await;
        pair
    }

    /// The database through the endpoint, as leadconv is given it.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/{DB}", self.endpoint.addr)
    }

    pub async fn connect_direct(&self, server: &PgServer, db: &str) -> sqlx::Result<sqlx::PgConnection> {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&server.url(db)).await
    }

    /// Waits until the replica has replayed everything the primary wrote.
    pub async fn await_replica_caught_up(&self) {
        let mut p = self.connect_direct(&self.primary, "postgres").await.unwrap();
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut p).await.unwrap();
        let mut r = self.connect_direct(&self.replica, "postgres").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let replayed: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&lsn)
                .fetch_one(&mut r)
                .await
                .unwrap();
            if replayed {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the replica did not replay up to {lsn} in 120 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the primary cleanly (a switchover's first step).
    pub async fn stop_primary(&self) {
        self.primary.pg_ctl("stop -m fast").await;
    }

    /// Kills the primary's postmaster with SIGKILL (a crash); its backends
    /// notice and exit on their own.
    pub async fn kill_primary(&self) {
        let pid = self.primary.pid();
        let ok = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -KILL {pid}");
    }

    /// Promotes the replica and waits until it takes writes.
    pub async fn promote_replica(&self) {
        self.replica.pg_ctl("promote").await;
    }

    /// Sends new connections to the replica and ends the open ones, as a
    /// VIP moved to the promoted server does.
    pub fn move_endpoint_to_replica(&self) {
        self.endpoint.repoint(&format!("127.0.0.1:{}", self.replica.port));
        self.endpoint.cut_all();
    }

    /// Cuts the replica off the primary: what the primary commits from now
    /// on exists on the primary alone.
    pub fn stop_replication(&self) {
        self.replication.repoint("127.0.0.1:1");
        self.replication.cut_all();
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for s in [&self.primary, &self.replica] {
            if let Ok(pid) = std::fs::read_to_string(s.data.join("postmaster.pid")) {
                if let Some(pid) = pid.lines().next() {
                    // SIGQUIT: immediate shutdown, children included.
                    let _ = std::process::Command::new("kill").args(["-QUIT", pid.trim()]).status();
                }
            }
        }
    }
}
