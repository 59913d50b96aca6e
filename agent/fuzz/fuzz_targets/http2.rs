//! HTTP/2 framing and HPACK over arbitrary bytes from both sides, exact or joined late, with
//! uncaptured gaps: framing may be lost (reported), never a panic.
#![no_main]
use kspan::protocol::{hpack, http2::Http2Conn};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mut conn = Http2Conn::new(mode & 1 != 0);
    let mut out = Vec::new();
    let mut rest = data;
    let mut ts = 0;
    while let [control, len_hi, len_lo, tail @ ..] = rest {
        let n = (u16::from_be_bytes([*len_hi, *len_lo]) as usize).min(tail.len());
        let (piece, next) = tail.split_at(n);
        let missing = if control & 0x80 != 0 {
            (*control & 0x3f) as u64 * 31
        } else {
            0
        };
        ts += 1;
        conn.feed(control & 1 == 0, piece, missing, ts, &mut out);
        out.clear();
        rest = next;
    }
    // The HPACK decoder on its own, on the whole input as one header block.
    let mut fields = Vec::new();
    let _ = hpack::Decoder::new().decode(data, &mut fields);
});
