//! Finished spans as handed to exporters, with OpenTelemetry semantic-convention attributes.
use std::{net::SocketAddr, sync::Arc};

use super::privacy::{Privacy, without_credentials};
use crate::process::ProcessInfo;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    /// Captured headers (`http.request.header.<name>` is a string array in the conventions).
    StrArray(Vec<String>),
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(v.to_string())
    }
}
impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(v)
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::StrArray(v) => write!(f, "{v:?}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: Option<u64>,
    pub kind: SpanKind,
    pub name: String,
    /// Unix epoch nanoseconds.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// Error status with its description.
    pub error: Option<String>,
    pub process: Arc<ProcessInfo>,
}

impl SpanRecord {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// What metrics need of every finished request, sampled or not.
#[derive(Clone, Debug)]
pub struct Observation {
    pub kind: SpanKind,
    pub process: Arc<ProcessInfo>,
    /// The process at the other end, when this agent saw both ends (rule 3).
    pub peer_process: Option<Arc<ProcessInfo>>,
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub status: Option<u16>,
    pub grpc: Option<Grpc>,
    /// The server as the client addressed it (`server.address`, `server.port`).
    pub server: (String, u16),
    pub duration_ns: u64,
    /// The span's status is error.
    pub error: bool,
    /// Failed as the caller sees it (4xx/5xx, non-OK gRPC status, or no response).
    pub failed: bool,
}

/// Everything known about one HTTP exchange when its span is built.
#[derive(Clone, Debug, Default)]
pub struct HttpExchange {
    pub method: String,
    pub target: String,
    /// Minor version for HTTP/1.x (0 or 1); 2 means HTTP/2.
    pub version: u8,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub request_body: u64,
    pub status: Option<u16>,
    pub response_body: u64,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub grpc: Option<Grpc>,
    /// Some of the exchange could not be decoded (e.g. HTTP/2 joined mid-connection).
    pub partial: bool,
    /// Request headers the configuration asked for (see [`Privacy`]), in arrival order.
    pub captured_headers: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grpc {
    pub service: String,
    pub method: String,
    pub status: Option<i64>,
}

impl Grpc {
    /// gRPC requests are POSTs to `/package.Service/Method` with an `application/grpc` type.
    pub fn from_request(path: &str, content_type: Option<&str>) -> Option<Self> {
        if !content_type?.starts_with("application/grpc") {
            return None;
        }
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        (!service.is_empty() && !method.is_empty() && !method.contains('/')).then(|| Grpc {
            service: service.to_string(),
            method: method.to_string(),
            status: None,
        })
    }
}

/// Splits a Host header into host and port, tolerating IPv6 literals.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[')
        && let Some((h, tail)) = rest.split_once(']')
    {
        return (h, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}

impl HttpExchange {
    /// Span name per the HTTP semantic conventions: the method alone when no route template is
    /// known (raw paths would explode cardinality).
    pub fn span_name(&self) -> String {
        match &self.grpc {
            Some(g) => format!("{}/{}", g.service, g.method),
            // The conventions' name when the method is unknown.
            None if self.method.is_empty() => "HTTP".to_string(),
            None => self.method.clone(),
        }
    }

    /// The server as a client addressed it: the Host header, else the peer address.
    pub fn server_endpoint(&self) -> (String, u16) {
        match (self.host.as_deref().map(split_host), self.peer) {
            (Some((h, p)), peer) => (h.to_string(), p.or(peer.map(|x| x.port())).unwrap_or(80)),
            (None, Some(peer)) => (peer.ip().to_string(), peer.port()),
            (None, None) => (String::new(), 80),
        }
    }

    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    pub fn attributes(&self, kind: SpanKind, privacy: &Privacy) -> Vec<(&'static str, AttrValue)> {
        let mut a: Vec<(&'static str, AttrValue)> = Vec::with_capacity(16);
        // Fields an HTTP/2 decoder joined mid-way could not read are left out, never guessed.
        if !self.method.is_empty() {
            a.push(("http.request.method", self.method.as_str().into()));
        }
        let (path, query) = match self.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.target.as_str(), None),
        };
        let host = self.host.as_deref().map(split_host);
        match kind {
            SpanKind::Server => {
                if !path.is_empty() {
                    a.push(("url.path", path.into()));
                }
                if let Some(q) = query {
                    a.push(("url.query", privacy.query(q).into()));
                }
                a.push(("url.scheme", "http".into()));
                if let Some((h, p)) = host {
                    a.push(("server.address", h.into()));
                    if let Some(p) = p.or(self.local.map(|l| l.port())) {
                        a.push(("server.port", (p as i64).into()));
                    }
                } else if let Some(l) = self.local {
                    a.push(("server.address", l.ip().to_string().into()));
                    a.push(("server.port", (l.port() as i64).into()));
                }
                if let Some(p) = self.peer {
                    a.push(("client.address", p.ip().to_string().into()));
                    a.push(("client.port", (p.port() as i64).into()));
                }
            }
            SpanKind::Client => {
                let (h, port) = self.server_endpoint();
                let authority = if port == 80 {
                    h.clone()
                } else {
                    format!("{h}:{port}")
                };
                let authority = if h.contains(':') && port != 80 {
                    format!("[{h}]:{port}")
                } else {
                    authority
                };
                let target = privacy.target(&self.target);
                if target.starts_with("http://") || target.starts_with("https://") {
                    // Absolute form (requests to a proxy): the target is the whole URL.
                    a.push(("url.full", without_credentials(&target).into()));
                } else if !target.is_empty() {
                    a.push(("url.full", format!("http://{authority}{target}").into()));
                }
                if !h.is_empty() {
                    a.push(("server.address", h.into()));
                }
                a.push(("server.port", (port as i64).into()));
            }
        }
        if let Some(p) = self.peer {
            a.push(("network.peer.address", p.ip().to_string().into()));
            a.push(("network.peer.port", (p.port() as i64).into()));
        }
        if let Some(l) = self.local {
            a.push(("network.local.address", l.ip().to_string().into()));
            a.push(("network.local.port", (l.port() as i64).into()));
            a.push((
                "network.type",
                if l.is_ipv4() { "ipv4" } else { "ipv6" }.into(),
            ));
        }
        a.push(("network.transport", "tcp".into()));
        a.push(("network.protocol.name", "http".into()));
        let version = match self.version {
            0 => "1.0",
            1 => "1.1",
            _ => "2",
        };
        a.push(("network.protocol.version", version.into()));
        if let Some(g) = &self.grpc {
            a.push(("rpc.system", "grpc".into()));
            a.push(("rpc.service", g.service.as_str().into()));
            a.push(("rpc.method", g.method.as_str().into()));
            if let Some(code) = g.status {
                a.push(("rpc.grpc.status_code", code.into()));
            }
        }
        if self.partial {
            a.push(("kspan.partial", true.into()));
        }
        if let Some(ua) = &self.user_agent {
            a.push(("user_agent.original", ua.as_str().into()));
        }
        for (&name, &key) in privacy.captured.iter().zip(privacy.captured_keys) {
            let values: Vec<String> = self
                .captured_headers
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .collect();
            if !values.is_empty() {
                a.push((key, AttrValue::StrArray(values)));
            }
        }
        a.push(("http.request.body.size", (self.request_body as i64).into()));
        if let Some(s) = self.status {
            a.push(("http.response.status_code", (s as i64).into()));
            a.push((
                "http.response.body.size",
                (self.response_body as i64).into(),
            ));
        }
        a
    }

    /// Error status per the conventions: 5xx for servers, 4xx and 5xx for clients; for gRPC,
    /// any non-OK status for clients and the server-fault codes for servers.
    pub fn error(&self, kind: SpanKind) -> Option<String> {
        if let Some(code) = self.grpc.as_ref().and_then(|g| g.status) {
            // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
            let server_fault = matches!(code, 2 | 4 | 12 | 13 | 14 | 15);
            let bad = match kind {
                SpanKind::Server => server_fault,
                SpanKind::Client => code != 0,
            };
            return bad.then(|| format!("gRPC status {code}"));
        }
        let s = self.status?;
        let bad = match kind {
            SpanKind::Server => s >= 500,
            SpanKind::Client => s >= 400,
        };
        bad.then(|| format!("HTTP {s}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex() -> HttpExchange {
        HttpExchange {
            method: "GET".into(),
            target: "/api/items?id=3".into(),
            version: 1,
            host: Some("backend:8081".into()),
            user_agent: Some("curl/8".into()),
            request_body: 0,
            status: Some(404),
            response_body: 12,
            local: Some("127.0.0.1:40000".parse().unwrap()),
            peer: Some("127.0.0.1:8081".parse().unwrap()),
            grpc: None,
            partial: false,
            captured_headers: Vec::new(),
        }
    }

    #[test]
    fn client_attributes_follow_semconv() {
        let e = ex();
        let a = e.attributes(SpanKind::Client, &Privacy::default());
        let get = |k: &str| a.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("url.full"),
            Some("http://backend:8081/api/items?id=REDACTED".into())
        );
        assert_eq!(get("server.address"), Some("backend".into()));
        assert_eq!(get("server.port"), Some(8081i64.into()));
        assert_eq!(get("http.response.status_code"), Some(404i64.into()));
        assert_eq!(get("user_agent.original"), Some("curl/8".into()));
        assert_eq!(e.error(SpanKind::Client).as_deref(), Some("HTTP 404"));
        assert_eq!(e.error(SpanKind::Server), None);
    }

    #[test]
    fn server_attributes_follow_semconv() {
        let mut e = ex();
        e.local = Some("10.0.0.2:8081".parse().unwrap());
        e.peer = Some("10.0.0.1:5555".parse().unwrap());
        let a = e.attributes(SpanKind::Server, &Privacy::default());
        let get = |k: &str| a.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("url.path"), Some("/api/items".into()));
        assert_eq!(get("url.query"), Some("id=REDACTED".into()));
        assert_eq!(get("client.address"), Some("10.0.0.1".into()));
        assert_eq!(get("client.port"), Some(5555i64.into()));
        assert_eq!(get("network.protocol.version"), Some("1.1".into()));
    }

    #[test]
    fn captured_headers_and_proxy_targets() {
        let (privacy, _) = Privacy::new(&["x-tenant".into()], &[], false);
        let mut e = ex();
        e.target = "http://bob:pw@api:8080/x?k=v".into();
        e.captured_headers = vec![("x-tenant", "a".into()), ("x-tenant", "b".into())];
        let a = e.attributes(SpanKind::Client, &privacy);
        let get = |k: &str| a.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(
            get("url.full"),
            Some("http://REDACTED:REDACTED@api:8080/x?k=REDACTED".into())
        );
        assert_eq!(
            get("http.request.header.x-tenant"),
            Some(AttrValue::StrArray(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            ex().attributes(SpanKind::Client, &privacy)
                .iter()
                .filter(|(k, _)| k.starts_with("http.request.header."))
                .count(),
            0,
            "absent headers make no attribute"
        );
    }

    #[test]
    fn host_header_forms() {
        assert_eq!(split_host("a:1"), ("a", Some(1)));
        assert_eq!(split_host("a"), ("a", None));
        assert_eq!(split_host("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host("[::1]"), ("::1", None));
        assert_eq!(split_host("::1"), ("::1", None));
        assert_eq!(split_host("a:notaport"), ("a", None));
    }
}
