//! Trace context, span records and the linking of spans into trees.
pub mod context;
pub mod db;
pub mod goroutines;
pub mod linker;
pub mod privacy;
pub mod sampler;
pub mod span;
