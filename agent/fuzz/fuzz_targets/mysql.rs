//! The mysql decoder on arbitrary segments (see `common/decoder.rs`); the first byte says
//! whether the connection was joined mid-way.
#![no_main]
use kspan::protocol::mysql;
use libfuzzer_sys::fuzz_target;

#[path = "common/decoder.rs"]
mod decoder;

fuzz_target!(|data: &[u8]| {
    decoder::drive(mysql::Exchanges::new(data.first() == Some(&1)), data);
});
