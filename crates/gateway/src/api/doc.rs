//! The API's wire types and their OpenAPI description: the document's header and bearer
//! schemes (`ApiDoc`), the path and query parameters, the bodies read and written, the
//! refusals, and the checks a posted body gets before it becomes a `MessageTemplate`
//! (those a WebSocket `send` gets). It does not route, authenticate or touch the bus
//! (`mod.rs`, `access`); a stored message is documented here but passed on as stored.

use chat_protocol::{ErrorCode, MessageTemplate, PresenceUser, RoomName, Username};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{
    IntoParams, IntoResponses, Modify, OpenApi, ToSchema,
    openapi::{
        RefOr,
        schema::{ObjectBuilder, Schema, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use super::{DEFAULT_USERNAME, MAX_IDEMPOTENCY_KEY_CHARS, error::Failure};
use crate::{auth::MAX_SUB_CHARS, bus::Dedupe};

/// Who an idempotent post is recorded for: every configured key is the same backend, so a
/// retry made after a key rotation still finds its original (WebSocket sends are recorded
/// under `user:…` or `client:…`, so they never meet these).
const IDEMPOTENCY_SENDER: &str = "api";
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
pub(super) struct ApiDoc;

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
pub(super) struct RoomPath {
    /// The room's name.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub(super) room: String,
}

/// A message to post.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct PostMessage {
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
pub(super) struct StoredMessage {
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
pub(super) struct PageQuery {
    /// Only messages with a smaller id: the first id of the page read before, to page
    /// back. Absent: the newest messages.
    pub(super) before: Option<u64>,
    /// How many messages at most: 1-200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub(super) limit: Option<usize>,
}

/// A page of a room's retained history.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MessagesPage {
    /// The room.
    pub(super) room: String,
    /// The room's epoch: it changes when the room's ids start again (its data was lost).
    pub(super) epoch: Option<String>,
    /// The room's last assigned id (0 when nothing was ever posted).
    pub(super) last_id: u64,
    /// The messages, oldest first, each the stored frame exactly.
    #[schema(value_type = Vec<StoredMessage>)]
    pub(super) messages: Vec<Box<RawValue>>,
    /// Older retained messages exist: ask again with `before` = the first id here.
    pub(super) has_more: bool,
}

/// A room's counters.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RoomInfo {
    /// The room.
    pub(super) room: String,
    /// The room's last assigned id (0 when nothing was ever posted).
    pub(super) last_id: u64,
    /// The room's epoch.
    pub(super) epoch: Option<String>,
    /// How many messages the room retains (at most `HISTORY_SIZE`).
    pub(super) retained: u64,
}

/// Who is in a room, across instances.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PresenceInfo {
    /// The room.
    pub(super) room: String,
    /// How many users are in the room (exact).
    pub(super) count: u64,
    /// At most `PRESENCE_MAX_USERS` of them.
    #[schema(value_type = Vec<PresenceUserDoc>)]
    pub(super) users: Vec<PresenceUser>,
}

/// A refusal.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorBody {
    /// The error code (the WebSocket protocol's).
    #[schema(schema_with = error_code_schema)]
    pub(super) error: &'static str,
    /// A sentence for humans.
    pub(super) message: String,
}

/// What a read can be refused with.
#[derive(IntoResponses)]
#[allow(dead_code)] // documentation only: `Failure` is what is sent
pub(super) enum ReadRefusals {
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
// Checks of a posted body

impl PostMessage {
    /// Reads the body: a JSON object with at least `text` (other fields are ignored).
    pub(super) fn parse(body: &[u8]) -> Result<Self, Failure> {
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
    pub(super) fn template(
        &self,
        room: &RoomName,
        max_text_bytes: usize,
    ) -> Result<MessageTemplate, Failure> {
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
    pub(super) fn dedupe(&self, window: std::time::Duration) -> Result<Option<Dedupe>, Failure> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
