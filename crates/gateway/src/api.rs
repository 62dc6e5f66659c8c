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
use chat_protocol::{ErrorCode, MessageTemplate, PresenceUser, RoomName, Username};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use tracing::{debug, warn};
use utoipa::{
    IntoParams, IntoResponses, Modify, OpenApi, ToSchema,
    openapi::{
        RefOr,
        schema::{ObjectBuilder, Schema, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::{AuthError, MAX_SUB_CHARS, Principal},
    bus::{Bus, BusError, Dedupe, Msg, Page},
    config::Secret,
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
/// Who an idempotent post is recorded for: every configured key is the same backend, so a
/// retry made after a key rotation still finds its original (WebSocket sends are recorded
/// under `user:…` or `client:…`, so they never meet these).
const IDEMPOTENCY_SENDER: &str = "api";
/// The largest history a room can retain (`HISTORY_SIZE`'s upper bound).
const MAX_RETAINED: usize = 100_000;
/// The error codes the API answers with.
const ERROR_CODES: [ErrorCode; 7] = [
    ErrorCode::BadRequest,
    ErrorCode::InvalidRoom,
    ErrorCode::InvalidUsername,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::TooLarge,
    ErrorCode::Unavailable,
];

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

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chat-gateway server API",
        description = "Post messages into rooms, page their history, read presence. \
                       Enabled by `API_KEY`; see docs/api.md."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerSchemes),
    tags(
        (name = "rooms", description = "A room's messages, counters and presence"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

/// The two bearer credentials: the API key (`API_KEY`) and a user token (a JWT, when
/// authentication is on).
struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let api_key = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "One of the keys in `API_KEY` (a comma list, for rotation): \
                 `Authorization: Bearer <key>`",
            ))
            .build();
        let user_token = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some(
                "A user's token (as on the WebSocket): reads of the rooms its `rooms` claim \
                 allows. When authentication is off, reads need no credential.",
            ))
            .build();
        components.add_security_scheme("api_key", SecurityScheme::Http(api_key));
        components.add_security_scheme("user_token", SecurityScheme::Http(user_token));
    }
}

// ---------------------------------------------------------------------------------------
// Request and response types

/// The room in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct RoomPath {
    /// The room's name.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    room: String,
}

/// A message to post.
#[derive(Debug, Deserialize, ToSchema)]
struct PostMessage {
    /// The message: 1 to `MAX_TEXT_BYTES` (default 4096) bytes of UTF-8.
    #[schema(min_length = 1)]
    text: String,
    /// The display name (validated and normalised like a WebSocket `username`). Default:
    /// `user` when given, else `api`.
    #[serde(default)]
    username: Option<String>,
    /// The author's user id (1-128 characters), shown as `user` in the message as a
    /// token's `sub` is. Absent: the message has no `user`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    user: Option<String>,
    /// Makes the post safe to retry: a post with a key already used within
    /// `IDEMPOTENCY_WINDOW_SECS` stores nothing and is answered 200 with the original
    /// message. 1-128 characters; one key per message.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    idempotency_key: Option<String>,
}

/// Which `message` frame: always `message`.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // documentation only: stored frames are passed on as they are
enum MessageType {
    Message,
}

/// A stored `message` frame, byte for byte as WebSocket clients receive it.
#[derive(ToSchema)]
#[schema(as = Message)]
#[allow(dead_code)] // documentation only: stored frames are passed on as they are
struct StoredMessage {
    /// Always `message`.
    #[schema(rename = "type")]
    kind: MessageType,
    /// The room.
    room: String,
    /// The per-room id: consecutive from 1.
    id: u64,
    /// The author's display name.
    username: String,
    /// The author's user id, when the author was authenticated (or the post named one);
    /// absent otherwise.
    #[schema(nullable = false)]
    user: Option<String>,
    /// The message.
    text: String,
    /// Milliseconds since the Unix epoch, from the store's clock.
    ts: u64,
}

/// A user in a presence list.
#[derive(ToSchema)]
#[schema(as = PresenceUser)]
#[allow(dead_code)] // documentation only: the protocol's `PresenceUser` is what is sent
struct PresenceUserDoc {
    /// The user id (a token's `sub`, or `anon-…` without authentication).
    user: String,
    /// The display name.
    name: String,
}

/// The page to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Only messages with a smaller id: the first id of the page read before, to page
    /// back. Absent: the newest messages.
    before: Option<u64>,
    /// How many messages at most: 1-200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<usize>,
}

/// A page of a room's retained history.
#[derive(Debug, Serialize, ToSchema)]
struct MessagesPage {
    /// The room.
    room: String,
    /// The room's epoch: it changes when the room's ids start again (its data was lost).
    epoch: Option<String>,
    /// The room's last assigned id (0 when nothing was ever posted).
    last_id: u64,
    /// The messages, oldest first, each the stored frame exactly.
    #[schema(value_type = Vec<StoredMessage>)]
    messages: Vec<Box<RawValue>>,
    /// Older retained messages exist: ask again with `before` = the first id here.
    has_more: bool,
}

/// A room's counters.
#[derive(Debug, Serialize, ToSchema)]
struct RoomInfo {
    /// The room.
    room: String,
    /// The room's last assigned id (0 when nothing was ever posted).
    last_id: u64,
    /// The room's epoch.
    epoch: Option<String>,
    /// How many messages the room retains (at most `HISTORY_SIZE`).
    retained: u64,
}

/// Who is in a room, across instances.
#[derive(Debug, Serialize, ToSchema)]
struct PresenceInfo {
    /// The room.
    room: String,
    /// How many users are in the room (exact).
    count: u64,
    /// At most `PRESENCE_MAX_USERS` of them.
    #[schema(value_type = Vec<PresenceUserDoc>)]
    users: Vec<PresenceUser>,
}

/// A refusal.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorBody {
    /// The error code (the WebSocket protocol's).
    #[schema(schema_with = error_code_schema)]
    error: &'static str,
    /// A sentence for humans.
    message: String,
}

/// What a read can be refused with.
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: `Failure` is what is sent
enum ReadRefusals {
    /// `invalid_room`; `bad_request`: `before` or `limit` unreadable or out of range (messages)
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `unauthorized`: a credential that is neither an API key nor a valid user token, or
    /// none while authentication is on (and `AUTH_ANONYMOUS` is not `read`)
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `forbidden`: the user token does not allow this room
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// `unavailable`: the message bus is down
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

fn error_code_schema() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some("The error code (the WebSocket protocol's)"))
        .enum_values(Some(ERROR_CODES.iter().map(|c| c.as_str())))
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
        .bus
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
// Validation, credentials, bus reads

impl PostMessage {
    /// Reads the body: a JSON object with at least `text` (other fields are ignored).
    fn parse(body: &[u8]) -> Result<Self, Failure> {
        // serde's derive would also read an array as the positional form of the fields.
        if !body.trim_ascii_start().starts_with(b"{") {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "the body must be a JSON object with `text`",
            ));
        }
        serde_json::from_slice(body).map_err(|err| {
            let message = if err.is_syntax() || err.is_eof() {
                format!("not valid JSON: {err}")
            } else {
                format!("malformed body: {err}")
            };
            Failure::new(ErrorCode::BadRequest, message)
        })
    }

    /// The message as the bus renders it, after the checks a WebSocket `send` gets.
    fn template(&self, room: &RoomName, max_text_bytes: usize) -> Result<MessageTemplate, Failure> {
        if self.text.is_empty() {
            return Err(Failure::new(ErrorCode::BadRequest, "`text` is empty"));
        }
        if self.text.len() > max_text_bytes {
            return Err(Failure::new(
                ErrorCode::TooLarge,
                format!(
                    "`text` is {} bytes; the limit is {max_text_bytes}",
                    self.text.len()
                ),
            ));
        }
        if let Some(user) = &self.user
            && !(1..=MAX_SUB_CHARS).contains(&user.chars().count())
        {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("`user` must be 1-{MAX_SUB_CHARS} characters"),
            ));
        }
        let username = match (&self.username, &self.user) {
            (Some(name), _) => Username::new(name).map_err(|err| {
                Failure::new(ErrorCode::InvalidUsername, format!("`username`: {err}"))
            })?,
            (None, Some(user)) => Username::new(user).map_err(|_| {
                Failure::new(
                    ErrorCode::InvalidUsername,
                    "`user` is not a valid display name: give `username` too",
                )
            })?,
            (None, None) => Username::new(DEFAULT_USERNAME)
                .map_err(|err| Failure::new(ErrorCode::InvalidUsername, err.to_string()))?,
        };
        Ok(MessageTemplate::with_user(
            room,
            username.as_str(),
            self.user.as_deref(),
            &self.text,
        ))
    }

    /// The idempotency record of the post, if it names a key.
    fn dedupe(&self, window: std::time::Duration) -> Result<Option<Dedupe>, Failure> {
        let Some(key) = &self.idempotency_key else {
            return Ok(None);
        };
        if !(1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&key.chars().count()) {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("`idempotency_key` must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters"),
            ));
        }
        Ok(Some(Dedupe::new(IDEMPOTENCY_SENDER, key, window)))
    }
}

/// The room named in the path.
fn room(path: Result<Path<RoomPath>, PathRejection>) -> Result<RoomName, Failure> {
    let name = path
        .map(|Path(p)| p.room)
        .map_err(|r| Failure::new(ErrorCode::InvalidRoom, r.body_text()))?;
    RoomName::new(&name).map_err(|err| Failure::new(ErrorCode::InvalidRoom, err.to_string()))
}

/// The bearer credential of a request, if it has an `Authorization` header at all.
fn credential(headers: &HeaderMap) -> Result<Option<&str>, Failure> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed =
        || Failure::unauthorized("the Authorization header must be `Bearer <credential>`");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, credential) = value.split_once(' ').ok_or_else(malformed)?;
    let credential = credential.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || credential.is_empty() {
        return Err(malformed());
    }
    Ok(Some(credential))
}

/// Whether `presented` is one of `keys`. Digests of equal length are compared in constant
/// time, with every key compared whatever the outcome of the others, so the time taken
/// says neither which key matched nor how much of one.
fn is_api_key(keys: &[Secret], presented: &str) -> bool {
    use sha2::{Digest, Sha256};
    let presented = Sha256::digest(presented.as_bytes());
    let found = keys.iter().fold(subtle::Choice::from(0), |found, key| {
        let key = Sha256::digest(key.expose().as_bytes());
        found | key.as_slice().ct_eq(presented.as_slice())
    });
    found.into()
}

/// The room of a read, once the caller may read it: with an API key; with a user token
/// that allows the room (authentication on); with nothing when authentication is off or
/// allows anonymous readers (`AUTH_ANONYMOUS=read`) — a join would show the same. A
/// credential that is presented must be valid either way.
async fn readable_room(
    state: &AppState,
    headers: &HeaderMap,
    path: Result<Path<RoomPath>, PathRejection>,
) -> Result<RoomName, Failure> {
    let principal = match credential(headers)? {
        Some(presented) if is_api_key(&state.config.api_keys, presented) => Principal::Open,
        presented => match (&state.auth, presented) {
            (None, None) => Principal::Open,
            (None, Some(_)) => {
                return Err(Failure::unauthorized(
                    "not a valid API key (authentication is off: reads need no credential)",
                ));
            }
            (Some(auth), presented) => auth.principal(presented).await.map_err(|why| {
                debug!(reason = %why, "server API: refused a read");
                Failure::unauthorized(match why {
                    AuthError::Missing => {
                        "an API key or a user token is required: Authorization: Bearer <credential>"
                            .to_owned()
                    }
                    other => other.to_string(),
                })
            })?,
        },
    };
    let room = room(path)?;
    if principal.may_join(&room) {
        Ok(room)
    } else {
        Err(Failure::new(
            ErrorCode::Forbidden,
            format!("the token does not allow room {room}"),
        ))
    }
}

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

/// A refusal: its status follows from its code; the body is `{"error","message"}`.
#[derive(Debug)]
struct Failure {
    code: ErrorCode,
    message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// A bus failure: the detail is for the log, not for the caller.
    fn unavailable(room: &RoomName, err: &BusError) -> Self {
        warn!(%room, error = %err, "server API: the message bus failed");
        Self::new(
            ErrorCode::Unavailable,
            "the message bus is unavailable, try again",
        )
    }

    fn status(&self) -> StatusCode {
        match self.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::BadRequest
            | ErrorCode::InvalidRoom
            | ErrorCode::InvalidUsername
            | ErrorCode::NotJoined => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(ErrorBody {
            error: self.code.as_str(),
            message: self.message,
        });
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_key_is_accepted_and_nothing_else() {
        let keys = [
            Secret::new("first-key-of-16-chars"),
            Secret::new("second-key-of-16-chars"),
        ];
        assert!(is_api_key(&keys, "first-key-of-16-chars"));
        assert!(is_api_key(&keys, "second-key-of-16-chars"));
        for wrong in ["", "first-key-of-16-char", "first-key-of-16-charsX", "x"] {
            assert!(!is_api_key(&keys, wrong), "{wrong:?}");
        }
        assert!(!is_api_key(&[], "first-key-of-16-chars"));
    }

    #[test]
    fn the_credential_is_a_bearer() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            h
        };
        assert_eq!(credential(&HeaderMap::new()).unwrap(), None);
        assert_eq!(credential(&with("Bearer abc")).unwrap(), Some("abc"));
        assert_eq!(credential(&with("bearer  abc ")).unwrap(), Some("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert!(credential(&with(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_post_is_checked_like_a_send() {
        let room = RoomName::new("r").unwrap();
        let parse = |body: &str| PostMessage::parse(body.as_bytes());
        let code = |r: Result<MessageTemplate, Failure>| r.err().map(|f| f.code);
        assert_eq!(
            parse("[\"x\"]").err().map(|f| f.code),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            parse("{}").err().map(|f| f.code),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            parse("{\"text\":1}").err().map(|f| f.code),
            Some(ErrorCode::BadRequest)
        );
        let post = parse(r#"{"text":""}"#).unwrap();
        assert_eq!(code(post.template(&room, 4)), Some(ErrorCode::BadRequest));
        let post = parse(r#"{"text":"hello"}"#).unwrap();
        assert_eq!(code(post.template(&room, 4)), Some(ErrorCode::TooLarge));
        let post = parse(r#"{"text":"hi","username":"a\u0007"}"#).unwrap();
        assert_eq!(
            code(post.template(&room, 4)),
            Some(ErrorCode::InvalidUsername)
        );
        let post = parse(r#"{"text":"hi","user":""}"#).unwrap();
        assert_eq!(code(post.template(&room, 4)), Some(ErrorCode::BadRequest));
        // The name defaults to the user, then to `api`.
        let post = parse(r#"{"text":"hi","user":"u-1","extra":true}"#).unwrap();
        let t = post.template(&room, 4).unwrap();
        assert_eq!(
            t.render(1, 2),
            r#"{"type":"message","room":"r","id":1,"username":"u-1","user":"u-1","text":"hi","ts":2}"#
        );
        let t = parse(r#"{"text":"hi"}"#)
            .unwrap()
            .template(&room, 4)
            .unwrap();
        assert_eq!(
            t.render(1, 2),
            r#"{"type":"message","room":"r","id":1,"username":"api","text":"hi","ts":2}"#
        );
        let window = std::time::Duration::from_secs(1);
        let post = parse(r#"{"text":"hi","idempotency_key":""}"#).unwrap();
        assert!(post.dedupe(window).is_err());
        let post = parse(r#"{"text":"hi","idempotency_key":"k"}"#).unwrap();
        assert_eq!(
            post.dedupe(window).ok().flatten(),
            Some(Dedupe::new("api", "k", window))
        );
    }
}
