//! Deadlines for kernel work: a sync waits on nothing forever. An `nft`
//! child that hangs is killed, a netlink socket that stops answering
//! times out, and the sync fails with the reason instead of freezing the
//! agent (whose liveness would then say so).

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// The longest an `nft` process may run: a whole rebuild at 226,000
/// elements takes a few seconds.
pub const NFT: Duration = Duration::from_secs(120);
/// The longest one netlink request may wait for an answer.
pub const NETLINK: Duration = Duration::from_secs(30);

/// Kills a child that has not exited before the deadline; dropping the
/// watchdog (once the child was waited for) cancels it.
pub struct Watchdog {
    _cancel: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn watch(child: &Child, after: Duration) -> Watchdog {
        let pid = child.id() as libc::pid_t;
        let (cancel, cancelled) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(after) {
                f.store(true, Ordering::Relaxed);
                // SAFETY: kill(2) on the pid of a child not yet waited for,
                // so it cannot have been reused.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        Watchdog { _cancel: cancel, fired }
    }

    /// Whether the deadline passed and the child was killed.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }
}

/// Bounds every receive on a netlink socket.
pub fn bound_receives(socket: &netlink_sys::Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval { tv_sec: NETLINK.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: setsockopt(2) with a valid fd and a timeval of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_past_its_deadline_is_killed_and_one_on_time_is_not() {
        let mut slow = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let dog = Watchdog::watch(&slow, Duration::from_millis(100));
        let status = slow.wait().unwrap();
        assert!(dog.fired() && !status.success(), "killed at the deadline");
        let mut quick = std::process::Command::new("true").spawn().unwrap();
        let dog = Watchdog::watch(&quick, Duration::from_secs(30));
        assert!(quick.wait().unwrap().success());
        assert!(!dog.fired());
    }
}
