//! kspan: kernel events → connection streams → HTTP messages → spans → exporters.
//!
//! Each stage is a module with no knowledge of the ones before it: `capture` (kernel and
//! recordings), `conn` + `protocol` (byte streams to messages), `trace` (messages to linked
//! spans), `export` (spans out), with `pipeline` joining the pure stages; `view` keeps recent
//! traces for the built-in viewer that `endpoint` serves.
pub mod allocator;
pub mod capture;
pub mod config;
pub mod conn;
pub mod endpoint;
pub mod export;
pub mod golang;
pub mod k8s;
pub mod metrics;
pub mod pipeline;
pub mod process;
pub mod protocol;
pub mod tls;
pub mod trace;
pub mod view;
