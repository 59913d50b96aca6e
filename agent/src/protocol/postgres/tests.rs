use super::*;
use crate::protocol::testing::{self, codes, ended};

type Run = testing::Run<Exchanges>;

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.bytes().chain([0])).collect()
}

fn startup(params: &[&str]) -> Vec<u8> {
    let mut body = PROTOCOL_3.to_be_bytes().to_vec();
    body.extend(cstrs(params));
    body.push(0);
    let mut v = (body.len() as u32 + 4).to_be_bytes().to_vec();
    v.extend(body);
    v
}

fn ready() -> Vec<u8> {
    msg(b'Z', b"I")
}

fn error(code: &str, message: &str) -> Vec<u8> {
    let mut body = cstrs(&["SERROR", &format!("C{code}"), &format!("M{message}")]);
    body.push(0);
    msg(b'E', &body)
}

/// The connection after startup and authentication (the password never leaves the decoder).
fn connected() -> Run {
    let mut r = Run::new(Exchanges::new(false));
    r.feed(true, &startup(&["user", "app", "database", "shop"]), 0, 1);
    r.feed(false, &msg(b'R', &[0, 0, 0, 10]), 0, 2);
    r.feed(true, &msg(b'p', b"SCRAM-SHA-256\0secret-password"), 0, 3);
    let mut ok = msg(b'R', &[0, 0, 0, 0]);
    ok.extend(msg(b'S', &cstrs(&["server_version", "15"])));
    ok.extend(msg(b'K', &[0; 8]));
    ok.extend(ready());
    r.feed(false, &ok, 0, 4);
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
fn simple_queries_end_at_ready_for_query() {
    let mut r = connected();
    r.feed(
        true,
        &msg(b'Q', b"SELECT * FROM orders WHERE id = 7\0"),
        0,
        10,
    );
    let mut reply = msg(b'T', &[0, 1, b'x', 0]);
    reply.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'7']));
    reply.extend(msg(b'C', b"SELECT 1\0"));
    r.feed(false, &reply, 0, 20);
    r.feed(false, &ready(), 0, 30);
    r.feed(true, &msg(b'Q', b"SELECT * FROM nope\0"), 0, 40);
    let mut reply = error("42P01", "relation \"nope\" does not exist");
    reply.extend(ready());
    r.feed(false, &reply, 0, 50);
    let steps = r.take();
    assert_eq!(
        begun(&steps),
        vec![
            (0, "SELECT * FROM orders WHERE id = 7".into()),
            (1, "SELECT * FROM nope".into())
        ]
    );
    assert_eq!(ended(&steps), vec![(0, 30), (1, 50)]);
    assert_eq!(codes(&steps), vec![(1, "42P01".into())]);
    assert!(!format!("{steps:?}").contains("secret-password"));
}

#[test]
fn extended_protocol_maps_statements_back_to_text() {
    let mut r = connected();
    let parse = [
        &cstrs(&["s1", "SELECT * FROM items WHERE id = $1"])[..],
        &[0, 0],
    ]
    .concat();
    let mut batch = msg(b'P', &parse);
    batch.extend(msg(
        b'B',
        &[&cstrs(&["", "s1"])[..], &[0, 0, 0, 0, 0, 0]].concat(),
    ));
    batch.extend(msg(b'D', b"P\0"));
    batch.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    // A second statement in the same batch, unnamed.
    batch.extend(msg(
        b'P',
        &[&cstrs(&["", "UPDATE items SET n = n + 1"])[..], &[0, 0]].concat(),
    ));
    batch.extend(msg(
        b'B',
        &[&cstrs(&["", ""])[..], &[0, 0, 0, 0, 0, 0]].concat(),
    ));
    batch.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    batch.extend(msg(b'S', b""));
    r.feed(true, &batch, 0, 10);
    let mut reply = msg(b'1', b"");
    reply.extend(msg(b'2', b""));
    reply.extend(msg(b'T', &[0, 0]));
    reply.extend(msg(b'D', &[0, 0]));
    reply.extend(msg(b'C', b"SELECT 1\0"));
    r.feed(false, &reply, 0, 20);
    let mut reply = msg(b'1', b"");
    reply.extend(msg(b'2', b""));
    reply.extend(msg(b'C', b"UPDATE 3\0"));
    reply.extend(ready());
    r.feed(false, &reply, 0, 30);
    // The named statement again, bound and executed without a new Parse.
    let mut again = msg(
        b'B',
        &[&cstrs(&["", "s1"])[..], &[0, 0, 0, 0, 0, 0]].concat(),
    );
    again.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    again.extend(msg(b'S', b""));
    r.feed(true, &again, 0, 40);
    let mut reply = msg(b'2', b"");
    reply.extend(msg(b'C', b"SELECT 0\0"));
    reply.extend(ready());
    r.feed(false, &reply, 0, 50);
    let steps = r.take();
    assert_eq!(
        begun(&steps),
        vec![
            (0, "SELECT * FROM items WHERE id = $1".into()),
            (1, "UPDATE items SET n = n + 1".into()),
            (2, "SELECT * FROM items WHERE id = $1".into()),
        ]
    );
    assert_eq!(ended(&steps), vec![(0, 20), (1, 30), (2, 50)]);
    assert_eq!(r.stats.desyncs, 0);
}

#[test]
fn an_error_fails_the_rest_of_its_batch() {
    let mut r = connected();
    let mut batch = Vec::new();
    for sql in ["INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (2)"] {
        batch.extend(msg(b'P', &[&cstrs(&["", sql])[..], &[0, 0]].concat()));
        batch.extend(msg(
            b'B',
            &[&cstrs(&["", ""])[..], &[0, 0, 0, 0, 0, 0]].concat(),
        ));
        batch.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    }
    batch.extend(msg(b'S', b""));
    r.feed(true, &batch, 0, 10);
    let mut reply = msg(b'1', b"");
    reply.extend(msg(b'2', b""));
    reply.extend(error("23505", "duplicate key value"));
    reply.extend(ready());
    r.feed(false, &reply, 0, 20);
    let steps = r.take();
    assert_eq!(ended(&steps), vec![(0, 20), (1, 20)]);
    assert_eq!(
        codes(&steps),
        vec![(0, "23505".into()), (1, "23505".into())]
    );
    // The connection is in step for what follows.
    r.feed(true, &msg(b'Q', b"SELECT 1\0"), 0, 30);
    r.feed(false, &[msg(b'C', b"SELECT 1\0"), ready()].concat(), 0, 40);
    assert_eq!(ended(&r.take()), vec![(2, 40)]);
}

#[test]
fn tls_is_given_up_and_plaintext_continues() {
    let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut r = Run::new(Exchanges::new(false));
    r.feed(true, &ssl, 0, 1);
    r.feed(false, b"S", 0, 2);
    assert_eq!(r.take(), vec![Step::GiveUp { ignore: true }]);

    let mut r = Run::new(Exchanges::new(false));
    r.feed(true, &ssl, 0, 1);
    r.feed(false, b"N", 0, 2);
    r.feed(true, &startup(&["user", "shop"]), 0, 3);
    r.feed(false, &ready(), 0, 4);
    r.feed(true, &msg(b'Q', b"BEGIN\0"), 0, 5);
    r.feed(false, &[msg(b'C', b"BEGIN\0"), ready()].concat(), 0, 6);
    let steps = r.take();
    assert_eq!(
        begun(&steps),
        vec![(0, "BEGIN".into())],
        "the user names the database"
    );
    assert_eq!(ended(&steps), vec![(0, 6)]);
}

#[test]
fn a_result_set_larger_than_the_capture_ends_at_its_ready_for_query() {
    let mut r = connected();
    r.feed(true, &msg(b'Q', b"SELECT * FROM big\0"), 0, 10);
    // 4 KiB captured of a 64 KiB read: row headers fall in the uncaptured part.
    let mut rows = msg(b'T', &[0, 0]);
    while rows.len() < 4096 {
        rows.extend(msg(
            b'D',
            &[
                0, 1, 0, 0, 0, 20, b'r', b'o', b'w', b's', b'!', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0,
            ],
        ));
    }
    rows.truncate(4096);
    r.feed(false, &rows, 60_000, 20);
    // A read whose captured bytes are not the reply's end changes nothing.
    r.feed(false, &[b'x'; 100], 5_000, 25);
    let mut last = vec![0u8; 40];
    last.extend(msg(b'C', b"SELECT 3000\0"));
    last.extend(ready());
    r.feed(false, &last, 0, 30);
    let steps = r.take();
    assert_eq!(ended(&steps), vec![(0, 30)]);
    assert!(steps.contains(&Step::Partial { id: 0 }));
    // Back in step.
    r.feed(true, &msg(b'Q', b"SELECT 1\0"), 0, 40);
    r.feed(false, &[msg(b'C', b"SELECT 1\0"), ready()].concat(), 0, 50);
    assert_eq!(ended(&r.take()), vec![(1, 50)]);
}

#[test]
fn copy_data_beyond_the_capture_is_skipped() {
    let mut r = connected();
    r.feed(true, &msg(b'Q', b"COPY t FROM STDIN\0"), 0, 10);
    r.feed(false, &msg(b'G', &[0, 0, 0]), 0, 20);
    // Rows of 64 KiB writes, 4 KiB captured: the client stream's place is lost.
    let mut rows = Vec::new();
    while rows.len() < 4096 {
        rows.extend(msg(b'd', b"1\tsome row\n"));
    }
    rows.truncate(4096);
    r.feed(true, &rows, 60_000, 30);
    r.feed(true, &[b'x'; 64], 4_000, 35);
    r.feed(
        false,
        &[msg(b'C', b"COPY 100000\0"), ready()].concat(),
        0,
        40,
    );
    let steps = r.take();
    assert_eq!(ended(&steps), vec![(0, 40)]);
    assert!(codes(&steps).is_empty());
    assert_eq!(r.stats.desyncs, 0);
    r.feed(true, &msg(b'Q', b"SELECT 1\0"), 0, 50);
    r.feed(false, &[msg(b'C', b"SELECT 1\0"), ready()].concat(), 0, 60);
    assert_eq!(ended(&r.take()), vec![(1, 60)]);
}
