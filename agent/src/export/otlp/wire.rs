//! The few protobuf wire-format primitives the OTLP encoder needs, and a reader for the one
//! message it decodes (the export response). Field numbers are those of
//! opentelemetry-proto's `trace/v1` and `collector/trace/v1`.

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

pub fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub const fn varint_len(v: u64) -> usize {
    // 1 byte per 7 significant bits, at least one.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

/// Bytes a length-delimited field with a one-byte tag takes (every field here has one).
pub const fn len_field_len(body: usize) -> usize {
    1 + varint_len(body as u64) + body
}

pub fn bytes_field(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    len_prefix(out, field, body.len());
    out.extend_from_slice(body);
}

/// A length-delimited field whose body `write` appends in place, its length filled in after:
/// no copy of the body when it takes two length bytes (128 to 16,383 bytes, as spans do);
/// otherwise the body is moved once to fit its length.
pub fn nested(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, LEN);
    let at = out.len();
    out.extend_from_slice(&[0x80, 0]);
    write(out);
    let len = out.len() - at - 2;
    if varint_len(len as u64) == 2 {
        out[at] = len as u8 | 0x80;
        out[at + 1] = (len >> 7) as u8;
    } else {
        let mut prefix = Vec::with_capacity(10);
        varint(&mut prefix, len as u64);
        out.splice(at..at + 2, prefix);
    }
}

/// The tag and length of a length-delimited field whose `len` bytes the caller writes next.
pub fn len_prefix(out: &mut Vec<u8>, field: u32, len: usize) {
    tag(out, field, LEN);
    varint(out, len as u64);
}

pub fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, VARINT);
    varint(out, v);
}

pub fn fixed64_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn fixed32_field(out: &mut Vec<u8>, field: u32, v: u32) {
    tag(out, field, FIXED32);
    out.extend_from_slice(&v.to_le_bytes());
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed protobuf in the collector's response")]
pub struct Malformed;

/// `ExportTraceServiceResponse.partial_success`: spans the collector rejected, and why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartialSuccess {
    pub rejected_spans: i64,
    pub error_message: String,
}

/// Decodes an `ExportTraceServiceResponse` (empty when all was accepted).
pub fn partial_success(mut b: &[u8]) -> Result<PartialSuccess, Malformed> {
    let mut out = PartialSuccess::default();
    while !b.is_empty() {
        let (field, value) = next_field(&mut b)?;
        if let (1, Value::Len(mut inner)) = (field, value) {
            while !inner.is_empty() {
                match next_field(&mut inner)? {
                    (1, Value::Varint(n)) => out.rejected_spans = n as i64,
                    (2, Value::Len(msg)) => {
                        out.error_message = String::from_utf8_lossy(msg).into_owned()
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(out)
}

/// The `google.rpc.RetryInfo.retry_delay` in a gRPC `Status.details` (`grpc-status-details-bin`),
/// which is what makes RESOURCE_EXHAUSTED retryable.
pub fn retry_delay(status: &[u8]) -> Option<std::time::Duration> {
    const RETRY_INFO: &[u8] = b"type.googleapis.com/google.rpc.RetryInfo";
    let mut b = status;
    while !b.is_empty() {
        // Status { int32 code = 1; string message = 2; repeated Any details = 3; }
        let (field, value) = next_field(&mut b).ok()?;
        let (3, Value::Len(mut any)) = (field, value) else {
            continue;
        };
        let (mut is_retry_info, mut payload) = (false, None);
        while !any.is_empty() {
            match next_field(&mut any).ok()? {
                (1, Value::Len(url)) => is_retry_info = url == RETRY_INFO,
                (2, Value::Len(v)) => payload = Some(v),
                _ => {}
            }
        }
        let (true, Some(mut info)) = (is_retry_info, payload) else {
            continue;
        };
        // RetryInfo { Duration retry_delay = 1; } Duration { int64 seconds = 1; int32 nanos = 2; }
        let mut delay = std::time::Duration::ZERO;
        while !info.is_empty() {
            if let (1, Value::Len(mut d)) = next_field(&mut info).ok()? {
                while !d.is_empty() {
                    match next_field(&mut d).ok()? {
                        (1, Value::Varint(s)) => delay += std::time::Duration::from_secs(s),
                        (2, Value::Varint(n)) => delay += std::time::Duration::from_nanos(n),
                        _ => {}
                    }
                }
            }
        }
        return Some(delay);
    }
    None
}

enum Value<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

fn read_varint(b: &mut &[u8]) -> Result<u64, Malformed> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or(Malformed)?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err(Malformed)
}

fn next_field<'a>(b: &mut &'a [u8]) -> Result<(u64, Value<'a>), Malformed> {
    let key = read_varint(b)?;
    let value = match (key & 7) as u8 {
        VARINT => Value::Varint(read_varint(b)?),
        LEN => {
            let n = usize::try_from(read_varint(b)?).map_err(|_| Malformed)?;
            if n > b.len() {
                return Err(Malformed);
            }
            let (v, rest) = b.split_at(n);
            *b = rest;
            Value::Len(v)
        }
        w @ (FIXED64 | FIXED32) => {
            let n = if w == FIXED64 { 8 } else { 4 };
            *b = b.get(n..).ok_or(Malformed)?;
            Value::Fixed
        }
        _ => return Err(Malformed),
    };
    Ok((key >> 3, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_what_is_written() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(read_varint(&mut out.as_slice()), Ok(v));
        }
    }

    #[test]
    fn nested_fields_equal_those_written_whole() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut whole = vec![9];
            bytes_field(&mut whole, 2, &body);
            let mut in_place = vec![9];
            nested(&mut in_place, 2, |out| out.extend_from_slice(&body));
            assert_eq!(in_place, whole, "{len}");
        }
    }

    #[test]
    fn partial_success_is_read_and_garbage_is_an_error() {
        let mut inner = Vec::new();
        varint_field(&mut inner, 1, 7);
        bytes_field(&mut inner, 2, b"too big");
        let mut msg = Vec::new();
        bytes_field(&mut msg, 1, &inner);
        assert_eq!(
            partial_success(&msg),
            Ok(PartialSuccess {
                rejected_spans: 7,
                error_message: "too big".into()
            })
        );
        assert_eq!(partial_success(&[]), Ok(PartialSuccess::default()));
        assert_eq!(partial_success(&[0x0a, 0x05, 1]), Err(Malformed));
        assert_eq!(partial_success(&[0xff; 11]), Err(Malformed));
    }

    #[test]
    fn retry_info_is_found_in_status_details() {
        let mut duration = Vec::new();
        varint_field(&mut duration, 1, 2);
        varint_field(&mut duration, 2, 500_000_000);
        let mut info = Vec::new();
        bytes_field(&mut info, 1, &duration);
        let mut any = Vec::new();
        bytes_field(&mut any, 1, b"type.googleapis.com/google.rpc.RetryInfo");
        bytes_field(&mut any, 2, &info);
        let mut status = Vec::new();
        varint_field(&mut status, 1, 8);
        bytes_field(&mut status, 3, &any);
        assert_eq!(
            retry_delay(&status),
            Some(std::time::Duration::from_millis(2500))
        );
        let mut no_info = Vec::new();
        varint_field(&mut no_info, 1, 8);
        assert_eq!(retry_delay(&no_info), None);
    }
}
