//! Who may open a WebSocket, decided before the upgrade: the Origin check against
//! cross-site WebSocket hijacking (`ALLOWED_ORIGINS`, refused with 403) and the
//! instance's connection limit (`MAX_CONNECTIONS`, refused with 503).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::http::{HeaderMap, header};

/// Open WebSocket connections on this instance, against `MAX_CONNECTIONS`.
#[derive(Debug)]
pub struct ConnectionLimit {
    open: Arc<AtomicUsize>,
    /// 0: no limit.
    max: usize,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionLimit {
    /// At most `max` connections at once (0: no limit).
    pub fn new(max: usize) -> Self {
        ConnectionLimit {
            open: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A slot for one more connection, or `None` at the limit.
    pub fn admit(&self) -> Option<ConnectionSlot> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(self.open.clone());
        (self.max == 0 || before < self.max).then_some(slot)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Which browser origins may open WebSockets (`ALLOWED_ORIGINS`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    /// Empty: only the request's own host. Otherwise any listed pattern.
    patterns: Vec<Pattern>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// `*`: every origin.
    Any,
    /// `https://chat.example.com[:port]`: exactly this origin.
    Origin(String),
    /// `chat.example.com[:port]`: this host, any scheme.
    Host(String),
    /// `*.example.com`: any subdomain of example.com (not example.com itself).
    Subdomains(String),
}

/// An `ALLOWED_ORIGINS` entry that cannot be understood.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an origin, a host or a *.domain pattern")]
pub struct BadPattern(String);

impl OriginPolicy {
    /// Parses a comma-separated list; empty means "same host only".
    pub fn parse(list: &str) -> Result<Self, BadPattern> {
        let mut patterns = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let lower = entry.to_ascii_lowercase();
            let pattern = if lower == "*" {
                Pattern::Any
            } else if let Some(domain) = lower.strip_prefix("*.") {
                Pattern::Subdomains(format!(".{domain}"))
            } else if lower.contains("://") {
                Pattern::Origin(lower.trim_end_matches('/').to_owned())
            } else {
                Pattern::Host(lower)
            };
            let valid = match &pattern {
                Pattern::Any => true,
                Pattern::Origin(o) => o.split_once("://").is_some_and(|(scheme, host)| {
                    !scheme.is_empty() && !host.is_empty() && !host.contains(['*', '/', ' '])
                }),
                Pattern::Host(h) => !h.is_empty() && !h.contains(['*', '/', ' ']),
                Pattern::Subdomains(d) => d.len() > 1 && !d.contains(['*', '/', ' ']),
            };
            if !valid {
                return Err(BadPattern(entry.to_owned()));
            }
            patterns.push(pattern);
        }
        Ok(OriginPolicy { patterns })
    }

    /// Whether a request with these headers may upgrade. Requests without `Origin` (not
    /// from a browser) are allowed: the attack this prevents needs a victim's browser.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        let Some((_, origin_host)) = origin.split_once("://") else {
            return false;
        };
        if self.patterns.is_empty() {
            // The page's own host: Host, or X-Forwarded-Host behind a proxy (a browser
            // cannot set either on a WebSocket handshake).
            return [header::HOST.as_str(), "x-forwarded-host"]
                .iter()
                .filter_map(|h| headers.get(*h)?.to_str().ok())
                .any(|host| same_host(origin_host, &host.to_ascii_lowercase()));
        }
        let hostname = origin_host.rsplit_once(':').map_or(origin_host, |(h, _)| h);
        self.patterns.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Origin(o) => *o == origin,
            Pattern::Host(h) => h == origin_host || h == hostname,
            Pattern::Subdomains(suffix) => hostname.ends_with(suffix.as_str()),
        })
    }
}

/// `origin_host` (from Origin) names the same host as `host` (a Host header). A Host
/// without a port (proxies often drop it) matches on the host name alone.
fn same_host(origin_host: &str, host: &str) -> bool {
    if origin_host == host {
        return true;
    }
    let has_port = |h: &str| {
        h.rsplit_once(':')
            .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
    };
    !has_port(host)
        && origin_host
            .rsplit_once(':')
            .is_some_and(|(name, _)| name == host)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn the_connection_limit_admits_up_to_max_and_frees_on_drop() {
        let limit = ConnectionLimit::new(2);
        let a = limit.admit().unwrap();
        let _b = limit.admit().unwrap();
        assert!(limit.admit().is_none());
        assert_eq!(limit.open(), 2);
        drop(a);
        assert!(limit.admit().is_some());
        let unlimited = ConnectionLimit::new(0);
        let slots: Vec<_> = (0..100).map(|_| unlimited.admit().unwrap()).collect();
        assert_eq!(unlimited.open(), slots.len());
    }

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn default_allows_the_same_host_and_non_browsers() {
        let p = OriginPolicy::parse("").unwrap();
        assert!(p.allows(&headers(None, "chat.local:4444")));
        assert!(p.allows(&headers(Some("http://chat.local:4444"), "chat.local:4444")));
        assert!(p.allows(&headers(Some("https://Chat.Local"), "chat.local")));
        // A proxy that dropped the port from Host.
        assert!(p.allows(&headers(Some("http://localhost:8080"), "localhost")));
        assert!(!p.allows(&headers(Some("http://localhost:8080"), "localhost:4444")));
        assert!(!p.allows(&headers(Some("https://evil.example"), "chat.local")));
        assert!(!p.allows(&headers(Some("null"), "chat.local")));
    }

    #[test]
    fn patterns() {
        let p = OriginPolicy::parse("https://app.example.com, *.chat.io ,localhost:3000").unwrap();
        assert!(p.allows(&headers(Some("https://app.example.com"), "gw")));
        assert!(!p.allows(&headers(Some("http://app.example.com"), "gw")));
        assert!(p.allows(&headers(Some("https://a.chat.io"), "gw")));
        assert!(p.allows(&headers(Some("https://a.b.chat.io:8443"), "gw")));
        assert!(!p.allows(&headers(Some("https://chat.io"), "gw")));
        assert!(!p.allows(&headers(Some("https://evilchat.io"), "gw")));
        assert!(p.allows(&headers(Some("http://localhost:3000"), "gw")));
        assert!(!p.allows(&headers(Some("http://localhost:3001"), "gw")));
        assert!(
            OriginPolicy::parse("*")
                .unwrap()
                .allows(&headers(Some("https://x"), "gw"))
        );
        assert!(OriginPolicy::parse("a b").is_err());
    }
}
