//! The reference path: OTLP export through opentelemetry-otlp. Spans are built as `SpanData`
//! directly (their ids, parents and times come from the traffic, not from a tracer), and each
//! batch is split by process so every span carries its own service's resource.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use opentelemetry::{
    InstrumentationScope, KeyValue, Value,
    trace::{SpanContext, SpanId, SpanKind as OtelKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};

use super::OtlpError;
use crate::{
    config::{OtlpConfig, Protocol},
    export::resource,
    process::ProcessInfo,
    trace::span::{AttrValue, SpanKind, SpanRecord},
};

pub struct SdkSink {
    exporter: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
    host: String,
    /// Export `process.command_line` (off by default: command lines often carry secrets).
    command_line: bool,
}

impl SdkSink {
    pub fn new(cfg: &OtlpConfig, host: String, command_line: bool) -> Result<Self, OtlpError> {
        let timeout = cfg.timeout;
        let ca = super::certificate(cfg)?;
        let https = cfg.endpoint.starts_with("https://");
        let exporter = match cfg.protocol {
            Protocol::Grpc => {
                let mut md = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                            .map_err(|e| OtlpError::Build(format!("header {k:?}: {e}")))?;
                    let val = v
                        .parse()
                        .map_err(|e| OtlpError::Build(format!("header {k:?}: {e}")))?;
                    md.insert(key, val);
                }
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(cfg.endpoint.clone())
                    .with_timeout(timeout)
                    .with_metadata(md);
                if https {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &ca {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    builder = builder.with_tls_config(tls);
                }
                builder.build()
            }
            Protocol::HttpProtobuf => {
                let mut client = reqwest::Client::builder().timeout(timeout);
                if let Some(pem) = &ca {
                    let certs = reqwest::Certificate::from_pem_bundle(pem)
                        .map_err(|e| OtlpError::Build(format!("CA certificate: {e}")))?;
                    client = client.tls_certs_merge(certs);
                }
                let client = client
                    .build()
                    .map_err(|e| OtlpError::Build(e.to_string()))?;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(cfg.endpoint.clone())
                    .with_timeout(timeout)
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_headers(cfg.headers.iter().cloned().collect())
                    .build()
            }
        }
        .map_err(|e| OtlpError::Build(e.to_string()))?;
        let scope = scope();
        Ok(Self {
            exporter,
            scope,
            host,
            command_line,
        })
    }

    /// Exports one batch; returns how many spans were delivered.
    pub async fn export(&mut self, spans: Vec<SpanRecord>) -> Result<usize, OtlpError> {
        // Keyed by the shared allocation: one Arc per process from the cache.
        let mut by_process: HashMap<usize, (Arc<ProcessInfo>, Vec<SpanData>)> = HashMap::new();
        for s in spans {
            let key = Arc::as_ptr(&s.process) as usize;
            let process = s.process.clone();
            by_process
                .entry(key)
                .or_insert_with(|| (process, Vec::new()))
                .1
                .push(to_span_data(s, &self.scope));
        }
        let mut sent = 0;
        let mut first_err = None;
        for (_, (process, batch)) in by_process {
            let n = batch.len();
            self.exporter
                .set_resource(&resource(&process, &self.host, self.command_line));
            match self.exporter.export(batch).await {
                Ok(()) => sent += n,
                Err(e) => first_err = first_err.or(Some(e.to_string())),
            }
        }
        match first_err {
            Some(e) if sent == 0 => Err(OtlpError::Export(e)),
            Some(e) => {
                log::warn!("part of an OTLP batch failed: {e}");
                Ok(sent)
            }
            None => Ok(sent),
        }
    }

    pub fn shutdown(&mut self) {
        let _ = self.exporter.shutdown();
    }
}

/// The instrumentation scope every kspan span carries.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(resource::SCOPE_NAME)
        .with_version(resource::SCOPE_VERSION)
        .build()
}

pub fn resource(p: &ProcessInfo, host: &str, command_line: bool) -> Resource {
    let attrs = resource::attributes(p, host, command_line)
        .into_iter()
        .map(|(k, v)| KeyValue::new(k, value(v)));
    Resource::builder_empty().with_attributes(attrs).build()
}

/// Converts a span for the OpenTelemetry SDK's exporters, moving its strings rather than
/// copying them.
pub fn to_span_data(s: SpanRecord, scope: &InstrumentationScope) -> SpanData {
    let time = |ns: u64| UNIX_EPOCH + Duration::from_nanos(ns);
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(s.trace_id),
            SpanId::from(s.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: s
            .parent_span_id
            .map(SpanId::from)
            .unwrap_or(SpanId::INVALID),
        parent_span_is_remote: false,
        span_kind: match s.kind {
            SpanKind::Server => OtelKind::Server,
            SpanKind::Client => OtelKind::Client,
        },
        name: s.name,
        start_time: time(s.start_unix_ns),
        end_time: time(s.end_unix_ns),
        attributes: s
            .attributes
            .into_iter()
            .map(|(k, v)| KeyValue::new(k, value(v)))
            .collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match s.error {
            Some(e) => Status::error(e),
            None => Status::Unset,
        },
        instrumentation_scope: scope.clone(),
    }
}

fn value(v: AttrValue) -> Value {
    match v {
        AttrValue::Str(x) => x.into(),
        AttrValue::Static(x) => x.into(),
        AttrValue::Shared(x) => x.to_string().into(),
        AttrValue::Int(x) => x.into(),
        AttrValue::Bool(x) => x.into(),
        AttrValue::StrArray(x) => Value::Array(
            x.into_iter()
                .map(opentelemetry::StringValue::from)
                .collect::<Vec<_>>()
                .into(),
        ),
    }
}
