//! `/healthz`, `/readyz` and `/metrics` for every role, over axum with
//! prometheus-client metrics. Each role registers its own metrics in a
//! `Registry`, sets why it is not ready (or that it is), and serves.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// What a role reports: its metrics, why it is not ready, and whether it
/// is alive: `/healthz` fails once the role's loop has not moved for
/// longer than it promised (`beat`), or a part of it died (`dead`), so the
/// kubelet restarts a process that hangs instead of trusting it forever.
#[derive(Clone)]
pub struct Probe {
    registry: Arc<Registry>,
    not_ready: Arc<Mutex<Option<String>>>,
    /// The loop's last beat, and how long it may go without the next.
    beat: Arc<Mutex<Option<(std::time::Instant, std::time::Duration)>>>,
    dead: Arc<Mutex<Option<String>>>,
}

impl Probe {
    /// Serves `registry`, plus the metrics every role shares. Not ready
    /// until `ready` is called.
    pub fn new(mut registry: Registry) -> Probe {
        registry.register(
            "natgw_objects_undecodable",
            "Objects left out of a cache because they could not be decoded",
            undecodable_counter(),
        );
        Probe {
            registry: Arc::new(registry),
            not_ready: Arc::new(Mutex::new(Some("starting".into()))),
            beat: Arc::default(),
            dead: Arc::default(),
        }
    }

    /// The role's loop made progress, and will again within `within`.
    pub fn beat(&self, within: std::time::Duration) {
        *self.beat.lock().unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), within));
    }

    /// A part the role cannot work without stopped: liveness fails.
    pub fn dead(&self, why: impl Into<String>) {
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
    }

    /// Why the role is not alive, if it is not.
    pub fn why_not_alive(&self) -> Option<String> {
        if let Some(why) = self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(why);
        }
        let beat = *self.beat.lock().unwrap_or_else(|p| p.into_inner());
        match beat {
            Some((at, within)) if at.elapsed() > within => {
                Some(format!("no progress for {} s (expected within {} s)", at.elapsed().as_secs(), within.as_secs()))
            }
            _ => None,
        }
    }

    pub fn ready(&self) {
        *self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Not ready, and why (served by /readyz).
    pub fn not_ready(&self, why: impl Into<String>) {
        *self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
    }

    pub fn why_not_ready(&self) -> Option<String> {
        self.not_ready.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Label sets of natgw's metric families: `[("kind", "Eip"), ...]`.
pub type Labels = Vec<(String, String)>;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Sets a timestamp gauge to now (Unix seconds).
pub fn set_now(gauge: &prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    gauge.set(now.map(|d| d.as_secs_f64()).unwrap_or_default());
}

/// The process-wide count of undecodable objects (see `cache`).
pub fn undecodable_counter() -> Counter {
    static C: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
    C.get_or_init(Counter::default).clone()
}

/// Open connections at most. A new one past it closes the oldest: a host
/// that opens thousands and says nothing (on a gateway, any VPC host could
/// before the input chain) never locks the kubelet's probes out, and the
/// process never runs out of descriptors.
pub const MAX_CONNECTIONS: usize = 128;
/// A request's headers must have arrived within this.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// No connection lives longer, keep-alive included.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, probe: Probe) {
    let app = router(probe);
    let mut open: std::collections::VecDeque<tokio::task::AbortHandle> = std::collections::VecDeque::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, a reset before accept: not the end.
                tracing::warn!(error = %e, "the health server cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        open.retain(|c| !c.is_finished());
        if open.len() >= MAX_CONNECTIONS
            && let Some(oldest) = open.pop_front()
        {
            oldest.abort();
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = tokio::spawn(async move {
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, serving).await;
        });
        open.push_back(connection.abort_handle());
    }
}

/// 200 "ok", or 503 with what is wrong.
fn verdict(what: &str, why: Option<String>) -> (StatusCode, String) {
    match why {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not {what}: {why}\n")),
    }
}

fn router(probe: Probe) -> Router {
    let ready = probe.clone();
    let alive = probe.clone();
    let metrics = probe;
    Router::new()
        .route("/healthz", get(move || std::future::ready(verdict("alive", alive.why_not_alive()))))
        .route("/readyz", get(move || std::future::ready(verdict("ready", ready.why_not_ready()))))
        .route(
            "/metrics",
            get(move || {
                let body = metrics.metrics();
                async move {
                    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
                        .into_response()
                }
            }),
        )
}

/// A blocking GET, for tests and tools: (status code, body).
pub fn get_blocking(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: natgw\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_says_why_and_metrics_are_served() {
        let mut registry = Registry::default();
        let syncs: Counter = Counter::default();
        registry.register("natgw_test_syncs", "Syncs", syncs.clone());
        syncs.inc();
        let probe = Probe::new(registry);
        probe.not_ready("no pod CIDR");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, probe.clone()));
        let get = |path: &'static str| tokio::task::spawn_blocking(move || get_blocking(addr, path).unwrap());
        assert_eq!(get("/readyz").await.unwrap(), (503, "not ready: no pod CIDR\n".into()));
        probe.ready();
        assert_eq!(get("/readyz").await.unwrap().0, 200);
        assert_eq!(get("/healthz").await.unwrap().0, 200);
        let metrics = get("/metrics").await.unwrap().1;
        assert!(metrics.contains("natgw_test_syncs_total 1"), "{metrics}");
        assert!(metrics.contains("natgw_objects_undecodable_total"), "{metrics}");
        server.abort();
    }

    /// Second round, item 16: liveness follows the loop's beat and the
    /// parts it cannot do without.
    #[tokio::test]
    async fn round2_item16_liveness_fails_without_progress_or_with_a_dead_part() {
        let probe = Probe::new(Registry::default());
        assert_eq!(probe.why_not_alive(), None, "alive before its first beat");
        probe.beat(std::time::Duration::from_secs(60));
        assert_eq!(probe.why_not_alive(), None);
        probe.beat(std::time::Duration::ZERO);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(probe.why_not_alive().is_some_and(|w| w.contains("no progress")));
        probe.beat(std::time::Duration::from_secs(60));
        probe.dead("the namespace worker stopped");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, probe));
        let (code, body) = tokio::task::spawn_blocking(move || get_blocking(addr, "/healthz")).await.unwrap().unwrap();
        assert_eq!((code, body.as_str()), (503, "not alive: the namespace worker stopped\n"));
        server.abort();
    }

    /// Second round, item 9: 2,000 connections that never say anything
    /// leave the probes answering, at once; an idle one is closed.
    #[tokio::test]
    async fn round2_item9_idle_connections_never_lock_the_probes_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let probe = Probe::new(Registry::default());
        probe.ready();
        let server = tokio::spawn(serve(listener, probe));
        let mut idle = Vec::new();
        for _ in 0..2000 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let started = std::time::Instant::now();
        let answer = tokio::task::spawn_blocking(move || get_blocking(addr, "/healthz")).await.unwrap().unwrap();
        assert_eq!(answer.0, 200);
        // A timed assertion only in the large: the bound is what the
        // kubelet's probe allows (1 s), ten times what it takes here.
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "took {:?}", started.elapsed());
        // The oldest idle connections were closed to make room.
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), idle[0].read(&mut buf)).await;
        assert!(matches!(first, Ok(Ok(0)) | Ok(Err(_))), "the oldest idle connection is still open: {first:?}");
        server.abort();
    }
}
