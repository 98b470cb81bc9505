//! `/readyz` and `/metrics` over plain HTTP: enough for a kubelet probe and
//! a Prometheus scrape, without a web framework.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the agent reports; the server only reads it.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Why egress is not ready; `None` when it is.
    pub not_ready: Option<String>,
    pub cidrs_known: bool,
    pub syncs_ok: u64,
    pub syncs_failed: u64,
    pub last_sync_seconds: f64,
    pub services_programmed: usize,
    pub services_invalid: usize,
    pub pods_translated: usize,
    pub pods_held: usize,
}

pub type Shared = Arc<Mutex<Health>>;

fn render_metrics(h: &Health) -> String {
    format!(
        "# HELP natgw_egress_cidrs_known 1 when the pod and service CIDRs are known; 0 means no egress is programmed.\n\
         # TYPE natgw_egress_cidrs_known gauge\nnatgw_egress_cidrs_known {}\n\
         # TYPE natgw_egress_syncs_total counter\nnatgw_egress_syncs_total{{result=\"ok\"}} {}\nnatgw_egress_syncs_total{{result=\"error\"}} {}\n\
         # TYPE natgw_egress_last_sync_seconds gauge\nnatgw_egress_last_sync_seconds {}\n\
         # TYPE natgw_egress_services gauge\nnatgw_egress_services{{state=\"programmed\"}} {}\nnatgw_egress_services{{state=\"invalid\"}} {}\n\
         # TYPE natgw_egress_pods gauge\nnatgw_egress_pods{{state=\"translated\"}} {}\nnatgw_egress_pods{{state=\"held\"}} {}\n\
         # HELP natgw_objects_undecodable_total Objects left out of a cache because they could not be decoded.\n\
         # TYPE natgw_objects_undecodable_total counter\nnatgw_objects_undecodable_total {}\n",
        u8::from(h.cidrs_known),
        h.syncs_ok,
        h.syncs_failed,
        h.last_sync_seconds,
        h.services_programmed,
        h.services_invalid,
        h.pods_translated,
        h.pods_held,
        natgw_kube_support::undecodable_total(),
    )
}

fn respond(path: &str, h: &Health) -> (u16, String) {
    match path {
        "/readyz" | "/healthz" => match &h.not_ready {
            None => (200, "ok\n".into()),
            Some(why) => (503, format!("not ready: {why}\n")),
        },
        "/metrics" => (200, render_metrics(h)),
        _ => (404, "not found: try /readyz or /metrics\n".into()),
    }
}

/// Serves until the future is dropped.
pub async fn serve(listener: TcpListener, health: Shared) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let health = health.clone();
        // Each request is tiny; one at a time keeps every task owned here.
        let mut buf = vec![0u8; 2048];
        let n = match tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => continue,
        };
        let request = String::from_utf8_lossy(&buf[..n]);
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        let snapshot = health.lock().map(|h| h.clone()).unwrap_or_default();
        let (code, body) = respond(path, &snapshot);
        let reason = match code {
            200 => "OK",
            503 => "Service Unavailable",
            _ => "Not Found",
        };
        let reply = format!(
            "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(reply.as_bytes()).await;
    }
}

/// A blocking GET, for tests and tools: (status code, body).
pub fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: natgw\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_says_why() {
        let h = Health { not_ready: Some("no pod CIDR".into()), ..Default::default() };
        assert_eq!(respond("/readyz", &h), (503, "not ready: no pod CIDR\n".into()));
        assert!(respond("/metrics", &h).1.contains("natgw_egress_cidrs_known 0"));
    }
}
