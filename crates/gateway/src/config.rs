//! Configuration from the environment (and a `.env` file outside production), validated
//! before anything binds a port. Secrets are held in [`Secret`], whose `Debug` redacts
//! them, so `Config` can derive `Debug` and still never show the Redis password.

use std::{fmt, net::IpAddr, time::Duration};

use ipnet::IpNet;

use chat_protocol::RoomName;
use serde::Deserialize;

use crate::admission::OriginPolicy;

/// A configuration the gateway refuses to start with; names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// envy could not parse a variable (its message names the variable).
    #[error("invalid environment: {0}")]
    Env(#[from] envy::Error),
    /// A variable parsed but its value is not acceptable.
    #[error("invalid {var}: {reason}")]
    Invalid {
        /// The environment variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// A value that must never be logged or shown: `Debug` redacts it (a URL keeps its
/// scheme, user and host, so logs still say where it points).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `redis://user:secret@host` → `redis://user:***@host`; anything else → `***`.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "***".into();
        };
        match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or("", |(u, _)| u);
                format!("{scheme}://{user}:***@{host}")
            }
            None => self.0.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Everything the gateway reads from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to bind (`HOST`, default `0.0.0.0`).
    pub host: IpAddr,
    /// Port to bind (`PORT`, default 4444).
    pub port: u16,
    /// Redis URL (`REDIS_URL`); `None` runs a single instance on the in-process bus.
    pub redis_url: Option<Secret>,
    /// Prefix of every Redis key and channel (`REDIS_PREFIX`, default `chat`).
    pub redis_prefix: String,
    /// Room joined on connect when the query names none (`DEFAULT_ROOM`, default `general`).
    pub default_room: RoomName,
    /// Messages kept per room (`HISTORY_SIZE`, default 200).
    pub history_size: usize,
    /// Largest `text`, bytes (`MAX_TEXT_BYTES`, default 4096).
    pub max_text_bytes: usize,
    /// Largest incoming WebSocket message, bytes (`MAX_FRAME_BYTES`, default 65536).
    pub max_frame_bytes: usize,
    /// Live messages queued per client before it is closed as too slow (`CLIENT_QUEUE`, default 1024).
    pub client_queue: usize,
    /// Bytes of live messages queued per client before it is closed as too slow
    /// (`CLIENT_QUEUE_BYTES`, default 1 MiB).
    pub client_queue_bytes: usize,
    /// Frames per second a connection may send on average (`RATE_LIMIT_PER_SEC`, default 50; 0 = off).
    pub rate_limit_per_sec: u32,
    /// Frames a connection may send in a burst (`RATE_LIMIT_BURST`, default 100).
    pub rate_limit_burst: u32,
    /// WebSocket connections per instance; more get HTTP 503 (`MAX_CONNECTIONS`; default:
    /// the open-file limit less a tenth and 100; 0 = no limit).
    pub max_connections: usize,
    /// Rooms one connection may be in (`MAX_ROOMS_PER_CONNECTION`, default 100).
    pub max_rooms_per_connection: usize,
    /// Browser origins allowed to connect (`ALLOWED_ORIGINS`; default: the request's own host).
    pub allowed_origins: OriginPolicy,
    /// On shutdown, clients are closed at random moments within this window
    /// (`SHUTDOWN_DRAIN_SECS`, default 3; 0 = all at once).
    pub shutdown_drain: Duration,
    /// Seconds between server pings (`PING_INTERVAL_SECS`, default 25).
    pub ping_interval: Duration,
    /// A socket that takes no bytes this long while frames wait drops the connection
    /// (`WRITE_TIMEOUT_SECS`, default 10).
    pub write_timeout: Duration,
    /// At most one flush of the clients' sockets per interval for chat messages, so one
    /// syscall carries several (`WRITE_COALESCE_MS`, default 0 = write at once).
    pub write_coalesce: Duration,
    /// With `write_coalesce`: coalesce per client, writing at once to a client not written
    /// to for an interval (`WRITE_COALESCE_MODE=adaptive`; default `interval`: one flush of
    /// every client per interval).
    pub write_coalesce_adaptive: bool,
    /// Under load, one publish script call per this interval carries every publish that
    /// arrived meanwhile; a publish finding Redis' lane quiet goes at once
    /// (`PUBLISH_BATCH_MS`, default 1; 0 = a call as soon as the previous one is answered).
    pub publish_batch: Duration,
    /// Longest wait for Redis on one command before answering `unavailable` (`REDIS_TIMEOUT_MS`, default 2000).
    pub redis_timeout: Duration,
    /// Interval of the pub/sub delivery self-probe (`PUBSUB_PROBE_SECS`, default 5; 0 = off).
    pub pubsub_probe: Option<Duration>,
    /// With `rediss://`: do not verify the server certificate (`REDIS_TLS_INSECURE`,
    /// default false). For Heroku's self-signed Key-Value Store only.
    pub redis_tls_insecure: bool,
    /// With `rediss://`: trust this PEM CA file instead of the system roots (`REDIS_TLS_CA_FILE`).
    pub redis_tls_ca_file: Option<String>,
    /// How long shutdown waits for connections to close (`SHUTDOWN_GRACE_SECS`, default 25).
    pub shutdown_grace: Duration,
    /// This instance's id in `welcome` and logs (`INSTANCE_ID`; default `DYNO`, else hostname + suffix).
    pub instance_id: String,
    /// Log format (`LOG_FORMAT`: `pretty` or `json`).
    pub log_format: LogFormat,
    /// Serve the web client from this directory instead of the embedded copy (`WEB_DIR`).
    pub web_dir: Option<String>,
    /// Worker threads of the async runtime (`TOKIO_WORKER_THREADS`; default: one per CPU).
    pub worker_threads: Option<usize>,
    /// Token verification (`AUTH_*`); `None`: authentication is off.
    pub auth: Option<AuthConfig>,
    /// A connection that has not sent complete request headers within this is closed
    /// (`HTTP_HEADER_TIMEOUT_SECS`, default 10).
    pub http_header_timeout: Duration,
    /// WebSocket connections one client address may hold (`MAX_CONNECTIONS_PER_IP`,
    /// default 200; 0 = no limit).
    pub max_connections_per_ip: usize,
    /// Proxies whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`, CIDRs).
    pub trusted_proxies: Vec<IpNet>,
    /// Rooms idle this long expire as a whole (`ROOM_IDLE_TTL_SECS`, default 30 days;
    /// `None` = keep forever).
    pub room_idle_ttl: Option<Duration>,
    /// Messages a fresh join replays at most (`JOIN_REPLAY_LIMIT`, default `HISTORY_SIZE`);
    /// a resume with `since` replays everything newer that is retained.
    pub join_replay_limit: usize,
    /// How long an idempotent send is remembered (`IDEMPOTENCY_WINDOW_SECS`, default 300).
    pub idempotency_window: Duration,
    /// Keys of the server API (`API_KEY`, a comma list for rotation); empty: `/api/*` is 404.
    pub api_keys: Vec<Secret>,
    /// Who is in a room (`PRESENCE`: `on` or `off`, default on).
    pub presence: bool,
    /// Presence entries' lease (`PRESENCE_TTL_SECS`, default 30), renewed every third of it.
    pub presence_ttl: Duration,
    /// Users listed in a `presence` frame at most (`PRESENCE_MAX_USERS`, default 1000);
    /// `count` is always exact.
    pub presence_max_users: usize,
    /// `METRICS_PORT`: `/metrics` is served on this port only (on `HOST`) instead of the
    /// public one; 0 picks a free port (tests).
    pub metrics_port: Option<u16>,
}

/// How tokens are verified (any one or more key sources).
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// HS256 secret (`AUTH_JWT_SECRET`, at least 32 bytes).
    pub secret: Option<Secret>,
    /// A PEM public key (`AUTH_JWT_PUBLIC_KEY_FILE`): RSA → RS256, EC P-256 → ES256,
    /// Ed25519 → EdDSA.
    pub public_key_file: Option<String>,
    /// A JWKS document (`AUTH_JWKS_URL`), fetched at start and again for an unknown `kid`.
    pub jwks_url: Option<String>,
    /// Required `iss` (`AUTH_JWT_ISSUER`).
    pub issuer: Option<String>,
    /// Required `aud` (`AUTH_JWT_AUDIENCE`).
    pub audience: Option<String>,
    /// What token-less clients may do (`AUTH_ANONYMOUS`: `off` or `read`).
    pub anonymous: Anonymous,
}

/// What a client without a token may do when authentication is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anonymous {
    /// Nothing: the upgrade is refused with 401.
    Off,
    /// Connect, join and read any room; every write is refused `unauthorized`.
    Read,
}

#[derive(Deserialize)]
struct Raw {
    host: Option<String>,
    port: Option<u16>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    default_room: Option<String>,
    history_size: Option<usize>,
    max_text_bytes: Option<usize>,
    max_frame_bytes: Option<usize>,
    client_queue: Option<usize>,
    client_queue_bytes: Option<usize>,
    rate_limit_per_sec: Option<u32>,
    rate_limit_burst: Option<u32>,
    max_connections: Option<usize>,
    max_rooms_per_connection: Option<usize>,
    allowed_origins: Option<String>,
    shutdown_drain_secs: Option<u64>,
    ping_interval_secs: Option<u64>,
    write_timeout_secs: Option<u64>,
    write_coalesce_ms: Option<u64>,
    write_coalesce_mode: Option<String>,
    publish_batch_ms: Option<u64>,
    redis_timeout_ms: Option<u64>,
    pubsub_probe_secs: Option<u64>,
    redis_tls_insecure: Option<String>,
    redis_tls_ca_file: Option<String>,
    shutdown_grace_secs: Option<u64>,
    instance_id: Option<String>,
    dyno: Option<String>,
    log_format: Option<String>,
    web_dir: Option<String>,
    tokio_worker_threads: Option<usize>,
    auth_jwt_secret: Option<String>,
    auth_jwt_public_key_file: Option<String>,
    auth_jwks_url: Option<String>,
    auth_jwt_issuer: Option<String>,
    auth_jwt_audience: Option<String>,
    auth_anonymous: Option<String>,
    http_header_timeout_secs: Option<u64>,
    max_connections_per_ip: Option<usize>,
    trusted_proxies: Option<String>,
    room_idle_ttl_secs: Option<u64>,
    join_replay_limit: Option<usize>,
    idempotency_window_secs: Option<u64>,
    api_key: Option<String>,
    presence: Option<String>,
    presence_ttl_secs: Option<u64>,
    presence_max_users: Option<usize>,
    metrics_port: Option<u16>,
}

impl Config {
    /// Reads the process environment, after loading `.env` unless `APP_ENV=production`.
    pub fn from_env() -> Result<Self, ConfigError> {
        if std::env::var("APP_ENV").as_deref() != Ok("production") {
            // A missing .env is normal; a malformed one is reported by the variables it breaks.
            let _ = dotenvy::dotenv();
        }
        Self::from_vars(std::env::vars())
    }

    /// Reads configuration from explicit `(NAME, value)` pairs (tests use this).
    pub fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        // An empty variable means "unset", as in most deploy tools' UIs.
        let raw: Raw = envy::from_iter(vars.into_iter().filter(|(_, v)| !v.is_empty()))?;
        Self::validate(raw)
    }

    /// Defaults for everything: embedded mode on port 4444.
    pub fn defaults() -> Self {
        // The empty environment is always valid.
        match Self::from_vars(std::iter::empty()) {
            Ok(c) => c,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }

    fn validate(raw: Raw) -> Result<Self, ConfigError> {
        let invalid = |var: &'static str, reason: &str| ConfigError::Invalid {
            var,
            reason: reason.to_owned(),
        };
        let auth = auth_config(&raw)?;
        let http_header_timeout = match raw.http_header_timeout_secs.unwrap_or(10) {
            s @ 1..=3600 => Duration::from_secs(s),
            _ => {
                return Err(invalid(
                    "HTTP_HEADER_TIMEOUT_SECS",
                    "must be between 1 and 3600 seconds",
                ));
            }
        };
        let trusted_proxies = raw
            .trusted_proxies
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| invalid("TRUSTED_PROXIES", &format!("{p:?} is not a CIDR")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let room_idle_ttl = match raw.room_idle_ttl_secs.unwrap_or(30 * 24 * 3600) {
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        let host = match raw.host.as_deref() {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(h) => h
                .parse()
                .map_err(|_| invalid("HOST", "must be an IP address, e.g. 0.0.0.0 or 127.0.0.1"))?,
        };
        let redis_prefix = raw.redis_prefix.unwrap_or_else(|| "chat".into());
        if redis_prefix.contains(['{', '}']) || redis_prefix.chars().any(char::is_whitespace) {
            return Err(invalid("REDIS_PREFIX", "must not contain braces or spaces"));
        }
        if let Some(url) = &raw.redis_url {
            let scheme = url.split_once("://").map(|(s, _)| s);
            const SCHEMES: [&str; 6] = [
                "redis",
                "rediss",
                "redis-sentinel",
                "rediss-sentinel",
                "redis-cluster",
                "rediss-cluster",
            ];
            if !scheme.is_some_and(|s| SCHEMES.contains(&s)) {
                return Err(invalid(
                    "REDIS_URL",
                    "must start with redis://, rediss://, redis-sentinel://, rediss-sentinel://, \
                     redis-cluster:// or rediss-cluster://",
                ));
            }
        }
        let redis_tls_insecure = match raw.redis_tls_insecure.as_deref() {
            None | Some("false" | "0" | "no") => false,
            Some("true" | "1" | "yes") => true,
            Some(_) => return Err(invalid("REDIS_TLS_INSECURE", "must be true or false")),
        };
        let default_room = raw.default_room.as_deref().unwrap_or("general");
        let default_room =
            RoomName::new(default_room).map_err(|e| invalid("DEFAULT_ROOM", &e.to_string()))?;
        let history_size = raw.history_size.unwrap_or(200);
        if !(1..=100_000).contains(&history_size) {
            return Err(invalid("HISTORY_SIZE", "must be between 1 and 100000"));
        }
        let join_replay_limit = raw.join_replay_limit.unwrap_or(history_size);
        if !(1..=history_size).contains(&join_replay_limit) {
            return Err(invalid(
                "JOIN_REPLAY_LIMIT",
                "must be between 1 and HISTORY_SIZE",
            ));
        }
        let idempotency_window = raw.idempotency_window_secs.unwrap_or(300);
        if !(1..=86_400).contains(&idempotency_window) {
            return Err(invalid(
                "IDEMPOTENCY_WINDOW_SECS",
                "must be between 1 and 86400 seconds",
            ));
        }
        let api_keys: Vec<Secret> = raw
            .api_key
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(Secret::new)
            .collect();
        if api_keys.iter().any(|k| k.expose().len() < 16) {
            return Err(invalid(
                "API_KEY",
                "every key must be at least 16 characters (comma-separated for rotation)",
            ));
        }
        let presence = match raw.presence.as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(_) => return Err(invalid("PRESENCE", "must be `on` or `off`")),
        };
        let presence_ttl = raw.presence_ttl_secs.unwrap_or(30);
        if !(3..=3600).contains(&presence_ttl) {
            return Err(invalid(
                "PRESENCE_TTL_SECS",
                "must be between 3 and 3600 seconds",
            ));
        }
        let presence_max_users = raw.presence_max_users.unwrap_or(1000);
        if !(1..=100_000).contains(&presence_max_users) {
            return Err(invalid(
                "PRESENCE_MAX_USERS",
                "must be between 1 and 100000",
            ));
        }
        let max_frame_bytes = raw.max_frame_bytes.unwrap_or(65_536);
        if !(1024..=16 << 20).contains(&max_frame_bytes) {
            return Err(invalid(
                "MAX_FRAME_BYTES",
                "must be between 1024 and 16777216",
            ));
        }
        let max_text_bytes = raw.max_text_bytes.unwrap_or(4096);
        if max_text_bytes == 0 || max_text_bytes > max_frame_bytes {
            return Err(invalid(
                "MAX_TEXT_BYTES",
                "must be at least 1 and at most MAX_FRAME_BYTES",
            ));
        }
        let client_queue = raw.client_queue.unwrap_or(1024);
        if !(1..=1_000_000).contains(&client_queue) {
            return Err(invalid("CLIENT_QUEUE", "must be between 1 and 1000000"));
        }
        let client_queue_bytes = raw.client_queue_bytes.unwrap_or(1 << 20);
        if client_queue_bytes < 1024 {
            return Err(invalid("CLIENT_QUEUE_BYTES", "must be at least 1024"));
        }
        let rate_limit_per_sec = raw.rate_limit_per_sec.unwrap_or(50);
        let rate_limit_burst = raw.rate_limit_burst.unwrap_or(100);
        if rate_limit_per_sec > 0 && rate_limit_burst == 0 {
            return Err(invalid("RATE_LIMIT_BURST", "must be at least 1"));
        }
        let max_rooms_per_connection = raw.max_rooms_per_connection.unwrap_or(100);
        if max_rooms_per_connection == 0 {
            return Err(invalid("MAX_ROOMS_PER_CONNECTION", "must be at least 1"));
        }
        let allowed_origins = OriginPolicy::parse(raw.allowed_origins.as_deref().unwrap_or(""))
            .map_err(|e| invalid("ALLOWED_ORIGINS", &e.to_string()))?;
        let secs = |v: Option<u64>, default: u64, var: &'static str, max: u64| {
            let v = v.unwrap_or(default);
            if (1..=max).contains(&v) {
                Ok(Duration::from_secs(v))
            } else {
                Err(invalid(
                    var,
                    &format!("must be between 1 and {max} seconds"),
                ))
            }
        };
        let ping_interval = secs(raw.ping_interval_secs, 25, "PING_INTERVAL_SECS", 3600)?;
        let write_timeout = secs(raw.write_timeout_secs, 10, "WRITE_TIMEOUT_SECS", 3600)?;
        let shutdown_grace = secs(raw.shutdown_grace_secs, 25, "SHUTDOWN_GRACE_SECS", 3600)?;
        let shutdown_drain = Duration::from_secs(raw.shutdown_drain_secs.unwrap_or(3));
        if shutdown_drain >= shutdown_grace {
            return Err(invalid(
                "SHUTDOWN_DRAIN_SECS",
                "must be shorter than SHUTDOWN_GRACE_SECS",
            ));
        }
        let write_coalesce = raw.write_coalesce_ms.unwrap_or(0);
        if write_coalesce > 1000 {
            return Err(invalid("WRITE_COALESCE_MS", "must be at most 1000"));
        }
        let write_coalesce_adaptive = match raw.write_coalesce_mode.as_deref() {
            None | Some("interval") => false,
            Some("adaptive") if write_coalesce == 0 => {
                return Err(invalid(
                    "WRITE_COALESCE_MODE",
                    "`adaptive` needs WRITE_COALESCE_MS above 0 (its bound)",
                ));
            }
            Some("adaptive") => true,
            Some(_) => {
                return Err(invalid(
                    "WRITE_COALESCE_MODE",
                    "must be `interval` or `adaptive`",
                ));
            }
        };
        let publish_batch = raw.publish_batch_ms.unwrap_or(1);
        let redis_timeout = raw.redis_timeout_ms.unwrap_or(2000);
        if publish_batch > 10_000 || publish_batch * 2 > redis_timeout {
            return Err(invalid(
                "PUBLISH_BATCH_MS",
                "must be at most 10000 and at most half of REDIS_TIMEOUT_MS",
            ));
        }
        if !(10..=60_000).contains(&redis_timeout) {
            return Err(invalid("REDIS_TIMEOUT_MS", "must be between 10 and 60000"));
        }
        let log_format = match raw.log_format.as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(_) => return Err(invalid("LOG_FORMAT", "must be `pretty` or `json`")),
        };
        let instance_id = match raw.instance_id.or(raw.dyno) {
            Some(id) => id,
            None => format!(
                "{}-{:04x}",
                gethostname::gethostname().to_string_lossy(),
                fastrand::u16(..)
            ),
        };
        if instance_id.len() > 128 || instance_id.chars().any(char::is_control) {
            return Err(invalid(
                "INSTANCE_ID",
                "must be at most 128 bytes without control characters",
            ));
        }
        let port = raw.port.unwrap_or(4444);
        if raw.metrics_port.is_some_and(|m| m == port && m != 0) {
            return Err(invalid(
                "METRICS_PORT",
                "must differ from PORT (it takes /metrics off the public port)",
            ));
        }
        let worker_threads = raw.tokio_worker_threads;
        if worker_threads == Some(0) {
            return Err(invalid("TOKIO_WORKER_THREADS", "must be at least 1"));
        }

        Ok(Config {
            host,
            port,
            redis_url: raw.redis_url.map(Secret::new),
            redis_prefix,
            default_room,
            history_size,
            max_text_bytes,
            max_frame_bytes,
            client_queue,
            client_queue_bytes,
            rate_limit_per_sec,
            rate_limit_burst,
            max_connections: raw.max_connections.unwrap_or_else(default_max_connections),
            max_rooms_per_connection,
            allowed_origins,
            shutdown_drain,
            ping_interval,
            write_timeout,
            write_coalesce: Duration::from_millis(write_coalesce),
            write_coalesce_adaptive,
            publish_batch: Duration::from_millis(publish_batch),
            redis_timeout: Duration::from_millis(redis_timeout),
            redis_tls_insecure,
            redis_tls_ca_file: raw.redis_tls_ca_file,
            pubsub_probe: match raw.pubsub_probe_secs.unwrap_or(5) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            shutdown_grace,
            instance_id,
            log_format,
            web_dir: raw.web_dir,
            worker_threads,
            auth,
            http_header_timeout,
            max_connections_per_ip: raw.max_connections_per_ip.unwrap_or(200),
            trusted_proxies,
            room_idle_ttl,
            join_replay_limit,
            idempotency_window: Duration::from_secs(idempotency_window),
            api_keys,
            presence,
            presence_ttl: Duration::from_secs(presence_ttl),
            presence_max_users,
            metrics_port: raw.metrics_port,
        })
    }
}

/// `MAX_CONNECTIONS` by default: what the open-file limit allows, less a tenth and 100 for
/// everything else (Redis, HTTP requests, logs); without a readable limit, none.
fn default_max_connections() -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) if soft != rlimit::INFINITY => {
            let soft = usize::try_from(soft).unwrap_or(usize::MAX);
            (soft - soft / 10).saturating_sub(100).max(1)
        }
        _ => 0,
    }
}

/// The `AUTH_*` variables: `None` when no key source is configured.
fn auth_config(raw: &Raw) -> Result<Option<AuthConfig>, ConfigError> {
    let invalid = |var: &'static str, reason: &str| ConfigError::Invalid {
        var,
        reason: reason.to_owned(),
    };
    let anonymous = match raw.auth_anonymous.as_deref() {
        None | Some("off") => Anonymous::Off,
        Some("read") => Anonymous::Read,
        Some(_) => return Err(invalid("AUTH_ANONYMOUS", "must be `off` or `read`")),
    };
    if let Some(secret) = &raw.auth_jwt_secret
        && secret.len() < 32
    {
        return Err(invalid(
            "AUTH_JWT_SECRET",
            "must be at least 32 bytes (HS256 with a short secret can be brute-forced)",
        ));
    }
    if raw.auth_jwt_secret.is_none()
        && raw.auth_jwt_public_key_file.is_none()
        && raw.auth_jwks_url.is_none()
    {
        return Ok(None);
    }
    if let Some(url) = &raw.auth_jwks_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(invalid(
            "AUTH_JWKS_URL",
            "must be an http:// or https:// URL",
        ));
    }
    Ok(Some(AuthConfig {
        secret: raw.auth_jwt_secret.clone().map(Secret::new),
        public_key_file: raw.auth_jwt_public_key_file.clone(),
        jwks_url: raw.auth_jwks_url.clone(),
        issuer: raw.auth_jwt_issuer.clone(),
        audience: raw.auth_jwt_audience.clone(),
        anonymous,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.port, 4444);
        assert!(c.redis_url.is_none());
        assert_eq!(c.default_room.as_str(), "general");
        assert_eq!(c.history_size, 200);
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn errors_name_the_variable() {
        for (vars, name) in [
            (&[("PORT", "http")][..], "PORT"),
            (&[("PORT", "99999")][..], "PORT"),
            (&[("HOST", "localhost")][..], "HOST"),
            (&[("TOKIO_WORKER_THREADS", "0")][..], "TOKIO_WORKER_THREADS"),
            (&[("AUTH_JWT_SECRET", "too short")][..], "AUTH_JWT_SECRET"),
            (&[("AUTH_ANONYMOUS", "write")][..], "AUTH_ANONYMOUS"),
            (&[("AUTH_JWKS_URL", "ftp://keys")][..], "AUTH_JWKS_URL"),
            (&[("TRUSTED_PROXIES", "10.0.0.0/33")][..], "TRUSTED_PROXIES"),
            (
                &[("HTTP_HEADER_TIMEOUT_SECS", "0")][..],
                "HTTP_HEADER_TIMEOUT_SECS",
            ),
            (&[("TOKIO_WORKER_THREADS", "x")][..], "TOKIO_WORKER_THREADS"),
            (&[("HISTORY_SIZE", "0")][..], "HISTORY_SIZE"),
            (&[("DEFAULT_ROOM", "a b")][..], "DEFAULT_ROOM"),
            (&[("LOG_FORMAT", "xml")][..], "LOG_FORMAT"),
            (&[("PING_INTERVAL_SECS", "-1")][..], "PING_INTERVAL_SECS"),
            (&[("MAX_TEXT_BYTES", "100000")][..], "MAX_TEXT_BYTES"),
            (&[("REDIS_PREFIX", "a{b")][..], "REDIS_PREFIX"),
            (&[("REDIS_URL", "localhost:6379")][..], "REDIS_URL"),
            (&[("ALLOWED_ORIGINS", "a b")][..], "ALLOWED_ORIGINS"),
            (&[("SHUTDOWN_DRAIN_SECS", "30")][..], "SHUTDOWN_DRAIN_SECS"),
            (
                &[("MAX_ROOMS_PER_CONNECTION", "0")][..],
                "MAX_ROOMS_PER_CONNECTION",
            ),
            (&[("REDIS_URL", "http://x")][..], "REDIS_URL"),
            (
                &[("WRITE_COALESCE_MODE", "sometimes")][..],
                "WRITE_COALESCE_MODE",
            ),
            (
                &[("WRITE_COALESCE_MODE", "adaptive")][..],
                "WRITE_COALESCE_MODE",
            ),
        ] {
            let err = cfg(vars).unwrap_err().to_string();
            assert!(err.contains(name), "{err:?} should name {name}");
        }
    }

    #[test]
    fn max_connections_defaults_to_what_the_open_file_limit_allows() {
        let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        let max = cfg(&[]).unwrap().max_connections;
        if soft == rlimit::INFINITY {
            assert_eq!(max, 0);
        } else {
            let soft = usize::try_from(soft).unwrap();
            assert!(max > 0 && max < soft, "{max} of {soft}");
        }
        assert_eq!(cfg(&[("MAX_CONNECTIONS", "0")]).unwrap().max_connections, 0);
    }

    #[test]
    fn write_coalescing_is_an_interval_and_a_mode() {
        let c = cfg(&[]).unwrap();
        assert_eq!(
            (c.write_coalesce, c.write_coalesce_adaptive),
            (Duration::ZERO, false)
        );
        let c = cfg(&[("WRITE_COALESCE_MS", "10")]).unwrap();
        assert_eq!(
            (c.write_coalesce, c.write_coalesce_adaptive),
            (Duration::from_millis(10), false)
        );
        let c = cfg(&[
            ("WRITE_COALESCE_MS", "10"),
            ("WRITE_COALESCE_MODE", "adaptive"),
        ])
        .unwrap();
        assert_eq!(
            (c.write_coalesce, c.write_coalesce_adaptive),
            (Duration::from_millis(10), true)
        );
    }

    #[test]
    fn publish_batching_is_bounded_by_the_redis_timeout() {
        assert_eq!(cfg(&[]).unwrap().publish_batch, Duration::from_millis(1));
        let c = cfg(&[("PUBLISH_BATCH_MS", "0")]).unwrap();
        assert_eq!(c.publish_batch, Duration::ZERO);
        let c = cfg(&[("PUBLISH_BATCH_MS", "1000")]).unwrap();
        assert_eq!(c.publish_batch, Duration::from_secs(1));
        for bad in [
            vec![("PUBLISH_BATCH_MS", "1001")],
            vec![("PUBLISH_BATCH_MS", "10001"), ("REDIS_TIMEOUT_MS", "60000")],
            vec![("PUBLISH_BATCH_MS", "18446744073709551615")],
            vec![("PUBLISH_BATCH_MS", "-1")],
        ] {
            assert!(cfg(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn instance_id_falls_back_to_dyno() {
        assert_eq!(cfg(&[("DYNO", "web.3")]).unwrap().instance_id, "web.3");
        assert_eq!(
            cfg(&[("DYNO", "web.3"), ("INSTANCE_ID", "a")])
                .unwrap()
                .instance_id,
            "a"
        );
    }

    #[test]
    fn debug_hides_the_redis_password() {
        let c = cfg(&[("REDIS_URL", "rediss://:s3cret@example.com:6380")]).unwrap();
        let c2 = cfg(&[("API_KEY", "api-key-of-sixteen-chars,second-key-sixteen-c")]).unwrap();
        assert_eq!(c2.api_keys.len(), 2);
        assert!(
            !format!("{c2:?}").contains("sixteen"),
            "API keys must not show"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("example.com:6380"), "{shown}");
    }
}
