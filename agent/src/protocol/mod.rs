//! Application protocols, decoded from connection byte streams. Nothing here knows about BPF.
pub mod hpack;
pub mod http1;
pub mod http2;
