//! A dedicated OS thread per network namespace. The thread enters the
//! namespace once with setns(2) and then runs every kernel operation for
//! it: child processes (nft) and netlink sockets it creates live there.
//! setns never runs on a thread shared with anything else (tokio workers
//! included), so the caller's namespace is never changed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use nix::sched::{CloneFlags, setns};

type Job = Box<dyn FnOnce() + Send>;

/// Handle to a thread living in one network namespace.
pub struct NetnsWorker {
    path: Option<PathBuf>,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("the namespace worker thread stopped")]
    Stopped,
    #[error("kernel work in the namespace panicked: {0}")]
    Panicked(String),
}

/// `/run/netns/NAME` for a name made by `ip netns add`, else the path itself.
pub fn netns_path(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') { PathBuf::from(name_or_path) } else { Path::new("/run/netns").join(name_or_path) }
}

/// Opens the namespace file, if any: before the thread starts, so a
/// missing namespace is the caller's error.
fn open(path: &Option<PathBuf>) -> Result<Option<File>, NetnsError> {
    match path {
        Some(p) => Ok(Some(File::open(p).map_err(|source| NetnsError::Open { path: p.clone(), source })?)),
        None => Ok(None),
    }
}

/// Enters the namespace on the calling (new, dedicated) thread.
fn enter(file: &Option<File>, path: &Option<PathBuf>) -> Result<(), NetnsError> {
    if let (Some(f), Some(p)) = (file, path) {
        setns(f, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter { path: p.clone(), source })?;
    }
    Ok(())
}

impl NetnsWorker {
    /// Starts the worker; `None` stays in the current namespace.
    pub fn start(path: Option<PathBuf>) -> Result<Self, NetnsError> {
        let file = open(&path)?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), NetnsError>>();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let p = path.clone();
        let thread = thread::Builder::new()
            .name("natgw-netns".into())
            .spawn(move || {
                let entered = enter(&file, &p);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                // A job that panics fails, not the worker: its caller gets
                // the panic as an error, and the next job runs as usual.
                for job in jobs_rx {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|source| NetnsError::Open { path: path.clone().unwrap_or_default(), source })?;
        ready_rx.recv().map_err(|_| NetnsError::Stopped)??;
        Ok(NetnsWorker { path, jobs: Some(jobs_tx), thread: Some(thread) })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Runs `f` inside the namespace and waits for its result; a panic in
    /// `f` is an error here, and the worker goes on.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, NetnsError> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_text(&*p));
            let _ = tx.send(result);
        });
        self.jobs.as_ref().ok_or(NetnsError::Stopped)?.send(job).map_err(|_| NetnsError::Stopped)?;
        rx.recv().map_err(|_| NetnsError::Stopped)?.map_err(NetnsError::Panicked)
    }

    /// Whether the worker thread still runs (liveness).
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl NetnsWorker {
    /// Queues `f` inside the namespace without waiting for it.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<(), NetnsError> {
        self.jobs.as_ref().ok_or(NetnsError::Stopped)?.send(Box::new(f)).map_err(|_| NetnsError::Stopped)
    }
}

impl Drop for NetnsWorker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// Runs `f` on a detached thread of its own inside the namespace (a
/// blocking reader that lives as long as the process).
pub fn detached(path: Option<PathBuf>, f: impl FnOnce() + Send + 'static) -> Result<(), NetnsError> {
    let file = open(&path)?;
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), NetnsError>>();
    thread::Builder::new()
        .name("natgw-netns-reader".into())
        .spawn(move || {
            let entered = enter(&file, &path);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                f();
            }
        })
        .map_err(|source| NetnsError::Open { path: PathBuf::new(), source })?;
    ready_rx.recv().map_err(|_| NetnsError::Stopped)?
}

/// Runs one closure in a namespace on a short-lived thread (tests, tools).
pub fn run_in<R: Send + 'static>(path: &Path, f: impl FnOnce() -> R + Send + 'static) -> Result<R, NetnsError> {
    NetnsWorker::start(Some(path.to_path_buf()))?.run(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_job_is_an_error_and_the_worker_goes_on() {
        let w = NetnsWorker::start(None).unwrap();
        let err = w.run(|| -> u32 { panic!("boom") }).unwrap_err();
        assert!(matches!(&err, NetnsError::Panicked(m) if m == "boom"), "{err}");
        assert_eq!(w.run(|| 7).unwrap(), 7);
        assert!(w.alive());
        w.spawn(|| panic!("in the background")).unwrap();
        assert_eq!(w.run(|| 8).unwrap(), 8, "a background panic does not stop it either");
    }
}
