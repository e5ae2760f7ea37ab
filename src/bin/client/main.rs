//! The command-line client: `append`, `query`, `follow`, `status`, `transfer-leader`,
//! membership (`members`, `add-learner`, `promote`, `remove`) and backup (`snapshot save`)
//! subcommands that print JSON lines, or, with no subcommand, the original project's interactive menu. It follows the cluster: the config
//! needs to name only one current member.
//!
//! Exit codes: 0 done; 1 refused, usage or config error; 2 no answer in time (outcome unknown).
//!
//! Who the client is: with `--cred FILE`, the user of that credential (`client user add`
//! made it), allowed what its role allows; without it, the operator, whose config names the
//! cluster's `secret_file`, allowed everything. The peers check every request; a request the
//! role does not allow is refused (`permission denied: role read cannot append`, exit 1).
//!
//! The leader refuses a membership change after which the voters it has heard from within an
//! election timeout would not be a majority of the new configuration's voters (the quorum
//! guard); `--force` on `add-learner`, `promote` and `remove` skips that check, and the menu
//! asks before forcing.

mod backup;
mod users;
mod watch;

use argh::FromArgs;
use raft::auth::Credential;
use raft::client::{Client, ClientError, Configured, PeerStatus};
use raft::config::PeerConfig;
use raft::raft::membership::check_address;
use raft::raft::permit;
use raft::raft::{
    ClientOp, ConfChange, FollowerInfo, Index, LogRecord, Member, MemberRole, NodeId, Role,
    StatusInfo, UserRole,
};
use serde::Serialize;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit code: the operation is done.
const EXIT_OK: u8 = 0;
/// Exit code: refused, or a usage or config error.
const EXIT_REFUSED: u8 = 1;
/// Exit code: no answer in time; the outcome is unknown.
const EXIT_NO_ANSWER: u8 = 2;
/// The time limit of an operation without `--timeout-ms`.
const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// The time limit of `promote` without `--timeout-ms`: a learner may need a while to catch up.
const DEFAULT_PROMOTE_TIMEOUT_MS: u64 = 10_000;
/// How long `follow` pauses after a read that found nothing new (or failed).
const FOLLOW_PAUSE: Duration = Duration::from_millis(30);
/// The most entries one read of `follow` asks for, so that a long log is printed as it is read.
const FOLLOW_BATCH: usize = 1000;

#[derive(FromArgs)]
/// Talk to a Raft cluster. With no subcommand, an interactive menu.
/// Exit codes: 0 done, 1 refused or usage error, 2 no answer in time (outcome unknown).
struct Args {
    /// a peer config naming the cluster's peers (default peers/peer1.json)
    #[argh(option, short = 'p', default = "PathBuf::from(\"peers/peer1.json\")")]
    path: PathBuf,

    /// time limit for each operation, in milliseconds (default 5000; promote: 10000)
    #[argh(option)]
    timeout_ms: Option<u64>,

    /// act as the user of this credential file (from `client user add`, mode 0600); without
    /// it, the config's secret_file makes this client the operator (admin)
    #[argh(option)]
    cred: Option<PathBuf>,

    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Append(AppendArgs),
    Query(QueryArgs),
    Follow(FollowArgs),
    Status(StatusArgs),
    TransferLeader(TransferLeaderArgs),
    Watch(WatchArgs),
    Members(MembersArgs),
    AddLearner(AddLearnerArgs),
    Promote(PromoteArgs),
    Remove(RemoveArgs),
    Snapshot(backup::SnapshotArgs),
    User(users::UserArgs),
}

#[derive(FromArgs)]
/// Print each member as the leader sees it, one JSON line each: id, address, role (voter or
/// learner), match_index and lag.
#[argh(subcommand, name = "members")]
struct MembersArgs {}

#[derive(FromArgs)]
/// Add peer ID at HOST:PORT as a learner (it gets the log but does not vote); prints the new
/// configuration once committed.
#[argh(subcommand, name = "add-learner")]
struct AddLearnerArgs {
    /// the new peer's node ID
    #[argh(positional)]
    id: NodeId,
    /// where peers reach it, HOST:PORT
    #[argh(positional)]
    address: String,
    /// add back the ID of a removed member (its peer started over with --join on an empty
    /// data dir); without it, a removed ID is refused
    #[argh(switch)]
    rejoin: bool,
    /// skip the leader's check that a majority of the voters after the change are live (the
    /// quorum guard); the cluster may then stop until enough of them are back
    #[argh(switch)]
    force: bool,
}

#[derive(FromArgs)]
/// Make learner ID a voter once it has caught up; retries until the time limit, then exits 1
/// saying how far behind it is.
#[argh(subcommand, name = "promote")]
struct PromoteArgs {
    /// the learner's node ID
    #[argh(positional)]
    id: NodeId,
    /// how long to wait for the learner to catch up, in milliseconds (default 10000)
    #[argh(option)]
    timeout_ms: Option<u64>,
    /// skip the leader's check that a majority of the voters after the change are live (the
    /// quorum guard); the cluster may then stop until enough of them are back
    #[argh(switch)]
    force: bool,
}

#[derive(FromArgs)]
/// Remove voter or learner ID from the cluster; prints the new configuration once committed.
#[argh(subcommand, name = "remove")]
struct RemoveArgs {
    /// the member's node ID
    #[argh(positional)]
    id: NodeId,
    /// skip the leader's check that a majority of the voters after the change are live (the
    /// quorum guard); the cluster may then stop until enough of them are back
    #[argh(switch)]
    force: bool,
}

#[derive(FromArgs)]
/// Append TEXT to the replicated log; prints its index, term and data as one JSON line.
#[argh(subcommand, name = "append")]
struct AppendArgs {
    /// the entry's text (use `--` before text that starts with '-')
    #[argh(positional)]
    text: String,
}

#[derive(FromArgs)]
/// Print the committed entries, one JSON line each, in index order (a linearizable read).
#[argh(subcommand, name = "query")]
struct QueryArgs {
    /// the first index to print (default 1); past the last committed index prints nothing
    #[argh(option, default = "1")]
    from: Index,
    /// print at most this many entries (default: all)
    #[argh(option)]
    limit: Option<usize>,
}

#[derive(FromArgs)]
/// Print committed entries from an index on, one JSON line each, as they commit, until killed
/// (like `tail -f`). With --timeout-ms, exit 2 once no peer has answered for that long.
#[argh(subcommand, name = "follow")]
struct FollowArgs {
    /// the first index to print (default 1)
    #[argh(option, default = "1")]
    from: Index,
}

#[derive(FromArgs)]
/// Print every peer's status, one JSON line each; exit 2 if none answers.
#[argh(subcommand, name = "status")]
struct StatusArgs {}

#[derive(FromArgs)]
/// Hand leadership to peer ID, or to the most up-to-date peer; prints the new leader and term.
#[argh(subcommand, name = "transfer-leader")]
struct TransferLeaderArgs {
    /// the peer to lead next (default: the most up-to-date one)
    #[argh(positional)]
    id: Option<NodeId>,
}

#[derive(FromArgs)]
/// A live view of the cluster, redrawn several times a second; q or Ctrl-C quits.
#[argh(subcommand, name = "watch")]
struct WatchArgs {
    /// print one frame as plain text and exit
    #[argh(switch)]
    once: bool,

    /// milliseconds between refreshes (default 250)
    #[argh(option, default = "250")]
    interval_ms: u64,
}

/// What `add-learner`, `promote` and `remove` print: the configuration entry's index and term,
/// and the configuration it made.
#[derive(Serialize)]
struct ConfiguredLine {
    index: u64,
    term: u64,
    members: Vec<Member>,
}

/// What `transfer-leader` prints.
#[derive(Serialize)]
struct LeaderLine {
    leader: NodeId,
    term: u64,
}

/// One `status` line; the fields after `answered` appear only for peers that answered.
#[derive(Serialize)]
struct StatusLine {
    id: NodeId,
    address: String,
    answered: bool,
    #[serde(flatten)]
    info: Option<StatusFields>,
}

#[derive(Serialize)]
struct StatusFields {
    role: Role,
    term: u64,
    leader: Option<NodeId>,
    last_index: u64,
    commit_index: u64,
    applied_index: u64,
    /// Datagrams the peer dropped for a missing or wrong authentication tag.
    auth_failures: u64,
    /// Whether a full disk stopped the peer's storage (it acknowledges nothing meanwhile).
    disk_full: bool,
    /// On the leader's row: each follower's match index, lag and time since last contact.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    followers: Vec<FollowerInfo>,
    /// This peer's role in its configuration (`voter`, `learner`); absent if it reports no
    /// configuration, or one without itself (it was removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    member_role: Option<MemberRole>,
    /// The index of the configuration in force on this peer (0: the bootstrap one).
    config_index: u64,
    /// That configuration's members.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    members: Vec<Member>,
    /// The index of this peer's latest snapshot (0: none) and the first index its log still
    /// holds (entries before it are compacted into the snapshot).
    snapshot_index: u64,
    first_index: u64,
}

impl From<&StatusInfo> for StatusFields {
    fn from(i: &StatusInfo) -> StatusFields {
        StatusFields {
            role: i.role,
            term: i.term,
            leader: i.leader,
            last_index: i.last_index,
            commit_index: i.commit_index,
            applied_index: i.applied_index,
            auth_failures: i.auth_failures,
            disk_full: i.disk_full,
            followers: i.followers.clone(),
            member_role: member_role(i),
            config_index: i.config_index,
            members: i.members.clone(),
            snapshot_index: i.snapshot_index,
            first_index: i.first_index,
        }
    }
}

/// A peer's role in the configuration it reports, if it is in it.
fn member_role(i: &StatusInfo) -> Option<MemberRole> {
    i.members.iter().find(|m| m.id == i.id).map(|m| m.role)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(code) => return ExitCode::from(code),
    };
    let timeout_ms = match &args.command {
        Some(Command::Promote(p)) => p
            .timeout_ms
            .or(args.timeout_ms)
            .unwrap_or(DEFAULT_PROMOTE_TIMEOUT_MS),
        _ => args.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
    };
    if timeout_ms == 0 {
        eprintln!("error: --timeout-ms must be at least 1");
        return ExitCode::from(EXIT_REFUSED);
    }
    if let Some(Command::AddLearner(a)) = &args.command {
        if let Err(e) = check_address(&a.address) {
            eprintln!("error: address {:?}: {e}", a.address);
            return ExitCode::from(EXIT_REFUSED);
        }
    }
    let from = match &args.command {
        Some(Command::Query(q)) => Some(q.from),
        Some(Command::Follow(f)) => Some(f.from),
        _ => None,
    };
    if from == Some(0) {
        eprintln!("error: --from must be at least 1 (log indices start at 1)");
        return ExitCode::from(EXIT_REFUSED);
    }
    if let Some(Command::Query(QueryArgs { limit: Some(0), .. })) = &args.command {
        eprintln!("error: --limit must be at least 1");
        return ExitCode::from(EXIT_REFUSED);
    }
    let timeout = Duration::from_millis(timeout_ms);
    let cluster = PeerConfig::load(&args.path).map_or_else(|_| String::new(), |c| c.cluster);
    let cred = args.cred.as_deref();
    let (mut client, role) = match connect(&args.path, timeout, cred) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let code = match args.command {
        Some(Command::Append(a)) => append(&mut client, &a.text),
        Some(Command::Query(q)) => query(&mut client, q.from, q.limit),
        Some(Command::Follow(f)) => follow(
            &mut client,
            f.from,
            args.timeout_ms.map(Duration::from_millis),
        ),
        Some(Command::Status(_)) => status(&mut client, timeout_ms),
        Some(Command::TransferLeader(t)) => transfer_leader(&mut client, t.id),
        Some(Command::Watch(w)) => watch(&args.path, cred, &w),
        Some(Command::Members(_)) => members(&mut client),
        Some(Command::AddLearner(a)) if a.rejoin => change(
            &mut client,
            ConfChange::Rejoin {
                id: a.id,
                address: a.address,
            },
            a.force,
        ),
        Some(Command::AddLearner(a)) => change(
            &mut client,
            ConfChange::AddLearner {
                id: a.id,
                address: a.address,
            },
            a.force,
        ),
        Some(Command::Promote(p)) => change(&mut client, ConfChange::Promote { id: p.id }, p.force),
        Some(Command::Remove(r)) => change(&mut client, ConfChange::Remove { id: r.id }, r.force),
        Some(Command::Snapshot(backup::SnapshotArgs {
            command: backup::SnapshotCommand::Save(s),
        })) => match backup::save(&mut client, &cluster, &s) {
            Ok(saved) => {
                print_or_exit(&json(&saved));
                EXIT_OK
            }
            Err(e) => fail(&e),
        },
        Some(Command::User(u)) => match users::run(&mut client, u) {
            Ok(lines) => {
                for line in &lines {
                    print_or_exit(line);
                }
                EXIT_OK
            }
            Err(e) => fail(&e),
        },
        None => menu(&mut client, role),
    };
    ExitCode::from(code)
}

/// Parses the command line; usage errors exit 1, `--help` exits 0.
fn parse_args() -> Result<Args, u8> {
    let mut strings = Vec::new();
    for arg in std::env::args_os() {
        match arg.into_string() {
            Ok(s) => strings.push(s),
            Err(bad) => {
                eprintln!("error: argument {bad:?} is not valid UTF-8");
                return Err(EXIT_REFUSED);
            }
        }
    }
    let program = strings
        .first()
        .map(|s| {
            Path::new(s)
                .file_name()
                .map_or(s.clone(), |f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "client".to_string());
    let rest: Vec<&str> = strings.iter().skip(1).map(String::as_str).collect();
    Args::from_args(&[&program], &rest).map_err(|early| match early.status {
        Ok(()) => {
            print_or_exit(&early.output);
            EXIT_OK
        }
        Err(()) => {
            eprintln!(
                "{}\nRun {program} --help for more information.",
                early.output.trim_end()
            );
            EXIT_REFUSED
        }
    })
}

/// A client of the cluster `path` describes, and the role it acts in: the user of credential
/// file `cred`, or else the operator, authenticated with the config's `secret_file` if any.
fn connect(
    path: &Path,
    timeout: Duration,
    cred: Option<&Path>,
) -> Result<(Client, UserRole), String> {
    let config = PeerConfig::load(path)?;
    let in_config = |e: String| format!("config {}: {e}", path.display());
    match cred {
        Some(file) => {
            let credential = Credential::load(file)?;
            let client =
                Client::from_credential(&config, timeout, &credential, file).map_err(in_config)?;
            Ok((client, credential.role))
        }
        None => {
            let client = Client::from_config(&config, timeout).map_err(|e| {
                let hint = if config.secret_file.is_some() {
                    " (a user without the cluster's secret passes its credential with --cred FILE)"
                } else {
                    ""
                };
                in_config(format!("{e}{hint}"))
            })?;
            Ok((client, UserRole::Admin))
        }
    }
}

/// The exit code for a failed operation, after printing why on stderr.
fn fail(e: &ClientError) -> u8 {
    match e {
        // Said as the peer said it: `permission denied: role read cannot append`.
        ClientError::Refused(reason) if reason.starts_with("permission denied") => {
            eprintln!("error: {reason}")
        }
        _ => eprintln!("error: {e}"),
    }
    match e {
        ClientError::Timeout(_) => EXIT_NO_ANSWER,
        ClientError::Refused(_) | ClientError::Io(_) => EXIT_REFUSED,
    }
}

/// Prints one line on stdout. A closed stdout (`client query | head`) ends the process
/// quietly; any other write error ends it with exit code 1.
fn print_or_exit(line: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_OK.into());
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(EXIT_REFUSED.into());
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

fn append(client: &mut Client, text: &str) -> u8 {
    match client.append(text) {
        Ok(a) => {
            print_or_exit(&json(&LogRecord {
                index: a.index,
                term: a.term,
                data: Some(text.to_string()),
                kind: None,
            }));
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

/// `query [--from N] [--limit K]`: prints nothing unless the whole read succeeded.
fn query(client: &mut Client, from: Index, limit: Option<usize>) -> u8 {
    match client.query_from(from, limit) {
        Ok(records) => {
            for r in &records {
                print_or_exit(&json(r));
            }
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

/// `follow [--from N]`: repeated linearizable reads from the next index to print, so every
/// entry from `from` on is printed once, in index order, with no gaps. A failed read (no
/// answer, a leader change) is retried; only a refusal ends it (exit 1), or, given `silence`,
/// that long without a successful read (exit 2). SIGINT, SIGTERM and a closed stdout end it
/// with exit 0 (a closed stdout also while there is nothing new to print).
fn follow(client: &mut Client, from: Index, silence: Option<Duration>) -> u8 {
    if let Err(e) = ctrlc::set_handler(|| {
        // Waiting for stdout's lock keeps a line from being cut short, but not for long: a
        // reader that stopped reading must not keep the process alive.
        let (locked, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _out = std::io::stdout().lock();
            let _ = locked.send(());
            loop {
                std::thread::park();
            }
        });
        let _ = wait.recv_timeout(Duration::from_millis(200));
        std::process::exit(EXIT_OK.into());
    }) {
        log::warn!("cannot handle SIGINT/SIGTERM: {e}");
    }
    let mut next = from;
    let mut last_answer = Instant::now();
    loop {
        match client.query_from(next, Some(FOLLOW_BATCH)) {
            Ok(records) => {
                last_answer = Instant::now();
                if records.is_empty() {
                    if stdout_closed() {
                        return EXIT_OK;
                    }
                    std::thread::sleep(FOLLOW_PAUSE);
                }
                for r in &records {
                    if r.index != next {
                        eprintln!(
                            "error: read from index {next} returned entry {} out of order",
                            r.index
                        );
                        return EXIT_REFUSED;
                    }
                    print_or_exit(&json(r));
                    next += 1;
                }
            }
            Err(e @ ClientError::Refused(_)) => return fail(&e),
            Err(e) => {
                let quiet = last_answer.elapsed();
                if silence.is_some_and(|limit| quiet >= limit) {
                    eprintln!(
                        "error: no answer for {} ms, waiting for index {next}: {e}",
                        quiet.as_millis()
                    );
                    return EXIT_NO_ANSWER;
                }
                log::warn!("reading from index {next}: {e}; retrying");
                std::thread::sleep(FOLLOW_PAUSE);
            }
        }
    }
}

/// Whether stdout is a pipe or socket whose reader has gone, so that `follow` ends while it
/// has nothing to print rather than at its next line. False where that cannot be told.
fn stdout_closed() -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: std::io::stdout().as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one pollfd that lives across the call, and no waiting.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        ready > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
    }
    #[cfg(not(unix))]
    false
}

/// `client watch`: status rounds with a short deadline, so a dead peer slows no redraw.
fn watch(path: &Path, cred: Option<&Path>, args: &WatchArgs) -> u8 {
    use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
    use crossterm::{cursor, execute, terminal};
    let interval = Duration::from_millis(args.interval_ms.clamp(50, 10_000));
    let mut client = match connect(path, interval.min(Duration::from_millis(200)), cred) {
        Ok((c, _)) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_REFUSED;
        }
    };
    let title = format!("raft watch: {}", path.display());
    let mut view = watch::Watch::default();
    if args.once {
        view.update(std::time::Instant::now(), client.status());
        for line in view.render(&title, usize::MAX) {
            print_or_exit(&line);
        }
        return EXIT_OK;
    }
    if !std::io::stdout().is_terminal() {
        eprintln!("error: watch needs a terminal; use `watch --once` for plain text");
        return EXIT_REFUSED;
    }
    /// Puts the terminal back however the view ends, a panic included.
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = terminal::disable_raw_mode();
            let _ = execute!(
                std::io::stdout(),
                cursor::Show,
                terminal::LeaveAlternateScreen
            );
        }
    }
    let start = terminal::enable_raw_mode().and_then(|()| {
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
    });
    let _restore = Restore;
    if let Err(e) = start {
        drop(_restore);
        eprintln!("error: cannot take over the terminal: {e}");
        return EXIT_REFUSED;
    }
    loop {
        view.update(std::time::Instant::now(), client.status());
        let (width, height) = terminal::size().unwrap_or((120, 40));
        let mut frame = String::new();
        for line in view.render(&title, height as usize) {
            let line: String = line.chars().take(width as usize).collect();
            frame.push_str(&line);
            frame.push_str("\x1b[K\r\n");
        }
        let mut out = std::io::stdout().lock();
        let drawn = write!(out, "\x1b[H{frame}\x1b[J").and_then(|()| out.flush());
        drop(out);
        if drawn.is_err() {
            return EXIT_OK;
        }
        let deadline = std::time::Instant::now() + interval;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match event::poll(left).and_then(|ready| {
                if ready {
                    event::read().map(Some)
                } else {
                    Ok(None)
                }
            }) {
                Ok(Some(Event::Key(KeyEvent {
                    code, modifiers, ..
                }))) => {
                    let quit = matches!(code, KeyCode::Char('q') | KeyCode::Esc)
                        || (code == KeyCode::Char('c')
                            && modifiers.contains(KeyModifiers::CONTROL));
                    if quit {
                        return EXIT_OK;
                    }
                }
                Ok(Some(Event::Resize(..))) => break,
                Ok(_) => {}
                Err(_) => return EXIT_OK,
            }
        }
    }
}

fn transfer_leader(client: &mut Client, target: Option<NodeId>) -> u8 {
    match client.transfer_leader(target) {
        Ok((leader, term)) => {
            print_or_exit(&json(&LeaderLine { leader, term }));
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

/// `members`: one line per member, as the leader sees it.
fn members(client: &mut Client) -> u8 {
    match client.members() {
        Ok(m) => {
            for member in &m.members {
                print_or_exit(&json(member));
            }
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

/// `add-learner`, `promote`, `remove`: one line once the change is committed. `force` skips
/// the leader's quorum guard.
fn change(client: &mut Client, change: ConfChange, force: bool) -> u8 {
    match client.change_members(change, force) {
        Ok(Configured {
            index,
            term,
            members,
            ..
        }) => {
            print_or_exit(&json(&ConfiguredLine {
                index,
                term,
                members,
            }));
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

fn status(client: &mut Client, timeout_ms: u64) -> u8 {
    let peers = client.status();
    for p in &peers {
        print_or_exit(&json(&StatusLine {
            id: p.id,
            address: p.address.to_string(),
            answered: p.answered,
            info: p.info.as_ref().map(StatusFields::from),
        }));
    }
    if peers.iter().any(|p| p.answered) {
        EXIT_OK
    } else {
        eprintln!(
            "error: no peer answered within {} ms",
            timeout_ms.min(raft::client::STATUS_WAIT.as_millis() as u64)
        );
        EXIT_NO_ANSWER
    }
}

/// Whether `role` may do `op`; if not, says so as the peers would (they check again).
fn allowed(role: UserRole, op: &ClientOp) -> bool {
    match permit(role, op) {
        Ok(()) => true,
        Err(reason) => {
            eprintln!("error: {reason}");
            false
        }
    }
}

/// The original project's menu, reading choices from stdin until `3`/`exit` or end of input.
/// A choice `role` does not allow is refused before anything is asked or sent.
fn menu(client: &mut Client, role: UserRole) -> u8 {
    let query_op = ClientOp::Query {
        start: 1,
        read_index: None,
    };
    let append_op = ClientOp::Append {
        client: 0,
        seq: 0,
        data: String::new(),
    };
    let transfer_op = ClientOp::TransferLeader {
        target: None,
        away_from: None,
    };
    let change_op = ClientOp::ChangeMembers {
        change: ConfChange::Remove { id: 0 },
        force: false,
    };
    let interactive = std::io::stdin().is_terminal();
    let mut lines = std::io::stdin().lock().lines();
    let mut read = |prompt: &str| -> Option<String> {
        // At a terminal the answer follows the prompt; piped, each prompt gets its own line.
        let mut out = std::io::stdout().lock();
        let _ = if interactive {
            write!(out, "{prompt} ")
        } else {
            writeln!(out, "{prompt}")
        };
        let _ = out.flush();
        match lines.next() {
            Some(Ok(line)) => Some(line.strip_suffix('\r').unwrap_or(&line).to_string()),
            Some(Err(e)) => {
                eprintln!("error: reading stdin: {e}");
                None
            }
            None => None,
        }
    };
    loop {
        println!();
        println!("1. query");
        println!("2. append");
        println!("3. exit");
        println!("4. status");
        println!("5. transfer leadership");
        println!("6. members");
        println!("7. add a learner");
        println!("8. promote a learner");
        println!("9. remove a member");
        let Some(choice) = read("choice:") else {
            return EXIT_OK;
        };
        match choice.trim() {
            "1" | "query" if !allowed(role, &query_op) => {}
            "2" | "append" if !allowed(role, &append_op) => {}
            "4" | "status" if !allowed(role, &ClientOp::Status) => {}
            "5" | "transfer" if !allowed(role, &transfer_op) => {}
            "6" | "members" if !allowed(role, &ClientOp::Members) => {}
            "7" | "add" | "add-learner" | "8" | "promote" | "9" | "remove"
                if !allowed(role, &change_op) => {}
            "1" | "query" => match client.query() {
                Ok(records) => print_records(&records, client.last_peer()),
                Err(e) => eprintln!("error: {e}"),
            },
            "2" | "append" => {
                let Some(text) = read("text to append:") else {
                    return EXIT_OK;
                };
                match client.append(&text) {
                    Ok(a) => println!(
                        "appended at index {}, term {} (answered by peer {})",
                        a.index, a.term, a.peer
                    ),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            "3" | "exit" | "quit" => return EXIT_OK,
            "4" | "status" => {
                let peers = client.status();
                print_status_table(&peers);
                if !peers.iter().any(|p| p.answered) {
                    eprintln!("error: no peer answered");
                }
            }
            "5" | "transfer" => {
                let Some(answer) = read("peer ID to lead next (empty: the most up-to-date):")
                else {
                    return EXIT_OK;
                };
                let target = match answer.trim() {
                    "" => None,
                    id => match id.parse::<NodeId>() {
                        Ok(id) => Some(id),
                        Err(_) => {
                            eprintln!("error: {id:?} is not a peer ID");
                            continue;
                        }
                    },
                };
                match client.transfer_leader(target) {
                    Ok((leader, term)) => println!("peer {leader} leads, in term {term}"),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            "6" | "members" => match client.members() {
                Ok(m) => print_members(&m),
                Err(e) => eprintln!("error: {e}"),
            },
            "7" | "add" | "add-learner" => {
                let Some(id) = read("new peer's ID:") else {
                    return EXIT_OK;
                };
                let Some(id) = parse_id(&id) else { continue };
                let Some(address) = read("its address (HOST:PORT):") else {
                    return EXIT_OK;
                };
                let address = address.trim().to_string();
                if let Err(e) = check_address(&address) {
                    eprintln!("error: address {address:?}: {e}");
                    continue;
                }
                if menu_change(client, ConfChange::AddLearner { id, address }, &mut read).is_none()
                {
                    return EXIT_OK;
                }
            }
            "8" | "promote" => {
                let Some(id) = read("learner's ID:") else {
                    return EXIT_OK;
                };
                let Some(id) = parse_id(&id) else { continue };
                if menu_change(client, ConfChange::Promote { id }, &mut read).is_none() {
                    return EXIT_OK;
                }
            }
            "9" | "remove" => {
                let Some(id) = read("member's ID to remove:") else {
                    return EXIT_OK;
                };
                let Some(id) = parse_id(&id) else { continue };
                if menu_change(client, ConfChange::Remove { id }, &mut read).is_none() {
                    return EXIT_OK;
                }
            }
            "" => {}
            other => eprintln!("error: unknown choice {other:?}; enter a number from 1 to 9"),
        }
    }
}

/// A node ID typed at the menu, or `None` after saying why not.
fn parse_id(text: &str) -> Option<NodeId> {
    match text.trim().parse::<NodeId>() {
        Ok(id) => Some(id),
        Err(_) => {
            eprintln!("error: {:?} is not a peer ID", text.trim());
            None
        }
    }
}

/// A membership change from the menu. Promotion gets the longer promote time limit, as on
/// the command line, unless the client's own is longer. `None` once input has ended.
fn menu_change(
    client: &mut Client,
    change: ConfChange,
    read: &mut impl FnMut(&str) -> Option<String>,
) -> Option<()> {
    let normal = client.timeout();
    if matches!(change, ConfChange::Promote { .. }) {
        client.set_timeout(normal.max(Duration::from_millis(DEFAULT_PROMOTE_TIMEOUT_MS)));
    }
    let outcome = menu_change_or_force(client, change, read);
    client.set_timeout(normal);
    outcome
}

/// Makes `change`; if the leader's quorum guard refuses it, asks whether to force it.
fn menu_change_or_force(
    client: &mut Client,
    change: ConfChange,
    read: &mut impl FnMut(&str) -> Option<String>,
) -> Option<()> {
    let result = match client.change_members(change.clone(), false) {
        Err(e) if e.is_guard_refusal() => {
            eprintln!("error: {e}");
            let answer =
                read("force it? the cluster then stops until enough of them are back [y/N]")?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                println!("not forced; nothing changed");
                return Some(());
            }
            client.change_members(change, true)
        }
        other => other,
    };
    match result {
        Ok(c) => println!(
            "done at index {}, term {}: members {}",
            c.index,
            c.term,
            describe(&c.members)
        ),
        Err(e) => eprintln!("error: {e}"),
    }
    Some(())
}

/// Members as `1, 2, 4 (learner)`.
fn describe(members: &[Member]) -> String {
    let parts: Vec<String> = members
        .iter()
        .map(|m| match m.role {
            MemberRole::Voter => m.id.to_string(),
            MemberRole::Learner => format!("{} (learner)", m.id),
        })
        .collect();
    parts.join(", ")
}

fn print_members(m: &raft::client::Members) {
    let state = if m.committed {
        "committed"
    } else {
        "not yet committed"
    };
    println!(
        "configuration at index {} ({state}), as leader {} sees it",
        m.config_index, m.leader
    );
    let address_width = m
        .members
        .iter()
        .map(|i| i.address.len())
        .max()
        .unwrap_or(0)
        .max("address".len());
    println!(
        "{:>4}  {:<address_width$}  {:<7}  {:>8}  {:>8}",
        "id", "address", "role", "match", "lag"
    );
    let or_dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for i in &m.members {
        println!(
            "{:>4}  {:<address_width$}  {:<7}  {:>8}  {:>8}",
            i.id,
            i.address,
            i.role.name(),
            or_dash(i.match_index),
            or_dash(i.lag)
        );
    }
}

fn print_records(records: &[LogRecord], peer: Option<NodeId>) {
    let from = peer.map_or(String::new(), |p| format!(" (answered by peer {p})"));
    println!("{} committed entries{from}", records.len());
    for r in records {
        match (&r.data, &r.kind) {
            (Some(data), _) => println!("  [{}] term {}: {data}", r.index, r.term),
            (None, Some(kind)) => println!("  [{}] term {}: ({kind})", r.index, r.term),
            (None, None) => println!("  [{}] term {}: (no data)", r.index, r.term),
        }
    }
}

fn print_status_table(peers: &[PeerStatus]) {
    let address_width = peers
        .iter()
        .map(|p| p.address.to_string().len())
        .max()
        .unwrap_or(0)
        .max("address".len());
    println!(
        "{:>4}  {:<address_width$}  {:<13}  {:<7}  {:>6}  {:>6}  {:>8}  {:>8}  {:>8}  {:>6}  answered",
        "id", "address", "role", "member", "term", "leader", "last", "commit", "applied", "config"
    );
    for p in peers {
        let address = p.address.to_string();
        match &p.info {
            Some(i) => println!(
                "{:>4}  {address:<address_width$}  {:<13}  {:<7}  {:>6}  {:>6}  {:>8}  {:>8}  {:>8}  {:>6}  yes",
                p.id,
                i.role.name(),
                member_role(i).map_or(if i.members.is_empty() { "-" } else { "removed" }, |r| r.name()),
                i.term,
                i.leader.map_or("-".to_string(), |l| l.to_string()),
                i.last_index,
                i.commit_index,
                i.applied_index,
                i.config_index
            ),
            None => println!(
                "{:>4}  {address:<address_width$}  {:<13}  {:<7}  {:>6}  {:>6}  {:>8}  {:>8}  {:>8}  {:>6}  no",
                p.id, "-", "-", "-", "-", "-", "-", "-", "-"
            ),
        }
    }
    // The newest configuration any peer reports (the leader's, on a tie).
    let newest = peers
        .iter()
        .filter_map(|p| p.info.as_ref())
        .filter(|i| !i.members.is_empty())
        .max_by_key(|i| (i.config_index, i.role == Role::Leader));
    if let Some(i) = newest {
        println!(
            "members (config index {}, from peer {}): {}",
            i.config_index,
            i.id,
            describe(&i.members)
        );
    }
}
