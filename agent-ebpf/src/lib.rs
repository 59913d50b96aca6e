//! Empty host-side library: it exists so `agent` can name this crate as a build dependency and
//! be rebuilt when the kernel programs change.
#![no_std]
