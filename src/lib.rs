//! raft: Raft consensus over UDP. A pure, deterministic core (`raft`) inside a thin shell of
//! threads (`peer`), with durable storage (`storage`) and a client library (`client`).

pub mod auth;
pub mod backup;
pub mod client;
pub mod cluster;
pub mod config;
pub mod http;
pub mod metrics;
pub mod peer;
pub mod ports;
pub mod probes;
pub mod raft;
pub mod storage;
pub mod transport;
