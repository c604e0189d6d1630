//! An apiserver in memory for the reconciler tests: it keeps objects, checks the guards a real
//! one checks (a status write's `resourceVersion`, a JSON patch's `test` operations), releases an
//! object being deleted once its last finalizer goes, and writes every request it answers to the
//! shared [`Log`], so that a test can pin the exact sequence of reads, writes and driver calls.

use super::Log;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

/// A change another writer makes to an object (its JSON).
pub type Touch = Box<dyn FnOnce(&mut Value) + Send>;

/// A label: nothing a decision rests on.
pub fn label() -> Touch {
    Box::new(|object| object["metadata"]["labels"]["touched-by"] = json!("someone else"))
}

/// A person's force-detach request: something a decision rests on.
pub fn force_detach_request(token: &'static str) -> Touch {
    Box::new(move |object| {
        object["metadata"]["annotations"]["safedetach.io/force-detach"] = json!(token);
    })
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

struct State {
    /// Objects by their URL path.
    objects: BTreeMap<String, Value>,
    last_version: u64,
    /// Status writes still to be refused, each as if another writer had touched the object
    /// just before it (a label: nothing a decision rests on).
    interleaved_writes: usize,
    /// Changes of another writer, each made just before one of the next finalizer writes (JSON
    /// patches), in order.
    before_finalizer_writes: Vec<Touch>,
    /// Lists by a field selector are refused, as an apiserver older than CRD selectable fields
    /// (Kubernetes 1.31) refuses them.
    field_selectors_refused: bool,
    log: Log,
}

impl FakeApi {
    pub fn new(log: Log) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                objects: BTreeMap::new(),
                last_version: 0,
                interleaved_writes: 0,
                before_finalizer_writes: Vec::new(),
                field_selectors_refused: false,
                log,
            })),
        }
    }

    /// A client whose every request this apiserver answers.
    pub fn client(&self) -> Client {
        let state = self.state.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(answer(&state, request).await) }
        });
        Client::new(service, "default")
    }

    /// Stores `object` as a create would (a UID, a `resourceVersion`), and returns it as stored.
    pub fn create<K>(&self, object: &K) -> K
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let mut value = serde_json::to_value(object).expect("an object encodes");
        let mut state = self.lock();
        let version = state.next_version();
        value["metadata"]["uid"] = json!(format!("uid-{}", object.name_any()));
        value["metadata"]["resourceVersion"] = json!(version);
        value["metadata"]["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
        state.objects.insert(path_of(object), value.clone());
        serde_json::from_value(value).expect("an object decodes")
    }

    /// The object as the server has it now.
    pub fn get<K>(&self, name: &str) -> Option<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let path = format!("{}/{name}", K::url_path(&(), None));
        let value = self.lock().objects.get(&path).cloned()?;
        Some(serde_json::from_value(value).expect("an object decodes"))
    }

    /// Replaces `object` as an update would (its `resourceVersion` not checked).
    pub fn replace<K>(&self, object: &K)
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        let mut value = serde_json::to_value(object).expect("an object encodes");
        let mut state = self.lock();
        value["metadata"]["resourceVersion"] = json!(state.next_version());
        state.objects.insert(path_of(object), value);
    }

    /// Another writer touches the object (a label) just before each of the next `count` status
    /// writes, which the `resourceVersion` guard then refuses.
    pub fn interleave_writes(&self, count: usize) {
        self.lock().interleaved_writes = count;
    }

    /// Another writer changes the object just before each of the next finalizer writes, one
    /// change each, so that a `test` of its `resourceVersion` fails.
    pub fn before_finalizer_writes(&self, touches: impl IntoIterator<Item = Touch>) {
        self.lock().before_finalizer_writes = touches.into_iter().collect();
    }

    /// From now on a list by a field selector is answered 400, as before Kubernetes 1.31.
    /// The newest version given to a write: what a list would answer at now.
    pub fn last_version(&self) -> u64 {
        self.lock().last_version
    }

    pub fn refuse_field_selectors(&self) {
        self.lock().field_selectors_refused = true;
    }

    /// A delete: with finalizers the object stays, marked as being deleted; without, it is gone.
    pub fn delete<K>(&self, name: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        let path = format!("{}/{name}", K::url_path(&(), None));
        let mut state = self.lock();
        let version = state.next_version();
        let object = state.objects.get_mut(&path).expect("the object exists");
        let held = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|finalizers| !finalizers.is_empty());
        if !held {
            state.objects.remove(&path);
            return;
        }
        object["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:10Z");
        object["metadata"]["resourceVersion"] = json!(version);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("the fake apiserver's state")
    }
}

impl State {
    fn next_version(&mut self) -> String {
        self.last_version += 1;
        self.last_version.to_string()
    }

    fn record(&self, entry: String) {
        self.log.lock().expect("the log").push(entry);
    }

    fn answer(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let name = path.rsplit('/').next().unwrap_or_default().to_owned();
        if *method == Method::GET && !self.objects.contains_key(path) && is_collection(path) {
            return self.list(path, query);
        }
        if *method == Method::POST && path.ends_with("/events") {
            let event: Value = serde_json::from_slice(body).unwrap_or_default();
            let reason = event["reason"].as_str().unwrap_or_default();
            self.record(format!("event {reason}"));
            return (StatusCode::CREATED, event);
        }
        if *method == Method::GET {
            self.record(format!("get {}", short(path)));
            return match self.objects.get(path) {
                Some(object) => (StatusCode::OK, object.clone()),
                None => not_found(&name),
            };
        }
        if *method == Method::PATCH
            && let Some(object_path) = path.strip_suffix("/status")
        {
            return self.patch_status(object_path, body);
        }
        if *method == Method::PATCH {
            return self.json_patch(path, body);
        }
        self.record(format!("unexpected {method} {path}"));
        not_found(&name)
    }

    /// The objects under the collection `path`, those a field selector `spec.volumeName=…`,
    /// `spec.volumeHandle=…` or `metadata.name=…` selects if the query has one.
    fn list(&mut self, path: &str, query: &str) -> (StatusCode, Value) {
        let selector = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("fieldSelector="))
            .map(|s| s.replace("%3D", "=").replace("%3d", "="));
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .and_then(|value| value.parse::<usize>().ok())
        };
        // Pages: `continue` is the offset of the next one.
        let (limit, from) = (param("limit"), param("continue").unwrap_or(0));
        self.record(match (&selector, from) {
            (Some(selector), _) => format!("list {} {selector}", short(path)),
            (None, 0) => format!("list {}", short(path)),
            (None, from) => format!("list {} continue={from}", short(path)),
        });
        let by_name = selector
            .as_deref()
            .and_then(|s| s.strip_prefix("metadata.name="))
            .map(str::to_owned);
        let wanted = match &selector {
            // Every apiserver selects any kind by name.
            Some(_) if by_name.is_some() => None,
            Some(_) if self.field_selectors_refused => {
                self.record("  refused: field selector".to_owned());
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "field label not supported",
                );
            }
            Some(selector) => match selector.split_once('=') {
                Some((field @ ("spec.volumeName" | "spec.volumeHandle"), value)) => Some((
                    field.trim_start_matches("spec.").to_owned(),
                    value.to_owned(),
                )),
                _ => return failure(StatusCode::BAD_REQUEST, "BadRequest", selector),
            },
            None => None,
        };
        let prefix = format!("{path}/");
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(key, _)| {
                key.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains('/'))
            })
            .map(|(_, object)| object.clone())
            .filter(|object| {
                wanted
                    .as_ref()
                    .is_none_or(|(field, value)| object["spec"][field] == value.as_str())
                    && by_name
                        .as_ref()
                        .is_none_or(|name| object["metadata"]["name"] == name.as_str())
            })
            .collect();
        let version = self.last_version.to_string();
        let end = limit.map_or(items.len(), |limit| (from + limit).min(items.len()));
        let next = (end < items.len()).then(|| end.to_string());
        let items = items.get(from..end).unwrap_or_default();
        (
            StatusCode::OK,
            json!({ "apiVersion": "v1", "kind": "List", "metadata": { "resourceVersion": version, "continue": next }, "items": items }),
        )
    }

    /// A merge patch of the status, on the `resourceVersion` it names.
    fn patch_status(&mut self, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let patch: Value = serde_json::from_slice(body).unwrap_or_default();
        // The status the write asks for: the stored one with the patch merged in.
        let mut status = self
            .objects
            .get(path)
            .map(|object| object["status"].clone())
            .unwrap_or_default();
        json_patch::merge(&mut status, &patch["status"]);
        self.record(format!(
            "write {}/status: {}",
            short(path),
            describe_status(&status)
        ));
        let version = self.next_version();
        let Some(object) = self.objects.get_mut(path) else {
            return not_found(path);
        };
        if self.interleaved_writes > 0 {
            self.interleaved_writes -= 1;
            object["metadata"]["labels"]["touched-by"] = json!("someone else");
            object["metadata"]["resourceVersion"] = json!(format!("{version}-other"));
        }
        let wanted = &patch["metadata"]["resourceVersion"];
        if !wanted.is_null() && *wanted != object["metadata"]["resourceVersion"] {
            self.log
                .lock()
                .expect("the log")
                .push("  refused: the object changed".to_owned());
            return failure(
                StatusCode::CONFLICT,
                "Conflict",
                "the object has been modified",
            );
        }
        object["status"] = status;
        object["metadata"]["resourceVersion"] = json!(version);
        (StatusCode::OK, object.clone())
    }

    /// A JSON patch (the finalizers); the last finalizer of an object being deleted releases it.
    fn json_patch(&mut self, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let version = self.next_version();
        let Some(object) = self.objects.get_mut(path) else {
            self.record(format!("write {} (gone)", short(path)));
            return not_found(path);
        };
        if !self.before_finalizer_writes.is_empty() {
            let touch = self.before_finalizer_writes.remove(0);
            touch(object);
            object["metadata"]["resourceVersion"] = json!(format!("{version}-other"));
        }
        let mut patched = object.clone();
        let operations: Vec<Value> = serde_json::from_slice(body).unwrap_or_default();
        // As the apiserver's JSON patch does, a `test` of a missing member against null passes.
        let operations: Vec<Value> = operations
            .into_iter()
            .filter(|op| {
                !(op["op"] == "test"
                    && op["value"].is_null()
                    && op["path"]
                        .as_str()
                        .is_some_and(|path| patched.pointer(path).is_none()))
            })
            .collect();
        let applied = serde_json::from_value::<json_patch::Patch>(Value::Array(operations))
            .map_err(|e| e.to_string())
            .and_then(|patch| json_patch::patch(&mut patched, &patch).map_err(|e| e.to_string()));
        if let Err(error) = applied {
            self.record(format!("write {}: refused", short(path)));
            return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &error);
        }
        let finalizers = patched["metadata"]["finalizers"].clone();
        // As the apiserver does: no finalizer is added to an object being deleted.
        let before = object["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let added = finalizers
            .as_array()
            .is_some_and(|after| after.iter().any(|f| !before.contains(f)));
        if added && !object["metadata"]["deletionTimestamp"].is_null() {
            self.record(format!("write {}: refused (being deleted)", short(path)));
            return failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "no new finalizers can be added if the object is being deleted",
            );
        }
        self.record(format!("write {}: finalizers {finalizers}", short(path)));
        patched["metadata"]["resourceVersion"] = json!(version);
        let released = finalizers.as_array().is_none_or(Vec::is_empty)
            && !patched["metadata"]["deletionTimestamp"].is_null();
        if released {
            self.objects.remove(path);
        } else {
            self.objects.insert(path.to_owned(), patched.clone());
        }
        (StatusCode::OK, patched)
    }
}

async fn answer(state: &Mutex<State>, request: Request<Body>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_else(|_| Bytes::new());
    let (code, value) = state
        .lock()
        .expect("the fake apiserver's state")
        .answer(&method, &path, &query, &body);
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
        .expect("a response")
}

/// Whether `path` names a collection of safedetach.io objects rather than one object.
fn is_collection(path: &str) -> bool {
    matches!(short(path), "volumes" | "volumeattachments")
}

fn path_of<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!("{}/{}", K::url_path(&(), None), object.name_any())
}

/// `volumeattachments/va` for the path of a safedetach.io object.
fn short(path: &str) -> &str {
    path.strip_prefix("/apis/safedetach.io/v1alpha1/")
        .unwrap_or(path)
}

/// The parts of a status the tests read the sequence by: the phase, the backend's word, a forced
/// detach's state.
fn describe_status(status: &Value) -> String {
    let mut parts = vec![format!(
        "phase={} attached={}",
        status["phase"].as_str().unwrap_or("-"),
        status["attached"].as_bool().unwrap_or(false)
    )];
    if let Some(state) = status["forceDetach"]["state"].as_str() {
        parts.push(format!("force={state}"));
    }
    parts.join(" ")
}

fn not_found(name: &str) -> (StatusCode, Value) {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{name} not found"),
    )
}

fn failure(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}
