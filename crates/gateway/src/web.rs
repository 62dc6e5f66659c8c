//! The browser client's static files: embedded in the binary (one binary is the whole
//! deploy), or read from `WEB_DIR` when set, for editing without rebuilding.

use std::{path::Path, sync::Arc};

use axum::{
    extract::State,
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use rust_embed::RustEmbed;

use crate::state::AppState;

#[derive(RustEmbed)]
#[folder = "../../web/"]
struct Assets;

/// Serves `web/` (`/` is `index.html`).
pub(crate) async fn serve(State(state): State<Arc<AppState>>, uri: Uri) -> Response {
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
    let body = match &state.config.web_dir {
        Some(dir) => tokio::fs::read(Path::new(dir).join(path)).await.ok(),
        None => Assets::get(path).map(|f| f.data.into_owned()),
    };
    match body {
        Some(body) => {
            let mime = mime_guess::from_path(path).first_or_octet_stream();
            (
                [
                    (header::CONTENT_TYPE, mime.as_ref().to_owned()),
                    (header::CACHE_CONTROL, "no-cache".to_owned()),
                ],
                body,
            )
                .into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
