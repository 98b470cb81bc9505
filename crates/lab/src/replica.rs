//! A `natgw run` process as one replica of an HA gateway on `natgw lab up
//! --ha`: started, signalled, killed and read (its status file, its log)
//! by tests and benchmarks.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// The heartbeat port the lab's replicas use.
pub const PORT: u16 = 7946;

/// The lab's HA key: made once per process (tests start pairs in
/// parallel), the same for every replica it starts.
fn lab_key() -> std::io::Result<[u8; 32]> {
    static KEY: std::sync::OnceLock<Result<[u8; 32], String>> = std::sync::OnceLock::new();
    let made = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
            .map(|_| key)
            .map_err(|e| e.to_string())
    });
    made.clone().map_err(std::io::Error::other)
}

pub struct Process {
    pub ns: String,
    pub name: String,
    /// Where it serves /metrics, /healthz and /readyz.
    pub metrics: std::net::SocketAddr,
    bin: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    status: PathBuf,
}

impl Process {
    /// Starts `bin run` in `ns` on the manifests in `manifests`, as replica
    /// `name` listening on `me` and advertising to `peer` (heartbeat
    /// addresses on the lab's `ha0`).
    pub fn spawn(
        bin: &Path,
        ns: String,
        manifests: &Path,
        name: &str,
        (me, peer): (&str, &str),
        priority: u8,
    ) -> std::io::Result<Process> {
        // A free port for its /metrics (taken back at once: a small race
        // with another test, which then fails loudly at bind).
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let dir = std::env::temp_dir().join(format!("natgw-replica-{ns}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let status = dir.join("status.json");
        // In its own directory, which goes with it.
        let key = dir.join("ha.key");
        std::fs::write(&key, lab_key()?)?;
        let args: Vec<String> = [
            "run",
            "--netns",
            &ns,
            "-f",
            &manifests.to_string_lossy(),
            "--poll-ms",
            "50",
            "--ha-name",
            name,
            "--ha-listen",
            &format!("{me}:{PORT}"),
            "--ha-peer",
            &format!("{peer}:{PORT}"),
            "--ha-priority",
            &priority.to_string(),
            "--ha-status-file",
            &status.to_string_lossy(),
            "--ha-key-file",
            &key.to_string_lossy(),
            "--metrics-addr",
            &metrics.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let mut p = Process {
            ns,
            name: name.into(),
            bin: bin.into(),
            args,
            child: None,
            log: dir.join("log"),
            status,
            metrics,
        };
        p.start()?;
        Ok(p)
    }

    /// Starts it (again), appending to its log.
    pub fn start(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        self.child = Some(Command::new(&self.bin).args(&self.args).stdout(Stdio::null()).stderr(log).spawn()?);
        Ok(())
    }

    /// Sends `sig` to the running process.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        let Some(child) = &self.child else { return Err(std::io::Error::other("not running")) };
        let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
        // SAFETY: a signal to our own child.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// kill -9: the namespace, and what its kernel holds, stay.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A planned stop (SIGTERM) and its exit.
    pub fn stop(&mut self) -> std::io::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        match self.child.take() {
            Some(mut c) => c.wait(),
            None => Err(std::io::Error::other("not running")),
        }
    }

    /// The status file's content (`Null` before the first write).
    pub fn status(&self) -> serde_json::Value {
        std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Whether its kernel holds `ip` as natgw holds an address.
    pub fn holds(&self, ip: Ipv4Addr) -> bool {
        Command::new("ip")
            .args(["-n", &self.ns, "route", "show", "table", "local", &ip.to_string()])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    }

    /// Active and holding `ip`.
    pub fn active(&self, ip: Ipv4Addr) -> bool {
        self.holds(ip) && self.status()["role"] == "active"
    }

    /// Its /metrics text, or empty while it does not answer.
    pub fn metrics_text(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.metrics, std::time::Duration::from_secs(1)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.status.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
