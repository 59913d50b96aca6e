//! OTLP/protobuf straight from span records: an `ExportTraceServiceRequest` written field by
//! field, with no intermediate message structs. Each process's resource is encoded once and
//! its bytes reused; buffers are kept between batches.
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use super::wire::{
    bytes_field, fixed32_field, fixed64_field, len_field_len, len_prefix, nested, varint_field,
    varint_len,
};
use crate::{
    export::resource,
    process::ProcessInfo,
    trace::span::{AttrValue, SpanKind, SpanRecord},
};

/// Encoded resources kept at most; beyond it those of exited processes are dropped.
const MAX_RESOURCES: usize = 4096;

/// `Span.flags`: sampled, and "whether the parent is remote" known (it is local: the
/// OpenTelemetry SDK's exporter writes the same).
const SPAN_FLAGS: u32 = 0x100 | 0x01;

pub struct Encoder {
    host: String,
    command_line: bool,
    /// `Resource` message bodies by process record (the `Arc` keeps its address unique).
    resources: HashMap<usize, (Arc<ProcessInfo>, Vec<u8>)>,
    /// The `InstrumentationScope` message body.
    scope: Vec<u8>,
    /// Encoded `Span`s per resource of the batch being written, in first-seen order.
    groups: Vec<(usize, Vec<u8>)>,
    /// Spare span buffers from earlier batches.
    spare: Vec<Vec<u8>>,
}

impl Encoder {
    /// A new encoder (its own buffers and caches) making the same requests as this one.
    pub fn sibling(&self) -> Self {
        Self::new(self.host.clone(), self.command_line)
    }

    pub fn new(host: String, command_line: bool) -> Self {
        let mut scope = Vec::new();
        bytes_field(&mut scope, 1, resource::SCOPE_NAME.as_bytes());
        bytes_field(&mut scope, 2, resource::SCOPE_VERSION.as_bytes());
        Self {
            host,
            command_line,
            resources: HashMap::default(),
            scope,
            groups: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Appends the `ExportTraceServiceRequest` of `spans` to `out`.
    pub fn encode(&mut self, spans: &[SpanRecord], out: &mut Vec<u8>) {
        for s in spans {
            let key = self.resource_key(&s.process);
            let group = match self.groups.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => {
                    let buf = self.spare.pop().unwrap_or_default();
                    self.groups.push((key, buf));
                    self.groups.len() - 1
                }
            };
            nested(&mut self.groups[group].1, 2, |out| write_span(out, s));
        }
        for (key, mut spans) in self.groups.drain(..) {
            let Some((_, resource)) = self.resources.get(&key) else {
                continue;
            };
            // ResourceSpans { resource = 1; scope_spans = 2 }, ScopeSpans { scope = 1; spans = 2 }
            let scope_spans = len_field_len(self.scope.len()) + spans.len();
            len_prefix(
                out,
                1,
                len_field_len(resource.len()) + len_field_len(scope_spans),
            );
            bytes_field(out, 1, resource);
            len_prefix(out, 2, scope_spans);
            bytes_field(out, 1, &self.scope);
            out.extend_from_slice(&spans);
            spans.clear();
            self.spare.push(spans);
        }
    }

    fn resource_key(&mut self, p: &Arc<ProcessInfo>) -> usize {
        let key = Arc::as_ptr(p) as usize;
        if !self.resources.contains_key(&key) {
            if self.resources.len() >= MAX_RESOURCES {
                // Only this cache holds records of exited processes.
                self.resources.retain(|_, (p, _)| Arc::strong_count(p) > 1);
            }
            let mut body = Vec::new();
            for (k, v) in resource::attributes(p, &self.host, self.command_line) {
                key_value(&mut body, 1, k, &v);
            }
            self.resources.insert(key, (p.clone(), body));
        }
        key
    }
}

fn write_span(out: &mut Vec<u8>, s: &SpanRecord) {
    bytes_field(out, 1, &s.trace_id.to_be_bytes());
    bytes_field(out, 2, &s.span_id.to_be_bytes());
    if let Some(p) = s.parent_span_id {
        bytes_field(out, 4, &p.to_be_bytes());
    }
    bytes_field(out, 5, s.name.as_bytes());
    let kind = match s.kind {
        SpanKind::Server => 2,
        SpanKind::Client => 3,
    };
    varint_field(out, 6, kind);
    fixed64_field(out, 7, s.start_unix_ns);
    fixed64_field(out, 8, s.end_unix_ns);
    for (k, v) in &s.attributes {
        key_value(out, 9, k, v);
    }
    // Status { message = 2; code = 3 }: UNSET (an empty message) or ERROR with its reason.
    match &s.error {
        Some(e) => {
            len_prefix(out, 15, len_field_len(e.len()) + 2);
            bytes_field(out, 2, e.as_bytes());
            varint_field(out, 3, 2);
        }
        None => len_prefix(out, 15, 0),
    }
    fixed32_field(out, 16, SPAN_FLAGS);
}

/// A `KeyValue { key = 1; AnyValue value = 2 }` as field `field`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, v: &AttrValue) {
    let value = any_value_len(v);
    len_prefix(out, field, len_field_len(key.len()) + len_field_len(value));
    bytes_field(out, 1, key.as_bytes());
    len_prefix(out, 2, value);
    write_any_value(out, v);
}

/// The body length of `AnyValue { string_value = 1; bool_value = 2; int_value = 3;
/// array_value = 5 }`.
fn any_value_len(v: &AttrValue) -> usize {
    match v {
        AttrValue::Str(_) | AttrValue::Static(_) | AttrValue::Shared(_) => {
            len_field_len(v.as_str().map_or(0, str::len))
        }
        AttrValue::Bool(_) => 2,
        AttrValue::Int(i) => 1 + varint_len(*i as u64),
        AttrValue::StrArray(items) => len_field_len(array_len(items)),
    }
}

/// The body length of `ArrayValue { repeated AnyValue values = 1 }` of strings.
fn array_len(items: &[String]) -> usize {
    items
        .iter()
        .map(|s| len_field_len(len_field_len(s.len())))
        .sum()
}

fn write_any_value(out: &mut Vec<u8>, v: &AttrValue) {
    match v {
        AttrValue::Str(s) => bytes_field(out, 1, s.as_bytes()),
        AttrValue::Static(s) => bytes_field(out, 1, s.as_bytes()),
        AttrValue::Shared(s) => bytes_field(out, 1, s.as_bytes()),
        AttrValue::Bool(b) => varint_field(out, 2, u64::from(*b)),
        AttrValue::Int(i) => varint_field(out, 3, *i as u64),
        AttrValue::StrArray(items) => {
            len_prefix(out, 5, array_len(items));
            for s in items {
                len_prefix(out, 1, len_field_len(s.len()));
                bytes_field(out, 1, s.as_bytes());
            }
        }
    }
}
