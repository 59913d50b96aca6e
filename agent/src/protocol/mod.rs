//! Application protocols, decoded from connection byte streams. Nothing here knows about BPF.
pub mod http1;
