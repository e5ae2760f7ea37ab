//! Loopback ports for the local clusters that tools (`chaos`) and tests start.
//!
//! A port taken from the kernel's ephemeral range (32768 and up on Linux) by binding port 0 and
//! then released can be handed to any other socket bound to port 0 (a client, a proxy, a
//! neighbouring test) before the peer binds it. Ports below that range are only ever handed out
//! by number, so they come from there: each once per process, starting at an offset from the
//! process ID so that two processes picking at once rarely meet, and each checked free for UDP
//! (the peers) and TCP (`metrics_addr`) when handed out.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// The ports handed out: `FIRST..FIRST + SPAN`, below the ephemeral range.
const FIRST: u32 = 20_000;
const SPAN: u32 = 12_000;

/// `n` distinct loopback ports, free for UDP and TCP a moment ago and not handed out before by
/// this process.
pub fn free_loopback_ports(n: usize) -> Result<Vec<u16>, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if ports.len() == n {
            return Ok(ports);
        }
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + step) % SPAN) as u16;
        let free = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
        if free {
            ports.push(port);
        }
    }
    if ports.len() == n {
        return Ok(ports);
    }
    Err(format!(
        "no {n} free loopback ports in {FIRST}..{}",
        FIRST + SPAN
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_below_the_ephemeral_range_and_never_handed_out_twice() {
        let first = free_loopback_ports(3).unwrap();
        let second = free_loopback_ports(3).unwrap();
        let all: std::collections::BTreeSet<u16> = first.iter().chain(&second).copied().collect();
        assert_eq!(all.len(), 6, "{first:?} {second:?}");
        for port in all {
            assert!((20_000..32_000).contains(&port), "{port}");
            UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        }
    }
}
