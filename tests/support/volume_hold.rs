//! deploy/volume-hold-policy.yaml's MutatingAdmissionPolicy on the real apiserver, bound for the
//! tests to the Volumes that carry [`HOLD_LABEL`] only, so that every other Volume of the tests
//! (and of the campaign's schedules that run without it) is held by the operator, as on a
//! cluster without the policy.
//!
//! The policy and this binding stay installed: they touch only Volumes that carry the label, and
//! test binaries that run at once may rely on them.

use super::cluster::eventually;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use safe_detach::api::{VOLUME_FINALIZER, Volume};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// The label a Volume carries to be held by the policy from its creation.
pub const HOLD_LABEL: &str = "safedetach.io/test-volume-hold";
pub const HOLD_VALUE: &str = "at-create";

const POLICY_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/volume-hold-policy.yaml"
);
const BINDING: &str = "safe-detach-volume-hold-tests";
const MANAGER: &str = "safe-detach-tests";
/// How long the apiserver may take to load a new policy.
const LOAD_WAIT: Duration = Duration::from_secs(60);

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "admissionregistration.k8s.io",
        "v1",
        kind,
    ))
}

/// The policy document of deploy/volume-hold-policy.yaml, without the file's cluster-wide binding.
fn policy_from_deploy() -> Value {
    let text = std::fs::read_to_string(Path::new(POLICY_FILE)).expect("read the policy file");
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(&text).expect("the policy file is YAML");
    documents
        .into_iter()
        .find(|d| d["kind"] == "MutatingAdmissionPolicy")
        .expect("the file holds a MutatingAdmissionPolicy")
}

/// Installs the policy with the tests' binding and waits until the apiserver applies it: a
/// dry-run create of a labelled Volume comes back carrying the finalizer.
pub async fn install(client: &Client) {
    let policy = policy_from_deploy();
    let policy_name = policy["metadata"]["name"]
        .as_str()
        .expect("the policy's name")
        .to_owned();
    let params = PatchParams::apply(MANAGER).force();
    Api::<DynamicObject>::all_with(client.clone(), &resource("MutatingAdmissionPolicy"))
        .patch(&policy_name, &params, &Patch::Apply(&policy))
        .await
        .expect("apply the volume-hold policy");
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": { "name": BINDING },
        "spec": {
            "policyName": policy_name,
            "matchResources": {
                "objectSelector": { "matchLabels": { HOLD_LABEL: HOLD_VALUE } },
            },
        },
    });
    Api::<DynamicObject>::all_with(client.clone(), &resource("MutatingAdmissionPolicyBinding"))
        .patch(BINDING, &params, &Patch::Apply(&binding))
        .await
        .expect("apply the tests' binding of the volume-hold policy");

    let volumes = Api::<Volume>::all(client.clone());
    let probe: Volume = serde_json::from_value(json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "Volume",
        "metadata": { "name": "volume-hold-probe", "labels": { HOLD_LABEL: HOLD_VALUE } },
        "spec": { "driver": "nbd", "volumeHandle": "volume-hold-probe" },
    }))
    .expect("a Volume");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually(
        "the apiserver applies the volume-hold policy",
        LOAD_WAIT,
        Duration::from_millis(200),
        || async {
            let created = volumes.create(&dry_run, &probe).await.ok()?;
            created
                .finalizers()
                .iter()
                .any(|f| f == VOLUME_FINALIZER)
                .then_some(())
        },
    )
    .await;
}
