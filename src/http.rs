//! A small HTTP/1.x server for `metrics_addr`, built to sit on an open port without becoming a
//! way to hurt the peer: `GET` only, a bounded request head (bytes and lines), a deadline for
//! the whole exchange, a cap on open connections, and never a body read (`Content-Length` is
//! not even looked at). Every answer closes its connection.
//!
//! One thread serves every connection through non-blocking sockets and `poll(2)`, so a client
//! that stalls holds a slot, never the thread; when the cap is reached the oldest connection
//! is dropped for the new one, so stalled connections cannot lock a scrape out. Stopping takes
//! at most one poll interval, whatever the clients are doing.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most bytes of request line and headers read from one connection.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines (the request line included) in one request.
pub const MAX_HEAD_LINES: usize = 64;
/// Most connections held open at once; a new one beyond it replaces the oldest.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a connection has, from accept, to send its request head and take the whole answer.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// How often the server looks at the stop flag and the deadlines when nothing happens.
const POLL_MS: i32 = 50;
/// Connections accepted per turn of the loop, so a flood of connects cannot starve the others.
const ACCEPTS_PER_TURN: usize = 64;

/// An answer: status code, content type and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    /// A `text/plain` answer.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Answers a `GET` of a path (the query string cut off).
pub type Handler = Box<dyn Fn(&str) -> Response + Send>;

/// The server thread; stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Server {
    /// Binds `addr` and serves `handler` on a thread named `name`. A port in use is an error
    /// naming the address (`cannot serve NAME on ADDR: …`).
    pub fn start(addr: SocketAddr, name: &str, handler: Handler) -> Result<Server, String> {
        let fail = |e: io::Error| format!("cannot serve {name} on {addr}: {e}");
        let listener = TcpListener::bind(addr).map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || serve(&listener, &handler, &stop))
                .map_err(|e| format!("cannot start the {name} thread: {e}"))?
        };
        Ok(Server {
            stop,
            thread: Some(thread),
            addr,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // Returns within one poll interval: the thread never blocks on a client.
            let _ = t.join();
        }
    }
}

/// One open connection: reading its head, then writing its answer.
struct Conn {
    stream: TcpStream,
    opened: Instant,
    head: Vec<u8>,
    /// The answer and how much of it is written.
    answer: Option<(Vec<u8>, usize)>,
}

/// What a connection needs next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Keep,
    Close,
}

fn serve(listener: &TcpListener, handler: &Handler, stop: &AtomicBool) {
    let mut conns: Vec<Conn> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        fds.clear();
        fds.push(pollfd(listener.as_raw_fd(), libc::POLLIN));
        for c in &conns {
            let events = if c.answer.is_some() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            fds.push(pollfd(c.stream.as_raw_fd(), events));
        }
        // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structs that
        // outlives the call; poll only writes their `revents` fields.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log::warn!("HTTP server: poll: {e}");
                std::thread::sleep(Duration::from_millis(POLL_MS as u64));
            }
            continue;
        }
        let now = Instant::now();
        let mut i = 0;
        conns.retain_mut(|c| {
            i += 1;
            let ready = fds[i].revents != 0;
            if ready && progress(c, handler) == Next::Close {
                return false;
            }
            now.duration_since(c.opened) < DEADLINE
        });
        if fds[0].revents != 0 {
            accept(listener, handler, &mut conns);
        }
    }
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Takes the connections waiting, reading and answering each at once if it can (a scrape
/// usually sends its request with the connect, and is done before the next turn).
fn accept(listener: &TcpListener, handler: &Handler, conns: &mut Vec<Conn>) {
    for _ in 0..ACCEPTS_PER_TURN {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // Out of file descriptors, say. The listener stays readable, so without a
                // pause the loop would spin; freeing the oldest connection lets the next
                // turn take the new one.
                log::debug!("HTTP server: accept: {e}");
                if !conns.is_empty() {
                    conns.remove(0);
                }
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream,
            opened: Instant::now(),
            head: Vec::new(),
            answer: None,
        };
        if progress(&mut conn, handler) == Next::Close {
            continue;
        }
        if conns.len() >= MAX_CONNECTIONS {
            // The oldest is the nearest to its deadline, and most likely a stalled one.
            conns.remove(0);
        }
        conns.push(conn);
    }
}

/// Reads what the connection sent, answers once the head is complete, and writes what the
/// socket takes of the answer.
fn progress(c: &mut Conn, handler: &Handler) -> Next {
    if c.answer.is_none() {
        let mut buf = [0u8; 2048];
        loop {
            let room = MAX_HEAD_BYTES + 1 - c.head.len();
            match c.stream.read(&mut buf[..room.min(2048)]) {
                Ok(0) => return Next::Close,
                Ok(n) => c.head.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Next::Close,
            }
            if head_end(&c.head).is_some() || c.head.len() > MAX_HEAD_BYTES {
                break;
            }
        }
        let Some(response) = judge(&c.head, handler) else {
            return Next::Keep;
        };
        c.answer = Some((encode(&response), 0));
    }
    let Some((bytes, written)) = c.answer.as_mut() else {
        return Next::Keep;
    };
    while *written < bytes.len() {
        match c.stream.write(&bytes[*written..]) {
            Ok(0) => return Next::Close,
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Next::Close,
        }
    }
    let _ = c.stream.shutdown(Shutdown::Write);
    Next::Close
}

/// The end of the head (the byte after its blank line), if it has arrived.
fn head_end(head: &[u8]) -> Option<usize> {
    let crlf = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = head.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The answer to the head received so far, or None while it is incomplete and within bounds.
fn judge(head: &[u8], handler: &Handler) -> Option<Response> {
    let end = head_end(head);
    let seen = &head[..end.unwrap_or(head.len())];
    if seen.iter().filter(|&&b| b == b'\n').count() > MAX_HEAD_LINES {
        return Some(Response::text(431, "too many header lines\n"));
    }
    let Some(end) = end else {
        return (head.len() > MAX_HEAD_BYTES)
            .then(|| Response::text(431, "request head too large\n"));
    };
    let head = String::from_utf8_lossy(&head[..end]);
    let request_line = head.lines().next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Response::text(400, "malformed request line\n"));
    };
    if !version.starts_with("HTTP/1.") {
        return Some(Response::text(400, "only HTTP/1.x is served\n"));
    }
    if method != "GET" {
        return Some(Response::text(405, "only GET is served\n"));
    }
    let path = target.split('?').next().unwrap_or("");
    Some(handler(path))
}

fn encode(r: &Response) -> Vec<u8> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let allow = if r.status == 405 {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    out.extend_from_slice(r.body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> Handler {
        Box::new(|path| Response::text(200, format!("path {path}\n")))
    }

    fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    }

    #[test]
    fn answers_get_and_refuses_everything_else_without_reading_a_body() {
        let server = Server::start("127.0.0.1:0".parse().unwrap(), "http-test", echo()).unwrap();
        let a = server.addr;
        let ok = ask(a, b"GET /metrics?x=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("path /metrics\n"), "{ok}");
        let post = ask(
            a,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(ask(a, b"GET /\r\n\r\n").starts_with("HTTP/1.1 400"));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert!(ask(a, long.as_bytes()).starts_with("HTTP/1.1 431"));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEAD_LINES)
        );
        assert!(ask(a, many.as_bytes()).starts_with("HTTP/1.1 431"));
    }

    #[test]
    fn stalled_connections_neither_block_a_request_nor_stopping() {
        let server = Server::start("127.0.0.1:0".parse().unwrap(), "http-test", echo()).unwrap();
        let stalled: Vec<TcpStream> = (0..MAX_CONNECTIONS + 20)
            .map(|_| {
                let mut s = TcpStream::connect(server.addr).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
                s
            })
            .collect();
        let started = Instant::now();
        let ok = ask(server.addr, b"GET /x HTTP/1.1\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(started.elapsed() < Duration::from_secs(1));
        let started = Instant::now();
        drop(server);
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(stalled);
    }
}
