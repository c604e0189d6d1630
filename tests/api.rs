//! The API as the real apiserver serves it: the CRDs from `src/api` installed on the local control
//! plane, their defaults, validation rules, status subresource, kubectl presentation and RBAC.
//! No operator runs here; these tests pin what users and the operator can rely on from the API.

mod support;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use safe_detach::api::{
    AttachmentPhase, OrphanPolicy, Volume, VolumeAttachment, VolumeAttachmentSpec,
    VolumeAttachmentStatus, VolumeSpec,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Debug;
use support::cluster::{TestObjects, admin_client, client_as, kubectl};

/// An untyped API, so a test can send bodies the Rust types could not express (a missing
/// required field, an unknown enum value) and read back exactly what the server stored.
fn untyped<K: Resource<DynamicType = ()>>(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::erase::<K>(&()))
}

fn object<K: Resource<DynamicType = ()>>(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a well-formed object")
}

fn attachment(name: &str, volume: &str, node: &str) -> VolumeAttachment {
    VolumeAttachment::new(
        name,
        VolumeAttachmentSpec {
            volume_name: volume.to_owned(),
            node_name: node.to_owned(),
            connector: None,
            read_only: None,
        },
    )
}

/// Now, to the second: the precision the API keeps.
fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).expect("a valid time"))
}

/// Asserts that the server refused a request as invalid (422), with `expected` in its message.
#[track_caller]
fn assert_invalid<T: Debug>(result: kube::Result<T>, expected: &str) {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            assert_eq!(status.reason, "Invalid", "{status:?}");
            assert!(
                status.message.contains(expected),
                "expected the message to contain {expected:?}, got {:?}",
                status.message
            );
        }
        other => panic!("expected 422 Invalid with {expected:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn crds_are_established_and_served() {
    let client = admin_client().await;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for wanted in safe_detach::api::crds() {
        let served = crds.get(&wanted.name_any()).await.expect("CRD installed");
        let status = served.status.expect("CRD status");
        for condition in ["NamesAccepted", "Established"] {
            let found = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == condition);
            assert_eq!(
                found.map(|c| c.status.as_str()),
                Some("True"),
                "{}: {condition}",
                wanted.name_any()
            );
        }
        let accepted = status.accepted_names.expect("accepted names");
        assert_eq!(accepted.plural, wanted.spec.names.plural);
        assert_eq!(accepted.short_names, wanted.spec.names.short_names);
        assert_eq!(accepted.categories, Some(vec!["safedetach".to_owned()]));
    }

    Api::<Volume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list volumes");
    Api::<VolumeAttachment>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list volumeattachments");
}

#[tokio::test]
async fn valid_objects_are_accepted_and_the_server_fills_in_defaults() {
    let mut objects = TestObjects::default();
    let volume = objects.volume("valid");
    let attachment_name = objects.attachment("valid");
    let client = admin_client().await;

    // Sent without the defaulted fields, so what comes back is the server's doing.
    let created = untyped::<Volume>(&client)
        .create(
            &PostParams::default(),
            &object::<Volume>(
                &volume,
                json!({ "driver": "nbd", "volumeHandle": "disk-1" }),
            ),
        )
        .await
        .expect("create a minimal Volume");
    assert_eq!(
        created.data["spec"],
        json!({
            "driver": "nbd",
            "volumeHandle": "disk-1",
            "multiAttach": false,
            "autoForceDetach": true,
            "orphanPolicy": "Report",
        })
    );
    let stored = Api::<Volume>::all(client.clone())
        .get(&volume)
        .await
        .expect("get the Volume");
    assert_eq!(
        stored.spec,
        VolumeSpec {
            driver: "nbd".to_owned(),
            volume_handle: "disk-1".to_owned(),
            multi_attach: false,
            stuck_after: None,
            auto_force_detach: true,
            orphan_policy: OrphanPolicy::Report,
        }
    );
    assert_eq!(stored.status, None);

    let mut wanted = attachment(&attachment_name, &volume, "node-a");
    wanted.spec.connector = Some(BTreeMap::from([("host".to_owned(), "node-a".to_owned())]));
    wanted.spec.read_only = Some(true);
    let attachments = Api::<VolumeAttachment>::all(client);
    attachments
        .create(&PostParams::default(), &wanted)
        .await
        .expect("create a VolumeAttachment");
    let stored = attachments
        .get(&attachment_name)
        .await
        .expect("get the VolumeAttachment");
    assert_eq!(stored.spec, wanted.spec);
    assert_eq!(stored.status, None);
}

#[tokio::test]
async fn required_fields_must_be_present_and_non_empty() {
    let mut objects = TestObjects::default();
    let client = admin_client().await;
    let volumes = untyped::<Volume>(&client);
    let attachments = untyped::<VolumeAttachment>(&client);
    let create = PostParams::default();

    let no_handle = object::<Volume>(&objects.volume("no-handle"), json!({ "driver": "nbd" }));
    assert_invalid(
        volumes.create(&create, &no_handle).await,
        "spec.volumeHandle: Required value",
    );
    let no_node =
        object::<VolumeAttachment>(&objects.attachment("no-node"), json!({ "volumeName": "v" }));
    assert_invalid(
        attachments.create(&create, &no_node).await,
        "spec.nodeName: Required value",
    );

    let empty_driver = object::<Volume>(
        &objects.volume("empty-driver"),
        json!({ "driver": "", "volumeHandle": "disk-1" }),
    );
    assert_invalid(
        volumes.create(&create, &empty_driver).await,
        "spec.driver in body should be at least 1 chars long",
    );
    let empty_volume = object::<VolumeAttachment>(
        &objects.attachment("empty-volume"),
        json!({ "volumeName": "", "nodeName": "node-a" }),
    );
    assert_invalid(
        attachments.create(&create, &empty_volume).await,
        "spec.volumeName in body should be at least 1 chars long",
    );
}

#[tokio::test]
async fn orphan_policy_is_report_or_detach() {
    let mut objects = TestObjects::default();
    let client = admin_client().await;
    let volumes = untyped::<Volume>(&client);

    let sometimes = object::<Volume>(
        &objects.volume("sometimes"),
        json!({ "driver": "nbd", "volumeHandle": "disk-1", "orphanPolicy": "Sometimes" }),
    );
    assert_invalid(
        volumes.create(&PostParams::default(), &sometimes).await,
        r#"spec.orphanPolicy: Unsupported value: "Sometimes": supported values: "Report", "Detach""#,
    );

    let detach = object::<Volume>(
        &objects.volume("detach"),
        json!({ "driver": "nbd", "volumeHandle": "disk-1", "orphanPolicy": "Detach" }),
    );
    let created = volumes
        .create(&PostParams::default(), &detach)
        .await
        .expect("orphanPolicy Detach is accepted");
    assert_eq!(created.data["spec"]["orphanPolicy"], "Detach");
}

#[tokio::test]
async fn stuck_after_is_a_duration_between_5s_and_168h() {
    let mut objects = TestObjects::default();
    let client = admin_client().await;
    let volumes = untyped::<Volume>(&client);
    let with_stuck_after = |name: String, stuck_after: &str| {
        object::<Volume>(
            &name,
            json!({ "driver": "nbd", "volumeHandle": "disk-1", "stuckAfter": stuck_after }),
        )
    };

    for accepted in ["5s", "90s", "1h30m", "168h"] {
        let created = volumes
            .create(
                &PostParams::default(),
                &with_stuck_after(objects.volume("stuck"), accepted),
            )
            .await
            .unwrap_or_else(|e| panic!("stuckAfter {accepted:?} should be accepted: {e}"));
        assert_eq!(created.data["spec"]["stuckAfter"], accepted);
    }

    let not_a_duration = with_stuck_after(objects.volume("stuck"), "5 minutes");
    assert_invalid(
        volumes
            .create(&PostParams::default(), &not_a_duration)
            .await,
        "spec.stuckAfter in body should match '^([0-9]+(ms|s|m|h))+$'",
    );
    for out_of_bounds in ["1s", "4999ms", "200h"] {
        let volume = with_stuck_after(objects.volume("stuck"), out_of_bounds);
        assert_invalid(
            volumes.create(&PostParams::default(), &volume).await,
            &format!(
                r#"spec.stuckAfter: Invalid value: "{out_of_bounds}": stuckAfter must be between 5s and 168h"#
            ),
        );
    }
}

#[tokio::test]
async fn a_volume_keeps_its_driver_and_handle() {
    let mut objects = TestObjects::default();
    let name = objects.volume("immutable");
    let client = admin_client().await;
    untyped::<Volume>(&client)
        .create(
            &PostParams::default(),
            &object::<Volume>(&name, json!({ "driver": "nbd", "volumeHandle": "disk-1" })),
        )
        .await
        .expect("create the Volume");
    let volumes = Api::<Volume>::all(client);
    let patch = |spec: Value| Patch::Merge(json!({ "spec": spec }));

    assert_invalid(
        volumes
            .patch(
                &name,
                &PatchParams::default(),
                &patch(json!({ "driver": "csi" })),
            )
            .await,
        r#"spec.driver: Invalid value: "csi": driver is immutable"#,
    );
    assert_invalid(
        volumes
            .patch(
                &name,
                &PatchParams::default(),
                &patch(json!({ "volumeHandle": "disk-2" })),
            )
            .await,
        r#"spec.volumeHandle: Invalid value: "disk-2": volumeHandle is immutable"#,
    );

    // The rules pin those two fields only; the policy stays editable.
    let patched = volumes
        .patch(
            &name,
            &PatchParams::default(),
            &patch(json!({ "multiAttach": true })),
        )
        .await
        .expect("multiAttach may change");
    assert!(patched.spec.multi_attach);
    assert_eq!(
        (
            patched.spec.driver.as_str(),
            patched.spec.volume_handle.as_str()
        ),
        ("nbd", "disk-1")
    );
}

#[tokio::test]
async fn an_attachment_keeps_its_volume_and_node() {
    let mut objects = TestObjects::default();
    let name = objects.attachment("immutable");
    let attachments = Api::<VolumeAttachment>::all(admin_client().await);
    attachments
        .create(
            &PostParams::default(),
            &attachment(&name, "vol-a", "node-a"),
        )
        .await
        .expect("create the VolumeAttachment");
    let patch = |spec: Value| Patch::Merge(json!({ "spec": spec }));

    assert_invalid(
        attachments
            .patch(
                &name,
                &PatchParams::default(),
                &patch(json!({ "volumeName": "vol-b" })),
            )
            .await,
        r#"spec.volumeName: Invalid value: "vol-b": volumeName is immutable"#,
    );
    assert_invalid(
        attachments
            .patch(
                &name,
                &PatchParams::default(),
                &patch(json!({ "nodeName": "node-b" })),
            )
            .await,
        r#"spec.nodeName: Invalid value: "node-b": nodeName is immutable"#,
    );

    let patched = attachments
        .patch(
            &name,
            &PatchParams::default(),
            &patch(json!({ "readOnly": true })),
        )
        .await
        .expect("readOnly may change");
    assert_eq!(patched.spec.read_only, Some(true));
    assert_eq!(
        (
            patched.spec.volume_name.as_str(),
            patched.spec.node_name.as_str()
        ),
        ("vol-a", "node-a")
    );
}

#[tokio::test]
async fn status_is_written_only_through_the_status_subresource() {
    let mut objects = TestObjects::default();
    let name = objects.attachment("status");
    let attachments = Api::<VolumeAttachment>::all(admin_client().await);
    let created = attachments
        .create(
            &PostParams::default(),
            &attachment(&name, "vol-a", "node-a"),
        )
        .await
        .expect("create the VolumeAttachment");

    let attached = VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Attached),
        attached: true,
        phase_since: Some(now()),
        observed_generation: created.metadata.generation,
        ..VolumeAttachmentStatus::default()
    };
    let written = attachments
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": attached })),
        )
        .await
        .expect("patch /status");
    assert_eq!(written.status.as_ref(), Some(&attached));
    assert_eq!(
        written.metadata.generation, created.metadata.generation,
        "a status write must not bump the generation"
    );

    // Through the main resource, status is ignored: by an update ...
    let detached = VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Detached),
        ..attached.clone()
    };
    let mut update = written.clone();
    update.status = Some(detached.clone());
    let updated = attachments
        .replace(&name, &PostParams::default(), &update)
        .await
        .expect("update the main resource");
    assert_eq!(updated.status.as_ref(), Some(&attached));
    // ... and by a patch.
    let patched = attachments
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": detached })),
        )
        .await
        .expect("patch the main resource");
    assert_eq!(patched.status.as_ref(), Some(&attached));

    let stored = attachments
        .get(&name)
        .await
        .expect("get the VolumeAttachment");
    assert_eq!(stored.status, Some(attached));
}

#[tokio::test]
async fn kubectl_shows_the_columns_categories_and_field_docs() {
    let mut objects = TestObjects::default();
    let volume = objects.volume("kubectl");
    let attachment_name = objects.attachment("kubectl");
    let client = admin_client().await;
    untyped::<Volume>(&client)
        .create(
            &PostParams::default(),
            &object::<Volume>(
                &volume,
                json!({ "driver": "nbd", "volumeHandle": "disk-1" }),
            ),
        )
        .await
        .expect("create the Volume");
    let attachments = Api::<VolumeAttachment>::all(client);
    attachments
        .create(
            &PostParams::default(),
            &attachment(&attachment_name, &volume, "node-a"),
        )
        .await
        .expect("create the VolumeAttachment");
    // Three hours in the phase: kubectl prints exactly "3h" for the next minute, which tells the
    // IN PHASE column apart from AGE.
    let since = Timestamp::now() - SignedDuration::from_hours(3);
    let status = VolumeAttachmentStatus {
        phase: Some(AttachmentPhase::Attached),
        attached: true,
        phase_since: Some(Time(
            Timestamp::from_second(since.as_second()).expect("a valid time"),
        )),
        ..VolumeAttachmentStatus::default()
    };
    attachments
        .patch_status(
            &attachment_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .expect("patch /status");

    let table = kubectl(&["get", "sdva", &attachment_name]).await;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "a header and one row:\n{table}");
    assert_eq!(
        rows[0],
        [
            "NAME", "VOLUME", "NODE", "PHASE", "ATTACHED", "IN", "PHASE", "AGE"
        ],
        "{table}"
    );
    assert_eq!(
        rows[1][..6],
        [
            attachment_name.as_str(),
            &volume,
            "node-a",
            "Attached",
            "true",
            "3h"
        ],
        "{table}"
    );
    assert_eq!(rows[1].len(), 7, "{table}");

    let table = kubectl(&["get", "sdvol", &volume]).await;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["NAME", "DRIVER", "HANDLE", "PHASE", "NODES", "AGE"],
        "{table}"
    );
    // No status yet: PHASE and NODES are blank, so the row has four fields.
    assert_eq!(rows[1][..3], [volume.as_str(), "nbd", "disk-1"], "{table}");
    assert_eq!(rows[1].len(), 4, "{table}");

    let names = kubectl(&["get", "safedetach", "-o", "name"]).await;
    let names: Vec<&str> = names.lines().collect();
    assert!(
        names.contains(&format!("volume.safedetach.io/{volume}").as_str()),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("volumeattachment.safedetach.io/{attachment_name}").as_str()),
        "{names:?}"
    );

    let explained = kubectl(&[
        "explain",
        "volumeattachments.spec.nodeName",
        "--api-version=safedetach.io/v1alpha1",
    ])
    .await;
    // kubectl wraps descriptions at its own width.
    let explained = explained.split_whitespace().collect::<Vec<_>>().join(" ");
    for expected in [
        "GROUP: safedetach.io",
        "KIND: VolumeAttachment",
        "FIELD: nodeName <string>",
        "Name of the node to connect the volume to, as the backend knows it (for CSI: the node id). Immutable.",
    ] {
        assert!(
            explained.contains(expected),
            "expected {expected:?} in:\n{explained}"
        );
    }
}

#[tokio::test]
async fn rbac_forbids_an_identity_without_a_binding() {
    // The admin impersonates a user that no binding names: what any identity gets before
    // deploy/'s ClusterRoleBinding applies to it.
    let user = "safe-detach-unbound";
    let result = Api::<Volume>::all(client_as(user).await)
        .list(&ListParams::default())
        .await;
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (403, "Forbidden"),
                "{status:?}"
            );
            // Naming the user shows authentication passed: RBAC refused.
            let expected = format!(
                "User \"{user}\" cannot list resource \"volumes\" in API group \
                 \"safedetach.io\" at the cluster scope"
            );
            assert!(status.message.contains(&expected), "{:?}", status.message);
        }
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}
