//! The agent's small HTTP servers (health checks, metrics): HTTP/1.1 on a listener, each
//! request answered by a function of its path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

/// An answer: status, content type, body.
pub type Answer = (StatusCode, &'static str, String);

/// Serves `listener` until the task is aborted, answering each request with `answer(path)`.
pub async fn serve(listener: TcpListener, answer: Arc<dyn Fn(&str) -> Answer + Send + Sync>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) = answer(req.uri().path());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(content_type),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, "http connection: {e}");
            }
        });
    }
}

/// A non-blocking tokio listener on `addr`.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}
