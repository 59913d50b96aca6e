//! Response heads read for what a span needs (status line and body framing) without
//! validating every header: httparse's full validation of nginx's eight response headers was
//! 9% of a keep-alive replay's instructions, for two of them used. The peer already accepted
//! these bytes; the decoder only has to stay in step with them.
use super::{Framing, MAX_HEADERS};

/// A complete response head.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Head {
    /// Bytes of the head, its blank line included.
    pub len: usize,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub status: u16,
    pub framing: Framing,
}

/// `Ok(None)` while the head is incomplete; `Err` when the bytes are not a response head.
pub(super) fn scan(buf: &[u8]) -> Result<Option<Head>, ()> {
    // Empty lines before a message are ignored (RFC 9112 §2.2), as httparse does.
    let skipped = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let (version, status, first) = match status_line(&buf[skipped..])? {
        Some((version, status, used)) => (version, status, skipped + used),
        None => return Ok(None),
    };
    let mut framing = Framing::None;
    let mut line_start = first;
    // One search for every line end of the head (a search per line cost more than httparse).
    for (headers, nl) in memchr::memchr_iter(b'\n', &buf[first..]).enumerate() {
        let line = &buf[line_start..first + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line_start = first + nl + 1;
        if line.is_empty() {
            return Ok(Some(Head {
                len: line_start,
                version,
                status,
                framing,
            }));
        }
        if headers == MAX_HEADERS || !header_line(line) {
            return Err(());
        }
        if let Some(value) = value_of(line, b"content-length:") {
            framing.content_length(value)?;
        } else if let Some(value) = value_of(line, b"transfer-encoding:") {
            framing.transfer_encoding(value);
        }
    }
    Ok(None)
}

/// What tells a header line from garbage cheaply: it starts with a name character, not white
/// space (obsolete line folding) or a colon. The rest is not validated: the peer accepted it.
fn header_line(line: &[u8]) -> bool {
    line[0] > b' ' && line[0] != b':' && line[0] < 0x7f
}

/// The value of the header `line` when its name (with the colon) is `name_colon`.
fn value_of<'a>(line: &'a [u8], name_colon: &[u8]) -> Option<&'a [u8]> {
    let (name, value) = line.split_at_checked(name_colon.len())?;
    // The colon's place first: it rules out nearly every other header in one comparison.
    (name.last() == Some(&b':') && name.eq_ignore_ascii_case(name_colon)).then_some(value)
}

/// `HTTP/1.x NNN[ reason]` and its line end: (minor version, status, bytes used).
fn status_line(buf: &[u8]) -> Result<Option<(u8, u16, usize)>, ()> {
    const PREFIX: &[u8] = b"HTTP/1.";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Err(());
    }
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        // A status line is short; a long run without one is not a response.
        return if buf.len() > super::MAX_HEAD {
            Err(())
        } else {
            Ok(None)
        };
    };
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() < 12 || line[8] != b' ' || !matches!(line.get(12), None | Some(b' ')) {
        return Err(());
    }
    let version = match line[7] {
        b'0' => 0,
        b'1' => 1,
        _ => return Err(()),
    };
    let status = crate::protocol::decimal(&line[9..12])
        .filter(|s| *s >= 100)
        .and_then(|s| u16::try_from(s).ok())
        .ok_or(())?;
    Ok(Some((version, status, nl + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(buf: &[u8]) -> Head {
        scan(buf).expect("a head").expect("complete")
    }

    #[test]
    fn status_and_framing_are_read() {
        let nginx = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 07:00:00 GMT\r\nContent-Type: text/html\r\nContent-Length: 615\r\nLast-Modified: Tue, 01 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\nETag: \"1-2\"\r\nAccept-Ranges: bytes\r\n\r\n<html>";
        let h = head(nginx);
        assert_eq!(
            (h.len, h.version, h.status, h.framing),
            (nginx.len() - 6, 1, 200, Framing::Length(615))
        );
        let chunked = b"HTTP/1.0 503 Service Unavailable\ntransfer-encoding: gzip, chunked \n\n";
        let h = head(chunked);
        assert_eq!(
            (h.len, h.version, h.status, h.framing),
            (chunked.len(), 0, 503, Framing::Chunked)
        );
        // No reason phrase; empty lines before the status line.
        let bare = b"\r\nHTTP/1.1 204\r\n\r\n";
        let h = head(bare);
        assert_eq!(
            (h.len, h.status, h.framing),
            (bare.len(), 204, Framing::None)
        );
        // Chunked wins over a length, in either order (RFC 9112 §6.3).
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        let h = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
    }

    #[test]
    fn incomplete_heads_wait_and_garbage_is_an_error() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(scan(&full[..cut]), Ok(None), "cut at {cut}");
        }
        for bad in [
            &b"HTTP/2.0 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\x00nul: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
            b"\xff\xfe garbage",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(scan(bad), Err(()), "{:?}", String::from_utf8_lossy(bad));
        }
        let many: Vec<u8> = [&b"HTTP/1.1 200 OK\r\n"[..]]
            .into_iter()
            .chain(std::iter::repeat_n(&b"X-A: b\r\n"[..], MAX_HEADERS + 1))
            .chain([&b"\r\n"[..]])
            .flatten()
            .copied()
            .collect();
        assert_eq!(scan(&many), Err(()), "more headers than httparse took");
    }
}
