//! Who may open a WebSocket, decided before the upgrade: the Origin check against
//! cross-site WebSocket hijacking (`ALLOWED_ORIGINS`, refused with 403), the instance's
//! connection limit (`MAX_CONNECTIONS`, 503) and the per-address one
//! (`MAX_CONNECTIONS_PER_IP`, 429), with the client's address taken from
//! `X-Forwarded-For` only behind a trusted proxy (`TRUSTED_PROXIES`).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::http::{HeaderMap, header};
use ipnet::IpNet;

use crate::sync::lock;

/// Open WebSocket connections, against `MAX_CONNECTIONS` (this instance) and
/// `MAX_CONNECTIONS_PER_IP` (one client address).
#[derive(Debug)]
pub struct ConnectionLimit {
    open: Arc<AtomicUsize>,
    /// 0: no limit.
    max: usize,
    /// Open connections per client address (only addresses with one open).
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// 0: no limit.
    max_per_ip: usize,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The instance is at `MAX_CONNECTIONS` (HTTP 503: try another instance).
    Instance,
    /// The client address is at `MAX_CONNECTIONS_PER_IP` (HTTP 429).
    Address,
}

/// One admitted connection; gives its places back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    open: Arc<AtomicUsize>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = lock(&self.per_ip);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnectionLimit {
    /// At most `max` connections at once, `max_per_ip` of them from one address (0: no
    /// limit).
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        ConnectionLimit {
            open: Arc::new(AtomicUsize::new(0)),
            max,
            per_ip: Arc::default(),
            max_per_ip,
        }
    }

    /// A slot for one more connection from `ip`, or why not.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        {
            let mut per_ip = lock(&self.per_ip);
            let n = per_ip.entry(ip).or_insert(0);
            if self.max_per_ip > 0 && *n >= self.max_per_ip {
                return Err(Refusal::Address);
            }
            *n += 1;
        }
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot {
            open: self.open.clone(),
            per_ip: self.per_ip.clone(),
            ip,
        };
        if self.max > 0 && before >= self.max {
            return Err(Refusal::Instance);
        }
        Ok(slot)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// The client's address: the peer's, or — when the peer is a trusted proxy
/// (`TRUSTED_PROXIES`) — the first address in `X-Forwarded-For`, from the right, that is
/// not a trusted proxy itself (the hops a client can forge are further left).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if is_trusted(&ip) => client = ip,
            Ok(ip) => return ip,
            // Garbage in the header: the last trusted hop is all that is known.
            Err(_) => return client,
        }
    }
    client
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
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        // An Origin that is not text is not an origin we allow (fail closed).
        let Ok(origin) = origin.to_str() else {
            return false;
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
    fn the_connection_limits_admit_up_to_their_max_and_free_on_drop() {
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let limit = ConnectionLimit::new(3, 2);
        let a1 = limit.admit(a).unwrap();
        let _a2 = limit.admit(a).unwrap();
        assert_eq!(limit.admit(a).err(), Some(Refusal::Address));
        let _b1 = limit.admit(b).unwrap();
        assert_eq!(limit.admit(b).err(), Some(Refusal::Instance));
        assert_eq!(limit.open(), 3);
        drop(a1);
        assert!(limit.admit(a).is_ok());
        let unlimited = ConnectionLimit::new(0, 0);
        let slots: Vec<_> = (0..100).map(|_| unlimited.admit(a).unwrap()).collect();
        assert_eq!(unlimited.open(), slots.len());
        drop(slots);
        assert!(
            lock(&unlimited.per_ip).is_empty(),
            "no entry outlives its connections"
        );
    }

    #[test]
    fn the_client_address_comes_from_forwarded_for_only_behind_a_trusted_proxy() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.7, 10.1.1.1"),
        );
        // From a trusted proxy: the first untrusted hop from the right.
        assert_eq!(client_ip(ip("10.0.0.5"), &h, &trusted), ip("203.0.113.7"));
        // From anyone else, the header is the client's own claim: ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.5"), &HeaderMap::new(), &trusted),
            ip("10.0.0.5")
        );
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
        let mut binary = headers(None, "chat.local");
        binary.insert(
            header::ORIGIN,
            HeaderValue::from_bytes(b"http://chat.local\xff").unwrap(),
        );
        assert!(!p.allows(&binary), "a non-UTF-8 Origin must fail closed");
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
