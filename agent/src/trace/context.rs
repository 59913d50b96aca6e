//! Trace context carried by requests: B3 (single `b3` header and multi `X-B3-*` headers) and
//! W3C `traceparent`. Parsing is strict: a malformed context is an error and is then ignored
//! as a whole, never half-used.
use crate::protocol::http1::Headers;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// No decision carried: the agent decides (it exports).
    Unset,
    Sampled,
    NotSampled,
    /// B3 debug (`X-B3-Flags: 1`, or `d` in the single header): always export.
    Debug,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    /// 64-bit B3 trace ids are widened to 128 bits with zero high bits, per the B3 spec.
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// `None` for a sampling-only context (`b3: 0`, or `X-B3-Sampled` alone).
    pub ids: Option<Ids>,
    pub sampling: Sampling,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    #[error("trace id must be 16 or 32 hex digits and not all zero")]
    TraceId,
    #[error("span id must be 16 hex digits and not all zero")]
    SpanId,
    #[error("parent span id must be 16 hex digits and not all zero")]
    ParentSpanId,
    #[error("unknown sampling state")]
    Sampling,
    #[error("b3 header has the wrong number of fields")]
    B3Fields,
    #[error("trace id without span id, or span id without trace id")]
    Incomplete,
    #[error("malformed traceparent")]
    Traceparent,
}

fn hex(s: &str, lens: &[usize]) -> Option<u128> {
    if !lens.contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|&v| v != 0)
}

fn trace_id(s: &str) -> Result<u128, ContextError> {
    hex(s, &[16, 32]).ok_or(ContextError::TraceId)
}

fn span_id(s: &str, err: ContextError) -> Result<u64, ContextError> {
    hex(s, &[16]).map(|v| v as u64).ok_or(err)
}

fn b3_sampling(s: &str) -> Result<Sampling, ContextError> {
    match s {
        "1" => Ok(Sampling::Sampled),
        "0" => Ok(Sampling::NotSampled),
        "d" => Ok(Sampling::Debug),
        _ => Err(ContextError::Sampling),
    }
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]` or `b3: {SamplingState}`.
pub fn parse_b3_single(v: &str) -> Result<TraceContext, ContextError> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    match parts.as_slice() {
        [state] => Ok(TraceContext {
            ids: None,
            sampling: b3_sampling(state)?,
        }),
        [t, s, rest @ ..] if rest.len() <= 2 => {
            let sampling = match rest.first() {
                Some(state) => b3_sampling(state)?,
                None => Sampling::Unset,
            };
            let parent_span_id = match rest.get(1) {
                Some(p) => Some(span_id(p, ContextError::ParentSpanId)?),
                None => None,
            };
            Ok(TraceContext {
                ids: Some(Ids {
                    trace_id: trace_id(t)?,
                    span_id: span_id(s, ContextError::SpanId)?,
                    parent_span_id,
                }),
                sampling,
            })
        }
        _ => Err(ContextError::B3Fields),
    }
}

/// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-ParentSpanId`, `X-B3-Sampled`, `X-B3-Flags`.
fn parse_b3_multi(h: &Headers) -> Result<Option<TraceContext>, ContextError> {
    let (t, s) = (h.get("x-b3-traceid"), h.get("x-b3-spanid"));
    let sampled = h.get("x-b3-sampled");
    let debug = h.get("x-b3-flags").map(str::trim) == Some("1");
    if t.is_none() && s.is_none() && sampled.is_none() && !debug {
        return Ok(None);
    }
    let mut sampling = match sampled.map(str::trim) {
        None => Sampling::Unset,
        // "true"/"false" were sent by early B3 implementations.
        Some("1") | Some("true") => Sampling::Sampled,
        Some("0") | Some("false") => Sampling::NotSampled,
        Some(_) => return Err(ContextError::Sampling),
    };
    if debug {
        sampling = Sampling::Debug;
    }
    let ids = match (t, s) {
        (None, None) => None,
        (Some(t), Some(s)) => Some(Ids {
            trace_id: trace_id(t.trim())?,
            span_id: span_id(s.trim(), ContextError::SpanId)?,
            parent_span_id: match h.get("x-b3-parentspanid") {
                Some(p) => Some(span_id(p.trim(), ContextError::ParentSpanId)?),
                None => None,
            },
        }),
        _ => return Err(ContextError::Incomplete),
    };
    Ok(Some(TraceContext { ids, sampling }))
}

/// `traceparent: 00-{trace-id}-{parent-id}-{flags}`.
pub fn parse_traceparent(v: &str) -> Result<TraceContext, ContextError> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let [version, t, s, flags, rest @ ..] = parts.as_slice() else {
        return Err(ContextError::Traceparent);
    };
    // Future versions may append fields; version 00 may not. "ff" is forbidden.
    if version.len() != 2 || *version == "ff" || (*version == "00" && !rest.is_empty()) {
        return Err(ContextError::Traceparent);
    }
    let flags = hex(flags, &[2])
        .map(|v| v as u8)
        .or(if *flags == "00" { Some(0) } else { None });
    let flags = flags.ok_or(ContextError::Traceparent)?;
    let trace_id = hex(t, &[32]).ok_or(ContextError::TraceId)?;
    Ok(TraceContext {
        ids: Some(Ids {
            trace_id,
            span_id: span_id(s, ContextError::SpanId)?,
            parent_span_id: None,
        }),
        sampling: if flags & 1 == 1 {
            Sampling::Sampled
        } else {
            Sampling::NotSampled
        },
    })
}

/// The context a request carries. Precedence: `b3`, then `X-B3-*`, then `traceparent`.
pub fn extract(h: &Headers) -> Result<Option<TraceContext>, ContextError> {
    if let Some(v) = h.get("b3") {
        return parse_b3_single(v).map(Some);
    }
    if let Some(ctx) = parse_b3_multi(h)? {
        return Ok(Some(ctx));
    }
    match h.get("traceparent") {
        Some(v) => parse_traceparent(v).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        let mut h = Headers::default();
        for (n, v) in pairs {
            h.insert(n, v);
        }
        h
    }

    #[test]
    fn multi_header_with_64_bit_trace_id_is_widened() {
        let h = headers(&[
            ("X-B3-TraceId", "463ac35c9f6413ad"),
            ("X-B3-SpanId", "a2fb4a1d1a96d312"),
            ("X-B3-ParentSpanId", "0020000000000001"),
            ("X-B3-Sampled", "1"),
        ]);
        let ctx = extract(&h).unwrap().unwrap();
        let ids = ctx.ids.unwrap();
        assert_eq!(ids.trace_id, 0x463ac35c9f6413ad_u128);
        assert_eq!(ids.span_id, 0xa2fb4a1d1a96d312);
        assert_eq!(ids.parent_span_id, Some(0x0020000000000001));
        assert_eq!(ctx.sampling, Sampling::Sampled);
    }

    #[test]
    fn single_header_forms() {
        let c =
            parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
                .unwrap();
        assert_eq!(c.ids.unwrap().trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(c.ids.unwrap().parent_span_id, Some(0x05e3ac9a4f6e3b90));
        assert_eq!(c.sampling, Sampling::Sampled);
        let c = parse_b3_single("80f198ee56343ba8-e457b5a2e4d86bd1").unwrap();
        assert_eq!(c.sampling, Sampling::Unset);
        assert_eq!(
            parse_b3_single("0").unwrap(),
            TraceContext {
                ids: None,
                sampling: Sampling::NotSampled
            }
        );
        assert_eq!(
            parse_b3_single("80f198ee56343ba8-e457b5a2e4d86bd1-d")
                .unwrap()
                .sampling,
            Sampling::Debug
        );
    }

    #[test]
    fn flags_force_and_sampled_zero_suppresses() {
        let h = headers(&[
            ("X-B3-TraceId", "463ac35c9f6413ad"),
            ("X-B3-SpanId", "a2fb4a1d1a96d312"),
            ("X-B3-Sampled", "0"),
        ]);
        assert_eq!(extract(&h).unwrap().unwrap().sampling, Sampling::NotSampled);
        let h = headers(&[("X-B3-Sampled", "0"), ("X-B3-Flags", "1")]);
        assert_eq!(extract(&h).unwrap().unwrap().sampling, Sampling::Debug);
        let h = headers(&[("X-B3-Sampled", "0")]);
        assert_eq!(
            extract(&h).unwrap().unwrap(),
            TraceContext {
                ids: None,
                sampling: Sampling::NotSampled
            }
        );
    }

    #[test]
    fn traceparent() {
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let c = extract(&h).unwrap().unwrap();
        assert_eq!(c.ids.unwrap().trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.ids.unwrap().span_id, 0x00f067aa0ba902b7);
        assert_eq!(c.sampling, Sampling::Sampled);
        assert_eq!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampling,
            Sampling::NotSampled
        );
    }

    #[test]
    fn b3_wins_over_traceparent() {
        let h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("b3", "80f198ee56343ba8-e457b5a2e4d86bd1-1"),
        ]);
        assert_eq!(
            extract(&h).unwrap().unwrap().ids.unwrap().trace_id,
            0x80f198ee56343ba8
        );
    }

    #[test]
    fn malformed_contexts_are_errors() {
        let bad_single = [
            "",
            "x",
            "80f198ee56343ba8",
            "80f198ee56343ba8-e457",
            "80f198ee56343ba8-e457b5a2e4d86bd1-2",
            "80f198ee56343ba8-e457b5a2e4d86bd1-1-xyz",
            "0000000000000000-e457b5a2e4d86bd1",
            "80f198ee56343ba8-0000000000000000",
            "80f198ee56343ba8g-e457b5a2e4d86bd1",
            "80f198ee56343ba8-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-extra",
            "+0f198ee56343ba8-e457b5a2e4d86bd1",
        ];
        for v in bad_single {
            assert!(parse_b3_single(v).is_err(), "{v:?}");
        }
        let bad_multi: [&[(&str, &str)]; 4] = [
            &[("X-B3-TraceId", "463ac35c9f6413ad")],
            &[("X-B3-SpanId", "a2fb4a1d1a96d312")],
            &[
                ("X-B3-TraceId", "463ac35c9f6413ad"),
                ("X-B3-SpanId", "a2fb4a1d1a96d312"),
                ("X-B3-Sampled", "yes"),
            ],
            &[
                ("X-B3-TraceId", "463ac35c9f6413ad"),
                ("X-B3-SpanId", "a2fb4a1d1a96d31"),
                ("X-B3-Sampled", "1"),
            ],
        ];
        for pairs in bad_multi {
            assert!(extract(&headers(pairs)).is_err(), "{pairs:?}");
        }
        for v in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(v).is_err(), "{v:?}");
        }
        assert_eq!(extract(&Headers::default()), Ok(None));
    }
}
