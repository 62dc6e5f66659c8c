//! The browser client's static files: embedded in the binary (one binary is the whole
//! deploy), or read from `WEB_DIR` when set, for editing without rebuilding.
//!
//! Every response carries a Content-Security-Policy (scripts, styles and connections to the
//! page's own origin only), `X-Content-Type-Options: nosniff` and `Referrer-Policy:
//! no-referrer`; embedded files carry an `ETag` (their SHA-256) and are answered 304 on
//! revalidation; bodies are compressed (gzip, brotli) when the browser accepts it. The
//! headers and the compression are tower-http's layers.

use std::{path::Path, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use rust_embed::RustEmbed;
use tower_http::{compression::CompressionLayer, set_header::SetResponseHeaderLayer};

use crate::state::AppState;

#[derive(RustEmbed)]
#[folder = "../../web/"]
struct Assets;

/// Same-origin only: no inline script, no third party, and the page may not be framed.
/// (`'self'` covers the page's own `ws:`/`wss:` origin for the WebSocket.)
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// The files, with their headers and compression.
pub(crate) fn files(state: Arc<AppState>) -> Router {
    let header =
        |name, value| SetResponseHeaderLayer::overriding(name, HeaderValue::from_static(value));
    Router::new()
        .fallback(serve)
        .with_state(state)
        .layer(CompressionLayer::new())
        .layer(header(header::CONTENT_SECURITY_POLICY, CSP))
        .layer(header(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(header(header::REFERRER_POLICY, "no-referrer"))
}

/// Serves `web/` (`/` is `index.html`).
async fn serve(State(state): State<Arc<AppState>>, uri: Uri, headers: HeaderMap) -> Response {
    let path = match uri.path().trim_start_matches('/') {
        "" => "index.html",
        p => p,
    };
    if path
        .split('/')
        .any(|seg| seg == ".." || seg.starts_with('.'))
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    let (body, etag) = match &state.config.web_dir {
        Some(dir) => match tokio::fs::read(Path::new(dir).join(path)).await {
            Ok(body) => (body, None),
            Err(_) => return StatusCode::NOT_FOUND.into_response(),
        },
        None => match Assets::get(path) {
            Some(file) => {
                let hash: String = file
                    .metadata
                    .sha256_hash()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                (file.data.into_owned(), Some(format!("\"{hash}\"")))
            }
            None => return StatusCode::NOT_FOUND.into_response(),
        },
    };
    let etag = etag.and_then(|e| HeaderValue::from_str(&e).ok());
    if let Some(etag) = &etag
        && headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .any(|v| v == etag || v == "*")
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag.clone())]).into_response();
    }
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let mut response = (
        [
            (header::CONTENT_TYPE, mime.as_ref().to_owned()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
        ],
        body,
    )
        .into_response();
    if let Some(etag) = etag {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}
