//! The viewer's JSON, in the Jaeger query API's shapes (`/api/traces`, `/api/traces/{id}`,
//! `/api/services`), so tools that read Jaeger read kspan: spans with `traceID`, `spanID`,
//! `references`, `startTime`/`duration` in microseconds, `tags`, and a `processes` table per
//! trace with each process's resource.
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;
use serde_json::{Value, json};

use super::store::{Query, Trace};
use crate::{
    export::resource,
    process::ProcessInfo,
    trace::span::{AttrValue, SpanKind, SpanRecord},
};

/// What the resource of a process shows: the same as exporters send.
#[derive(Clone, Debug, Default)]
pub struct ResourceView {
    pub host: String,
    pub command_line: bool,
}

/// `{"data": [...], "total": n, "limit": l, "offset": 0, "errors": null}`.
pub fn traces_json(traces: &[&Trace], limit: usize, view: &ResourceView) -> Value {
    // The same few processes make most traces: each resource is built once per answer.
    let mut resources = Resources::default();
    let data: Vec<Value> = traces
        .iter()
        .map(|t| trace_json(t, view, &mut resources))
        .collect();
    json!({"data": data, "total": traces.len(), "limit": limit, "offset": 0, "errors": null})
}

/// Jaeger's error body.
pub fn error_json(code: u16, msg: &str) -> Value {
    json!({"data": null, "total": 0, "limit": 0, "offset": 0, "errors": [{"code": code, "msg": msg}]})
}

pub fn names_json(names: Vec<String>) -> Value {
    json!({"total": names.len(), "data": names, "limit": 0, "offset": 0, "errors": null})
}

/// Resources already built, by process record.
type Resources = HashMap<*const ProcessInfo, Value>;

/// One trace: its spans (earliest first) and the processes they came from.
fn trace_json(t: &Trace, view: &ResourceView, resources: &mut Resources) -> Value {
    let mut processes: HashMap<*const ProcessInfo, (String, &Arc<ProcessInfo>)> =
        HashMap::default();
    let mut spans: Vec<&SpanRecord> = t.spans.iter().collect();
    spans.sort_by_key(|s| (s.start_unix_ns, s.span_id));
    let ids: rustc_hash::FxHashSet<u64> = spans.iter().map(|s| s.span_id).collect();
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let next = processes.len() + 1;
            let (pid, _) = processes
                .entry(Arc::as_ptr(&s.process))
                .or_insert_with(|| (format!("p{next}"), &s.process));
            span_json(s, pid, s.parent_span_id.is_some_and(|p| !ids.contains(&p)))
        })
        .collect();
    let processes: serde_json::Map<String, Value> = processes
        .into_values()
        .map(|(id, p)| {
            let process = resources.entry(Arc::as_ptr(p)).or_insert_with(|| {
                let tags = resource::attributes(p, &view.host, view.command_line);
                json!({"serviceName": p.service_name, "tags": tags_json(&tags)})
            });
            (id, process.clone())
        })
        .collect();
    let trace_id = t.spans.first().map_or(0, |s| s.trace_id);
    json!({
        "traceID": trace_id_hex(trace_id),
        "spans": spans,
        "processes": processes,
        "warnings": null,
    })
}

/// 16 hex digits for a 64-bit id (as B3 and Jaeger write it), else 32.
pub fn trace_id_hex(id: u128) -> String {
    if id >> 64 == 0 {
        format!("{id:016x}")
    } else {
        format!("{id:032x}")
    }
}

fn span_json(s: &SpanRecord, process: &str, orphan: bool) -> Value {
    let trace_id = trace_id_hex(s.trace_id);
    let references: Vec<Value> = s
        .parent_span_id
        .map(|p| json!({"refType": "CHILD_OF", "traceID": trace_id, "spanID": format!("{p:016x}")}))
        .into_iter()
        .collect();
    let kind = match s.kind {
        SpanKind::Server => "server",
        SpanKind::Client => "client",
    };
    let mut tags = vec![tag("span.kind", &AttrValue::Static(kind))];
    tags.extend(s.attributes.iter().map(|(k, v)| tag(k, v)));
    if let Some(e) = &s.error {
        tags.push(tag("error", &AttrValue::Bool(true)));
        tags.push(tag("otel.status_code", &AttrValue::Static("ERROR")));
        tags.push(tag("otel.status_description", &AttrValue::Str(e.clone())));
    }
    // Microseconds, the start rounded down and the end up: a child inside its parent in
    // nanoseconds stays inside in microseconds.
    let start_us = s.start_unix_ns / 1000;
    let end_us = s.end_unix_ns.max(s.start_unix_ns).div_ceil(1000);
    let warnings = orphan.then(|| {
        vec![format!(
            "parent span {:016x} not seen by this agent",
            s.parent_span_id.unwrap_or(0)
        )]
    });
    json!({
        "traceID": trace_id,
        "spanID": format!("{:016x}", s.span_id),
        "operationName": s.name,
        "references": references,
        "startTime": start_us,
        "duration": end_us - start_us,
        "tags": tags,
        "logs": [],
        "processID": process,
        "warnings": warnings,
        "flags": 1,
    })
}

fn tags_json(attrs: &[(&str, AttrValue)]) -> Vec<Value> {
    attrs.iter().map(|(k, v)| tag(k, v)).collect()
}

/// A Jaeger tag; string arrays (captured headers) as their JSON text, as Jaeger's OTLP
/// translator writes them.
fn tag(key: &str, v: &AttrValue) -> Value {
    match v {
        AttrValue::Int(i) => json!({"key": key, "type": "int64", "value": i}),
        AttrValue::Bool(b) => json!({"key": key, "type": "bool", "value": b}),
        AttrValue::StrArray(items) => {
            json!({"key": key, "type": "string", "value": Value::from(items.clone()).to_string()})
        }
        other => json!({"key": key, "type": "string", "value": other.as_str().unwrap_or_default()}),
    }
}

/// The query of `/api/traces` from its parameters (Jaeger's names: `service`, `operation`,
/// `minDuration`/`maxDuration` as Go durations, `limit`, `tags` as a JSON object, where
/// `{"error":"true"}` selects failed traces; and kspan's `peer`, a service-graph edge's server).
pub fn query(params: &[(String, String)]) -> Result<Query, String> {
    let mut q = Query {
        limit: 100,
        ..Query::default()
    };
    for (k, v) in params {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        match k.as_str() {
            "service" => q.service = Some(v.to_string()),
            "operation" => q.operation = Some(v.to_string()),
            "peer" => q.peer = Some(v.to_string()),
            "minDuration" => q.min_duration_ns = duration_ns(v)?,
            "maxDuration" => q.max_duration_ns = duration_ns(v)?,
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .map_err(|_| format!("limit {v:?} is not a number"))?
                    .clamp(1, 10_000)
            }
            "tags" => {
                let tags: serde_json::Map<String, Value> = serde_json::from_str(v)
                    .map_err(|e| format!("tags must be a JSON object: {e}"))?;
                for (tag, want) in tags {
                    match (tag.as_str(), want.as_str()) {
                        ("error", Some("true")) => q.errors_only = true,
                        ("error", Some("false")) => {}
                        _ => {
                            return Err(format!(
                                "tag {tag:?} cannot be searched here (only error)"
                            ));
                        }
                    }
                }
            }
            // Jaeger's time range and lookback: everything kept is recent.
            "start" | "end" | "lookback" => {}
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(q)
}

/// A Go duration as Jaeger takes it: `250us`, `1.5ms`, `2s`, `1m`.
fn duration_ns(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        _ => {
            return Err(format!(
                "duration {text:?} needs a unit: ns, us, ms, s, m or h"
            ));
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("duration {text:?} is not a number and a unit"))?;
    Ok((n * scale) as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::view::store::{Limits, TraceStore};

    fn process(service: &str, pid: u32) -> Arc<ProcessInfo> {
        Arc::new(ProcessInfo {
            pid,
            service_name: service.into(),
            exe: format!("/usr/bin/{service}"),
            command_line: format!("{service} --password=hunter2"),
            ..ProcessInfo::default()
        })
    }

    fn store_with(spans: Vec<SpanRecord>) -> TraceStore {
        let limits = Limits {
            traces: 10,
            bytes: usize::MAX,
            per_sec: 10,
        };
        let mut store = TraceStore::new(limits, Instant::now());
        store.offer(&spans, Instant::now());
        store
    }

    #[test]
    fn traces_take_jaegers_shape() {
        let (front, back) = (process("front", 10), process("back", 20));
        let trace = 0xabcu128 << 64 | 0x1;
        let client = SpanRecord {
            trace_id: trace,
            span_id: 0x2,
            parent_span_id: Some(0x1),
            kind: SpanKind::Client,
            name: "GET".into(),
            start_unix_ns: 1_000_500,
            end_unix_ns: 3_000_100,
            attributes: vec![
                ("http.response.status_code", AttrValue::Int(500)),
                ("kspan.partial", AttrValue::Bool(false)),
                (
                    "http.request.header.x-tenant",
                    AttrValue::StrArray(vec!["a".into()]),
                ),
            ],
            error: Some("500".into()),
            process: front.clone(),
        };
        let server = SpanRecord {
            span_id: 0x3,
            parent_span_id: Some(0x2),
            kind: SpanKind::Server,
            name: "GET /x".into(),
            start_unix_ns: 1_000_900,
            end_unix_ns: 3_000_000,
            attributes: vec![],
            error: None,
            process: back,
            ..client.clone()
        };
        let store = store_with(vec![server, client]);
        let t = store.get(trace).unwrap();
        let view = ResourceView {
            host: "node-1".into(),
            command_line: false,
        };
        let v = trace_json(t, &view, &mut Resources::default());
        assert_eq!(v["traceID"], "0000000000000abc0000000000000001");
        let spans = v["spans"].as_array().unwrap();
        // Earliest first.
        assert_eq!(spans[0]["spanID"], "0000000000000002");
        assert_eq!(spans[0]["operationName"], "GET");
        assert_eq!(spans[0]["startTime"], 1000);
        assert_eq!(spans[0]["duration"], 2001, "the end rounded up");
        assert_eq!(
            spans[0]["references"],
            json!([{"refType": "CHILD_OF", "traceID": "0000000000000abc0000000000000001", "spanID": "0000000000000001"}])
        );
        assert_eq!(
            spans[0]["warnings"],
            json!(["parent span 0000000000000001 not seen by this agent"]),
            "its parent is not in the trace"
        );
        assert_eq!(spans[1]["warnings"], Value::Null, "its parent is");
        let tags = &spans[0]["tags"];
        assert_eq!(
            tags[0],
            json!({"key": "span.kind", "type": "string", "value": "client"})
        );
        assert!(
            tags.as_array().unwrap().contains(
                &json!({"key": "http.response.status_code", "type": "int64", "value": 500})
            )
        );
        assert!(tags.as_array().unwrap().contains(
            &json!({"key": "http.request.header.x-tenant", "type": "string", "value": "[\"a\"]"})
        ));
        assert!(
            tags.as_array()
                .unwrap()
                .contains(&json!({"key": "error", "type": "bool", "value": true}))
        );
        let p = &v["processes"][spans[0]["processID"].as_str().unwrap()];
        assert_eq!(p["serviceName"], "front");
        assert!(
            p["tags"]
                .as_array()
                .unwrap()
                .contains(&json!({"key": "host.name", "type": "string", "value": "node-1"}))
        );
        assert!(
            !v.to_string().contains("hunter2"),
            "command lines are shown only when exported"
        );
        assert_ne!(spans[0]["processID"], spans[1]["processID"]);
        let all = traces_json(&[t], 20, &view);
        assert_eq!(all["total"], 1);
        assert_eq!(all["data"][0]["traceID"], v["traceID"]);
        assert_eq!(
            trace_id_hex(0x42),
            "0000000000000042",
            "64-bit ids as B3 writes them"
        );
    }

    #[test]
    fn search_parameters_read_as_jaeger_writes_them() {
        let p = |pairs: &[(&str, &str)]| {
            query(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        let q = p(&[
            ("service", "front"),
            ("operation", "GET /x"),
            ("minDuration", "1.5ms"),
            ("maxDuration", "2s"),
            ("limit", "20"),
            ("tags", r#"{"error":"true"}"#),
            ("lookback", "1h"),
            ("peer", ""),
        ])
        .unwrap();
        assert_eq!(q.service.as_deref(), Some("front"));
        assert_eq!(q.operation.as_deref(), Some("GET /x"));
        assert_eq!(q.min_duration_ns, 1_500_000);
        assert_eq!(q.max_duration_ns, 2_000_000_000);
        assert_eq!(q.limit, 20);
        assert!(q.errors_only);
        assert_eq!(q.peer, None, "empty parameters are absent");
        assert_eq!(p(&[]).unwrap().limit, 100);
        assert_eq!(
            p(&[("minDuration", "250us")]).unwrap().min_duration_ns,
            250_000
        );
        for bad in [
            [("minDuration", "10")],
            [("limit", "x")],
            [("tags", "{")],
            [("tags", r#"{"http.method":"GET"}"#)],
            [("colour", "red")],
        ] {
            assert!(p(&bad).is_err(), "{bad:?}");
        }
    }
}
