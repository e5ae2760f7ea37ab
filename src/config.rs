//! The per-peer JSON config (stub; see the config commit).
