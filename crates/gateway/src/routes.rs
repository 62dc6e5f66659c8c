//! The HTTP routes: the two WebSocket endpoints (admission, then the upgrade into a
//! session), the health checks, the server API (`api.rs`), and the web client's files.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Extension, Json, Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;
use tracing::{debug, warn};

use crate::{
    admission::{Refusal, client_ip},
    api,
    auth::Principal,
    bus::Bus,
    metrics::{Refused, Scraped},
    session::{self, ConnectParams, Endpoint},
    state::AppState,
    transport::Upgrade,
    web,
};

/// The HTTP routes. `/metrics` is among them unless `METRICS_PORT` moves it to
/// [`metrics_router`].
pub fn router(state: Arc<AppState>) -> Router {
    let mut routes = Router::new()
        .route("/ws", get(websocket).layer(Extension(Endpoint::Ws)))
        .route(
            "/websocket",
            get(websocket).layer(Extension(Endpoint::Legacy)),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if state.config.metrics_port.is_none() {
        routes = routes.route("/metrics", get(metrics));
    }
    routes
        .merge(api::router(&state))
        .fallback_service(web::files(state.clone()))
        .with_state(state)
}

/// `/metrics` alone, for `METRICS_PORT`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Admits a WebSocket (not shutting down, an allowed origin, under `MAX_CONNECTIONS`)
/// and hands it to a session once upgraded.
async fn websocket(
    Extension(at): Extension<Endpoint>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    upgrade: Upgrade,
    Query(params): Query<ConnectParams>,
    headers: HeaderMap,
    State(state): State<Arc<AppState>>,
) -> Response {
    if state.shutdown.is_cancelled() {
        state.metrics.refused(Refused::Shutdown);
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if !state.config.allowed_origins.allows(&headers) {
        state.metrics.refused(Refused::Origin);
        warn!(origin = ?headers.get(header::ORIGIN), "refused a WebSocket from another origin");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let principal = match &state.auth {
        None => Principal::Open,
        Some(auth) => match auth.principal(bearer(&headers, &params)).await {
            Ok(principal) => principal,
            Err(why) => {
                state.metrics.refused(Refused::Auth);
                debug!(reason = %why, "refused a WebSocket without a valid token");
                let body = Json(json!({"error": "unauthorized", "message": why.to_string()}));
                return (StatusCode::UNAUTHORIZED, body).into_response();
            }
        },
    };
    let ip = client_ip(peer.ip(), &headers, &state.config.trusted_proxies);
    let slot = match state.connections.admit(ip) {
        Ok(slot) => slot,
        Err(refusal) => {
            state.metrics.refused(Refused::Limit);
            return refused_over_limit(refusal);
        }
    };
    let task = state.tracker.token();
    upgrade.on_upgrade(move |socket| async move {
        let _task = task;
        let _slot = slot;
        session::run(socket, state, params, at, principal).await;
    })
}

fn refused_over_limit(refusal: Refusal) -> Response {
    match refusal {
        Refusal::Instance => {
            (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response()
        }
        Refusal::Address => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from your address",
        )
            .into_response(),
    }
}

/// The token of a connect request: `Authorization: Bearer …`, else the `token` query
/// parameter (browsers cannot set headers on a WebSocket).
fn bearer<'a>(headers: &'a HeaderMap, params: &'a ConnectParams) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .or_else(|| params.token.as_ref().map(|t| t.expose()))
        .filter(|t| !t.is_empty())
}

/// Prometheus text exposition (version 0.0.4) of this instance's series.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(Scraped {
        rooms_served: state.hub.room_count(),
        room_subscriptions: state.bus.room_subscriptions(),
        bus_ready: state.bus.is_ready(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if state.bus.is_ready() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "message bus not connected").into_response()
    }
}
