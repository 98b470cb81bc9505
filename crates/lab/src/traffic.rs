//! Real TCP and UDP between lab namespaces. Sockets are created on a
//! thread inside the namespace and keep belonging to it afterwards, so the
//! test thread can use them directly.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use natgw_dataplane::netns::{netns_path, run_in};

pub const TIMEOUT: Duration = Duration::from_secs(2);

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Runs `f` in namespace `ns` (a name under /run/netns).
pub fn in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> std::io::Result<R> {
    run_in(&netns_path(ns), f).map_err(io_err)
}

/// A server that answers every TCP connection or UDP datagram with
/// `from <peer ip>:<peer port>\n`, then echoes TCP lines back. A line
/// `after MS TEXT` is answered with `TEXT` after MS milliseconds of
/// silence: the server writes first after an idle period.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn tcp_server(ns: &str, ip: Ipv4Addr, port: u16) -> std::io::Result<Server> {
    let listener = in_ns(ns, move || TcpListener::bind(SocketAddrV4::new(ip, port)))??;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, peer)) => {
                    let s = s.clone();
                    thread::spawn(move || serve_tcp(conn, peer, &s));
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Ok(Server { stop, thread: Some(thread) })
}

fn serve_tcp(mut conn: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    if writeln!(conn, "from {peer}").is_err() {
        return;
    }
    let Ok(read_half) = conn.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                let reply = match line.strip_prefix("after ").and_then(|r| r.split_once(' ')) {
                    Some((ms, text)) => {
                        thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                        text.to_string()
                    }
                    None => line.clone(),
                };
                if conn.write_all(reply.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

pub fn udp_server(ns: &str, ip: Ipv4Addr, port: u16) -> std::io::Result<Server> {
    let sock = in_ns(ns, move || UdpSocket::bind(SocketAddrV4::new(ip, port)))??;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !s.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(format!("from {peer}\n").as_bytes(), peer);
            }
        }
    });
    Ok(Server { stop, thread: Some(thread) })
}

/// An open TCP connection made from a namespace.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The server's first line: how it saw us.
    pub seen_as: String,
}

impl Conn {
    /// Sends a line and waits for its echo. Fails once the session is cut.
    pub fn echo(&mut self, text: &str) -> std::io::Result<()> {
        writeln!(self.stream, "{text}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "closed"));
        }
        if line.trim_end() == text { Ok(()) } else { Err(io_err(format!("echo mismatch: {line:?}"))) }
    }

    /// Asks the server to answer only after `idle`, then waits for the
    /// answer: the connection stays silent in both directions meanwhile.
    pub fn answer_after(&mut self, idle: Duration, text: &str) -> std::io::Result<()> {
        writeln!(self.stream, "after {} {text}", idle.as_millis())?;
        self.stream.set_read_timeout(Some(idle + TIMEOUT))?;
        let mut line = String::new();
        let read = self.reader.read_line(&mut line);
        self.stream.set_read_timeout(Some(TIMEOUT))?;
        if read? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "closed"));
        }
        if line.trim_end() == text { Ok(()) } else { Err(io_err(format!("answer mismatch: {line:?}"))) }
    }
}

/// A UDP socket in a namespace that keeps its port: every datagram it
/// sends to one server belongs to the same flow (5-tuple).
pub struct UdpFlow {
    sock: UdpSocket,
}

impl UdpFlow {
    pub fn open(ns: &str, dst: Ipv4Addr, port: u16) -> std::io::Result<UdpFlow> {
        let sock = in_ns(ns, || UdpSocket::bind("0.0.0.0:0"))??;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.connect(SocketAddrV4::new(dst, port))?;
        Ok(UdpFlow { sock })
    }

    /// Sends one datagram; the source address the server saw.
    pub fn source(&self) -> std::io::Result<Ipv4Addr> {
        source_ip(&self.seen_as()?)
    }

    /// Sends one datagram; the address and port the server saw.
    pub fn seen_as(&self) -> std::io::Result<String> {
        self.sock.send(b"hello\n")?;
        let mut buf = [0u8; 512];
        let n = self.sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().trim_start_matches("from ").to_string())
    }
}

/// Connects from `ns` to `dst:port`; returns the open connection.
pub fn tcp_connect(ns: &str, dst: Ipv4Addr, port: u16) -> std::io::Result<Conn> {
    let stream = in_ns(ns, move || TcpStream::connect_timeout(&SocketAddrV4::new(dst, port).into(), TIMEOUT))??;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut seen_as = String::new();
    reader.read_line(&mut seen_as)?;
    Ok(Conn { stream, reader, seen_as: seen_as.trim().trim_start_matches("from ").to_string() })
}

/// The source address `dst:port` sees for a TCP connection from `ns`.
pub fn tcp_source(ns: &str, dst: Ipv4Addr, port: u16) -> std::io::Result<Ipv4Addr> {
    let c = tcp_connect(ns, dst, port)?;
    source_ip(&c.seen_as)
}

/// The source address `dst:port` sees for a UDP datagram from `ns`.
pub fn udp_source(ns: &str, dst: Ipv4Addr, port: u16) -> std::io::Result<Ipv4Addr> {
    UdpFlow::open(ns, dst, port)?.source()
}

fn source_ip(seen: &str) -> std::io::Result<Ipv4Addr> {
    seen.parse::<SocketAddrV4>().map(|a| *a.ip()).map_err(|_| io_err(format!("unexpected server reply {seen:?}")))
}
