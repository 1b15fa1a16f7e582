//! The metrics endpoint: `GET /metrics` over HTTP/1.1 (hyper), on loopback TCP or a Unix
//! socket. Bounded so that no client can take the daemon down: at most [`MAX_CONNECTIONS`] at
//! once (more are closed at once), [`HEADER_TIMEOUT`] to send a request's head, at most
//! [`MAX_HEAD_BYTES`] of it, and [`CONNECTION_LIFETIME`] per connection, keep-alive included.
//! The caller runs it on a thread of its own, so a scrape never waits for, or holds up, the
//! control thread or the audit writer.

use std::{
    convert::Infallible,
    fs, io,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tracing::warn;

use super::Format;
use crate::config::Listen;

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 8;
/// Time a client has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, however it is used.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Largest request head read (hyper's smallest read buffer).
pub const MAX_HEAD_BYTES: usize = 8192;
/// The path served.
pub const PATH: &str = "/metrics";

/// A bound listening socket, before the runtime that serves it exists.
pub enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Binds `listen`. A Unix socket replaces a stale socket file (never another kind of file), gets
/// mode 0660 and, with `group`, that group.
pub fn bind(listen: &Listen, group: Option<u32>) -> io::Result<Bound> {
    match listen {
        Listen::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(Bound::Tcp(listener))
        }
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            match fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)?,
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let listener = std::os::unix::net::UnixListener::bind(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
            if let Some(gid) = group {
                nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))?;
            }
            listener.set_nonblocking(true)?;
            Ok(Bound::Unix(listener))
        }
    }
}

/// Serves scrapes on `bound` until the runtime stops; `scrape` renders the text. Must run inside
/// a tokio runtime with time and I/O enabled.
pub async fn serve(bound: Bound, scrape: Arc<dyn Fn(Format) -> String + Send + Sync>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut turned_away: u64 = 0;
    let listener = match bound {
        Bound::Tcp(l) => TcpListener::from_std(l).map(Listener::Tcp),
        Bound::Unix(l) => UnixListener::from_std(l).map(Listener::Unix),
    };
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            warn!(error = %e, "cannot serve the metrics endpoint");
            return;
        }
    };
    loop {
        let accepted = listener.accept().await;
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // Out of fds, say: wait rather than spin.
                warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Dropped: the client sees the connection closed.
            turned_away += 1;
            if turned_away.is_power_of_two() {
                warn!(turned_away, "metrics connections beyond {MAX_CONNECTIONS} at once are closed");
            }
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            match stream {
                Stream::Tcp(s) => connection(s, scrape).await,
                Stream::Unix(s) => connection(s, scrape).await,
            }
            drop(permit);
        });
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
            Self::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        }
    }
}

async fn connection<S>(stream: S, scrape: Arc<dyn Fn(Format) -> String + Send + Sync>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &*scrape);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    // A connection past its lifetime is dropped, mid-response or not.
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
}

/// The answer to one request: the metrics for `GET /metrics` (and `HEAD`), else 404 or 405.
pub fn respond(request: &Request<impl Sized>, scrape: &dyn Fn(Format) -> String) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
        response
    };
    if request.uri().path() != PATH {
        return plain(StatusCode::NOT_FOUND, "ztseg serves its metrics at /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let accept = request.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    let mut response = Response::new(Full::new(Bytes::from(scrape(format))));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(format.content_type()));
    response
}

/// Removes a Unix socket the endpoint listened on (at the daemon's stop).
pub fn unbind(listen: &Listen) {
    if let Listen::Unix(path) = listen {
        remove_socket(path);
    }
}

fn remove_socket(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str, accept: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(accept) = accept {
            builder = builder.header(header::ACCEPT, accept);
        }
        builder.body(()).unwrap()
    }

    fn scrape(format: Format) -> String {
        format!("{format:?}\n")
    }

    #[test]
    fn metrics_are_served_at_their_path_in_the_format_asked_for() {
        let r = respond(&request(Method::GET, "/metrics", None), &scrape);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
        let r = respond(
            &request(Method::GET, "/metrics", Some("application/openmetrics-text; version=1.0.0")),
            &scrape,
        );
        assert!(
            r.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/openmetrics-text")
        );
        assert_eq!(respond(&request(Method::HEAD, "/metrics", None), &scrape).status(), StatusCode::OK);
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        assert_eq!(respond(&request(Method::GET, "/", None), &scrape).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&request(Method::GET, "/metrics/x", None), &scrape).status(),
            StatusCode::NOT_FOUND
        );
        let r = respond(&request(Method::POST, "/metrics", None), &scrape);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn a_unix_socket_replaces_a_stale_socket_but_not_a_file() {
        let dir = std::env::temp_dir().join(format!("ztseg-metrics-bind-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sub/metrics.sock");
        let listen = Listen::Unix(path.clone());
        drop(bind(&listen, None).unwrap());
        // The socket file stays behind (a crash): the next bind replaces it.
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
        drop(bind(&listen, None).unwrap());
        unbind(&listen);
        assert!(!path.exists());
        fs::write(&path, "not a socket").unwrap();
        let err = bind(&listen, None).err().unwrap();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a socket");
        let _ = fs::remove_dir_all(&dir);
    }
}
