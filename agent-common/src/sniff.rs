//! Recognises a connection's protocol from the first bytes it carries, never from ports
//! (Redis on 6380 and PostgreSQL on 5433 are common). Shared by the kernel programs, which
//! drop connections of no known protocol, and by userspace, which judges payloads the kernel
//! passed on undecided (too short to tell).
//!
//! Written for the verifier: fixed indexes into a fixed-size head, no loops.
use crate::{proto, role};

/// Bytes of a payload the sniff looks at.
pub const SNIFF_LEN: usize = 16;

/// The protocol of a connection whose first payload starts with `head` (`len` bytes of it
/// real), sent in direction `egress` by a process on side `role` (0 when unknown: a socket
/// found mid-life). `None`: none that kspan decodes.
#[inline(always)]
pub fn sniff(head: &[u8; SNIFF_LEN], len: usize, egress: bool, role: u8) -> Option<u8> {
    if len < 4 {
        return None;
    }
    let p = head;
    if tls_record(p, role) {
        return Some(proto::TLS);
    }
    // Who sent these bytes, when the socket's side is known.
    let from_client = match role {
        role::CLIENT => Some(egress),
        role::SERVER => Some(!egress),
        _ => None,
    };
    match [p[0], p[1], p[2], p[3]] {
        [b'G', b'E', b'T', b' ']
        | [b'P', b'O', b'S', b'T']
        | [b'P', b'U', b'T', b' ']
        | [b'H', b'E', b'A', b'D']
        | [b'D', b'E', b'L', b'E']
        | [b'O', b'P', b'T', b'I']
        | [b'P', b'A', b'T', b'C']
        | [b'C', b'O', b'N', b'N']
        | [b'T', b'R', b'A', b'C']
        | [b'H', b'T', b'T', b'P'] => return Some(proto::HTTP1),
        [b'P', b'R', b'I', b' '] => return Some(proto::HTTP2),
        _ => {}
    }
    if len >= 9 && h2_server_preface(p) {
        return Some(proto::HTTP2);
    }
    if from_client != Some(false) && resp_array(p, len) {
        return Some(proto::REDIS);
    }
    if from_client != Some(false) && len >= 8 && postgres_opening(p) {
        return Some(proto::POSTGRES);
    }
    if from_client != Some(true) && len >= 6 && mysql_handshake(p, len) {
        return Some(proto::MYSQL);
    }
    // Clients that read a packet's header before its body (mysql-connector-python) show the
    // greeting's header alone; the decoder gives the connection up if no greeting follows.
    if from_client == Some(false) && len == 4 && mysql_greeting_header(p) {
        return Some(proto::MYSQL);
    }
    // A socket found mid-life (a connection pool older than the agent) shows no opening:
    // a client's request must do.
    if role == 0 && egress && len >= 6 {
        if postgres_request(p) {
            return Some(proto::POSTGRES);
        }
        if mysql_command(p, len) {
            return Some(proto::MYSQL);
        }
    }
    None
}

/// A TLS record header: a handshake record (ClientHello, ServerHello) of TLS 1.0–1.3, or, on a
/// socket found mid-life, an application-data record. OpenSSL reads a record's 5-byte header
/// on its own, so that is all there may be.
#[inline(always)]
fn tls_record(p: &[u8; SNIFF_LEN], role: u8) -> bool {
    let length = (p[3] as usize) << 8 | p[4] as usize;
    let kind = p[0] == 0x16 || (role == 0 && p[0] == 0x17);
    kind && p[1] == 3 && p[2] <= 4 && (1..=18_432).contains(&length)
}

/// A packet header alone: sequence 0 and the length of a plausible greeting.
#[inline(always)]
fn mysql_greeting_header(p: &[u8; SNIFF_LEN]) -> bool {
    let body = p[0] as usize | (p[1] as usize) << 8;
    p[2] == 0 && p[3] == 0 && (20..1024).contains(&body)
}

/// A PostgreSQL Query or Parse message shorter than 64 KiB, its text starting plausibly.
#[inline(always)]
fn postgres_request(p: &[u8; SNIFF_LEN]) -> bool {
    let short = p[1] == 0 && p[2] == 0 && (p[3] != 0 || p[4] >= 5);
    match p[0] {
        b'Q' => short && statement_start(p[5]),
        // Parse: a statement name (or none) first.
        b'P' => short && (p[5] == 0 || p[5].is_ascii_graphic()),
        _ => false,
    }
}

/// A MySQL command packet that is the whole write: sequence 0, a query, prepare or execute.
#[inline(always)]
fn mysql_command(p: &[u8; SNIFF_LEN], len: usize) -> bool {
    let body = p[0] as usize | (p[1] as usize) << 8 | (p[2] as usize) << 16;
    let whole = body + 4 == len;
    whole
        && p[3] == 0
        && match p[4] {
            // COM_QUERY, COM_STMT_PREPARE: SQL text.
            0x03 | 0x16 => statement_start(p[5]),
            // COM_STMT_EXECUTE: statement id, flags, iteration count 1.
            0x17 => body >= 10 && p[9] == 0 && p[10] == 1,
            _ => false,
        }
}

/// The first byte of SQL text: a keyword, a parenthesis, a comment or white space.
#[inline(always)]
fn statement_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'(' || b == b'/' || b == b'-' || b.is_ascii_whitespace()
}

/// An HTTP/2 server's preface is a SETTINGS frame, often sent before it reads the client's:
/// length a multiple of 6 below 64 KiB, type 4, no flags but ACK, stream 0.
#[inline(always)]
fn h2_server_preface(p: &[u8; SNIFF_LEN]) -> bool {
    p[0] == 0 && p[2].is_multiple_of(6) && p[3] == 4 && p[4] & !1 == 0 && p[5..9] == [0, 0, 0, 0]
}

/// A RESP command: an array of bulk strings, `*<count>\r\n$<len>\r\n`, count below 1000.
#[inline(always)]
fn resp_array(p: &[u8; SNIFF_LEN], len: usize) -> bool {
    if p[0] != b'*' || !p[1].is_ascii_digit() {
        return false;
    }
    // Where the count ends: 1 to 3 digits.
    let after = if p[2] == b'\r' {
        2
    } else if p[2].is_ascii_digit() && p[3] == b'\r' {
        3
    } else if p[2].is_ascii_digit() && p[3].is_ascii_digit() && p[4] == b'\r' {
        4
    } else {
        return false;
    };
    len >= after + 3 && p[after + 1] == b'\n' && p[after + 2] == b'$'
}

/// The PostgreSQL client's first message: a StartupMessage (length, protocol 3.0), or an
/// SSLRequest / GSSENCRequest (length 8, magic code).
#[inline(always)]
fn postgres_opening(p: &[u8; SNIFF_LEN]) -> bool {
    let startup = p[0] == 0 && p[1] == 0 && p[4..8] == [0, 3, 0, 0] && (p[2] != 0 || p[3] >= 8);
    let request =
        p[0..4] == [0, 0, 0, 8] && p[4..7] == [0x04, 0xd2, 0x16] && (p[7] == 0x2f || p[7] == 0x30);
    startup || request
}

/// A MySQL server's greeting: packet 0, protocol version 10, a version string starting with a
/// digit, and a plausible length.
#[inline(always)]
fn mysql_handshake(p: &[u8; SNIFF_LEN], len: usize) -> bool {
    let body = p[0] as usize | (p[1] as usize) << 8;
    p[2] == 0
        && p[3] == 0
        && p[4] == 10
        && p[5].is_ascii_digit()
        && (20..1024).contains(&body)
        && len <= body + 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> ([u8; SNIFF_LEN], usize) {
        let mut h = [0u8; SNIFF_LEN];
        let n = bytes.len().min(SNIFF_LEN);
        h[..n].copy_from_slice(&bytes[..n]);
        (h, bytes.len())
    }

    fn of(bytes: &[u8], egress: bool, role: u8) -> Option<u8> {
        let (h, len) = head(bytes);
        sniff(&h, len, egress, role)
    }

    #[test]
    fn recognises_each_protocol_from_its_opening() {
        let client = role::CLIENT;
        assert_eq!(of(b"GET / HTTP/1.1\r\n", true, client), Some(proto::HTTP1));
        assert_eq!(of(b"PRI * HTTP/2.0\r\n", true, client), Some(proto::HTTP2));
        assert_eq!(
            of(b"*1\r\n$4\r\nPING\r\n", true, client),
            Some(proto::REDIS)
        );
        assert_eq!(
            of(b"*12\r\n$3\r\nSET\r\n", true, client),
            Some(proto::REDIS)
        );
        let startup = [0, 0, 0, 0x29, 0, 3, 0, 0, b'u', b's', b'e', b'r', 0];
        assert_eq!(of(&startup, true, client), Some(proto::POSTGRES));
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(of(&ssl, true, client), Some(proto::POSTGRES));
        let mut greeting = vec![0x4a, 0, 0, 0, 10];
        greeting.extend_from_slice(b"11.8.3-MariaDB\0");
        greeting.resize(0x4a + 4, 0);
        assert_eq!(of(&greeting, false, client), Some(proto::MYSQL));
        assert_eq!(of(&greeting, true, role::SERVER), Some(proto::MYSQL));
        assert_eq!(
            of(&greeting[..4], false, client),
            Some(proto::MYSQL),
            "its header alone"
        );
        assert_eq!(of(&greeting[..4], true, client), None);
    }

    #[test]
    fn tls_records_from_their_five_byte_header() {
        let client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        assert_eq!(of(client_hello, true, role::CLIENT), Some(proto::TLS));
        assert_eq!(
            of(&client_hello[..5], false, role::SERVER),
            Some(proto::TLS)
        );
        // Application data only where the handshake may have come before the agent.
        let app_data = b"\x17\x03\x03\x00\x40";
        assert_eq!(of(app_data, true, 0), Some(proto::TLS));
        assert_eq!(of(app_data, true, role::CLIENT), None);
        assert_eq!(
            of(b"\x16\x03\x01\x00\x00", true, role::CLIENT),
            None,
            "empty"
        );
    }

    #[test]
    fn direction_rules_out_impostors() {
        // A client-first opening sent by the server, and a greeting sent by the client.
        assert_eq!(of(b"*1\r\n$4\r\nPING\r\n", true, role::SERVER), None);
        let mut greeting = vec![0x4a, 0, 0, 0, 10, b'8'];
        greeting.resize(0x4a + 4, 0);
        assert_eq!(of(&greeting, true, role::CLIENT), None);
        for junk in [
            &b"SSH-2.0-OpenSSH"[..],
            b"*abc\r\n",
            b"\x16\x03\x09\x02\x00",
            b"\x17\x03\x03\x02\x00",
            b"+OK\r\n",
        ] {
            assert_eq!(of(junk, true, role::CLIENT), None, "{junk:?}");
        }
        assert_eq!(of(b"GE", true, role::CLIENT), None, "too short to tell");
    }

    #[test]
    fn pooled_connections_older_than_the_agent_show_a_request() {
        let mut q = vec![b'Q', 0, 0, 0, 13];
        q.extend_from_slice(b"SELECT 1\0");
        assert_eq!(of(&q, true, 0), Some(proto::POSTGRES));
        assert_eq!(of(&q, true, role::CLIENT), None, "a request is no opening");
        assert_eq!(of(&q, false, 0), None);
        let mut com_query = vec![9, 0, 0, 0, 0x03];
        com_query.extend_from_slice(b"SELECT 1");
        assert_eq!(of(&com_query, true, 0), Some(proto::MYSQL));
        com_query.push(b' ');
        assert_eq!(of(&com_query, true, 0), None, "length must match the write");
    }
}
