//! What the test collectors answer when told to (failures, partial success), and a Zipkin v2
//! receiver that checks every span it gets against the v2 schema.
use std::{
    collections::VecDeque,
    io::Read as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
use serde_json::Value;

/// One scripted answer to the next export request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// OTLP/HTTP: answer this status (and `Retry-After`) and keep nothing.
    Http {
        status: u16,
        retry_after: Option<u64>,
    },
    /// OTLP/gRPC: fail with this code and keep nothing.
    Grpc(tonic::Code),
    /// Keep the spans but report this many rejected.
    Reject(i64),
}

#[derive(Clone, Default)]
pub struct Script(Arc<Mutex<ScriptState>>);

#[derive(Default)]
struct ScriptState {
    answers: VecDeque<Answer>,
    requests: usize,
    gzipped: usize,
}

impl Script {
    /// Answers the next requests so, in order; then every request is accepted.
    pub fn answer(&self, answers: impl IntoIterator<Item = Answer>) {
        self.0.lock().unwrap().answers.extend(answers);
    }

    /// Export requests received, and how many of them were gzipped.
    pub fn requests(&self) -> (usize, usize) {
        let s = self.0.lock().unwrap();
        (s.requests, s.gzipped)
    }

    pub(crate) fn next(&self, gzip: bool) -> Option<Answer> {
        let mut s = self.0.lock().unwrap();
        s.requests += 1;
        s.gzipped += usize::from(gzip);
        s.answers.pop_front()
    }
}

pub(crate) fn rejected(n: i64) -> ExportTracePartialSuccess {
    ExportTracePartialSuccess {
        rejected_spans: n,
        error_message: "scripted rejection".into(),
    }
}

pub(crate) fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .expect("a gzip body");
    out
}

/// The next HTTP/1.1 request on a connection: its head (lower-cased) and its body (by
/// Content-Length); `None` once the peer closes. `buf` carries bytes of the next request.
pub(crate) async fn next_request<S>(sock: &mut S, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    loop {
        // Parse the head, wait for the whole body.
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = buf.drain(..end + 4 + len).skip(end + 4).collect();
                return Some((head, body));
            }
        }
        let mut chunk = [0u8; 8192];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Spans a Zipkin receiver got, each already checked against the v2 schema, and every schema
/// violation it saw.
#[derive(Clone, Default)]
pub struct Zipkin {
    pub spans: Arc<Mutex<Vec<Value>>>,
    pub violations: Arc<Mutex<Vec<String>>>,
}

/// A Zipkin v2 receiver: `POST /api/v2/spans` with a JSON array of spans.
pub fn zipkin_receiver(rt: &tokio::runtime::Runtime) -> (SocketAddr, Zipkin) {
    use tokio::io::AsyncWriteExt as _;
    let got = Zipkin::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("receiver bind");
    let addr = listener.local_addr().expect("addr");
    let shared = got.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let got = shared.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, body)) = next_request(&mut sock, &mut buf).await {
                    let mut problems = Vec::new();
                    if !head.starts_with("post /api/v2/spans ") {
                        problems.push(format!("request line {:?}", head.lines().next()));
                    }
                    if !head.contains("content-type: application/json") {
                        problems.push("not application/json".into());
                    }
                    match serde_json::from_slice::<Value>(&body) {
                        Ok(Value::Array(spans)) => {
                            for s in &spans {
                                problems.extend(v2_violations(s));
                            }
                            got.spans.lock().unwrap().extend(spans);
                        }
                        other => problems.push(format!("body is no JSON array: {other:?}")),
                    }
                    let status = if problems.is_empty() {
                        "202 Accepted"
                    } else {
                        "400 Bad Request"
                    };
                    got.violations.lock().unwrap().extend(problems);
                    let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, got)
}

/// What in `span` breaks zipkin2's `Span` schema (zipkin-api.yaml, v2): field names and types,
/// lowercase hex ids of the right widths, integer microseconds, string tags, endpoints.
pub fn v2_violations(span: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(obj) = span.as_object() else {
        return vec![format!("span is not an object: {span}")];
    };
    let hex = |v: &Value, widths: &[usize]| {
        v.as_str().is_some_and(|s| {
            widths.contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && s.bytes().any(|b| b != b'0')
        })
    };
    for (key, v) in obj {
        let ok = match key.as_str() {
            "traceId" => hex(v, &[16, 32]),
            "id" | "parentId" => hex(v, &[16]),
            "kind" => matches!(
                v.as_str(),
                Some("CLIENT" | "SERVER" | "PRODUCER" | "CONSUMER")
            ),
            "name" => v.is_string(),
            "timestamp" | "duration" => v.as_u64().is_some_and(|n| n > 0),
            "debug" | "shared" => v.is_boolean(),
            "localEndpoint" | "remoteEndpoint" => endpoint_ok(v),
            "annotations" => v.is_array(),
            "tags" => v
                .as_object()
                .is_some_and(|t| t.values().all(Value::is_string)),
            _ => false,
        };
        if !ok {
            out.push(format!("{key}: {v}"));
        }
    }
    for required in ["traceId", "id"] {
        if !obj.contains_key(required) {
            out.push(format!("no {required}"));
        }
    }
    out
}

fn endpoint_ok(v: &Value) -> bool {
    v.as_object().is_some_and(|e| {
        e.iter().all(|(k, v)| match k.as_str() {
            "serviceName" => v.is_string(),
            "ipv4" => v
                .as_str()
                .is_some_and(|s| s.parse::<std::net::Ipv4Addr>().is_ok()),
            "ipv6" => v
                .as_str()
                .is_some_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok()),
            "port" => v.as_u64().is_some_and(|p| p <= 65535),
            _ => false,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_check_catches_what_zipkin_would_refuse() {
        let good = serde_json::json!({
            "traceId": "463ac35c9f6413ad", "id": "a2fb4a1d1a96d312", "kind": "SERVER",
            "name": "get", "timestamp": 1, "duration": 2,
            "localEndpoint": {"serviceName": "a"}, "remoteEndpoint": {"ipv4": "127.0.0.1", "port": 80},
            "tags": {"k": "v"}
        });
        assert_eq!(v2_violations(&good), Vec::<String>::new());
        for (key, bad) in [
            ("traceId", serde_json::json!("463AC35C9F6413AD")),
            ("id", serde_json::json!("a2fb")),
            ("kind", serde_json::json!("server")),
            ("timestamp", serde_json::json!(1.5)),
            ("tags", serde_json::json!({"k": 1})),
            ("remoteEndpoint", serde_json::json!({"ipv4": "::1"})),
            ("color", serde_json::json!("red")),
        ] {
            let mut s = good.clone();
            s[key] = bad;
            assert!(!v2_violations(&s).is_empty(), "{key}");
        }
    }
}
