//! `leadconv serve`: the HTTP API, plus the background loops a running
//! installation needs from a long-lived process.

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::http::{self, listener, AppState};
use crate::queue::enqueue::Enqueuer;
use crate::queue::Topology;

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub amqp_url: String,
    pub topology: Topology,
    /// See [`AppState::record_url`].
    pub record_url: Option<String>,
    /// What a slow or idle client may hold.
    pub limits: listener::Limits,
    /// Convert-now leads converted at once (see [`Enqueuer::convert_here`]).
    pub convert_now_concurrency: usize,
}

/// Serves until `stop` is cancelled; in-flight requests are finished (see
/// [`listener::DRAIN`]).
pub async fn run(pool: PgPool, cfg: ServeConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let metrics = crate::metrics::install();
    let enqueuer = Arc::new(
        Enqueuer::new(pool.clone(), cfg.amqp_url.clone(), cfg.topology.clone())
            .converting_now_at_once(cfg.convert_now_concurrency),
    );
    let finished = crate::store::finished::Waiters::start(pool.clone(), stop.clone());
    let record_url = cfg.record_url.map(Arc::from);
    let app = http::router(AppState { pool: pool.clone(), enqueuer: enqueuer.clone(), metrics, finished, record_url });
    // Rule relay and scheduler: every replica runs both; the database
    // (SKIP LOCKED claims) keeps their work from being done twice. They
    // start once the schema is there (until then /readyz says why).
    let background = [
        tokio::spawn(after_schema(
            pool.clone(),
            stop.clone(),
            crate::automation::rules::run_relay(enqueuer.clone(), stop.clone()),
        )),
        tokio::spawn(after_schema(
            pool.clone(),
            stop.clone(),
            crate::automation::schedule::run_scheduler(enqueuer.clone(), stop.clone()),
        )),
    ];
    let tcp = listener::bind(cfg.listen)?;
    // Printed so that scripts and tests binding port 0 learn the address.
    println!("listening on http://{}", tcp.local_addr()?);
    let served = listener::serve(tcp, app, cfg.limits, stop.clone()).await;
    stop.cancel();
    // Convert-now conversions whose callers stopped waiting.
    enqueuer.drain(listener::DRAIN).await;
    for task in background {
        match task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "background loop failed"),
            Err(e) => tracing::error!(error = %e, "background loop panicked"),
            Ok(Ok(())) => {}
        }
    }
    served?;
    Ok(())
}

/// Runs `task` once the database has this binary's schema, saying once
/// what is missing while it waits.
async fn after_schema(
    pool: PgPool,
    stop: CancellationToken,
    task: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        match crate::store::db::require_schema(&pool).await {
            Ok(()) => break,
            Err(e) if !said => {
                tracing::warn!(problem = %format!("{e:#}"), "waiting for the schema before relaying rules and running schedules");
                said = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }
    task.await
}

/// A `/metrics` and `/healthz` listener for processes without the API
/// (`leadconv worker --metrics ADDR`), with `serve`'s default limits.
pub async fn metrics_only(listen: SocketAddr, stop: CancellationToken) -> anyhow::Result<()> {
    use axum::routing::get;
    let handle = crate::metrics::install();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let tcp = listener::bind(listen)?;
    tracing::info!(addr = %tcp.local_addr()?, "metrics listening");
    listener::serve(tcp, app, listener::Limits::DEFAULT, stop).await?;
    Ok(())
}
