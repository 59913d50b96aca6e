//! kspan: kernel events → connection streams → HTTP messages → spans → exporters.
pub mod capture;
pub mod protocol;
