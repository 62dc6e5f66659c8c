//! The server API for backends (`/api/*`, docs/api.md): post a message into a room the
//! way a WebSocket `send` does (the same atomic `Bus::publish`, so it gets the room's next
//! id and reaches every instance; idempotent with `idempotency_key`), page back through a
//! room's history, read who is in a room and a room's counters, and the OpenAPI 3.1
//! document of all of it, generated from these handlers and types (utoipa).
//!
//! It is enabled by `API_KEY`; without it every `/api/*` path answers 404. Writes need an
//! API key; reads take an API key, a user token that allows the room, or nothing when
//! authentication is off (a join shows the same history). Refusals are
//! `{"error","message"}` with the WebSocket error codes; a bus failure is `unavailable`
//! without its detail (logged). Keys and tokens are never logged. It does not deliver
//! anything itself (the bus and the hub do) nor verify tokens (`auth`).

/// Who may call: bearer credentials, API keys, readable rooms.
mod access;
/// The wire types, their OpenAPI description and the checks of a posted body.
mod doc;
/// `Failure`: a refusal and its response.
mod error;

use std::sync::{Arc, OnceLock};

use axum::{
    Json, Router,
    extract::{
        DefaultBodyLimit, Path, Query, State,
        rejection::{BytesRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use bytes::Bytes;
use chat_protocol::{ErrorCode, RoomName};
use serde_json::value::RawValue;
use tracing::warn;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use self::{
    access::{credential, is_api_key, readable_room, room},
    doc::{
        ApiDoc, ErrorBody, MessagesPage, PageQuery, PostMessage, PresenceInfo, ReadRefusals,
        RoomInfo, RoomPath, StoredMessage,
    },
    error::Failure,
};
use crate::{
    bus::{Bus, BusError, Msg, Page},
    state::AppState,
};

/// The display name of a posted message that names neither `username` nor `user`.
pub const DEFAULT_USERNAME: &str = "api";
/// Longest `idempotency_key`, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;
/// Messages per page when `limit` is not given.
pub const DEFAULT_PAGE_LIMIT: usize = 50;
/// Largest `limit` of a page.
pub const MAX_PAGE_LIMIT: usize = 200;
/// The largest history a room can retain (`HISTORY_SIZE`'s upper bound).
const MAX_RETAINED: usize = 100_000;

/// The `/api` routes: the API when `API_KEY` is set, else 404 for every `/api/*` path.
/// Request bodies are bounded by `MAX_FRAME_BYTES`.
pub fn router(state: &AppState) -> Router<Arc<AppState>> {
    let fenced = |router: Router<Arc<AppState>>| {
        router
            .route("/api", any(not_found))
            .route("/api/{*rest}", any(not_found))
    };
    if state.config.api_keys.is_empty() {
        return fenced(Router::new());
    }
    let (api, _) = documented().split_for_parts();
    fenced(api).layer(DefaultBodyLimit::max(state.config.max_frame_bytes))
}

/// The OpenAPI document of the API, as `GET /api/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// Every endpoint with its documentation: the router and the document cannot disagree.
fn documented() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(post_message, get_messages))
        .routes(routes!(get_room))
        .routes(routes!(get_presence))
        .routes(routes!(openapi_json))
}

// ---------------------------------------------------------------------------------------
// Handlers

/// Posts a message into a room.
///
/// As a WebSocket `send` does, the message gets the room's next id, is stored in history
/// and reaches every client of the room on every instance, atomically.
#[utoipa::path(
    post,
    path = "/api/rooms/{room}/messages",
    tag = "rooms",
    params(RoomPath),
    request_body(content = PostMessage, content_type = "application/json"),
    responses(
        (status = 201, description = "Stored and published: the message as clients receive it", body = StoredMessage),
        (status = 200, description = "A repeated `idempotency_key`: nothing stored now; the original message", body = StoredMessage),
        (status = 400, description = "`bad_request` (not JSON, a missing or mistyped field, empty `text`, a bad `user` or `idempotency_key`), `invalid_room`, `invalid_username`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no API key, or a wrong one", body = ErrorBody),
        (status = 413, description = "`too_large`: `text` over `MAX_TEXT_BYTES`, or the body over `MAX_FRAME_BYTES`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the message bus is down; nothing was stored (retry, with the same `idempotency_key`)", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
async fn post_message(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<RoomPath>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let Some(presented) = credential(&headers)? else {
        return Err(Failure::unauthorized(
            "an API key is required: Authorization: Bearer <key>",
        ));
    };
    if !is_api_key(&state.config.api_keys, presented) {
        return Err(Failure::unauthorized("not a valid API key"));
    }
    let room = room(path)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Failure::new(
                ErrorCode::TooLarge,
                format!(
                    "the body is over MAX_FRAME_BYTES ({} bytes)",
                    state.config.max_frame_bytes
                ),
            )
        } else {
            Failure::new(ErrorCode::BadRequest, rejection.body_text())
        }
    })?;
    let post = PostMessage::parse(&body)?;
    let template = post.template(&room, state.config.max_text_bytes)?;
    let dedupe = post.dedupe(state.config.idempotency_window)?;
    let published = state
        .publish(&room, &template, dedupe.as_ref())
        .await
        .map_err(|err| Failure::unavailable(&room, &err))?;
    let status = if published.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, json_type(), published.msg.json).into_response())
}

/// Reads a page of a room's retained history.
///
/// Messages come oldest first, each exactly as stored; page back with `before`.
#[utoipa::path(
    get,
    path = "/api/rooms/{room}/messages",
    tag = "rooms",
    params(RoomPath, PageQuery),
    responses((status = 200, description = "The page", body = MessagesPage), ReadRefusals),
    security(("api_key" = []), ("user_token" = []), ()),
)]
async fn get_messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<RoomPath>, PathRejection>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<MessagesPage>, Failure> {
    let room = readable_room(&state, &headers, path).await?;
    let Query(query) = query.map_err(|r| Failure::new(ErrorCode::BadRequest, r.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            format!("`limit` must be 1-{MAX_PAGE_LIMIT}"),
        ));
    }
    let page = state
        .bus
        .page(&room, query.before, limit)
        .await
        .map_err(|err| Failure::unavailable(&room, &err))?;
    let messages = page
        .messages
        .iter()
        .map(|msg| stored(&room, msg))
        .collect::<Result<_, _>>()?;
    Ok(Json(MessagesPage {
        room: room.to_string(),
        epoch: page.epoch.map(|e| e.to_string()),
        last_id: page.top,
        messages,
        has_more: page.has_more,
    }))
}

/// Reads a room's counters: its last id, epoch and how many messages it retains.
#[utoipa::path(
    get,
    path = "/api/rooms/{room}",
    tag = "rooms",
    params(RoomPath),
    responses((status = 200, description = "The room", body = RoomInfo), ReadRefusals),
    security(("api_key" = []), ("user_token" = []), ()),
)]
async fn get_room(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<RoomPath>, PathRejection>,
) -> Result<Json<RoomInfo>, Failure> {
    let room = readable_room(&state, &headers, path).await?;
    let (page, retained) = retained(&state, &room)
        .await
        .map_err(|err| Failure::unavailable(&room, &err))?;
    Ok(Json(RoomInfo {
        room: room.to_string(),
        last_id: page.top,
        epoch: page.epoch.map(|e| e.to_string()),
        retained,
    }))
}

/// Reads who is in a room, across instances.
#[utoipa::path(
    get,
    path = "/api/rooms/{room}/presence",
    tag = "rooms",
    params(RoomPath),
    responses((status = 200, description = "Who is there", body = PresenceInfo), ReadRefusals),
    security(("api_key" = []), ("user_token" = []), ()),
)]
async fn get_presence(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<RoomPath>, PathRejection>,
) -> Result<Json<PresenceInfo>, Failure> {
    let room = readable_room(&state, &headers, path).await?;
    let snapshot = state
        .bus
        .presence(&room, state.config.presence_max_users)
        .await
        .map_err(|err| Failure::unavailable(&room, &err))?;
    Ok(Json(PresenceInfo {
        room: room.to_string(),
        count: snapshot.count,
        users: snapshot.users,
    }))
}

/// This document (OpenAPI 3.1).
///
/// Served without a credential whenever the API is enabled.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object),
    ),
)]
async fn openapi_json() -> Response {
    static DOCUMENT: OnceLock<Bytes> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        // Serialising a document of strings and maps cannot fail.
        Bytes::from(openapi().to_pretty_json().unwrap_or_default())
    });
    (json_type(), document.clone()).into_response()
}

/// Any other `/api` path, and every one when the API is off.
async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

// ---------------------------------------------------------------------------------------
// Bus reads and the JSON content type

/// A stored frame as the JSON object it is (its bytes, unchanged).
fn stored(room: &RoomName, msg: &Msg) -> Result<Box<RawValue>, Failure> {
    serde_json::from_slice(&msg.json).map_err(|_| {
        warn!(%room, id = msg.id, "server API: a stored message is not JSON");
        Failure::new(
            ErrorCode::Unavailable,
            "the message bus is unavailable, try again",
        )
    })
}

/// How many messages `room` retains, with a page whose `top` and `epoch` go with the
/// count. Both buses retain a run of consecutive ids ending at the room's last one, so a
/// page that holds the oldest retained message (`has_more` false) gives the count as
/// `top - oldest + 1`. Two one-message reads: the newest (for the room's last id), then
/// the one `HISTORY_SIZE` back. When that guess misses (`HISTORY_SIZE` changed since the
/// history was written, or a publish trimmed it in between), the whole retained history
/// is read once instead.
async fn retained(state: &AppState, room: &RoomName) -> Result<(Page, u64), BusError> {
    let newest = state.bus.page(room, None, 1).await?;
    if newest.messages.is_empty() {
        return Ok((newest, 0));
    }
    let expected = newest.top.min(state.config.history_size as u64);
    let probe = state
        .bus
        .page(room, Some(newest.top - expected + 2), 1)
        .await?;
    if let Some(oldest) = probe.messages.first()
        && !probe.has_more
    {
        let count = (probe.top + 1).saturating_sub(oldest.id);
        return Ok((probe, count));
    }
    let all = state.bus.page(room, None, MAX_RETAINED).await?;
    let count = all.messages.len() as u64;
    Ok((all, count))
}

fn json_type() -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )]
}
