//! Finished spans as handed to exporters, with OpenTelemetry semantic-convention attributes.
use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use super::{
    db::DbExchange,
    privacy::{Privacy, without_credentials},
};
pub use crate::protocol::http1::Text;
use crate::{process::ProcessInfo, protocol::Outcome};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

#[derive(Clone, Debug)]
pub enum AttrValue {
    Str(String),
    /// Fixed words ("http", "1.1", "ipv4"): no allocation per span.
    Static(&'static str),
    /// Text many spans repeat (a statement's table, a connection's database or peer): one
    /// reference count per span instead of a copy.
    Shared(Arc<str>),
    Int(i64),
    Bool(bool),
    /// Captured headers (`http.request.header.<name>` is a string array in the conventions).
    StrArray(Vec<String>),
}

impl AttrValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            AttrValue::Static(s) => Some(s),
            AttrValue::Shared(s) => Some(s),
            _ => None,
        }
    }
}

/// Equal when the exported values are: a static and an owned string with the same text are.
impl PartialEq for AttrValue {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (AttrValue::Int(a), AttrValue::Int(b)) => a == b,
            (AttrValue::Bool(a), AttrValue::Bool(b)) => a == b,
            (AttrValue::StrArray(a), AttrValue::StrArray(b)) => a == b,
            (a, b) => a.as_str().is_some() && a.as_str() == b.as_str(),
        }
    }
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
impl From<Arc<str>> for AttrValue {
    fn from(v: Arc<str>) -> Self {
        AttrValue::Shared(v)
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
            AttrValue::Static(s) => write!(f, "{s:?}"),
            AttrValue::Shared(s) => write!(f, "{s:?}"),
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
    /// Most names are fixed words (an HTTP method): no allocation per span for them.
    pub name: Text,
    /// Unix epoch nanoseconds.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// Error status with its description.
    pub error: Option<String>,
    pub process: Arc<ProcessInfo>,
}

impl SpanRecord {
    /// Bytes the record holds (its process record is shared, so not counted): what the export
    /// queue's byte bound adds up.
    pub fn footprint(&self) -> usize {
        let strings: usize = self
            .attributes
            .iter()
            .map(|(_, v)| match v {
                AttrValue::Str(s) => s.capacity(),
                AttrValue::StrArray(items) => {
                    items.capacity() * size_of::<String>()
                        + items.iter().map(String::capacity).sum::<usize>()
                }
                // Shared strings are held by the connection or cache they come from too.
                AttrValue::Static(_)
                | AttrValue::Shared(_)
                | AttrValue::Int(_)
                | AttrValue::Bool(_) => 0,
            })
            .sum();
        size_of::<Self>()
            + text_capacity(&self.name)
            + self.error.as_ref().map_or(0, String::capacity)
            + self.attributes.capacity() * size_of::<(&str, AttrValue)>()
            + strings
    }

    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// What metrics need of every finished request, sampled or not, borrowed from the span's
/// exchange before its attributes take the strings (an owned copy per request was two
/// allocations at line rate).
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    pub kind: SpanKind,
    pub process: &'a ProcessInfo,
    /// The process at the other end, when this agent saw both ends (rule 3).
    pub peer_process: Option<&'a ProcessInfo>,
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    pub status: Option<u16>,
    pub grpc: Option<&'a Grpc>,
    /// The server as the client addressed it (`server.address`, `server.port`); CLIENT only.
    pub server: Option<(Cow<'a, str>, u16)>,
    pub duration_ns: u64,
    /// The span's status is error.
    pub error: bool,
    /// Failed as the caller sees it (4xx/5xx, non-OK gRPC status, or no response).
    pub failed: bool,
    /// Set for data-store calls (whose `method`, `path` and `status` are empty).
    pub db: Option<DbObservation>,
}

/// What the data-store metrics need of a call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbObservation {
    pub system: &'static str,
    pub operation: Option<Arc<str>>,
    pub collection: Option<Arc<str>>,
    /// The store's error code, empty when none.
    pub error_code: String,
}

/// One exchange of any protocol, as its span is built.
#[derive(Clone, Debug)]
pub enum Exchange {
    Http(HttpExchange),
    Db(DbExchange),
}

impl Exchange {
    pub fn span_name(&self) -> Text {
        match self {
            Exchange::Http(h) => h.span_name(),
            Exchange::Db(d) => d.span_name().into(),
        }
    }

    /// The span's attributes; they take the exchange's strings.
    pub fn attributes(self, kind: SpanKind, privacy: &Privacy) -> Vec<(&'static str, AttrValue)> {
        match self {
            Exchange::Http(h) => h.attributes(kind, privacy),
            Exchange::Db(d) => d.attributes(privacy),
        }
    }

    /// Error status per the conventions of the exchange's protocol.
    pub fn error(&self, kind: SpanKind) -> Option<String> {
        match self {
            Exchange::Http(h) => h.error(kind),
            Exchange::Db(d) => d.error(),
        }
    }

    /// Bytes its strings hold (what the linger's byte bound counts beside the span itself).
    pub fn heap_bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        match self {
            Exchange::Http(h) => {
                text_capacity(&h.method)
                    + h.target.capacity()
                    + opt(&h.host)
                    + opt(&h.user_agent)
                    + h.grpc
                        .as_ref()
                        .map_or(0, |g| g.service.capacity() + g.method.capacity())
                    + h.captured_headers.capacity() * size_of::<(&str, String)>()
                    + h.captured_headers
                        .iter()
                        .map(|(_, v)| v.capacity())
                        .sum::<usize>()
            }
            Exchange::Db(d) => {
                // The text is shared with the decoder's prepared statements: counted once
                // per span all the same, as if it were its own.
                d.call.text.len()
                    + d.error
                        .as_ref()
                        .map_or(0, |(c, m)| c.capacity() + m.capacity())
            }
        }
    }

    pub fn partial(&self) -> bool {
        match self {
            Exchange::Http(h) => h.partial,
            Exchange::Db(d) => d.partial,
        }
    }

    pub fn set_partial(&mut self) {
        match self {
            Exchange::Http(h) => h.partial = true,
            Exchange::Db(d) => d.partial = true,
        }
    }

    pub fn set_outcome(&mut self, outcome: Outcome) {
        match (self, outcome) {
            (Exchange::Http(h), Outcome::HttpStatus(s)) => h.status = Some(s),
            (Exchange::Http(h), Outcome::GrpcStatus(code)) => {
                if let Some(g) = h.grpc.as_mut() {
                    g.status = Some(code);
                }
            }
            (Exchange::Db(d), Outcome::DbError { code, message }) => {
                d.error = Some((code, message))
            }
            _ => {}
        }
    }

    pub fn set_request_body(&mut self, len: u64) {
        if let Exchange::Http(h) = self {
            h.request_body = len;
        }
    }

    pub fn set_response_body(&mut self, len: u64) {
        if let Exchange::Http(h) = self {
            h.response_body = len;
        }
    }
}

/// Everything known about one HTTP exchange when its span is built.
#[derive(Clone, Debug, Default)]
pub struct HttpExchange {
    pub method: Text,
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
    /// Read at a TLS library: the exchange was HTTPS.
    pub tls: bool,
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
    // One pass over bytes: `str::rsplit_once(char)` and a second search cost 4% of a
    // keep-alive replay's instructions.
    let mut colon = None;
    for (i, &c) in host.as_bytes().iter().enumerate() {
        if c == b':' {
            if colon.is_some() {
                // Two colons: an IPv6 address without brackets, so no port.
                return (host, None);
            }
            colon = Some(i);
        }
    }
    match colon {
        Some(i) => (&host[..i], port(&host.as_bytes()[i + 1..])),
        None => (host, None),
    }
}

/// A Host header taken apart ([`split_host`]): its name as a string of its own (the header
/// cut short, without a copy, unless the name is bracketed) and its port.
fn host_parts(mut host: String) -> (String, Option<u16>) {
    let (start, len, port) = {
        let (name, port) = split_host(&host);
        (
            name.as_ptr() as usize - host.as_ptr() as usize,
            name.len(),
            port,
        )
    };
    if start == 0 {
        host.truncate(len);
        (host, port)
    } else {
        (host[start..start + len].to_string(), port)
    }
}

/// A decimal port; `None` for anything else (as `str::parse::<u16>` but without its sign).
fn port(digits: &[u8]) -> Option<u16> {
    u16::try_from(crate::protocol::decimal(digits)?).ok()
}

impl HttpExchange {
    /// Span name per the HTTP semantic conventions: the method alone when no route template is
    /// known (raw paths would explode cardinality).
    pub fn span_name(&self) -> Text {
        match &self.grpc {
            Some(g) => format!("{}/{}", g.service, g.method).into(),
            // The conventions' name when the method is unknown.
            None if self.method.is_empty() => "HTTP".into(),
            None => self.method.clone(),
        }
    }

    /// The server as a client addressed it: the Host header, else the peer address.
    pub fn server_endpoint(&self) -> (Cow<'_, str>, u16) {
        let (name, host_port) = match (&self.host, self.peer) {
            (Some(host), _) => {
                let (name, port) = split_host(host);
                (Cow::Borrowed(name), port)
            }
            (None, Some(peer)) => (ip_string(peer.ip()).into(), None),
            (None, None) => (Cow::Borrowed(""), None),
        };
        (name, self.server_port(host_port))
    }

    /// The server's port given the Host header's: else the peer's, else the scheme's.
    fn server_port(&self, host_port: Option<u16>) -> u16 {
        host_port
            .or(self.peer.map(|p| p.port()))
            .unwrap_or(self.default_port())
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The port a URL of this exchange's scheme leaves out.
    fn default_port(&self) -> u16 {
        if self.tls { 443 } else { 80 }
    }

    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The span's attributes. Opt-in attributes of the conventions (client.port,
    /// network.local.*, network.transport, network.type, body sizes, and user_agent.original on
    /// CLIENT spans) only with `privacy.opt_in_attributes`: the conventions ask instrumentations
    /// not to emit them unasked, and each costs export time on every span.
    /// Strings move into the attributes rather than being copied (the span's last use).
    pub fn attributes(
        mut self,
        kind: SpanKind,
        privacy: &Privacy,
    ) -> Vec<(&'static str, AttrValue)> {
        let opt_in = privacy.opt_in_attributes;
        let mut a: Vec<(&'static str, AttrValue)> =
            Vec::with_capacity(if opt_in { 20 } else { 12 });
        let peer_ip = self.peer.map(|p| ip_shared(p.ip()));
        // Fields an HTTP/2 decoder joined mid-way could not read are left out, never guessed.
        if !self.method.is_empty() {
            a.push(("http.request.method", method_value(&self.method)));
        }
        match kind {
            SpanKind::Server => {
                let target = std::mem::take(&mut self.target);
                match target.split_once('?') {
                    Some((path, query)) => {
                        if !path.is_empty() {
                            a.push(("url.path", path.into()));
                        }
                        a.push(("url.query", privacy.query(query).into()));
                    }
                    None if !target.is_empty() => a.push(("url.path", target.into())),
                    None => {}
                }
                a.push(("url.scheme", AttrValue::Static(self.scheme())));
                if let Some((name, host_port)) = self.host.take().map(host_parts) {
                    a.push(("server.address", name.into()));
                    if let Some(p) = host_port.or(self.local.map(|l| l.port())) {
                        a.push(("server.port", (p as i64).into()));
                    }
                } else if let Some(l) = self.local {
                    a.push(("server.address", ip_shared(l.ip()).into()));
                    a.push(("server.port", (l.port() as i64).into()));
                }
                if let (Some(p), Some(ip)) = (self.peer, &peer_ip) {
                    a.push(("client.address", ip.clone().into()));
                    if opt_in {
                        a.push(("client.port", (p.port() as i64).into()));
                    }
                }
            }
            SpanKind::Client => {
                let (h, host_port): (AttrValue, _) = match (self.host.take(), self.peer) {
                    (Some(host), _) => {
                        let (name, port) = host_parts(host);
                        (name.into(), port)
                    }
                    (None, Some(peer)) => (ip_shared(peer.ip()).into(), None),
                    (None, None) => (AttrValue::Static(""), None),
                };
                let port = self.server_port(host_port);
                let h_text = h.as_str().unwrap_or_default();
                let target = privacy.target(&self.target);
                if target.starts_with("http://") || target.starts_with("https://") {
                    // Absolute form (requests to a proxy): the target is the whole URL.
                    a.push(("url.full", without_credentials(&target).into()));
                } else if !target.is_empty() {
                    let mut url = String::with_capacity(16 + h_text.len() + target.len());
                    url.push_str(self.scheme());
                    url.push_str("://");
                    let default_port = self.default_port();
                    let bracket = h_text.contains(':') && port != default_port;
                    if bracket {
                        url.push('[');
                    }
                    url.push_str(h_text);
                    if bracket {
                        url.push(']');
                    }
                    if port != default_port {
                        url.push(':');
                        url.push_str(itoa::Buffer::new().format(port));
                    }
                    url.push_str(&target);
                    a.push(("url.full", url.into()));
                }
                a.push(("server.port", (port as i64).into()));
                if !h_text.is_empty() {
                    a.push(("server.address", h));
                }
            }
        }
        if let (Some(p), Some(ip)) = (self.peer, peer_ip) {
            a.push(("network.peer.address", ip.into()));
            a.push(("network.peer.port", (p.port() as i64).into()));
        }
        if opt_in {
            if let Some(l) = self.local {
                a.push(("network.local.address", ip_shared(l.ip()).into()));
                a.push(("network.local.port", (l.port() as i64).into()));
                let family = if l.is_ipv4() { "ipv4" } else { "ipv6" };
                a.push(("network.type", AttrValue::Static(family)));
            }
            a.push(("network.transport", AttrValue::Static("tcp")));
            a.push(("network.protocol.name", AttrValue::Static("http")));
        }
        let version = match self.version {
            0 => "1.0",
            1 => "1.1",
            _ => "2",
        };
        a.push(("network.protocol.version", AttrValue::Static(version)));
        if let Some(g) = self.grpc {
            a.push(("rpc.system", AttrValue::Static("grpc")));
            a.push(("rpc.service", g.service.into()));
            a.push(("rpc.method", g.method.into()));
            if let Some(code) = g.status {
                a.push(("rpc.grpc.status_code", code.into()));
            }
        }
        if self.partial {
            a.push(("kspan.partial", true.into()));
        }
        if let Some(ua) = self.user_agent
            && (kind == SpanKind::Server || opt_in)
        {
            a.push(("user_agent.original", ua.into()));
        }
        for (&name, &key) in privacy.captured.iter().zip(privacy.captured_keys) {
            let values: Vec<String> = self
                .captured_headers
                .iter_mut()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| std::mem::take(v))
                .collect();
            if !values.is_empty() {
                a.push((key, AttrValue::StrArray(values)));
            }
        }
        if opt_in {
            a.push(("http.request.body.size", (self.request_body as i64).into()));
        }
        if let Some(s) = self.status {
            a.push(("http.response.status_code", (s as i64).into()));
            if opt_in {
                a.push((
                    "http.response.body.size",
                    (self.response_body as i64).into(),
                ));
            }
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

/// The conventions' method values are the upper-case standard names; these are fixed words.
fn method_value(m: &Text) -> AttrValue {
    match m {
        Cow::Borrowed(k) => AttrValue::Static(k),
        Cow::Owned(m) => m.as_str().into(),
    }
}

/// Heap bytes `t` holds.
pub fn text_capacity(t: &Text) -> usize {
    match t {
        Cow::Borrowed(_) => 0,
        Cow::Owned(s) => s.capacity(),
    }
}

/// `IpAddr::to_string` goes through the formatting machinery, which was a visible share of the
/// linker's time; IPv4, nearly every address, is written directly.
pub fn ip_string(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut buf = [0; 15];
            ipv4_text(v4, &mut buf).to_string()
        }
        std::net::IpAddr::V6(_) => ip.to_string(),
    }
}

/// Addresses whose text is remembered per thread; beyond it the cache starts over.
const IP_TEXTS: usize = 1024;

/// [`ip_string`] shared: spans name the same few peers over and over, so the text of each
/// is made once (per thread, bounded) and every span holds a reference to it.
pub fn ip_shared(ip: std::net::IpAddr) -> Arc<str> {
    thread_local! {
        static TEXTS: std::cell::RefCell<rustc_hash::FxHashMap<std::net::IpAddr, Arc<str>>> =
            Default::default();
    }
    TEXTS.with_borrow_mut(|texts| {
        if let Some(t) = texts.get(&ip) {
            return t.clone();
        }
        if texts.len() >= IP_TEXTS {
            texts.clear();
        }
        let text: Arc<str> = ip_string(ip).into();
        texts.insert(ip, text.clone());
        text
    })
}

/// Dotted-decimal text in `buf`, digit by digit (a byte has at most three).
fn ipv4_text(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    // Only ASCII digits and dots were written.
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
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
            tls: false,
        }
    }

    /// A lookup over the exchange's attributes as `kind` with `privacy`.
    fn attrs(
        e: &HttpExchange,
        kind: SpanKind,
        privacy: &Privacy,
    ) -> impl Fn(&str) -> Option<AttrValue> + use<> {
        let a = e.clone().attributes(kind, privacy);
        move |k| a.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn client_attributes_follow_semconv() {
        let e = ex();
        let get = attrs(&e, SpanKind::Client, &Privacy::default());
        assert_eq!(
            get("url.full"),
            Some("http://backend:8081/api/items?id=REDACTED".into())
        );
        assert_eq!(get("server.address"), Some("backend".into()));
        assert_eq!(get("server.port"), Some(8081i64.into()));
        assert_eq!(get("http.response.status_code"), Some(404i64.into()));
        assert_eq!(get("http.request.method"), Some("GET".into()));
        assert_eq!(get("network.peer.address"), Some("127.0.0.1".into()));
        assert_eq!(get("user_agent.original"), None, "opt-in on CLIENT spans");
        assert_eq!(e.error(SpanKind::Client).as_deref(), Some("HTTP 404"));
        assert_eq!(e.error(SpanKind::Server), None);
        let all = Privacy {
            opt_in_attributes: true,
            ..Default::default()
        };
        let get = attrs(&e, SpanKind::Client, &all);
        assert_eq!(get("user_agent.original"), Some("curl/8".into()));
        assert_eq!(get("network.local.port"), Some(40000i64.into()));
        assert_eq!(get("http.response.body.size"), Some(12i64.into()));
    }

    #[test]
    fn ipv6_url_authority_is_bracketed() {
        let mut e = ex();
        e.host = None;
        e.peer = Some("[::1]:8081".parse().unwrap());
        let get = attrs(&e, SpanKind::Client, &Privacy::default());
        assert_eq!(
            get("url.full"),
            Some("http://[::1]:8081/api/items?id=REDACTED".into())
        );
        e.peer = Some("[::1]:80".parse().unwrap());
        let get = attrs(&e, SpanKind::Client, &Privacy::default());
        assert_eq!(
            get("url.full"),
            Some("http://::1/api/items?id=REDACTED".into())
        );
    }

    #[test]
    fn ip_strings_match_display() {
        for ip in [
            "0.0.0.0",
            "10.200.3.45",
            "255.255.255.255",
            "1.20.109.250",
            "100.9.0.99",
            "::1",
            "fe80::1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_string(ip), ip.to_string());
            assert_eq!(&*ip_shared(ip), ip.to_string());
        }
    }

    #[test]
    fn server_attributes_follow_semconv() {
        let mut e = ex();
        e.local = Some("10.0.0.2:8081".parse().unwrap());
        e.peer = Some("10.0.0.1:5555".parse().unwrap());
        let get = attrs(&e, SpanKind::Server, &Privacy::default());
        assert_eq!(get("url.path"), Some("/api/items".into()));
        assert_eq!(get("url.query"), Some("id=REDACTED".into()));
        assert_eq!(get("client.address"), Some("10.0.0.1".into()));
        assert_eq!(get("network.protocol.version"), Some("1.1".into()));
        assert_eq!(get("url.scheme"), Some("http".into()));
        for opt_in in [
            "client.port",
            "network.local.address",
            "network.local.port",
            "network.type",
            "network.transport",
            "network.protocol.name",
            "http.request.body.size",
            "http.response.body.size",
        ] {
            assert_eq!(get(opt_in), None, "{opt_in} is opt-in");
        }
        let all = Privacy {
            opt_in_attributes: true,
            ..Default::default()
        };
        let get = attrs(&e, SpanKind::Server, &all);
        assert_eq!(get("client.port"), Some(5555i64.into()));
        assert_eq!(get("network.type"), Some("ipv4".into()));
        assert_eq!(get("http.request.body.size"), Some(0i64.into()));
    }

    #[test]
    fn captured_headers_and_proxy_targets() {
        let (privacy, _) = Privacy::new(&["x-tenant".into()], &[], false);
        let mut e = ex();
        e.target = "http://bob:pw@api:8080/x?k=v".into();
        e.captured_headers = vec![("x-tenant", "a".into()), ("x-tenant", "b".into())];
        let get = attrs(&e, SpanKind::Client, &privacy);
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
        assert_eq!(split_host("a:"), ("a", None));
        assert_eq!(split_host("a:+80"), ("a", None));
        assert_eq!(split_host("a:65535"), ("a", Some(65535)));
        assert_eq!(split_host("a:65536"), ("a", None));
        assert_eq!(split_host("a:008080"), ("a", Some(8080)));
        // The name taken out of the header is the same text, in place or copied.
        for host in ["a:1", "a", "[::1]:8080", "::1", "[::1]"] {
            let (name, port) = split_host(host);
            assert_eq!(host_parts(host.to_string()), (name.to_string(), port));
        }
    }
}
