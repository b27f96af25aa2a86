//! `/metrics` over HTTP, bounded against whoever can connect (any local user): a cap on
//! connections, a header timeout and a lifetime per connection, no spin on a failed accept,
//! a loopback listener answering only requests that name a loopback host, and scrapes that
//! share one read of the datapath.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{Health, blocking, metrics};
use crate::state::Paths;

/// At most this many connections to `/metrics` at once; more are closed as they come.
const METRICS_CONNECTIONS: usize = 64;
/// A connection (idle or not) is closed after this long; a scrape takes milliseconds.
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// A request's headers must arrive within this long.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// One read of the datapath at a time for every scraper: a scrape that asked while another
/// was rendering waits for the next render and shares it (or takes the one that started
/// after it asked), so any number of scrapers cost one reader.
#[derive(Default)]
struct Scrapes {
    last: tokio::sync::Mutex<Option<(std::time::Instant, Arc<String>)>>,
}

impl Scrapes {
    async fn text(&self, paths: &Paths, health: &Mutex<Health>) -> Arc<String> {
        let asked = std::time::Instant::now();
        let mut last = self.last.lock().await;
        if let Some((began, text)) = &*last
            && *began >= asked
        {
            return text.clone();
        }
        let began = std::time::Instant::now();
        let h = health.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let p = paths.clone();
        let text = Arc::new(blocking(move || metrics::render(&p, &h)).await);
        *last = Some((began, text.clone()));
        text
    }
}

/// A Host header (absent, or naming a loopback address or `localhost`, with or without a
/// port) that a request to a loopback listener may carry.
fn names_loopback(host: Option<&hyper::header::HeaderValue>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Serves `/metrics`. Bounded against whoever can connect (any local user): a cap on
/// connections, a header timeout and a lifetime per connection, a pause after a failed
/// accept (out of descriptors) instead of a spin; the policy loop never waits on it.
pub(super) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    paths: Paths,
    health: Arc<Mutex<Health>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    // Served on loopback only: a request must name a loopback host. A web page in a browser
    // on this host could otherwise read it by rebinding its own name to 127.0.0.1.
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let server = Arc::new(MetricsServer::new(paths, health, loopback));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("metrics: accept failed ({e}); pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _slot = slot;
            server.serve(stream).await;
        });
    }
}

/// What answers one connection to `/metrics`: HTTP/1 by hyper, the header read and the
/// whole connection bounded in time, scrapes shared (`Scrapes`).
pub struct MetricsServer {
    paths: Paths,
    health: Arc<Mutex<Health>>,
    scrapes: Arc<Scrapes>,
    /// Served on a loopback address: requests must name a loopback host.
    loopback: bool,
}

impl MetricsServer {
    pub fn new(paths: Paths, health: Arc<Mutex<Health>>, loopback: bool) -> MetricsServer {
        MetricsServer {
            paths,
            health,
            scrapes: Arc::new(Scrapes::default()),
            loopback,
        }
    }

    /// Serves one connection (a TCP stream, or any byte stream: the fuzz target's) until
    /// it ends, times out or passes its lifetime.
    pub async fn serve<IO>(&self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use http_body_util::Full;
        use hyper::{Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
        let loopback = self.loopback;
        let (paths, health, scrapes) = (
            self.paths.clone(),
            self.health.clone(),
            self.scrapes.clone(),
        );
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (paths, health, scrapes) = (paths.clone(), health.clone(), scrapes.clone());
            async move {
                if loopback && !names_loopback(req.headers().get(hyper::header::HOST)) {
                    return Response::builder()
                        .status(StatusCode::FORBIDDEN)
                        .body(Full::new(Bytes::from(
                            "served to this host only: the Host header must name 127.0.0.1, ::1 or localhost\n",
                        )));
                }
                if req.uri().path() != "/metrics" {
                    return Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from("see /metrics\n")));
                }
                let text = scrapes.text(&paths, &health).await;
                Response::builder()
                    .header(
                        hyper::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(text.as_bytes().to_vec())))
            }
        });
        let io = hyper_util::rt::TokioIo::new(io);
        let conn = http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(METRICS_HEADER_TIMEOUT)
            .serve_connection(io, svc);
        let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, conn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::names_loopback;
    use hyper::header::HeaderValue;

    #[test]
    fn only_loopback_hosts_are_served_on_loopback() {
        for ok in [
            "127.0.0.1:9108",
            "127.0.0.1",
            "localhost:9108",
            "LOCALHOST",
            "[::1]:9108",
            "[::1]",
        ] {
            assert!(names_loopback(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        assert!(names_loopback(None), "no Host (HTTP/1.0)");
        for bad in [
            "evil.example:9108",
            "evil.example",
            "192.0.2.1:9108",
            "[2001:db8::1]:9108",
            "localhost.evil.example",
        ] {
            assert!(
                !names_loopback(Some(&HeaderValue::from_static(bad))),
                "{bad}"
            );
        }
    }
}
