//! Adding and removing one finalizer with JSON patches that touch only that entry, so that the
//! finalizers of other controllers are never replaced or lost.

use super::Error;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::fmt::Debug;

/// Adds `finalizer` to `object` unless it is there.
pub async fn add<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    if object.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let patch = match &object.meta().finalizers {
        Some(_) => json!([{ "op": "add", "path": "/metadata/finalizers/-", "value": finalizer }]),
        None => json!([{ "op": "add", "path": "/metadata/finalizers", "value": [finalizer] }]),
    };
    json_patch(api, &object.name_any(), patch).await
}

/// Removes `finalizer` from `object`. The `test` operation makes the patch fail, rather than
/// remove another entry, if the list changed since `object` was read.
pub async fn remove<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(index) = object.finalizers().iter().position(|f| f == finalizer) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch = json!([
        { "op": "test", "path": path, "value": finalizer },
        { "op": "remove", "path": path },
    ]);
    json_patch(api, &object.name_any(), patch).await
}

async fn json_patch<K>(api: &Api<K>, name: &str, operations: serde_json::Value) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let patch: json_patch::Patch = serde_json::from_value(operations)?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(())
}
