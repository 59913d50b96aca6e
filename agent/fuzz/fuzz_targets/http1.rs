//! HTTP/1 decoding of arbitrary bytes, cut into syscall-sized pieces with uncaptured gaps, in
//! both directions: it may desync, never panic or grow without bound.
#![no_main]
use kspan::protocol::http1::Http1Conn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut conn = Http1Conn::new();
    let mut out = Vec::new();
    let mut rest = data;
    let mut ts = 0;
    // Each piece: [control byte][len byte][len bytes]; control says direction and how many
    // bytes after it were not captured.
    while let [control, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (piece, next) = tail.split_at(n);
        let missing = if control & 0x80 != 0 {
            (*control & 0x3f) as u64 * 97
        } else {
            0
        };
        ts += 1;
        conn.feed(control & 1 == 0, piece, missing, ts, &mut out);
        if control & 0x40 != 0 {
            conn.resync();
        }
        out.clear();
        rest = next;
    }
    conn.close(ts + 1, &mut out);
});
