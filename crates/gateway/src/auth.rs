//! Who a connection is, and what it may do: verifying signed tokens (JWT, with the
//! `jsonwebtoken` crate), the rooms a token allows, and the anonymous policy.
//!
//! Keys come from `AUTH_JWT_SECRET` (HS256), `AUTH_JWT_PUBLIC_KEY_FILE` (RS256, ES256 or
//! EdDSA, by the key's type) and `AUTH_JWKS_URL` (each key by its `kid`, fetched at start
//! and again, at most every [`JWKS_REFRESH`], when a token names a `kid` not seen yet).
//! Every key is tried only with its own algorithm, so `alg: none` and algorithm confusion
//! (an HS256 token checked with a public key as the secret) cannot pass.
//!
//! This module never logs or returns a token: errors say which check failed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chat_protocol::{RoomName, Username};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
};
use serde::Deserialize;
use tracing::warn;

use crate::{
    config::{Anonymous, AuthConfig},
    sync::lock,
};

/// Clock leeway for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// At most one JWKS fetch per this interval (an unknown `kid` is otherwise free to send).
pub const JWKS_REFRESH: Duration = Duration::from_secs(10);

/// Longest `sub`, in characters.
pub const MAX_SUB_CHARS: usize = 128;

/// Why a token was refused (the 401's `message`, the `unauthorized` error's text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is required.
    #[error(
        "a token is required (the `token` query parameter or an `Authorization: Bearer` header)"
    )]
    Missing,
    /// Not a JWT.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// No configured key for its algorithm or `kid`.
    #[error("no key to verify this token (algorithm or kid unknown)")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is not `AUTH_JWT_ISSUER`.
    #[error("the token's issuer (iss) is not accepted")]
    WrongIssuer,
    /// `aud` is not `AUTH_JWT_AUDIENCE`.
    #[error("the token's audience (aud) is not accepted")]
    WrongAudience,
    /// A claim is missing or invalid.
    #[error("the token's `{0}` claim is missing or invalid")]
    Claim(&'static str),
}

/// A key that cannot be used, found at start-up (the binary exits with code 2).
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct KeyError {
    var: &'static str,
    reason: String,
}

/// What a verified token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `sub`: the user id.
    pub user: String,
    /// `name`, or `sub` when absent: the display name.
    pub name: Username,
    /// `rooms`: where the user may go.
    pub rooms: RoomAccess,
    /// `exp`, Unix seconds.
    pub exp: u64,
}

/// The rooms a token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoomAccess {
    /// No `rooms` claim: every room.
    All,
    /// Exact names and `prefix*` patterns.
    Only(Vec<RoomPattern>),
}

/// One entry of a `rooms` claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoomPattern {
    /// `lobby`
    Exact(String),
    /// `team-*`: any room starting with `team-`.
    Prefix(String),
}

impl RoomAccess {
    /// Whether `room` is allowed.
    pub fn allows(&self, room: &RoomName) -> bool {
        match self {
            RoomAccess::All => true,
            RoomAccess::Only(patterns) => patterns.iter().any(|p| match p {
                RoomPattern::Exact(name) => name == room.as_str(),
                RoomPattern::Prefix(prefix) => room.as_str().starts_with(prefix.as_str()),
            }),
        }
    }

    fn parse(claim: Option<Vec<String>>) -> Result<Self, AuthError> {
        let Some(entries) = claim else {
            return Ok(RoomAccess::All);
        };
        entries
            .into_iter()
            .map(|entry| {
                let (name, prefix) = match entry.strip_suffix('*') {
                    Some(p) => (p, true),
                    None => (entry.as_str(), false),
                };
                // A prefix may be empty (`*`: every room); a name must be a room name.
                let valid = (prefix && name.is_empty()) || RoomName::new(name).is_ok();
                match (valid, prefix) {
                    (false, _) => Err(AuthError::Claim("rooms")),
                    (true, true) => Ok(RoomPattern::Prefix(name.to_owned())),
                    (true, false) => Ok(RoomPattern::Exact(name.to_owned())),
                }
            })
            .collect::<Result<_, _>>()
            .map(RoomAccess::Only)
    }
}

/// Who is on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Authentication is off: anyone may do anything, under any name.
    Open,
    /// Authentication is on and the client has no token (`AUTH_ANONYMOUS=read`): it may
    /// join and read, not write.
    Reader,
    /// A verified token.
    User(Identity),
}

impl Principal {
    /// The verified identity, if any.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Principal::User(identity) => Some(identity),
            _ => None,
        }
    }

    /// Whether the connection may join `room`.
    pub fn may_join(&self, room: &RoomName) -> bool {
        match self {
            Principal::Open | Principal::Reader => true,
            Principal::User(identity) => identity.rooms.allows(room),
        }
    }

    /// Whether the connection may write (send, and later typing and the like).
    pub fn may_write(&self) -> bool {
        !matches!(self, Principal::Reader)
    }
}

/// The claims this gateway reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    name: Option<String>,
    rooms: Option<Vec<String>>,
    exp: Option<u64>,
}

/// A key and the one algorithm it verifies.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    alg: Algorithm,
}

/// Keys fetched from the JWKS URL, by `kid`.
struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: Mutex<HashMap<String, Key>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Set once the fetch at start has been tried.
    prefetched: tokio::sync::watch::Sender<bool>,
}

/// Token verification, shared by every connection.
pub struct Auth {
    /// The secret and the public key file (no `kid` needed).
    static_keys: Vec<Key>,
    jwks: Option<Jwks>,
    issuer: Option<String>,
    audience: Option<String>,
    anonymous: Anonymous,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("static_keys", &self.static_keys.len())
            .field("jwks", &self.jwks.as_ref().map(|j| j.url.as_str()))
            .field("anonymous", &self.anonymous)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Reads the configured keys (the public key file is read and parsed here).
    pub fn new(config: &AuthConfig) -> Result<Arc<Self>, KeyError> {
        let mut static_keys = Vec::new();
        if let Some(secret) = &config.secret {
            let key =
                DecodingKey::from_secret(secret.expose().as_bytes()).map_err(|e| KeyError {
                    var: "AUTH_JWT_SECRET",
                    reason: e.to_string(),
                })?;
            static_keys.push(Key {
                key,
                alg: Algorithm::HS256,
            });
        }
        if let Some(path) = &config.public_key_file {
            let bad = |reason: String| KeyError {
                var: "AUTH_JWT_PUBLIC_KEY_FILE",
                reason: format!("{path}: {reason}"),
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            static_keys.push(
                public_key(&pem)
                    .ok_or_else(|| bad("not a PEM RSA, EC P-256 or Ed25519 public key".into()))?,
            );
        }
        let jwks = match &config.jwks_url {
            None => None,
            Some(url) => Some(Jwks {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| KeyError {
                        var: "AUTH_JWKS_URL",
                        reason: e.to_string(),
                    })?,
                keys: Mutex::new(HashMap::new()),
                last_fetch: tokio::sync::Mutex::new(None),
                prefetched: tokio::sync::watch::channel(false).0,
            }),
        };
        Ok(Arc::new(Auth {
            static_keys,
            jwks,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            anonymous: config.anonymous,
        }))
    }

    /// Fetches the JWKS document now (at start; later fetches happen on an unknown `kid`).
    pub async fn prefetch(&self) {
        if let Some(jwks) = &self.jwks {
            jwks.fetch().await;
            jwks.prefetched.send_replace(true);
        }
    }

    /// Waits until the fetch at start has been tried (tests; `App::wait_ready`).
    pub async fn prefetched(&self) {
        if let Some(jwks) = &self.jwks {
            let _ = jwks.prefetched.subscribe().wait_for(|done| *done).await;
        }
    }

    /// Who a connection is, given the token it brought (if any).
    pub async fn principal(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        match token {
            None if self.anonymous == Anonymous::Read => Ok(Principal::Reader),
            None => Err(AuthError::Missing),
            Some(token) => self.verify(token).await.map(Principal::User),
        }
    }

    /// Verifies `token`: signature, `exp`, `nbf`, `iss`, `aud`, and the claims this
    /// gateway reads.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        let key = match (&header.kid, &self.jwks) {
            (Some(kid), Some(jwks)) => match jwks.key(kid).await {
                Some(key) => key,
                None => self.static_key(header.alg)?,
            },
            _ => self.static_key(header.alg)?,
        };
        let mut validation = Validation::new(key.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let claims = decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::UnknownKey,
                ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => AuthError::Claim("exp"),
                ErrorKind::MissingRequiredClaim(_) => AuthError::Claim("sub"),
                _ => AuthError::Malformed,
            })?
            .claims;
        identity(claims)
    }

    fn static_key(&self, alg: Algorithm) -> Result<Key, AuthError> {
        self.static_keys
            .iter()
            .find(|k| k.alg == alg)
            .cloned()
            .ok_or(AuthError::UnknownKey)
    }
}

/// The claims a verified token must have, checked.
fn identity(claims: Claims) -> Result<Identity, AuthError> {
    let user = claims
        .sub
        .filter(|s| (1..=MAX_SUB_CHARS).contains(&s.chars().count()))
        .ok_or(AuthError::Claim("sub"))?;
    let name = match claims.name {
        Some(name) => Username::new(&name).map_err(|_| AuthError::Claim("name"))?,
        None => Username::new(&user).map_err(|_| AuthError::Claim("name"))?,
    };
    Ok(Identity {
        user,
        name,
        rooms: RoomAccess::parse(claims.rooms)?,
        exp: claims.exp.ok_or(AuthError::Claim("exp"))?,
    })
}

/// A PEM public key, by its type: RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA.
fn public_key(pem: &[u8]) -> Option<Key> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Some(Key {
            key,
            alg: Algorithm::RS256,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Some(Key {
            key,
            alg: Algorithm::ES256,
        });
    }
    DecodingKey::from_ed_pem(pem).ok().map(|key| Key {
        key,
        alg: Algorithm::EdDSA,
    })
}

impl Jwks {
    /// The key named `kid`, fetching the document again (rate-limited) if it is unknown.
    async fn key(&self, kid: &str) -> Option<Key> {
        if let Some(key) = lock(&self.keys).get(kid).cloned() {
            return Some(key);
        }
        self.refresh().await;
        lock(&self.keys).get(kid).cloned()
    }

    /// Fetches the document for an unknown `kid`, unless such a fetch happened less than
    /// [`JWKS_REFRESH`] ago (anyone can send a token with a made-up `kid`).
    async fn refresh(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < JWKS_REFRESH) {
            return;
        }
        *last = Some(Instant::now());
        self.fetch().await;
    }

    /// Fetches the document and replaces the keys (kept as they were if it fails).
    async fn fetch(&self) {
        let fetched = async {
            let response = self.client.get(&self.url).send().await?;
            response.error_for_status()?.json::<JwkSet>().await
        };
        match fetched.await {
            Ok(set) => {
                let keys: HashMap<String, Key> = set
                    .keys
                    .iter()
                    .filter_map(|jwk| {
                        let kid = jwk.common.key_id.clone()?;
                        let alg = match &jwk.algorithm {
                            AlgorithmParameters::RSA(_) => Algorithm::RS256,
                            AlgorithmParameters::EllipticCurve(ec)
                                if ec.curve == EllipticCurve::P256 =>
                            {
                                Algorithm::ES256
                            }
                            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                            _ => return None,
                        };
                        let key = DecodingKey::from_jwk(jwk).ok()?;
                        Some((kid, Key { key, alg }))
                    })
                    .collect();
                *lock(&self.keys) = keys;
            }
            Err(err) => warn!(url = %self.url, error = %err, "fetching the JWKS failed"),
        }
    }
}

/// What `chat-gateway token` signs.
#[derive(Debug, serde::Serialize)]
pub struct NewToken<'a> {
    /// `sub`
    pub sub: &'a str,
    /// `name`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// `rooms`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<&'a str>>,
    /// `iat`
    pub iat: u64,
    /// `exp`
    pub exp: u64,
}

/// Signs `claims` with an HS256 `secret` (for `chat-gateway token`, scripts and tests).
pub fn sign_hs256(
    secret: &str,
    claims: &NewToken<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth(anonymous: Anonymous) -> Arc<Auth> {
        Auth::new(&AuthConfig {
            secret: Some(Secret::new(SECRET)),
            public_key_file: None,
            jwks_url: None,
            issuer: Some("me".into()),
            audience: None,
            anonymous,
        })
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_good_token_gives_its_identity() {
        let t = token(
            json!({"sub": "u1", "name": " ann ", "rooms": ["lobby", "team-*"], "exp": now() + 60, "iss": "me"}),
        );
        let id = auth(Anonymous::Off).verify(&t).await.unwrap();
        assert_eq!((id.user.as_str(), id.name.as_str()), ("u1", "ann"));
        let room = |r| RoomName::new(r).unwrap();
        assert!(id.rooms.allows(&room("lobby")) && id.rooms.allows(&room("team-a")));
        assert!(!id.rooms.allows(&room("lobby2")) && !id.rooms.allows(&room("other")));
    }

    #[tokio::test]
    async fn each_check_says_what_failed() {
        let a = auth(Anonymous::Off);
        let cases = [
            (
                json!({"sub": "u", "exp": now() - 60, "iss": "me"}),
                AuthError::Expired,
            ),
            (
                json!({"sub": "u", "exp": now() + 60, "nbf": now() + 60, "iss": "me"}),
                AuthError::NotYetValid,
            ),
            (
                json!({"sub": "u", "exp": now() + 60, "iss": "you"}),
                AuthError::WrongIssuer,
            ),
            (json!({"sub": "u", "iss": "me"}), AuthError::Claim("exp")),
            (
                json!({"exp": now() + 60, "iss": "me"}),
                AuthError::Claim("sub"),
            ),
            (
                json!({"sub": "", "exp": now() + 60, "iss": "me"}),
                AuthError::Claim("sub"),
            ),
            (
                json!({"sub": "u", "name": "a\u{7}b", "exp": now() + 60, "iss": "me"}),
                AuthError::Claim("name"),
            ),
            (
                json!({"sub": "u", "rooms": ["a b"], "exp": now() + 60, "iss": "me"}),
                AuthError::Claim("rooms"),
            ),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                a.verify(&token(claims.clone())).await,
                Err(expected),
                "{claims}"
            );
        }
        // Within the leeway, an expired token still passes.
        let t = token(json!({"sub": "u", "exp": now() - 2, "iss": "me"}));
        assert!(a.verify(&t).await.is_ok());
        assert_eq!(a.verify("not.a.jwt").await, Err(AuthError::Malformed));
        let other = encode(
            &Header::default(),
            &json!({"sub": "u", "exp": now() + 60, "iss": "me"}),
            &EncodingKey::from_secret(b"another secret, just as long as the other").unwrap(),
        )
        .unwrap();
        assert_eq!(a.verify(&other).await, Err(AuthError::BadSignature));
    }

    #[tokio::test]
    async fn alg_none_and_an_algorithm_without_a_key_are_refused() {
        let a = auth(Anonymous::Off);
        // {"alg":"none"} . {"sub":"u","exp":...} . (no signature)
        use base64::Engine;
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"sub": "u", "exp": now() + 60, "iss": "me"}))
        );
        assert!(a.verify(&none).await.is_err());
        let rs = format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": "RS256", "typ": "JWT"})),
            b64(&json!({"sub": "u", "exp": now() + 60, "iss": "me"}))
        );
        assert_eq!(a.verify(&rs).await, Err(AuthError::UnknownKey));
    }

    #[tokio::test]
    async fn without_a_token_only_readers_are_let_in() {
        assert_eq!(
            auth(Anonymous::Off).principal(None).await,
            Err(AuthError::Missing)
        );
        let reader = auth(Anonymous::Read).principal(None).await.unwrap();
        assert!(reader.may_join(&RoomName::new("any").unwrap()) && !reader.may_write());
    }
}
