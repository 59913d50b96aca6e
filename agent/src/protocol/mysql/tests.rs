use super::*;
use crate::protocol::testing::{self, codes, ended};

type Run = testing::Run<Exchanges>;

fn packet(seq: u8, body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_le_bytes()[..3].to_vec();
    v.push(seq);
    v.extend_from_slice(body);
    v
}

fn ok(seq: u8) -> Vec<u8> {
    packet(seq, &[0, 0, 0, 2, 0, 0, 0])
}

fn eof(seq: u8) -> Vec<u8> {
    packet(seq, &[0xfe, 0, 0, 2, 0])
}

/// A text result set of one column and `rows` rows, EOF-delimited.
fn result_set(rows: usize) -> Vec<u8> {
    let mut v = packet(1, &[1]);
    v.extend(packet(
        2,
        b"\x03def\x00\x00\x00\x01n\x00\x0c?\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00",
    ));
    v.extend(eof(3));
    for i in 0..rows {
        v.extend(packet(4 + i as u8, b"\x01x"));
    }
    v.extend(eof(4 + rows as u8));
    v
}

fn err(seq: u8, code: u16, state: &str, msg: &str) -> Vec<u8> {
    let mut body = vec![0xff];
    body.extend(code.to_le_bytes());
    body.push(b'#');
    body.extend(state.as_bytes());
    body.extend(msg.as_bytes());
    packet(seq, &body)
}

fn command(cmd: u8, rest: &[u8]) -> Vec<u8> {
    packet(0, &[&[cmd][..], rest].concat())
}

/// Greeting, a handshake response naming database `shop`, authentication.
fn connected() -> Run {
    let mut r = Run::new(Exchanges::new(false));
    let mut greeting = vec![10];
    greeting.extend(b"11.8.3-MariaDB\0");
    greeting.resize(70, 1);
    r.feed(false, &packet(0, &greeting), 0, 1);
    let caps = CLIENT_CONNECT_WITH_DB | CLIENT_SECURE_CONNECTION | 0x200;
    let mut response = caps.to_le_bytes().to_vec();
    response.extend([0; 28]);
    response.extend(b"app\0");
    response.push(20);
    response.extend([0xaa; 20]);
    response.extend(b"shop\0mysql_native_password\0");
    r.feed(true, &packet(1, &response), 0, 2);
    r.feed(false, &ok(2), 0, 3);
    assert!(r.take().is_empty());
    r
}

fn begun(steps: &[Step]) -> Vec<(u64, String)> {
    testing::calls(steps)
        .into_iter()
        .map(|(id, c)| {
            assert_eq!(c.namespace.as_deref(), Some("shop"));
            (id, c.text.to_string())
        })
        .collect()
}

#[test]
fn queries_end_at_their_last_packet() {
    let mut r = connected();
    r.feed(true, &command(COM_QUERY, b"SELECT n FROM items"), 0, 10);
    let rows = result_set(3);
    let (a, b) = rows.split_at(20);
    r.feed(false, a, 0, 20);
    r.feed(false, b, 0, 30);
    r.feed(
        true,
        &command(COM_QUERY, b"INSERT INTO items VALUES (1)"),
        0,
        40,
    );
    r.feed(false, &ok(1), 0, 50);
    r.feed(true, &command(COM_QUERY, b"SELECT * FROM nope"), 0, 60);
    r.feed(
        false,
        &err(1, 1146, "42S02", "Table 'shop.nope' doesn't exist"),
        0,
        70,
    );
    let steps = r.take();
    assert_eq!(
        begun(&steps),
        vec![
            (0, "SELECT n FROM items".into()),
            (1, "INSERT INTO items VALUES (1)".into()),
            (2, "SELECT * FROM nope".into())
        ]
    );
    assert_eq!(ended(&steps), vec![(0, 30), (1, 50), (2, 70)]);
    assert_eq!(codes(&steps), vec![(2, "1146".into())]);
    assert!(!format!("{steps:?}").contains("aaaa"));
}

#[test]
fn prepared_statements_are_mapped_back_to_their_text() {
    let mut r = connected();
    r.feed(
        true,
        &command(COM_STMT_PREPARE, b"SELECT n FROM items WHERE id = ?"),
        0,
        10,
    );
    // STMT_PREPARE_OK: statement 7, 1 column, 1 parameter; then their definitions and EOFs.
    let mut reply = packet(1, &[0, 7, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0]);
    reply.extend(packet(2, b"\x03def\x00\x00\x00\x01?\x00"));
    reply.extend(eof(3));
    reply.extend(packet(4, b"\x03def\x00\x00\x00\x01n\x00"));
    reply.extend(eof(5));
    r.feed(false, &reply, 0, 20);
    r.feed(
        true,
        &command(COM_STMT_EXECUTE, &[7, 0, 0, 0, 0, 1, 0, 0, 0]),
        0,
        30,
    );
    // A binary result set without EOFs (CLIENT_DEPRECATE_EOF): the closing OK starts `FE`.
    let mut rows = packet(1, &[1]);
    rows.extend(packet(2, b"\x03def\x00\x00\x00\x01n\x00"));
    rows.extend(packet(3, &[0, 0, 1, 0, 0, 0]));
    rows.extend(packet(4, &[0xfe, 0, 0, 2, 0, 0, 0]));
    r.feed(false, &rows, 0, 40);
    r.feed(true, &command(COM_STMT_CLOSE, &[7, 0, 0, 0]), 0, 50);
    r.feed(true, &command(COM_INIT_DB, b"other"), 0, 60);
    r.feed(false, &ok(1), 0, 70);
    r.feed(true, &command(COM_QUERY, b"SELECT 1"), 0, 80);
    let steps = r.take();
    assert_eq!(
        begun(&steps[..2]),
        vec![(0, "SELECT n FROM items WHERE id = ?".into())]
    );
    assert_eq!(ended(&steps), vec![(0, 40)]);
    let namespace = steps.iter().find_map(|s| match s {
        Step::Begin {
            id: 1,
            call: Call::Db(c),
            ..
        } => c.namespace.clone(),
        _ => None,
    });
    assert_eq!(
        namespace.as_deref(),
        Some("other"),
        "COM_INIT_DB changed it"
    );
    assert!(r.d.statements.is_empty(), "closed");
}

#[test]
fn several_result_sets_and_tls() {
    let mut r = connected();
    r.feed(true, &command(COM_QUERY, b"CALL two_results()"), 0, 10);
    let mut first = packet(1, &[1]);
    first.extend(packet(2, b"\x03def"));
    first.extend(eof(3));
    first.extend(packet(4, b"\x01x"));
    // EOF with "more results exist".
    first.extend(packet(5, &[0xfe, 0, 0, 0x0a, 0]));
    r.feed(false, &first, 0, 20);
    assert!(ended(&r.take()).is_empty());
    r.feed(false, &ok(6), 0, 30);
    assert_eq!(ended(&r.take()), vec![(0, 30)]);

    let mut r = Run::new(Exchanges::new(false));
    r.feed(false, &packet(0, b"\x0a8.0.36\0"), 0, 1);
    let mut ssl = (CLIENT_SSL | CLIENT_SECURE_CONNECTION)
        .to_le_bytes()
        .to_vec();
    ssl.resize(32, 0);
    r.feed(true, &packet(1, &ssl), 0, 2);
    assert!(r.take().contains(&Step::GiveUp { ignore: true }));
}

#[test]
fn a_result_set_larger_than_the_capture_ends_at_its_closing_packet() {
    let mut r = connected();
    r.feed(true, &command(COM_QUERY, b"SELECT * FROM big"), 0, 10);
    let rows = result_set(200);
    // The first read's middle is lost; the last read ends with the closing EOF.
    r.feed(false, &rows[..40], 100_000, 20);
    let n = rows.len();
    r.feed(false, &rows[n - 30..], 0, 30);
    let steps = r.take();
    assert_eq!(ended(&steps), vec![(0, 30)]);
    assert!(steps.contains(&Step::Partial { id: 0 }));
    r.feed(true, &command(COM_QUERY, b"SELECT 1"), 0, 40);
    r.feed(false, &result_set(1), 0, 50);
    assert_eq!(ended(&r.take()), vec![(1, 50)]);
}
