//! Everything the kernel programs and the daemon must agree on, byte for byte.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding fields and fixed-width flags, and
//! is checked for size and field offsets by the unit tests below: a change that moves a field is
//! a change of the pinned maps' layout, which the daemon refuses to adopt (it compares key and
//! value sizes of the pinned maps with these types before it loads anything).
#![no_std]

pub mod agent;
pub mod decision;
pub mod dns;
pub mod event;
pub mod maps;
pub mod packet;
pub mod rule;
pub mod sockopt;
