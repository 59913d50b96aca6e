//! Zipkin v2 JSON (`POST /api/v2/spans`), encoded from the same span records as OTLP and
//! mapped as the OpenTelemetry specification's Zipkin exporter section says: B3 ids one to one
//! (a 64-bit trace id stays 16 hex digits), `service.name` as the local endpoint, the peer as
//! the remote endpoint, attributes and the other resource attributes as string tags, an error
//! status as `otel.status_code=ERROR` and `error=<description>`.
use std::{fmt::Write as _, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;

use super::{resource, retry};
use crate::{
    config::ZipkinConfig,
    process::ProcessInfo,
    trace::span::{AttrValue, SpanKind, SpanRecord},
};

#[derive(Debug, thiserror::Error)]
pub enum ZipkinError {
    #[error("could not build the Zipkin exporter: {0}")]
    Build(String),
    #[error("Zipkin export failed: {0}")]
    Export(String),
}

pub struct ZipkinSink {
    client: reqwest::Client,
    endpoint: String,
    timeout: Duration,
    encoder: Encoder,
    body: String,
}

impl ZipkinSink {
    pub fn new(cfg: &ZipkinConfig, host: String, command_line: bool) -> Result<Self, ZipkinError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .build()
            .map_err(|e| ZipkinError::Build(e.to_string()))?;
        Ok(Self {
            client,
            endpoint: cfg.endpoint.clone(),
            timeout: cfg.timeout,
            encoder: Encoder::new(host, command_line),
            body: String::new(),
        })
    }

    /// Exports one batch; returns how many spans were delivered.
    pub async fn export(&mut self, spans: &[SpanRecord]) -> Result<usize, ZipkinError> {
        if spans.is_empty() {
            return Ok(0);
        }
        self.body.clear();
        self.encoder.encode(spans, &mut self.body);
        let body = Bytes::copy_from_slice(self.body.as_bytes());
        let (client, endpoint, timeout) = (&self.client, &self.endpoint, self.timeout);
        retry::run(|| async {
            let req = client
                .post(endpoint.as_str())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .timeout(timeout)
                .body(body.clone());
            retry::http_answer(req.send().await).await
        })
        .await
        .map_err(ZipkinError::Export)?;
        Ok(spans.len())
    }
}

/// Writes batches as Zipkin v2 JSON; each process's tags are written once and reused.
pub struct Encoder {
    host: String,
    command_line: bool,
    /// Per process record: its `"localEndpoint":…` and resource tags, pre-rendered.
    processes: std::collections::HashMap<usize, (Arc<ProcessInfo>, Process)>,
}

struct Process {
    local_endpoint: String,
    /// `"key":"value"` pairs, comma-separated, ready to join the span's tags.
    tags: String,
}

const MAX_PROCESSES: usize = 4096;

impl Encoder {
    pub fn new(host: String, command_line: bool) -> Self {
        Self {
            host,
            command_line,
            processes: Default::default(),
        }
    }

    /// Appends the JSON array of `spans` to `out`.
    pub fn encode(&mut self, spans: &[SpanRecord], out: &mut String) {
        out.push('[');
        for (i, s) in spans.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let process = self.process(&s.process);
            write_span(out, s, process);
        }
        out.push(']');
    }

    fn process(&mut self, p: &Arc<ProcessInfo>) -> &Process {
        let key = Arc::as_ptr(p) as usize;
        if !self.processes.contains_key(&key) {
            if self.processes.len() >= MAX_PROCESSES {
                self.processes.retain(|_, (p, _)| Arc::strong_count(p) > 1);
            }
            let mut local_endpoint = String::from("{\"serviceName\":");
            string(&mut local_endpoint, &p.service_name);
            local_endpoint.push('}');
            let mut tags = String::new();
            let attrs = resource::attributes(p, &self.host, self.command_line);
            let scope = [
                ("otel.scope.name", AttrValue::Static(resource::SCOPE_NAME)),
                (
                    "otel.scope.version",
                    AttrValue::Static(resource::SCOPE_VERSION),
                ),
            ];
            for (k, v) in attrs
                .iter()
                .filter(|(k, _)| *k != "service.name")
                .chain(&scope)
            {
                tag(&mut tags, k, v);
            }
            self.processes.insert(
                key,
                (
                    p.clone(),
                    Process {
                        local_endpoint,
                        tags,
                    },
                ),
            );
        }
        &self.processes[&key].1
    }
}

fn write_span(out: &mut String, s: &SpanRecord, process: &Process) {
    out.push_str("{\"traceId\":\"");
    // B3 64-bit trace ids are the low half of the 128-bit one; Zipkin keeps them 16 digits.
    if s.trace_id >> 64 == 0 {
        let _ = write!(out, "{:016x}", s.trace_id as u64);
    } else {
        let _ = write!(out, "{:032x}", s.trace_id);
    }
    let _ = write!(out, "\",\"id\":\"{:016x}\"", s.span_id);
    if let Some(p) = s.parent_span_id {
        let _ = write!(out, ",\"parentId\":\"{p:016x}\"");
    }
    out.push_str(match s.kind {
        SpanKind::Server => ",\"kind\":\"SERVER\"",
        SpanKind::Client => ",\"kind\":\"CLIENT\"",
    });
    out.push_str(",\"name\":");
    string(out, &s.name);
    // Microseconds; a span shorter than one still lasts one (Zipkin reads 0 as "unknown").
    let micros = s.end_unix_ns.saturating_sub(s.start_unix_ns) / 1000;
    let _ = write!(
        out,
        ",\"timestamp\":{},\"duration\":{}",
        s.start_unix_ns / 1000,
        micros.max(1)
    );
    out.push_str(",\"localEndpoint\":");
    out.push_str(&process.local_endpoint);
    if let Some(remote) = remote_endpoint(s) {
        out.push_str(",\"remoteEndpoint\":");
        out.push_str(&remote);
    }
    out.push_str(",\"tags\":{");
    let start = out.len();
    for (k, v) in &s.attributes {
        tag(out, k, v);
    }
    if let Some(e) = &s.error {
        tag(out, "otel.status_code", &AttrValue::Static("ERROR"));
        tag(out, "error", &AttrValue::Str(e.clone()));
    }
    if !process.tags.is_empty() {
        if out.len() > start {
            out.push(',');
        }
        out.push_str(&process.tags);
    }
    out.push_str("}}");
}

/// The peer's address as Zipkin's remote endpoint.
fn remote_endpoint(s: &SpanRecord) -> Option<String> {
    let ip: IpAddr = s.attr("network.peer.address")?.as_str()?.parse().ok()?;
    let family = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
    let mut out = format!("{{\"{family}\":\"{ip}\"");
    if let Some(AttrValue::Int(port)) = s.attr("network.peer.port") {
        let _ = write!(out, ",\"port\":{port}");
    }
    out.push('}');
    Some(out)
}

/// Appends `"key":"value"` (after a comma unless it is the object's first member). Zipkin
/// tags are strings: numbers and booleans as text, arrays as JSON text.
fn tag(out: &mut String, key: &str, v: &AttrValue) {
    if !out.ends_with('{') && !out.is_empty() {
        out.push(',');
    }
    string(out, key);
    out.push(':');
    match v {
        AttrValue::Str(s) => string(out, s),
        AttrValue::Static(s) => string(out, s),
        AttrValue::Shared(s) => string(out, s),
        AttrValue::Int(i) => {
            let _ = write!(out, "\"{i}\"");
        }
        AttrValue::Bool(b) => {
            let _ = write!(out, "\"{b}\"");
        }
        AttrValue::StrArray(items) => {
            let json = serde_json::to_string(items).unwrap_or_default();
            string(out, &json);
        }
    }
}

/// A JSON string literal.
fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests;
