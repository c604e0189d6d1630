//! A fault-injecting gRPC proxy: its own unix socket in front of a CSI plugin's socket.
//!
//! It works at the HTTP/2 level, so it forwards every method of every service unchanged (messages,
//! headers, trailers) and needs no knowledge of the protocol. Each downstream connection gets its
//! own upstream connection. Faults are armed per gRPC method path (e.g.
//! `/csi.v1.Controller/ControllerPublishVolume`) and stay armed until disarmed:
//!
//! - [`Fault::Delay`]: forwards at once, holds the plugin's reply back for a while (the call takes
//!   effect on time; its answer is late).
//! - [`Fault::Drop`]: forwards, waits for the plugin's whole reply, then closes the client's
//!   connection without sending it (the call took effect; its answer is lost).
//! - [`Fault::Fail`]: answers with the given gRPC status and forwards nothing.
//! - [`Fault::Late`]: holds the call back, then forwards it on a connection of its own whatever
//!   the client did meanwhile (it may have given up at its deadline): a plugin that carries out
//!   a call after its caller stopped waiting for it. [`Fault::LateAfterCut`] does the same and
//!   cuts the client off at once: a reply lost early.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// What the proxy does to calls of one method.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Forward, then hold the reply back this long.
    Delay(Duration),
    /// Forward, then close the client's connection instead of replying.
    Drop,
    /// Reply with this status without forwarding.
    Fail { code: tonic::Code, message: String },
    /// Hold the call this long, then forward it whether or not the client still waits.
    Late(Duration),
    /// Close the client's connection at once, and forward the call after this long: a reply
    /// lost early, for a call that the plugin carries out late.
    LateAfterCut(Duration),
}

#[derive(Default)]
struct Shared {
    faults: HashMap<String, Fault>,
    /// Calls seen per method path, whether faulted or not.
    calls: HashMap<String, usize>,
}

/// The proxy; it stops when dropped.
pub struct GrpcProxy {
    socket: PathBuf,
    shared: Arc<Mutex<Shared>>,
    accept: JoinHandle<()>,
}

impl GrpcProxy {
    /// Listens on `socket` and forwards to the plugin at `upstream`.
    pub fn start(upstream: &Path, socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind the proxy socket");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let upstream = upstream.to_owned();
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, upstream.clone(), shared.clone()));
                }
            }
        });
        Self {
            socket: socket.to_owned(),
            shared,
            accept,
        }
    }

    /// The proxy's socket, where clients connect.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Applies `fault` to every later call of `method` (a gRPC path), until disarmed.
    pub fn arm(&self, method: &str, fault: Fault) {
        self.lock().faults.insert(method.to_owned(), fault);
    }

    /// Makes `method` transparent again.
    pub fn disarm(&self, method: &str) {
        self.lock().faults.remove(method);
    }

    /// How many calls of `method` reached the proxy.
    pub fn calls(&self, method: &str) -> usize {
        self.lock().calls.get(method).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("proxy state lock")
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves one client connection over one upstream connection, until either ends or a
/// [`Fault::Drop`] kills it.
async fn serve(stream: UnixStream, upstream: PathBuf, shared: Arc<Mutex<Shared>>) {
    let upstream_path = upstream.clone();
    let Ok(upstream) = UnixStream::connect(&upstream).await else {
        return; // The client sees its connection closed, as with no plugin at all.
    };
    let Ok((sender, connection)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream)).await
    else {
        return;
    };
    let upstream_task = tokio::spawn(connection);
    let kill = Arc::new(Notify::new());
    let service = hyper::service::service_fn({
        let kill = kill.clone();
        move |request| {
            handle(
                request,
                sender.clone(),
                upstream_path.clone(),
                shared.clone(),
                kill.clone(),
            )
        }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        // Dropping the connection closes the client's socket with the reply unsent.
        _ = kill.notified() => {}
    }
    upstream_task.abort();
}

async fn handle(
    request: Request<Incoming>,
    mut upstream: SendRequest<Incoming>,
    upstream_path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    kill: Arc<Notify>,
) -> Result<Response<ProxyBody>, Infallible> {
    let method = request.uri().path().to_owned();
    let fault = {
        let mut shared = shared.lock().expect("proxy state lock");
        *shared.calls.entry(method.clone()).or_default() += 1;
        shared.faults.get(&method).cloned()
    };
    if let Some(Fault::Fail { code, message }) = &fault {
        return Ok(status_response(*code, message));
    }
    if let Some(Fault::Late(hold)) = fault {
        return Ok(forward_late(request, upstream_path, hold).await);
    }
    if let Some(Fault::LateAfterCut(hold)) = fault {
        if let Err(response) = send_later(request, upstream_path, hold).await {
            return Ok(response);
        }
        kill.notify_one();
        return Ok(std::future::pending().await);
    }

    let (mut parts, body) = request.into_parts();
    parts.uri = upstream_uri(&parts.uri);
    let response = match upstream
        .send_request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response,
        Err(error) => {
            return Ok(status_response(
                tonic::Code::Unavailable,
                &format!("proxy: upstream failed: {error}"),
            ));
        }
    };

    match fault {
        None | Some(Fault::Fail { .. } | Fault::Late(_) | Fault::LateAfterCut(_)) => {
            Ok(response.map(|body| body.map_err(BoxError::from).boxed()))
        }
        Some(Fault::Delay(delay)) => {
            let (parts, body) = response.into_parts();
            let body = collect(body).await;
            tokio::time::sleep(delay).await;
            Ok(Response::from_parts(parts, body))
        }
        Some(Fault::Drop) => {
            // Let the plugin finish the call, then cut the client off before it hears back.
            let _ = response.into_body().collect().await;
            kill.notify_one();
            std::future::pending().await
        }
    }
}

/// Reads the whole call, then forwards it after `hold` from a task of its own, on a connection of
/// its own: the client's giving up (a reset stream, a closed connection) does not stop it. The
/// plugin's reply reaches the client if it still waits.
async fn forward_late(
    request: Request<Incoming>,
    upstream: PathBuf,
    hold: Duration,
) -> Response<ProxyBody> {
    match send_later(request, upstream, hold).await {
        Ok(replied) => replied.await.unwrap_or_else(|_| {
            status_response(tonic::Code::Unavailable, "proxy: the late call was lost")
        }),
        Err(response) => response,
    }
}

/// Reads the whole call and leaves a task of its own to send it after `hold`; its reply comes
/// on the channel returned.
async fn send_later(
    request: Request<Incoming>,
    upstream: PathBuf,
    hold: Duration,
) -> Result<tokio::sync::oneshot::Receiver<Response<ProxyBody>>, Response<ProxyBody>> {
    let (mut parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|collected| collected.to_bytes()) else {
        return Err(status_response(
            tonic::Code::Unavailable,
            "proxy: the call's body was cut off",
        ));
    };
    parts.uri = upstream_uri(&parts.uri);
    let (reply, replied) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        let response = match send_alone(&upstream, Request::from_parts(parts, body)).await {
            Ok(response) => response,
            Err(error) => status_response(
                tonic::Code::Unavailable,
                &format!("proxy: upstream failed: {error}"),
            ),
        };
        let _ = reply.send(response);
    });
    Ok(replied)
}

/// One call on a new connection to the plugin, its whole reply read.
async fn send_alone(
    upstream: &Path,
    request: Request<Bytes>,
) -> Result<Response<ProxyBody>, BoxError> {
    let stream = UnixStream::connect(upstream).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, http_body_util::Full::new(body));
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = collect(body).await;
    connection.abort();
    Ok(Response::from_parts(parts, body))
}

/// The same path on the plugin's side.
fn upstream_uri(uri: &Uri) -> Uri {
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Uri::builder()
        .scheme("http")
        .authority("localhost")
        .path_and_query(path)
        .build()
        .expect("a valid upstream URI")
}

/// The whole body, re-served from memory, trailers included.
async fn collect(body: Incoming) -> ProxyBody {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = Vec::new();
    match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            frames.push(Ok(Frame::data(collected.to_bytes())));
            if let Some(trailers) = trailers {
                frames.push(Ok(Frame::trailers(trailers)));
            }
        }
        Err(error) => frames.push(Err(error.into())),
    }
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// A gRPC "trailers-only" reply carrying `code` and `message`.
fn status_response(code: tonic::Code, message: &str) -> Response<ProxyBody> {
    let message: String = message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect::<String>()
        .replace('%', "%25");
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", HeaderValue::from(code as i32))
        .header(
            "grpc-message",
            HeaderValue::from_str(&message).expect("an ASCII header value"),
        )
        .body(Empty::new().map_err(BoxError::from).boxed())
        .expect("a valid status response")
}
