//! Status writes as JSON merge patches (RFC 7386) conditioned on a resourceVersion.
//!
//! A merge patch costs the apiserver less than a server-side apply of the same status (no
//! field-ownership merge; docs/benchmarks.md measures both), and the `resourceVersion` it carries
//! is a precondition as it is for an apply: a write decided on an older version is refused with a
//! conflict. The patch carries only what changed from the status stored at that version, with a
//! `null` for each field that went, so the result is exactly the new status.

use serde::Serialize;
use serde_json::{Map, Value, json};

/// The merge patch that turns `stored`, the status of the object at `version`, into `next`, on
/// condition that the object is still at `version`. Without a version there is no condition to
/// put (a `null` would remove it): an error, never an unconditional write.
pub fn status_patch<S: Serialize>(
    version: Option<String>,
    stored: &S,
    next: &S,
) -> Result<Value, serde_json::Error> {
    let Some(version) = version else {
        return Err(serde::ser::Error::custom(
            "the object has no resourceVersion to condition the status write on",
        ));
    };
    let (stored, next) = (serde_json::to_value(stored)?, serde_json::to_value(next)?);
    Ok(json!({
        "metadata": { "resourceVersion": version },
        "status": merge_diff(&stored, &next),
    }))
}

/// The merge patch from `old` to `new`: the members that changed, `null` for those removed;
/// anything but an object is replaced whole (lists included, as RFC 7386 has it).
fn merge_diff(old: &Value, new: &Value) -> Value {
    let (Value::Object(old), Value::Object(new)) = (old, new) else {
        return new.clone();
    };
    let mut patch = Map::new();
    for (key, value) in new {
        match old.get(key) {
            Some(before) if before == value => {}
            Some(before @ Value::Object(_)) if value.is_object() => {
                patch.insert(key.clone(), merge_diff(before, value));
            }
            _ => {
                patch.insert(key.clone(), value.clone());
            }
        }
    }
    for key in old.keys().filter(|key| !new.contains_key(*key)) {
        patch.insert(key.clone(), Value::Null);
    }
    Value::Object(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the apiserver makes of the patch: `old` with it merged in.
    fn applied(old: &Value, patch: &Value) -> Value {
        let mut result = old.clone();
        json_patch::merge(&mut result, patch);
        result
    }

    #[test]
    fn the_patch_turns_the_stored_status_into_the_next_one_exactly() {
        let stored = json!({
            "phase": "Attached",
            "attached": true,
            "connectionInfo": { "uri": "nbd://a", "export": "e1" },
            "boundTo": { "driver": "nbd", "volumeHandle": "h1", "volumeUid": "u1" },
            "conditions": [{ "type": "Ready", "status": "True" }],
            "handledTokens": ["t1"],
        });
        let next = json!({
            "phase": "Detaching",
            "attached": true,
            "connectionInfo": { "uri": "nbd://a" },
            "boundTo": { "driver": "nbd", "volumeHandle": "h1", "volumeUid": "u1" },
            "conditions": [{ "type": "Ready", "status": "False" }, { "type": "Stuck", "status": "False" }],
            "forceDetach": { "state": "InProgress", "attempts": 1 },
        });
        let patch = merge_diff(&stored, &next);
        assert_eq!(applied(&stored, &patch), next);
        // Only what changed goes: the unchanged binding and flag stay out of the patch.
        assert_eq!(
            patch,
            json!({
                "phase": "Detaching",
                "connectionInfo": { "export": null },
                "conditions": [{ "type": "Ready", "status": "False" }, { "type": "Stuck", "status": "False" }],
                "forceDetach": { "state": "InProgress", "attempts": 1 },
                "handledTokens": null,
            })
        );
        // From nothing stored, and back to nothing.
        assert_eq!(applied(&json!({}), &merge_diff(&json!({}), &next)), next);
        assert_eq!(applied(&next, &merge_diff(&next, &json!({}))), json!({}));
    }

    #[test]
    fn the_patch_names_the_version_it_was_decided_on() {
        let patch = status_patch(Some("42".into()), &json!({ "a": 1 }), &json!({ "a": 2 }))
            .expect("serializable");
        assert_eq!(
            patch,
            json!({ "metadata": { "resourceVersion": "42" }, "status": { "a": 2 } })
        );
        assert!(status_patch(None, &json!({ "a": 1 }), &json!({ "a": 2 })).is_err());
    }
}
