//! Adding and removing one finalizer with JSON patches that touch only that entry, so that the
//! finalizers of other controllers are never replaced or lost.
//!
//! Both are guarded against a cache that lags: the add tests that the object is the one read and
//! its list is still the one read (as kube-runtime's own finalizer helper does), the removal that
//! the object is still the version its decision was taken on, or, in [`remove_on_grounds`], still
//! holds the values its decision rests on. A failed guard is a
//! [`Error::Conflict`]: read again.

use super::Error;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::fmt::Debug;

/// Adds `finalizer` to `object` unless it is there; returns the object as the server now has it,
/// or `None` if nothing was written.
pub async fn add<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<Option<K>, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    if object.finalizers().iter().any(|f| f == finalizer) {
        return Ok(None);
    }
    // Kubernetes neither merges nor deduplicates finalizers: without the test, an add from an
    // old read would replace a list someone extended since, or add ours twice. The UID test keeps
    // it off a new object created under the same name since that read.
    let uid = json!({ "op": "test", "path": "/metadata/uid", "value": object.uid() });
    let patch = if object.finalizers().is_empty() {
        json!([
            uid,
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [finalizer] },
        ])
    } else {
        json!([
            uid,
            { "op": "test", "path": "/metadata/finalizers", "value": object.finalizers() },
            { "op": "add", "path": "/metadata/finalizers/-", "value": finalizer },
        ])
    };
    json_patch(api, &object.name_any(), patch).await.map(Some)
}

/// Removes `finalizer` from `object`, provided the server still has the version `object` is.
pub async fn remove<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(index) = object.finalizers().iter().position(|f| f == finalizer) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch = json!([
        { "op": "test", "path": "/metadata/resourceVersion", "value": object.resource_version() },
        { "op": "test", "path": path, "value": finalizer },
        { "op": "remove", "path": path },
    ]);
    json_patch(api, &object.name_any(), patch).await.map(drop)
}

/// Removes `finalizer` from the object `name`, provided the server's copy still holds each of
/// `grounds` (a JSON pointer and the value found there, `null` for a missing member) and still
/// lists exactly `finalizers`. The apiserver tests them on the copy it patches, so that a change
/// to anything else since (a label) neither refuses the removal nor slips under it.
pub async fn remove_on_grounds<K>(
    api: &Api<K>,
    name: &str,
    finalizers: &[String],
    finalizer: &str,
    grounds: &[(String, serde_json::Value)],
) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(index) = finalizers.iter().position(|f| f == finalizer) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let mut operations: Vec<serde_json::Value> = grounds
        .iter()
        .map(|(pointer, value)| json!({ "op": "test", "path": pointer, "value": value }))
        .collect();
    operations.push(json!({ "op": "test", "path": "/metadata/finalizers", "value": finalizers }));
    operations.push(json!({ "op": "remove", "path": path }));
    json_patch(api, name, serde_json::Value::Array(operations))
        .await
        .map(drop)
}

/// Sends a JSON patch of `operations` to the object `name`.
async fn json_patch<K>(api: &Api<K>, name: &str, operations: serde_json::Value) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let request = http::Request::patch(format!("{}/{name}", api.resource_url()))
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(encoded_as_the_apiserver_encodes(&operations)?)
        .map_err(kube::Error::HttpError)?;
    match api.clone().into_client().request::<K>(request).await {
        Ok(object) => Ok(object),
        // The apiserver's answer to a JSON patch that cannot be applied: here, a `test` that
        // found the object changed.
        Err(kube::Error::Api(status)) if status.code == 422 => {
            Err(Error::Conflict(kube::Error::Api(status)))
        }
        Err(error) => Err(Error::from_write(error)),
    }
}

/// `value` as JSON text whose strings escape `<`, `>`, `&`, U+2028 and U+2029 as `\uXXXX`, as
/// the apiserver's encoder writes them: its JSON patch `test` compares a string's encoded text,
/// so that `"a&b"` would not match the `"a\u0026b"` it holds. Outside strings, JSON text has
/// none of these characters.
fn encoded_as_the_apiserver_encodes(value: &serde_json::Value) -> Result<Vec<u8>, Error> {
    let text = serde_json::to_string(value)?;
    let mut encoded = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => encoded.push_str("\\u003c"),
            '>' => encoded.push_str("\\u003e"),
            '&' => encoded.push_str("\\u0026"),
            '\u{2028}' => encoded.push_str("\\u2028"),
            '\u{2029}' => encoded.push_str("\\u2029"),
            c => encoded.push(c),
        }
    }
    Ok(encoded.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::encoded_as_the_apiserver_encodes;
    use serde_json::json;

    #[test]
    fn strings_are_encoded_with_the_escapes_the_apiserver_writes() {
        let value =
            json!({ "op": "test", "path": "/a~1b", "value": "x&y <z> \u{2028}\u{2029}\n\"" });
        let encoded = encoded_as_the_apiserver_encodes(&value).expect("encodes");
        assert_eq!(
            String::from_utf8(encoded.clone()).expect("text"),
            r#"{"op":"test","path":"/a~1b","value":"x\u0026y \u003cz\u003e \u2028\u2029\n\""}"#
        );
        let decoded: serde_json::Value = serde_json::from_slice(&encoded).expect("decodes");
        assert_eq!(decoded, value);
    }
}
