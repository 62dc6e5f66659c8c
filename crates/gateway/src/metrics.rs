//! What an operator graphs and alerts on: the Prometheus series of one instance
//! (`GET /metrics`, or on `METRICS_PORT` only), every one listed in `docs/operations.md`.
//!
//! The exposition is `metrics-exporter-prometheus`'s, but its recorder is not installed
//! globally: each instance (tests run several in one process) owns one, and the series are
//! registered once, here, as handles. Counting is then an atomic add on a handle — no
//! name lookup, no lock — and the hot path counts per message and per batch, never per
//! recipient: a message given to N members adds N once, bytes are added once per batch
//! of writes. Values that already exist elsewhere (rooms served, subscriptions, whether
//! Redis is up) are read when scraped instead of being kept up to date.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chat_protocol::{ErrorCode, close};
pub use metrics::Counter;
use metrics::{Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Upper bounds (seconds) of `chat_publish_duration_seconds`: a Redis round trip, from
/// sub-millisecond on a LAN to the command timeout.
const PUBLISH_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds (seconds) of `chat_delivery_lag_seconds`: from a message's `ts` (Redis'
/// clock) to its write here; includes the clocks' difference between hosts.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often recorded latencies are folded into their buckets when nobody scrapes (the
/// exporter keeps raw samples until then).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Why a WebSocket was refused before its upgrade (`chat_connections_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `Origin` not in `ALLOWED_ORIGINS`.
    Origin,
    /// `MAX_CONNECTIONS` or `MAX_CONNECTIONS_PER_IP`.
    Limit,
    /// No valid token.
    Auth,
    /// The instance is shutting down.
    Shutdown,
}

impl Refused {
    const ALL: [Refused; 4] = [
        Refused::Origin,
        Refused::Limit,
        Refused::Auth,
        Refused::Shutdown,
    ];

    fn label(self) -> &'static str {
        match self {
            Refused::Origin => "origin",
            Refused::Limit => "limit",
            Refused::Auth => "auth",
            Refused::Shutdown => "shutdown",
        }
    }
}

/// Every protocol error code (`chat_errors_total`).
const ERROR_CODES: [ErrorCode; 9] = [
    ErrorCode::BadRequest,
    ErrorCode::TooLarge,
    ErrorCode::InvalidRoom,
    ErrorCode::InvalidUsername,
    ErrorCode::NotJoined,
    ErrorCode::RateLimited,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::Unavailable,
];

/// Close codes counted by name in `chat_connections_closed_total`: the ones this server
/// sends, and the usual ones of clients. A peer's other codes count as `other`, so a
/// client cannot make the instance hold one series per code it invents.
const CLOSE_CODES: [u16; 11] = [
    1000,
    1001,
    close::PROTOCOL_ERROR,
    1003,
    close::INVALID_DATA,
    close::POLICY,
    close::TOO_BIG,
    1011,
    close::RESTART,
    close::TRY_AGAIN,
    close::TOKEN_EXPIRED,
];

/// The instance's series.
#[derive(Debug)]
pub struct Metrics {
    handle: PrometheusHandle,
    connections_ws: Gauge,
    connections_websocket: Gauge,
    /// `chat_connections_opened_total`.
    pub opened: Counter,
    refused: [Counter; 4],
    closed: [Counter; CLOSE_CODES.len()],
    closed_other: Counter,
    closed_none: Counter,
    rooms_served: Gauge,
    room_subscriptions: Gauge,
    /// `chat_messages_received_total`: sends accepted from clients and the API.
    pub received: Counter,
    /// `chat_messages_published_total`: sends stored and published (not repeats).
    pub published: Counter,
    /// `chat_messages_delivered_total`: message frames queued for clients' sockets.
    pub delivered: Counter,
    /// `chat_bytes_sent_total`: bytes written to clients' sockets.
    pub bytes_sent: Counter,
    /// `chat_publish_duration_seconds`.
    pub publish_duration: Histogram,
    delivery_lag: Histogram,
    errors: [Counter; ERROR_CODES.len()],
    redis_up: Gauge,
    /// `chat_redis_reconnects_total`: the subscriber connection came back after a break.
    pub redis_reconnects: Counter,
    /// `chat_gaps_detected_total`: live messages that arrived after a hole.
    pub gaps_detected: Counter,
    /// `chat_backfilled_messages_total`: messages a repair delivered from history.
    pub backfilled: Counter,
    /// `chat_epoch_resets_total`: a room's ids restarted under its members.
    pub epoch_resets: Counter,
}

/// What the registrations say about themselves (the exporter ignores it).
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

impl Metrics {
    /// Registers every series (at 0). The server then starts [`Metrics::keep_up`].
    pub fn new(version: &str) -> Result<Arc<Self>, BuildError> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("chat_publish_duration_seconds".into()),
                PUBLISH_BUCKETS,
            )?
            .set_buckets_for_metric(
                Matcher::Full("chat_delivery_lag_seconds".into()),
                LAG_BUCKETS,
            )?
            .build_recorder();
        let r = &recorder;
        let counter = |name: &'static str, help: &'static str| {
            r.describe_counter(KeyName::from_const_str(name), None, help.into());
            r.register_counter(&Key::from_static_name(name), &METADATA)
        };
        let gauge = |name: &'static str, help: &'static str| {
            r.describe_gauge(KeyName::from_const_str(name), None, help.into());
            r.register_gauge(&Key::from_static_name(name), &METADATA)
        };
        let labelled = |name: &'static str, label: &'static str, value: String| {
            Key::from_parts(name, vec![Label::new(label, value)])
        };

        r.describe_gauge(
            KeyName::from_const_str("chat_connections"),
            None,
            "Open WebSocket connections, by endpoint".into(),
        );
        let connections_ws = r.register_gauge(
            &labelled("chat_connections", "endpoint", "ws".into()),
            &METADATA,
        );
        let connections_websocket = r.register_gauge(
            &labelled("chat_connections", "endpoint", "websocket".into()),
            &METADATA,
        );
        let opened = counter(
            "chat_connections_opened_total",
            "WebSocket connections accepted (upgraded)",
        );
        r.describe_counter(
            KeyName::from_const_str("chat_connections_refused_total"),
            None,
            "WebSocket upgrades refused, by reason".into(),
        );
        let refused = Refused::ALL.map(|why| {
            r.register_counter(
                &labelled(
                    "chat_connections_refused_total",
                    "reason",
                    why.label().into(),
                ),
                &METADATA,
            )
        });
        r.describe_counter(
            KeyName::from_const_str("chat_connections_closed_total"),
            None,
            "WebSocket connections closed, by close code (none: the peer dropped)".into(),
        );
        let closed_key = |code: String| labelled("chat_connections_closed_total", "code", code);
        let closed =
            CLOSE_CODES.map(|code| r.register_counter(&closed_key(code.to_string()), &METADATA));
        let closed_other = r.register_counter(&closed_key("other".into()), &METADATA);
        let closed_none = r.register_counter(&closed_key("none".into()), &METADATA);
        let rooms_served = gauge("chat_rooms_served", "Rooms with members on this instance");
        let room_subscriptions = gauge(
            "chat_room_subscriptions",
            "Room channels this instance is subscribed to",
        );
        let received = counter(
            "chat_messages_received_total",
            "Sends accepted from clients and the server API",
        );
        let published = counter(
            "chat_messages_published_total",
            "Messages stored and published (a repeated idempotent send is not)",
        );
        let delivered = counter(
            "chat_messages_delivered_total",
            "Message frames given to clients (live, replayed and repaired)",
        );
        let bytes_sent = counter(
            "chat_bytes_sent_total",
            "Bytes written to WebSocket clients",
        );
        let seconds = |name: &'static str, help: &'static str| {
            r.describe_histogram(
                KeyName::from_const_str(name),
                Some(Unit::Seconds),
                help.into(),
            );
            r.register_histogram(&Key::from_static_name(name), &METADATA)
        };
        let publish_duration = seconds(
            "chat_publish_duration_seconds",
            "Round trip of a publish to the message bus",
        );
        let delivery_lag = seconds(
            "chat_delivery_lag_seconds",
            "From a message's ts to its delivery to this instance's members",
        );
        r.describe_counter(
            KeyName::from_const_str("chat_errors_total"),
            None,
            "Error frames sent to clients, by protocol code".into(),
        );
        let errors = ERROR_CODES.map(|code| {
            r.register_counter(
                &labelled("chat_errors_total", "code", code.as_str().into()),
                &METADATA,
            )
        });
        let redis_up = gauge(
            "chat_redis_up",
            "1 when the message bus is connected and subscribed (the in-process bus: always)",
        );
        let redis_reconnects = counter(
            "chat_redis_reconnects_total",
            "Times the Redis subscriber connection came back after a break",
        );
        let gaps_detected = counter(
            "chat_gaps_detected_total",
            "Holes noticed in a room's live ids (each starts a repair from history)",
        );
        let backfilled = counter(
            "chat_backfilled_messages_total",
            "Messages repairs delivered from history",
        );
        let epoch_resets = counter(
            "chat_epoch_resets_total",
            "Rooms whose ids restarted (new epoch) under their members",
        );
        r.describe_gauge(
            KeyName::from_const_str("chat_build_info"),
            None,
            "1, labelled with the running version".into(),
        );
        r.register_gauge(
            &labelled("chat_build_info", "version", version.to_owned()),
            &METADATA,
        )
        .set(1.0);

        Ok(Arc::new(Metrics {
            handle: recorder.handle(),
            connections_ws,
            connections_websocket,
            opened,
            refused,
            closed,
            closed_other,
            closed_none,
            rooms_served,
            room_subscriptions,
            received,
            published,
            delivered,
            bytes_sent,
            publish_duration,
            delivery_lag,
            errors,
            redis_up,
            redis_reconnects,
            gaps_detected,
            backfilled,
            epoch_resets,
        }))
    }

    /// Starts the task that folds recorded latencies into their buckets every few
    /// seconds, so that they take no memory when nobody scrapes. Must run inside a tokio
    /// runtime.
    pub fn keep_up(self: &Arc<Self>) {
        let upkeep = self.handle.clone();
        // Lives as long as the process; it only folds samples into buckets.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
    }

    /// The exposition, with the values read at scrape time set first.
    pub fn render(&self, now: Scraped) -> String {
        self.rooms_served.set(now.rooms_served as f64);
        self.room_subscriptions.set(now.room_subscriptions as f64);
        self.redis_up.set(if now.bus_ready { 1.0 } else { 0.0 });
        self.handle.render()
    }

    /// The open-connections gauge of an endpoint (`legacy`: `/websocket`).
    pub fn connections(&self, legacy: bool) -> &Gauge {
        if legacy {
            &self.connections_websocket
        } else {
            &self.connections_ws
        }
    }

    /// Counts a refused upgrade.
    pub fn refused(&self, why: Refused) {
        if let Some(i) = Refused::ALL.iter().position(|r| *r == why) {
            self.refused[i].increment(1);
        }
    }

    /// Counts a closed connection: by its close code, `None` when no close frame was
    /// exchanged (the peer dropped).
    pub fn closed(&self, code: Option<u16>) {
        match code {
            None => self.closed_none.increment(1),
            Some(code) => match CLOSE_CODES.iter().position(|c| *c == code) {
                Some(i) => self.closed[i].increment(1),
                None => self.closed_other.increment(1),
            },
        }
    }

    /// Counts an error frame sent.
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.errors[i].increment(1);
        }
    }

    /// Records how late a message with timestamp `ts` (ms since the Unix epoch, Redis'
    /// clock) is delivered now; a timestamp ahead of this host's clock counts as 0.
    pub fn delivery_lag(&self, ts: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.delivery_lag
            .record(now.saturating_sub(ts) as f64 / 1000.0);
    }
}

/// The values `/metrics` reads at scrape time.
#[derive(Clone, Copy, Debug)]
pub struct Scraped {
    /// Rooms with local members.
    pub rooms_served: usize,
    /// Room channels subscribed.
    pub room_subscriptions: usize,
    /// Whether the bus is connected and subscribed.
    pub bus_ready: bool,
}
