//! The postgres decoder on arbitrary segments (see `common/decoder.rs`); the first byte says
//! whether the connection was joined mid-way. The same bytes as SQL text go through what spans
//! do with statements.
#![no_main]
use kspan::protocol::{postgres, sql};
use libfuzzer_sys::fuzz_target;

#[path = "common/decoder.rs"]
mod decoder;

fuzz_target!(|data: &[u8]| {
    decoder::drive(postgres::Exchanges::new(data.first() == Some(&1)), data);
    let text = String::from_utf8_lossy(data);
    let sanitised = sql::sanitize(&text);
    assert!(sanitised.len() <= text.len() + 1);
    let _ = (sql::operation(&text), sql::collection(&text));
});
