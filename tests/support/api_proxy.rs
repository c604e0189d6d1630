//! A plain-HTTP front for the apiserver, on the loopback, for one operator: it forwards every
//! request under the operator's own identity (its RBAC-bound token), records each write, and on
//! demand makes the faults a real apiserver cannot make:
//!
//! - A lagging watch ([`ApiProxy::set_watch_delay`]): every chunk of a watch response reaches the
//!   operator that long after the apiserver sent it, in order, while every other request is
//!   answered at once. The operator's own writes land and answer immediately, but its informer
//!   cache learns of them late, as a cache behind a slow or overloaded apiserver does.
//! - A late list ([`ApiProxy::set_list_delay`]): a LIST of one kind is answered that long after
//!   the apiserver answered it, as a large collection served by a busy apiserver is, while the
//!   other kinds' lists come at once. A restarted operator's caches then fill in either order.
//! - A partition ([`ApiProxy::freeze`] and [`ApiProxy::thaw`]): while frozen, nothing the operator
//!   sends reaches the apiserver and nothing the apiserver sends reaches the operator — new
//!   requests, answers to requests already on their way, and chunks of open watches are all held
//!   until the thaw (or until the operator gives up on them). Its lease renewals do not land, and
//!   its cache stands still.
//! - A restart of the apiserver, as the operator sees it ([`ApiProxy::restart`]): every open watch
//!   ends; a request under way reaches the apiserver, and a write lands, but its answer is lost
//!   (503); and for a while every new request is refused (503), as by a load balancer in front
//!   of an apiserver that is not ready. The real apiserver is shared by every schedule and test
//!   running at once, so it is not restarted itself.
//!
//! The apiserver's own metrics count every client of a shared cluster; the writes recorded here
//! are one operator's.
//!
//! The proxy runs on the runtime that started it and stops taking connections when it is
//! dropped; the connections it serves end with the operator that opened them.

use super::cluster::operator_kubeconfig;
use bytes::Bytes;
use http_body_util::BodyExt;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A write request the operator sent to the apiserver.
#[derive(Clone, Debug)]
pub struct ApiWrite {
    /// When the proxy passed it on to the apiserver (a write held by a partition counts from the
    /// thaw, when it really reached the apiserver).
    pub at: Instant,
    pub method: String,
    /// The request's path (no query).
    pub path: String,
}

impl ApiWrite {
    /// A write to a Volume or a VolumeAttachment (object or status).
    pub fn to_safedetach(&self) -> bool {
        self.path.starts_with("/apis/safedetach.io/")
    }

    pub fn to_status(&self) -> bool {
        self.to_safedetach() && self.path.ends_with("/status")
    }

    /// A write to a VolumeAttachment's status.
    pub fn to_attachment_status(&self) -> bool {
        self.to_status() && self.path.contains("/volumeattachments/")
    }

    /// A write to a Volume's status.
    pub fn to_volume_status(&self) -> bool {
        self.to_status() && self.path.contains("/volumes/")
    }

    pub fn to_event(&self) -> bool {
        self.path.starts_with("/apis/events.k8s.io/")
    }
}

/// What every forwarded request consults.
struct Shared {
    /// The apiserver, reached with the operator's identity.
    upstream: Client,
    writes: Mutex<Vec<ApiWrite>>,
    watch_delay: Mutex<Duration>,
    /// The plural resource whose LISTs are answered late, and how late.
    list_delay: Mutex<Option<(String, Duration)>>,
    /// Whether the partition is on; every holding point waits for this to be false.
    frozen: watch::Sender<bool>,
    /// How many restarts so far: a request or watch that began before one is cut by it.
    restarts: watch::Sender<u64>,
    /// Until when the restarted apiserver refuses every request.
    down_until: Mutex<Option<Instant>>,
    /// Requests refused while down, and answers lost to a restart.
    refused: AtomicUsize,
    lost: AtomicUsize,
}

impl Shared {
    fn watch_delay(&self) -> Duration {
        *self.watch_delay.lock().expect("the proxy's state")
    }

    /// How late a GET of `path` that is not a watch is answered: a LIST of the lagging kind.
    fn list_delay(&self, path: &str) -> Duration {
        match &*self.list_delay.lock().expect("the proxy's state") {
            Some((plural, delay)) if path.ends_with(&format!("/{plural}")) => *delay,
            _ => Duration::ZERO,
        }
    }

    fn down(&self) -> bool {
        self.down_until
            .lock()
            .expect("the proxy's state")
            .is_some_and(|until| Instant::now() < until)
    }

    fn restarts(&self) -> u64 {
        *self.restarts.borrow()
    }

    /// Resolves at once when not frozen, else at the thaw.
    async fn thawed(&self) {
        let mut frozen = self.frozen.subscribe();
        // The sender lives as long as `Shared`: an error cannot happen while we hold it.
        let _ = frozen.wait_for(|frozen| !*frozen).await;
    }
}

/// A running front; see the module doc.
pub struct ApiProxy {
    shared: Arc<Shared>,
    /// A kubeconfig that points at the front, without credentials of its own.
    pub kubeconfig: PathBuf,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl ApiProxy {
    pub async fn start() -> Self {
        let path = operator_kubeconfig().await;
        let read =
            Kubeconfig::read_from(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let config = kube::Config::from_custom_kubeconfig(read, &KubeConfigOptions::default())
            .await
            .expect("the operator's kubeconfig");
        let upstream = Client::try_from(config).expect("a client with the operator's identity");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let address = listener.local_addr().expect("its address");
        let shared = Arc::new(Shared {
            upstream,
            writes: Mutex::default(),
            watch_delay: Mutex::new(Duration::ZERO),
            list_delay: Mutex::default(),
            frozen: watch::channel(false).0,
            restarts: watch::channel(0).0,
            down_until: Mutex::default(),
            refused: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
        });
        let app = axum::Router::new().fallback({
            let shared = shared.clone();
            move |request: axum::extract::Request| forward(shared.clone(), request)
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir().expect("a folder for the kubeconfig");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: proxied\n  cluster:\n    server: http://{address}\nusers:\n- name: operator\n  user: {{}}\ncontexts:\n- name: proxied\n  context:\n    cluster: proxied\n    user: operator\ncurrent-context: proxied\n"
            ),
        )
        .expect("write the kubeconfig");
        Self {
            shared,
            kubeconfig,
            task,
            _dir: dir,
        }
    }

    /// Every write so far, oldest first.
    pub fn writes(&self) -> Vec<ApiWrite> {
        self.shared
            .writes
            .lock()
            .expect("the proxy's state")
            .clone()
    }

    /// The writes recorded at or after `since`.
    pub fn writes_since(&self, since: Instant) -> Vec<ApiWrite> {
        self.writes()
            .into_iter()
            .filter(|w| w.at >= since)
            .collect()
    }

    /// From now on every chunk of a watch response (open or opened later) is handed to the
    /// operator `delay` after it came from the apiserver, in order. Zero turns the lag off (chunks
    /// already waiting keep their release time).
    pub fn set_watch_delay(&self, delay: Duration) {
        *self.shared.watch_delay.lock().expect("the proxy's state") = delay;
    }

    /// From now on every LIST of `plural` (e.g. `volumeattachments`, of any group) is handed to
    /// the operator `delay` after the apiserver answered it; the lists of other kinds, and every
    /// watch, are not held. Zero turns it off.
    pub fn set_list_delay(&self, plural: &str, delay: Duration) {
        *self.shared.list_delay.lock().expect("the proxy's state") =
            (!delay.is_zero()).then(|| (plural.to_owned(), delay));
    }

    /// Cuts the operator off from the apiserver, in both directions, until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// Ends the partition: everything held goes on its way at once (each watch's chunks in their
    /// order), as a healed network delivers what it had buffered.
    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// Restarts the apiserver as the operator sees it: every open watch ends, every request under
    /// way loses its answer (a write lands all the same), and every request is refused for
    /// `down`.
    pub fn restart(&self, down: Duration) {
        *self.shared.down_until.lock().expect("the proxy's state") = Some(Instant::now() + down);
        self.shared.restarts.send_modify(|n| *n += 1);
    }

    /// How many requests the restarts refused, and how many answers they lost.
    pub fn restart_effects(&self) -> (usize, usize) {
        (
            self.shared.refused.load(Ordering::SeqCst),
            self.shared.lost.load(Ordering::SeqCst),
        )
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer of an apiserver that cannot serve: 503 with a `Status`, as a client reads it.
fn unavailable(message: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": "ServiceUnavailable",
        "code": 503,
    });
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        [(http::header::CONTENT_TYPE, "application/json")],
        status.to_string(),
    )
        .into_response()
}

/// Whether the request opens a watch (`?watch=true`, or `1`, as clients spell it).
fn is_watch(query: Option<&str>) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1")
}

async fn forward(shared: Arc<Shared>, request: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (http::StatusCode::BAD_REQUEST, "unreadable body").into_response();
    };
    shared.thawed().await;
    if shared.down() {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return unavailable("the apiserver is restarting");
    }
    let restarts = shared.restarts();
    if !matches!(parts.method, http::Method::GET | http::Method::HEAD) {
        shared
            .writes
            .lock()
            .expect("the proxy's state")
            .push(ApiWrite {
                at: Instant::now(),
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
            });
    }
    let watching = is_watch(parts.uri.query());
    let late = if parts.method == http::Method::GET && !watching {
        shared.list_delay(parts.uri.path())
    } else {
        Duration::ZERO
    };
    parts.headers.remove(http::header::HOST);
    let request = http::Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
    let answer = shared.upstream.send(request).await;
    tokio::time::sleep(late).await;
    // An answer that comes back during a partition is held like everything else: a request sent
    // just before the cut must not let the operator learn that it landed.
    shared.thawed().await;
    // A restart while the request was under way: whatever it did at the apiserver stands, but
    // the connection that would have carried the answer is gone.
    if shared.restarts() != restarts {
        shared.lost.fetch_add(1, Ordering::SeqCst);
        return unavailable("the apiserver restarted before it answered");
    }
    match answer {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            for hop in [http::header::TRANSFER_ENCODING, http::header::CONNECTION] {
                parts.headers.remove(hop);
            }
            let body = if watching {
                delay_line(shared, body, restarts)
            } else {
                axum::body::Body::new(body)
            };
            axum::response::Response::from_parts(parts, body)
        }
        Err(error) => (http::StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

/// A chunk of a watch response, with the time it may be handed on.
type Held = (Instant, Result<Bytes, kube::Error>);

/// Relays a watch response through a delay line: a reader takes each chunk as soon as the
/// apiserver sends it and stamps it with its release time (arrival plus the delay of that
/// moment); the operator's side hands the chunks on in order, each at its release time and not
/// during a partition. Reading ahead keeps the arrival times true however long the line is.
fn delay_line(
    shared: Arc<Shared>,
    mut upstream: kube::client::Body,
    restarts: u64,
) -> axum::body::Body {
    let (line, out) = mpsc::unbounded_channel::<Held>();
    let reader = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut restarted = shared.restarts.subscribe();
            loop {
                // A restart ends the watch: what it had not sent yet is never sent.
                let frame = tokio::select! {
                    frame = upstream.frame() => frame,
                    _ = restarted.wait_for(|n| *n != restarts) => return,
                };
                let Some(frame) = frame else { return };
                let release = Instant::now() + shared.watch_delay();
                let chunk = match frame {
                    Ok(frame) => match frame.into_data() {
                        Ok(data) => Ok(data),
                        // Trailers carry nothing a watch client reads.
                        Err(_) => continue,
                    },
                    Err(error) => Err(error),
                };
                let failed = chunk.is_err();
                // The operator hung up (the receiver is gone): stop reading.
                if line.send((release, chunk)).is_err() || failed {
                    return;
                }
            }
        })
    };
    // The reader stops with the response it feeds: when the operator closes the watch, the
    // stream below is dropped, and with it this guard.
    let line = Line {
        out,
        shared,
        _reader: AbortOnDrop(reader),
    };
    let chunks = futures::stream::unfold(line, |mut line| async move {
        let (release, chunk) = line.out.recv().await?;
        tokio::time::sleep_until(release).await;
        line.shared.thawed().await;
        Some((chunk, line))
    });
    axum::body::Body::from_stream(chunks)
}

/// The operator's end of a delay line.
struct Line {
    out: mpsc::UnboundedReceiver<Held>,
    shared: Arc<Shared>,
    _reader: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
