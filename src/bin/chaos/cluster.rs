//! The peer processes of a chaos run: configs that point every peer at its link proxies (or
//! the peers of a `--netns` run, which the namespace script configures and starts), and
//! start / kill -9 / SIGSTOP / SIGCONT / restart on the same data directory.

use crate::netns::{alive, wait_gone, Netns};
use crate::proxy::Network;
use raft::client::{Client, PeerStatus};
use raft::raft::{NodeId, Role};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How peers are started.
enum Launcher {
    /// This binary on loopback, as our child.
    Local(PathBuf),
    /// By the namespace script inside the peer's namespace; not our child.
    Netns(Arc<Netns>),
}

/// A running peer process.
enum Proc {
    Child(Child),
    /// Known by pid only: its exit status is not ours to collect.
    Detached(u32),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Detached(pid) => *pid,
        }
    }
}

/// One peer process and the files it uses across restarts.
pub struct PeerProc {
    pub id: NodeId,
    /// Where clients reach it.
    pub addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Proc>,
    paused: bool,
    /// How many times it was started.
    pub starts: u32,
    /// It was removed from the cluster: its exit (status 0) is expected, not a failure.
    removed: bool,
    /// Start the next process with `--join` (its data was wiped to be added anew).
    join: bool,
}

impl PeerProc {
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(Proc::Child(c)) => matches!(c.try_wait(), Ok(None)),
            Some(Proc::Detached(pid)) => alive(*pid),
        }
    }

    fn start(&mut self, launcher: &Launcher) -> Result<(), String> {
        if self.is_running() {
            return Ok(());
        }
        // A removed peer stays down until it is added again; restarting it is pointless
        // (it would only find its removal in its log and exit).
        if self.removed {
            return Ok(());
        }
        let exe = match launcher {
            Launcher::Local(exe) => exe,
            Launcher::Netns(netns) => {
                self.child = Some(Proc::Detached(netns.start(self.id)?));
                self.paused = false;
                self.starts += 1;
                return Ok(());
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let child = Command::new(exe)
            .arg("-p")
            .arg(&self.config)
            .args(self.join.then_some("--join"))
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_PEER_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {} for node {}: {e}", exe.display(), self.id))?;
        self.child = Some(Proc::Child(child));
        self.paused = false;
        self.starts += 1;
        Ok(())
    }

    /// kill -9, and reap it (or, if it is not our child, wait until it is gone, so that a
    /// restart finds its port and data directory free).
    fn kill(&mut self) {
        match self.child.take() {
            Some(Proc::Child(mut c)) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Some(Proc::Detached(pid)) => {
                let _ = signal(pid, "-KILL");
                if !wait_gone(pid, Duration::from_secs(5)) {
                    log::warn!("node {} (pid {pid}) survived kill -9 for 5 s", self.id);
                }
            }
            None => {}
        }
        self.paused = false;
    }

    fn signal(&mut self, sig: &str) -> Result<(), String> {
        match &self.child {
            Some(p) => signal(p.pid(), sig),
            None => Err(format!("node {} is not running", self.id)),
        }
    }
}

fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .map_err(|e| format!("kill {sig}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid} failed: {status}"))
    }
}

/// The peers of the run.
pub struct Cluster {
    pub peers: BTreeMap<NodeId, PeerProc>,
    launcher: Launcher,
}

impl Cluster {
    /// Writes a config per peer into `dir/nI/` whose `other_peers` are this peer's proxies,
    /// and starts nothing yet. `ports` are the peers' own ports; every peer uses `secret_file`
    /// and `snapshot_entries`, if given.
    pub fn configure(
        dir: &Path,
        exe: &Path,
        ports: &BTreeMap<NodeId, u16>,
        network: &Network,
        secret_file: Option<&Path>,
        snapshot_entries: Option<u64>,
    ) -> Result<Cluster, String> {
        let mut peers = BTreeMap::new();
        for (&id, &port) in ports {
            let home = dir.join(format!("n{id}"));
            std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
            let others: Vec<serde_json::Value> = ports
                .keys()
                .filter(|&&j| j != id)
                .map(|&j| {
                    let proxy = network.proxy_addr(id, j);
                    serde_json::json!({"node_ID": j, "host": "127.0.0.1", "port": proxy.port()})
                })
                .collect();
            let mut config = serde_json::json!({
                "name": format!("chaos{id}"),
                "node_ID": id,
                "host": "127.0.0.1",
                "port": port,
                "other_peers": others,
                "data_dir": home.join("data"),
            });
            if let Some(secret) = secret_file {
                config["secret_file"] = secret.to_string_lossy().into_owned().into();
            }
            if let Some(n) = snapshot_entries {
                config["snapshot_entries"] = n.into();
                config["snapshot_trailing"] = (n / 10).into();
            }
            let path = home.join("config.json");
            std::fs::write(&path, format!("{config:#}\n"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            peers.insert(
                id,
                PeerProc {
                    id,
                    addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    config: path,
                    log: home.join("peer.log"),
                    child: None,
                    paused: false,
                    starts: 0,
                    removed: false,
                    join: false,
                },
            );
        }
        Ok(Cluster {
            peers,
            launcher: Launcher::Local(exe.to_path_buf()),
        })
    }

    /// The peers `netns` started in its namespaces (`up`), taken over by their pid files.
    pub fn in_netns(netns: Arc<Netns>, nodes: usize) -> Result<Cluster, String> {
        let mut peers = BTreeMap::new();
        for id in 1..=nodes as NodeId {
            let pid = netns
                .pid(id)
                .ok_or_else(|| format!("no pid file for node {id} after `up`"))?;
            peers.insert(
                id,
                PeerProc {
                    id,
                    addr: netns.cfg.addr(id),
                    config: netns.config(id),
                    log: netns.peer_log(id),
                    child: Some(Proc::Detached(pid)),
                    paused: false,
                    starts: 1,
                    removed: false,
                    join: false,
                },
            );
        }
        Ok(Cluster {
            peers,
            launcher: Launcher::Netns(netns),
        })
    }

    /// The peers' own addresses, which clients use.
    pub fn client_addresses(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.peers.iter().map(|(&id, p)| (id, p.addr)).collect()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.peers.keys().copied().collect()
    }

    pub fn start(&mut self, id: NodeId) -> Result<(), String> {
        let p = self
            .peers
            .get_mut(&id)
            .ok_or_else(|| format!("no node {id}"))?;
        p.start(&self.launcher)
    }

    pub fn start_all(&mut self) -> Result<(), String> {
        for id in self.ids() {
            self.start(id)?;
        }
        Ok(())
    }

    pub fn kill(&mut self, id: NodeId) -> Result<(), String> {
        self.peer(id)?.kill();
        Ok(())
    }

    pub fn pause(&mut self, id: NodeId) -> Result<(), String> {
        let p = self.peer(id)?;
        p.signal("-STOP")?;
        p.paused = true;
        Ok(())
    }

    pub fn resume(&mut self, id: NodeId) -> Result<(), String> {
        let p = self.peer(id)?;
        if p.paused {
            p.signal("-CONT")?;
            p.paused = false;
        }
        Ok(())
    }

    /// Resumes every paused peer and (re)starts every peer that is not running.
    pub fn heal(&mut self) -> Result<(), String> {
        for id in self.ids() {
            self.resume(id)?;
            if !self.peer(id)?.is_running() {
                self.start(id)?;
            }
        }
        Ok(())
    }

    /// Peers that exited on their own (not killed by us) since the last call: each is
    /// reaped (so a later [`Cluster::heal`] restarts it) and described with its exit status
    /// and the panic message its log ends with, if any.
    pub fn reap_exited(&mut self) -> Vec<(NodeId, String)> {
        let mut out = Vec::new();
        for p in self.peers.values_mut() {
            let status = match &mut p.child {
                None => continue,
                Some(Proc::Child(c)) => match c.try_wait() {
                    Ok(Some(status)) => status.to_string(),
                    _ => continue,
                },
                Some(Proc::Detached(pid)) if !alive(*pid) => {
                    format!("pid {pid} exited (status unknown: not our child)")
                }
                Some(Proc::Detached(_)) => continue,
            };
            p.child = None;
            p.paused = false;
            if p.removed && status.contains("exit status: 0") {
                log::info!("node {} exited after its removal from the cluster", p.id);
                continue;
            }
            let panic = last_panic(&p.log).map_or(String::new(), |m| format!(": {m}"));
            out.push((p.id, format!("{status}{panic}")));
        }
        out
    }

    /// Node `id` is being removed from the cluster: its own exit is expected, and it is not
    /// restarted until [`Cluster::rejoin`].
    pub fn mark_removed(&mut self, id: NodeId, removed: bool) -> Result<(), String> {
        self.peer(id)?.removed = removed;
        Ok(())
    }

    /// Waits up to `within` for removed node `id` to exit by itself, then kills it; wipes its
    /// data directory; starts it with `--join`, to be added again as a new member.
    pub fn rejoin(&mut self, id: NodeId, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while self.peer(id)?.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let p = self.peer(id)?;
        if p.is_running() {
            log::warn!("node {id} did not exit within {within:?} of its removal; killing it");
        }
        p.kill();
        let text = std::fs::read_to_string(&p.config)
            .map_err(|e| format!("{}: {e}", p.config.display()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.config.display()))?;
        let data = config["data_dir"]
            .as_str()
            .ok_or_else(|| format!("{}: no data_dir", p.config.display()))?;
        match std::fs::remove_dir_all(data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot wipe {data}: {e}")),
        }
        p.removed = false;
        p.join = true;
        let launcher = &self.launcher;
        let p = self.peers.get_mut(&id).expect("checked");
        p.start(launcher)
    }

    pub fn total_starts(&self) -> u32 {
        self.peers.values().map(|p| p.starts).sum()
    }

    fn peer(&mut self, id: NodeId) -> Result<&mut PeerProc, String> {
        self.peers
            .get_mut(&id)
            .ok_or_else(|| format!("no node {id}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.peers.values_mut() {
            p.kill();
        }
    }
}

/// The last panic in a peer's log: the `panicked at` line and the message after it.
fn last_panic(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().rposition(|l| l.contains("panicked at"))?;
    let place = lines[at].split("panicked at").nth(1).unwrap_or("").trim();
    let message = lines.get(at + 1).map_or("", |l| l.trim());
    Some(format!("panicked at {place} {message}"))
}

/// The leader among the peers that answered: the one in the highest term that says it leads.
pub fn leader_of(statuses: &[PeerStatus]) -> Option<NodeId> {
    statuses
        .iter()
        .filter_map(|s| s.info.as_ref())
        .filter(|i| i.role == Role::Leader)
        .max_by_key(|i| i.term)
        .map(|i| i.id)
}

/// Polls `status` until some peer leads, or `within` passes.
pub fn wait_for_leader(client: &mut Client, within: Duration) -> Option<NodeId> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = leader_of(&client.status()) {
            return Some(l);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
