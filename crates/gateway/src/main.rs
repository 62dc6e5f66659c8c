//! `chat-gateway`: read the configuration, start logging, serve until SIGTERM or SIGINT.
//! A configuration it cannot use exits with code 2 and a message naming the variable.

use std::time::Duration;

use anyhow::Context;
use chat_gateway::{App, Config, auth, telemetry};
use clap::{Parser, Subcommand};

/// A horizontally scalable WebSocket chat gateway (configured by the environment: see
/// docs/operations.md).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Prints an HS256 token signed with AUTH_JWT_SECRET, for development and scripts.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// The display name (`name`; default: the user id).
        #[arg(long)]
        name: Option<String>,
        /// Rooms the token allows, comma-separated names or `prefix*` patterns (default:
        /// every room).
        #[arg(long)]
        rooms: Option<String>,
        /// How long the token is valid: a number of seconds, or with a unit (`90s`, `30m`,
        /// `1h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("chat-gateway: {err}");
            std::process::exit(2);
        }
    };
    if let Some(Command::Token {
        sub,
        name,
        rooms,
        ttl,
    }) = cli.command
    {
        let Some(secret) = config.auth.as_ref().and_then(|a| a.secret.as_ref()) else {
            eprintln!("chat-gateway: AUTH_JWT_SECRET is not set: nothing to sign with");
            std::process::exit(2);
        };
        let iat = unix_now();
        let claims = auth::NewToken {
            sub: &sub,
            name: name.as_deref(),
            rooms: rooms
                .as_deref()
                .map(|r| r.split(',').map(str::trim).collect()),
            iat,
            exp: iat + ttl.as_secs(),
        };
        println!("{}", auth::sign_hs256(secret.expose(), &claims)?);
        return Ok(());
    }
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

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
