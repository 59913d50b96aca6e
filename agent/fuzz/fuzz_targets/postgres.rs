//! The postgres decoder on arbitrary segments (see `common/decoder.rs`); the first byte says
//! whether the connection was joined mid-way.
#![no_main]
use kspan::protocol::postgres;
use libfuzzer_sys::fuzz_target;

#[path = "common/decoder.rs"]
mod decoder;

fuzz_target!(|data: &[u8]| {
    decoder::drive(postgres::Exchanges::new(data.first() == Some(&1)), data);
});
