//! The encoder against the reference: the same span records through opentelemetry-otlp's
//! conversion (what the SDK exporter sends) and through [`Encoder`], decoded with the
//! opentelemetry-proto message types, must be the same requests.
use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value::Value},
    trace::v1::ResourceSpans,
};
use opentelemetry_proto::transform::{
    common::tonic::ResourceAttributesWithSchema, trace::tonic::group_spans_by_resource_and_scope,
};
use prost::Message as _;

use super::{encode::Encoder, sdk};
use crate::{
    capture::{event, replay::Player},
    config::Filter,
    pipeline::{Pipeline, PipelineOptions},
    process::{ProcessCache, ProcessInfo},
    trace::{
        privacy::Privacy,
        span::{AttrValue, SpanKind, SpanRecord},
    },
};

/// Real traffic of every span kind (see `tests/src/bin/record-corpus.rs`).
pub const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/corpus.kspan");

/// The corpus's spans; `opt_in` adds the opt-in attributes.
pub fn corpus_spans(opt_in: bool) -> Vec<SpanRecord> {
    let data = std::fs::read(CORPUS).expect("the recorded corpus");
    let mut player = Player::new(&data[..]).expect("a kspan recording");
    let (mut privacy, _) = Privacy::new(&["x-tenant".into()], &[], false);
    privacy.opt_in_attributes = opt_in;
    let mut p = Pipeline::new(
        PipelineOptions {
            filter: Filter::default(),
            linger_ns: 0,
            max_linger_bytes: usize::MAX,
            max_open_spans: 10_000,
            max_conns: 10_000,
            clock_offset_ns: 1_700_000_000_000_000_000,
            privacy,
            sampler: Default::default(),
            db_server_spans: true,
        },
        // Recorded processes are gone: named from the records alone, the same every run.
        ProcessCache::new("/nonexistent"),
    );
    let mut out = Vec::new();
    while let Some(r) = player.next_record().expect("readable corpus") {
        let Ok(ev) = event::decode(r) else { continue };
        let ts = ev.ts_ns;
        p.handle(ev);
        p.tick(ts, &mut out);
    }
    p.tick(u64::MAX, &mut out);
    out
}

/// The reference request: the SDK exporter sends one request per process's resource.
fn reference(spans: &[SpanRecord]) -> ExportTraceServiceRequest {
    let scope = sdk::scope();
    let mut groups: Vec<(Arc<ProcessInfo>, Vec<SpanRecord>)> = Vec::new();
    for s in spans {
        match groups.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &s.process)) {
            Some((_, g)) => g.push(s.clone()),
            None => groups.push((s.process.clone(), vec![s.clone()])),
        }
    }
    let resource_spans = groups
        .into_iter()
        .flat_map(|(p, g)| {
            let resource = ResourceAttributesWithSchema::from(&sdk::resource(&p, "node-1", true));
            let data = g
                .into_iter()
                .map(|s| sdk::to_span_data(s, &scope))
                .collect();
            group_spans_by_resource_and_scope(data, &resource)
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

fn encoded(spans: &[SpanRecord]) -> ExportTraceServiceRequest {
    let mut enc = Encoder::new("node-1".into(), true);
    let mut buf = Vec::new();
    // Twice through one encoder: cached resources and reused buffers change nothing.
    enc.encode(spans, &mut buf);
    buf.clear();
    enc.encode(spans, &mut buf);
    ExportTraceServiceRequest::decode(&buf[..]).expect("valid protobuf")
}

/// The SDK keeps resource attributes in a hash map: their order is not part of the data.
fn normalised(mut r: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
    for rs in &mut r.resource_spans {
        if let Some(res) = rs.resource.as_mut() {
            res.attributes.sort_by(|a, b| a.key.cmp(&b.key));
        }
    }
    r
}

fn attr_values(r: &ExportTraceServiceRequest) -> impl Iterator<Item = &Value> {
    r.resource_spans
        .iter()
        .flat_map(|rs: &ResourceSpans| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .flat_map(|s| &s.attributes)
        .filter_map(|kv| kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()))
}

#[test]
fn the_encoder_matches_the_reference_exporter_on_the_corpus() {
    for opt_in in [false, true] {
        let spans = corpus_spans(opt_in);
        assert!(spans.len() >= 25, "{} spans", spans.len());
        let ours = normalised(encoded(&spans));
        let theirs = normalised(reference(&spans));
        assert_eq!(ours.resource_spans.len(), theirs.resource_spans.len());
        for (a, b) in ours.resource_spans.iter().zip(&theirs.resource_spans) {
            assert_eq!(a, b);
        }
        assert_eq!(ours.encode_to_vec().len(), theirs.encode_to_vec().len());
    }
}

/// The corpus covers what the differential test claims: both kinds, HTTP/1.1, HTTP/2, gRPC,
/// a data store, error statuses, partial spans, spans with and without parents, string,
/// integer, boolean and array attributes.
#[test]
fn the_corpus_covers_every_kind_of_span() {
    let spans = corpus_spans(true);
    let has = |key: &str, value: &str| {
        spans
            .iter()
            .any(|s| s.attr(key).is_some_and(|v| v.as_str() == Some(value)))
    };
    assert!(spans.iter().any(|s| s.kind == SpanKind::Server));
    assert!(spans.iter().any(|s| s.kind == SpanKind::Client));
    assert!(has("network.protocol.version", "1.1"));
    assert!(has("network.protocol.version", "2"));
    assert!(has("rpc.system", "grpc"));
    assert!(has("db.system.name", "redis"));
    assert!(spans.iter().filter(|s| s.error.is_some()).count() >= 5);
    assert!(spans.iter().any(|s| s.parent_span_id.is_none()));
    assert!(spans.iter().any(|s| s.parent_span_id.is_some()));
    assert!(
        spans
            .iter()
            .any(|s| matches!(s.attr("kspan.partial"), Some(AttrValue::Bool(true)))),
        "partial spans (a channel older than the recording)"
    );
    let r = encoded(&spans);
    let values: Vec<&Value> = attr_values(&r).collect();
    assert!(values.iter().any(|v| matches!(v, Value::StringValue(_))));
    assert!(values.iter().any(|v| matches!(v, Value::IntValue(_))));
    assert!(values.iter().any(|v| matches!(v, Value::ArrayValue(_))));
    assert!(values.iter().any(|v| matches!(v, Value::BoolValue(true))));
}

/// Values the corpus cannot hold: a partial span (as the linker marks one), negative and large
/// integers, empty and non-ASCII strings, booleans, an empty array, 64-bit trace ids.
#[test]
fn edge_values_match_the_reference() {
    let mut base = corpus_spans(false).remove(0);
    base.attributes
        .push(("kspan.partial", AttrValue::Bool(true)));
    let mut s = base.clone();
    s.trace_id = 0x1;
    s.parent_span_id = Some(u64::MAX);
    s.name = "é ✓".into();
    s.error = Some(String::new());
    s.attributes = vec![
        ("a.neg", AttrValue::Int(-5)),
        ("a.max", AttrValue::Int(i64::MAX)),
        ("a.min", AttrValue::Int(i64::MIN)),
        ("a.empty", AttrValue::Str(String::new())),
        ("a.false", AttrValue::Bool(false)),
        ("a.none", AttrValue::StrArray(Vec::new())),
        (
            "a.many",
            AttrValue::StrArray(vec!["x".into(), String::new(), "ü".repeat(200)]),
        ),
        ("a.long", AttrValue::Str("v".repeat(70_000))),
    ];
    let spans = vec![s, base];
    assert_eq!(normalised(encoded(&spans)), normalised(reference(&spans)));
}
