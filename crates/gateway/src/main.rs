//! `chat-gateway`: read the configuration, start logging, serve until SIGTERM or SIGINT.
//! A configuration it cannot use exits with code 2 and a message naming the variable.

use anyhow::Context;
use chat_gateway::{App, Config, telemetry};

fn main() -> anyhow::Result<()> {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("chat-gateway: {err}");
            std::process::exit(2);
        }
    };
    // Built here rather than by #[tokio::main], so that TOKIO_WORKER_THREADS is validated
    // with the rest of the configuration (and may come from .env).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init(config.log_format);
    let app = match App::build(config).await {
        Ok(app) => app,
        Err(err) if err.is_config() => {
            eprintln!("chat-gateway: {err}");
            std::process::exit(2);
        }
        Err(err) => return Err(err).context("start-up failed"),
    };
    app.run(shutdown_signal()).await.context("server failed")?;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Heroku, Kubernetes, docker stop). It logs
/// nothing itself: the drain must start whatever happens to the log output (the app logs
/// "shutting down" once it has started).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
