//! One HTTP/1.1 listener for `/metrics` (Prometheus text format), `/healthz` (the
//! process is alive) and `/readyz` (brokers reachable, partitions assigned once, no
//! output blocked; the daemon sets the reason a 503 gives). GET only,
//! one request per connection: all a scraper and a probe need, with no web framework.
//!
//! It must never take the process down or spin: at most [`MAX_CONNECTIONS`] requests are
//! served at once (more wait in the kernel's backlog), every read and write has a
//! timeout, and a failing `accept` (a full file-descriptor table) backs off instead of
//! retrying in a tight loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What `/readyz` answers: ready, or not ready and why.
#[derive(Debug, Default)]
pub struct Health {
    pub ready: AtomicBool,
    reason: std::sync::Mutex<String>,
}

impl Health {
    pub fn new(ready: bool) -> Self {
        Self { ready: AtomicBool::new(ready), reason: Default::default() }
    }

    /// None: ready. Some(reason): not ready, and `/readyz` says why.
    pub fn set(&self, not_ready: Option<String>) {
        if let Ok(mut r) = self.reason.lock() {
            *r = not_ready.clone().unwrap_or_default();
        }
        self.ready.store(not_ready.is_none(), Ordering::Relaxed);
    }

    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut accept_backoff = std::time::Duration::from_millis(10);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => {
                accept_backoff = std::time::Duration::from_millis(10);
                stream
            }
            Err(e) => {
                // EMFILE and friends: wait for descriptors to free up instead of spinning.
                tracing::warn!("metrics listener: accept failed, backing off {accept_backoff:?}: {e}");
                tokio::time::sleep(accept_backoff).await;
                accept_backoff = (accept_backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // Read up to the end of the headers: a request may arrive in several
            // segments, and answering the first alone would misread it.
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read_head = async {
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            };
            if tokio::time::timeout(IO_TIMEOUT, read_head).await.is_err() || n == 0 {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..n]);
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            let (status, ctype, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                ("GET", "/readyz") if health.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "text/plain", "ready\n".to_string())
                }
                ("GET", "/readyz") => {
                    ("503 Service Unavailable", "text/plain", format!("not ready: {}\n", health.reason()))
                }
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            // A client that stops reading must not hold a slot for ever.
            let _ = tokio::time::timeout(IO_TIMEOUT, async {
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request split over several TCP segments is read whole, not answered from its
    /// first piece.
    #[test]
    fn a_request_in_pieces_is_answered_as_a_whole() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let metrics = Arc::new(Metrics::new(vec![0.0]));
            let health = Arc::new(Health::new(true));
            let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(serve(listener, metrics, health, stop_rx));
            for (pieces, want) in [
                (vec!["GET /rea", "dyz HTTP/1.0\r\n", "\r\n"], "HTTP/1.1 200 OK"),
                (vec!["GET /nope HTTP/1.0\r\n\r\n"], "HTTP/1.1 404 Not Found"),
                (vec!["POST /metrics HTTP/1.0\r\n\r\n"], "HTTP/1.1 405"),
            ] {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                for p in pieces {
                    s.write_all(p.as_bytes()).await.unwrap();
                    s.flush().await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                }
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                assert!(out.starts_with(want), "{out}");
            }
        });
    }

    /// Clients that connect and never send hold at most MAX_CONNECTIONS slots; the
    /// listener keeps answering once they time out, and /readyz says why it is not ready.
    #[test]
    fn idle_clients_cannot_starve_the_listener() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let health = Arc::new(Health::new(true));
            health.set(Some("output topic dl blocked".into()));
            let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(serve(listener, Arc::new(Metrics::new(vec![0.0])), health, stop_rx));
            let mut idle = Vec::new();
            for _ in 0..MAX_CONNECTIONS + 8 {
                idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            let started = std::time::Instant::now();
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 503"), "{out}");
            assert!(out.ends_with("not ready: output topic dl blocked\n"), "{out}");
            assert!(started.elapsed() >= std::time::Duration::from_secs(4), "it waited for a free slot");
        });
    }
}
