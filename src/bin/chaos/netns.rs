//! `chaos --netns`: the peers run in Linux network namespaces of their own, made and faulted
//! by `scripts/netns-cluster.sh` (compiled into this binary, so there is one implementation of
//! how a namespaced cluster is built), and partitions are made by taking links down and by
//! packet filters instead of by proxies.
//!
//! Every peer listens on `SUBNET.I:3000` inside namespace `PREFIXI`; the host is `SUBNET.254`
//! on bridge `PREFIXbr`, which is how the clients in this process reach the peers. A run holds
//! a lock on its prefix and tears everything down when its [`NetnsGuard`] is dropped.

use raft::raft::NodeId;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Names and addresses of chaos runs of their own, apart from a cluster run by hand (prefix
/// `raft`, 10.213.7.0/24) and from `tests/netns.rs` (`rtst`, 10.213.9.0/24).
pub const DEFAULT_PREFIX: &str = "rchaos";
pub const DEFAULT_SUBNET: &str = "10.213.11";

/// The port every peer listens on inside its namespace (fixed by the script).
pub const PORT: u16 = 3000;

const SCRIPT: &str = include_str!("../../../scripts/netns-cluster.sh");

/// Which namespaces and addresses a run uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsConfig {
    /// Namespaces are `PREFIX1..N`, the bridge `PREFIXbr`, the host ends of the links `PREFIXvI`.
    pub prefix: String,
    /// The first three octets of a private /24: peer `I` is `.I`, the host `.254`.
    pub subnet: String,
    /// The peers' `snapshot_entries` (their `snapshot_trailing` a tenth of it), if set.
    pub snapshot_entries: Option<u64>,
}

impl NetnsConfig {
    /// Checks that the names fit Linux's 15-byte interface names and that the subnet is a
    /// private /24, so that a run never routes traffic meant for a real network.
    pub fn new(prefix: &str, subnet: &str) -> Result<NetnsConfig, String> {
        let name_ok = (1..=10).contains(&prefix.len())
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !name_ok {
            return Err(format!(
                "--netns-prefix {prefix:?}: 1 to 10 lowercase letters and digits, starting with a letter"
            ));
        }
        let octets: Vec<u8> = subnet
            .split('.')
            .map(|o| o.parse::<u8>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("--netns-subnet {subnet:?}: three octets, like 10.213.11"))?;
        let private = match octets[..] {
            [10, _, _] => true,
            [172, b, _] => (16..32).contains(&b),
            [192, 168, _] => true,
            _ => false,
        };
        if !private {
            return Err(format!(
                "--netns-subnet {subnet:?}: must be three octets of a private /24 (10.x.y, 172.16-31.y, 192.168.y)"
            ));
        }
        Ok(NetnsConfig {
            prefix: prefix.to_string(),
            subnet: subnet.to_string(),
            snapshot_entries: None,
        })
    }

    /// Peer `id`'s address, where clients reach it.
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        let o: Vec<u8> = self
            .subnet
            .split('.')
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        SocketAddr::from((Ipv4Addr::new(o[0], o[1], o[2], id as u8), PORT))
    }

    fn is_default(&self) -> bool {
        self.prefix == DEFAULT_PREFIX && self.subnet == DEFAULT_SUBNET
    }

    /// The command-line options that select this config.
    pub fn args(&self) -> String {
        if self.is_default() {
            " --netns".into()
        } else {
            format!(
                " --netns --netns-prefix {} --netns-subnet {}",
                self.prefix, self.subnet
            )
        }
    }
}

/// Why network namespaces cannot be made here (not root, no `ip`, no permission), if so;
/// otherwise whether one-way cuts can be made (a working nft or iptables).
pub fn probe(cfg: &NetnsConfig) -> Result<bool, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Err("not running as root".into());
    }
    for (tool, version) in [("bash", "--version"), ("ip", "-V")] {
        if let Err(e) = Command::new(tool).arg(version).output() {
            return Err(format!("cannot run `{tool}`: {e}"));
        }
    }
    // The pid keeps two runs that probe at once from tripping over each other.
    let ns = format!("{}probe{}", cfg.prefix, std::process::id());
    let added = run("ip", &["netns", "add", &ns]);
    if let Err(e) = added {
        return Err(format!("`ip netns add` failed: {e}"));
    }
    let filter = run("ip", &["netns", "exec", &ns, "nft", "list", "tables"]).is_ok()
        || run("ip", &["netns", "exec", &ns, "iptables", "-L", "-n"]).is_ok();
    let _ = run("ip", &["netns", "del", &ns]);
    Ok(filter)
}

/// Runs a command; its stdout, or why it failed.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A run's namespaced cluster: the script's commands, with the run's names and folders.
pub struct Netns {
    pub cfg: NetnsConfig,
    /// The script's folder: configs, data, logs and pid files of the peers.
    peers_dir: PathBuf,
    script: PathBuf,
    /// Holds `release/peer` and `release/client`, where the script looks for its binaries.
    bin_dir: PathBuf,
    /// Every script command and what it printed, for the post-mortem.
    log: Mutex<File>,
    /// Whether one-way cuts can be made here (they need a packet filter).
    pub one_way: bool,
    /// Whether the peers run without a key (`--no-auth`: the script writes `"insecure": true`).
    pub insecure: bool,
}

impl Netns {
    fn script(&self, args: &[&str]) -> Result<String, String> {
        let start = Instant::now();
        let out = Command::new("bash")
            .arg(&self.script)
            .args(args)
            .env("RAFT_NETNS_PREFIX", &self.cfg.prefix)
            .env("RAFT_NETNS_SUBNET", &self.cfg.subnet)
            .env("RAFT_NETNS_DIR", &self.peers_dir)
            .env(
                "RAFT_NETNS_SNAPSHOT_ENTRIES",
                self.cfg
                    .snapshot_entries
                    .map_or_else(String::new, |n| n.to_string()),
            )
            .env("CARGO_TARGET_DIR", &self.bin_dir)
            .env("RAFT_NETNS_INSECURE", if self.insecure { "1" } else { "" })
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_PEER_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run the netns script: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if let Ok(mut log) = self.log.lock() {
            let _ = writeln!(
                log,
                "$ netns-cluster.sh {} ({} ms, {})\n{stdout}{stderr}",
                args.join(" "),
                start.elapsed().as_millis(),
                out.status
            );
        }
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "netns-cluster.sh {} failed ({}): {}",
                args.join(" "),
                out.status,
                stderr.trim()
            ))
        }
    }

    /// Makes `n` namespaces and starts a peer in each; returns once one leads.
    pub fn up(&self, n: usize) -> Result<(), String> {
        self.script(&["up", &n.to_string()]).map(|_| ())
    }

    /// Takes peer `id`'s link down: nothing in or out, clients included.
    pub fn cut(&self, id: NodeId) -> Result<(), String> {
        self.script(&["cut", &id.to_string()]).map(|_| ())
    }

    /// Peer `id` receives nothing on its port, but can send.
    pub fn cut_in(&self, id: NodeId) -> Result<(), String> {
        self.script(&["cut-in", &id.to_string()]).map(|_| ())
    }

    /// Nothing peer `id` sends leaves its namespace, but it receives.
    pub fn cut_out(&self, id: NodeId) -> Result<(), String> {
        self.script(&["cut-out", &id.to_string()]).map(|_| ())
    }

    /// Cuts every listed peer's link.
    pub fn split(&self, ids: &[NodeId]) -> Result<(), String> {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        self.script(&["split", &list.join(",")]).map(|_| ())
    }

    /// Every link up, every filter lifted.
    pub fn heal(&self) -> Result<(), String> {
        self.script(&["heal"]).map(|_| ())
    }

    /// Starts peer `id` inside its namespace on its data; returns its pid.
    pub fn start(&self, id: NodeId) -> Result<u32, String> {
        self.script(&["start", &id.to_string()])?;
        self.pid(id)
            .ok_or_else(|| format!("no pid file for node {id} after starting it"))
    }

    /// Peer `id`'s pid as the script last recorded it (the peer itself: `ip netns exec`
    /// execs it).
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        std::fs::read_to_string(self.peers_dir.join(format!("peer{id}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn config(&self, id: NodeId) -> PathBuf {
        self.peers_dir.join(format!("peer{id}.json"))
    }

    pub fn peer_log(&self, id: NodeId) -> PathBuf {
        self.peers_dir.join(format!("peer{id}.log"))
    }

    /// Our namespaces that exist now.
    fn existing(&self) -> Vec<String> {
        let list = run("ip", &["netns", "list"]).unwrap_or_default();
        list.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| {
                n.strip_prefix(&self.cfg.prefix).is_some_and(|rest| {
                    !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
                })
            })
            .map(String::from)
            .collect()
    }
}

/// Owns a run's namespaces and its lock on the prefix: `down` runs when it is dropped, whether
/// the run ended, aborted or panicked.
pub struct NetnsGuard {
    netns: Arc<Netns>,
    _lock: File,
}

impl NetnsGuard {
    /// Takes the prefix's lock, removes what a killed run with the same prefix left, and lays
    /// out the script and the binaries it runs in `home`. Makes no namespace yet.
    pub fn prepare(
        cfg: &NetnsConfig,
        home: &Path,
        peers_dir: &Path,
        peer_exe: &Path,
        insecure: bool,
        notes: &mut Vec<String>,
    ) -> Result<NetnsGuard, String> {
        let one_way =
            probe(cfg).map_err(|why| format!("network namespaces cannot be used here: {why}"))?;
        let lock_path = std::env::temp_dir().join(format!("raft-chaos-netns-{}.lock", cfg.prefix));
        // Root opens a file of a well-known name in a shared folder: never through a link
        // someone planted there, and never truncating what it opens.
        let lock = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e} (a link there is refused)", lock_path.display()))?;
        if lock.try_lock().is_err() {
            return Err(format!(
                "another chaos --netns run is using the prefix {:?}; give this one --netns-prefix and --netns-subnet of its own",
                cfg.prefix
            ));
        }
        let client_exe = peer_exe.with_file_name("client");
        for exe in [peer_exe, &client_exe] {
            if !exe.exists() {
                return Err(format!(
                    "{} not found: build it with `cargo build --release --bins`",
                    exe.display()
                ));
            }
        }
        let release = home.join("bin").join("release");
        let scripts = home.join("scripts");
        for d in [&release, &scripts, &peers_dir.to_path_buf()] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        for (exe, name) in [(peer_exe, "peer"), (&client_exe, "client")] {
            let exe = exe
                .canonicalize()
                .map_err(|e| format!("{}: {e}", exe.display()))?;
            std::os::unix::fs::symlink(&exe, release.join(name))
                .map_err(|e| format!("{}: {e}", release.join(name).display()))?;
        }
        let script = scripts.join("netns-cluster.sh");
        std::fs::write(&script, SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
        let log_path = home.join("netns.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let netns = Arc::new(Netns {
            cfg: cfg.clone(),
            peers_dir: peers_dir
                .canonicalize()
                .map_err(|e| format!("{}: {e}", peers_dir.display()))?,
            script,
            bin_dir: home.join("bin"),
            log: Mutex::new(log),
            one_way,
            insecure,
        });
        let guard = NetnsGuard { netns, _lock: lock };
        let left = guard.netns.existing();
        if !left.is_empty() {
            guard.netns.script(&["down"])?;
            notes.push(format!(
                "removed namespaces {} that an earlier run left behind",
                left.join(",")
            ));
        }
        // The bridge's /24 must be ours alone: a route to it elsewhere would be hijacked.
        let probe_addr = format!("{}.1", cfg.subnet);
        let routes = run("ip", &["-4", "route", "show", "to", "match", &probe_addr])?;
        if let Some(r) = routes.lines().find(|l| !l.starts_with("default")) {
            return Err(format!(
                "{}.0/24 is already routed on this host ({}); choose another --netns-subnet",
                cfg.subnet,
                r.trim()
            ));
        }
        Ok(guard)
    }

    pub fn netns(&self) -> Arc<Netns> {
        self.netns.clone()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = self.netns.script(&["down"]) {
            eprintln!(
                "chaos: tearing down the namespaces failed: {e}; `RAFT_NETNS_PREFIX={} scripts/netns-cluster.sh down` removes them",
                self.netns.cfg.prefix
            );
        }
    }
}

/// Whether process `pid` runs (a zombie does not: it holds no socket or lock any more).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold anything.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    !matches!(state.and_then(|s| s.chars().next()), None | Some('Z' | 'X'))
}

/// Waits up to `within` for `pid` to be gone; whether it is.
pub fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_accepts_only_short_names_and_private_subnets() {
        assert!(NetnsConfig::new("rchaos", "10.213.11").is_ok());
        assert!(NetnsConfig::new("r2", "192.168.3").is_ok());
        assert!(NetnsConfig::new("", "10.1.2").is_err());
        assert!(NetnsConfig::new("waytoolongprefix", "10.1.2").is_err());
        assert!(NetnsConfig::new("Bad-name", "10.1.2").is_err());
        assert!(NetnsConfig::new("ok", "8.8.8").is_err());
        assert!(NetnsConfig::new("ok", "172.32.1").is_err());
        assert!(NetnsConfig::new("ok", "10.1").is_err());
        assert!(NetnsConfig::new("ok", "10.1.2.3").is_err());
        let c = NetnsConfig::new("ok", "10.213.11").unwrap();
        assert_eq!(c.addr(3).to_string(), "10.213.11.3:3000");
    }

    #[test]
    fn a_process_is_alive_until_reaped_or_a_zombie() {
        assert!(alive(std::process::id()));
        let mut child = Command::new("sleep").arg("10").spawn().unwrap();
        let pid = child.id();
        assert!(alive(pid));
        child.kill().unwrap();
        // Not reaped yet: a zombie, which counts as gone.
        assert!(wait_gone(pid, Duration::from_secs(2)));
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
