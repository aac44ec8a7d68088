//! One HTTP/1.1 listener for `/metrics` (Prometheus text format), `/healthz` (the
//! process is alive) and `/readyz` (brokers reachable and the model loaded). GET only,
//! one request per connection: all a scraper and a probe need, with no web framework.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::metrics::Metrics;

pub struct Health {
    pub ready: AtomicBool,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((mut stream, _)) = accepted else { continue };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
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
            if tokio::time::timeout(std::time::Duration::from_secs(5), read_head).await.is_err() || n == 0 {
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
                ("GET", "/readyz") => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
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
            let health = Arc::new(Health { ready: AtomicBool::new(true) });
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
}
