//! The Raft protocol as a pure state machine (no sockets, threads, clocks or files).

pub mod message;
pub mod node;

pub use message::*;
pub use node::{Config, HardState, Node, Ready};
