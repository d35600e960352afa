//! Graceful shutdown: SIGTERM or SIGINT cancels a token; whoever does work
//! stops taking more when it is cancelled and finishes what is in flight.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing conversions in flight"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing conversions in flight"),
        }
        t.cancel();
    });
    token
}
