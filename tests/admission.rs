//! deploy/'s ValidatingAdmissionPolicy on the real apiserver: the cure for `cinder reset-state`.
//! A hand edit of an attachment's status by a cluster admin is refused with a message that points
//! to the force-detach annotation, while the operator, under its own identity, keeps writing
//! status: it attaches, and it force-detaches and re-attaches on request.
//!
//! The policy binds cluster-wide, and other test binaries write status as the admin, so the
//! policy and its binding are deleted when the test ends, whether it passed or not.
//!
//! And deploy/'s MutatingAdmissionPolicy, bound to labelled Volumes only
//! (`support::volume_hold`): a Volume held from its creation is never deleted at once.

mod support;

use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use safe_detach::api::{
    AttachmentPhase, FORCE_DETACH_ANNOTATION, ForceDetachState, VOLUME_FINALIZER, Volume,
    VolumeAttachment,
};
use safe_detach::config::{ConfigFile, DriverEntry};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::cluster::{
    TestObjects, admin_client, admin_kubeconfig, eventually, kubectl, unique_name,
};
use support::operator::{Operator, SHARD_LABEL};
use support::qsd::Qsd;
use support::volume_hold::{self, HOLD_LABEL, HOLD_VALUE};
use tokio::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const POLICY: &str = "safe-detach-status-writer";
const OPERATOR_IDENTITY: &str = "system:serviceaccount:safe-detach:safe-detach";
const MANAGER: &str = "safe-detach-admission-test";
/// How long the apiserver may take to load a new policy, and the operator to attach.
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

fn policy_file() -> PathBuf {
    Path::new(REPO).join("deploy/admission-policy.yaml")
}

/// Deletes deploy/'s policy and binding when dropped, passed or failed.
struct PolicyInstalled;

impl PolicyInstalled {
    async fn apply() -> Self {
        let guard = Self;
        let file = policy_file();
        kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            file.to_str().expect("a UTF-8 path"),
        ])
        .await;
        guard
    }
}

impl Drop for PolicyInstalled {
    fn drop(&mut self) {
        // `drop` cannot await, and the test's runtime may be unwinding: a thread with its own.
        let removed = std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up")
                .block_on(async {
                    let file = policy_file();
                    kubectl(&[
                        "delete",
                        "--ignore-not-found",
                        "--wait",
                        "-f",
                        file.to_str().expect("a UTF-8 path"),
                    ])
                    .await;
                    await_policy_unloaded().await;
                })
        })
        .join();
        if removed.is_err() {
            // Leaving the binding would break every later test that writes status as the admin.
            eprintln!(
                "could not delete the admission policy binding {POLICY}: delete it by hand with \
                 `kubectl delete validatingadmissionpolicybinding {POLICY}`"
            );
            if !std::thread::panicking() {
                panic!("clean-up of the admission policy failed");
            }
        }
    }
}

/// Waits until the apiserver has dropped the policy (as it took a moment to load it): the test
/// binaries after this one write status as the admin.
async fn await_policy_unloaded() {
    let client = admin_client().await;
    let attachments = Api::<VolumeAttachment>::all(client.clone());
    let name = unique_name("admission-unloaded");
    create(
        &client,
        json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "VolumeAttachment",
            // Labelled as a test's, so that no operator outside the tests takes it up.
            "metadata": { "name": name, "labels": { SHARD_LABEL: name } },
            "spec": { "volumeName": name, "nodeName": "node-a" },
        }),
    )
    .await;
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    eventually("the apiserver drops the policy", WAIT, POLL, || async {
        let result = attachments
            .patch_status(&name, &dry_run, &reset_state())
            .await;
        result.is_ok().then_some(())
    })
    .await;
    attachments
        .delete(&name, &Default::default())
        .await
        .expect("delete the probe attachment");
}

/// The status edit an administrator would make to "reset" a stuck attachment by hand.
fn reset_state() -> Patch<Value> {
    Patch::Merge(json!({ "status": { "phase": "Detached", "attached": false } }))
}

/// What the apiserver answered a refused request: its code and message.
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>) -> Option<(u16, String)> {
    match result {
        Err(kube::Error::Api(status)) => Some((status.code, status.message)),
        Ok(_) => None,
        Err(other) => panic!("expected an answer from the apiserver, got {other}"),
    }
}

fn phase(attachment: &VolumeAttachment) -> Option<AttachmentPhase> {
    attachment.status.as_ref().and_then(|s| s.phase)
}

fn attached_and_confirmed(attachment: &VolumeAttachment) -> bool {
    let status = attachment.status.as_ref();
    phase(attachment) == Some(AttachmentPhase::Attached) && status.is_some_and(|s| s.attached)
}

async fn create(client: &Client, object: Value) {
    let name = object["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_owned();
    let params = PatchParams::apply(MANAGER);
    let result = match object["kind"].as_str() {
        Some("Volume") => Api::<Volume>::all(client.clone())
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map(drop),
        _ => Api::<VolumeAttachment>::all(client.clone())
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .map(drop),
    };
    result.unwrap_or_else(|e| panic!("create {name}: {e}"));
}

/// Runs kubectl as the admin and returns its standard error, expecting it to fail.
async fn kubectl_refused(args: &[&str]) -> String {
    let local = Path::new(REPO).join(".local/bin/kubectl");
    let program = if local.exists() {
        local
    } else {
        PathBuf::from("kubectl")
    };
    let output = tokio::process::Command::new(&program)
        .arg("--kubeconfig")
        .arg(admin_kubeconfig().await)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        !output.status.success(),
        "kubectl {} succeeded, expected a refusal:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn hand_edits_of_status_are_refused_while_the_operator_writes_on() {
    let client = admin_client().await;
    let attachments = Api::<VolumeAttachment>::all(client.clone());
    let volumes = Api::<Volume>::all(client.clone());

    // Dropped in reverse order: the operator, the policy, the objects, the daemon.
    let qsd = Qsd::start();
    let mut objects = TestObjects::default();
    let shard = unique_name("shard");
    let driver = format!("nbd-{shard}");
    let handle = "disk-1";
    qsd.create_image(handle);
    let volume = objects.volume("vap-volume");
    let attachment = objects.attachment("vap-attachment");
    let labels = json!({ SHARD_LABEL: shard });

    let _policy = PolicyInstalled::apply().await;

    // (A full cluster's controller manager also type-checks the policy into its status; this
    // control plane runs none, so the expressions are proven by the requests below.)
    let policy: Value = serde_json::from_str(
        &kubectl(&["get", "validatingadmissionpolicy", POLICY, "-o", "json"]).await,
    )
    .expect("the policy as JSON");
    assert_eq!(
        policy["spec"]["variables"][0]["expression"],
        format!("'{OPERATOR_IDENTITY}'"),
        "the policy names the operator's identity"
    );

    create(
        &client,
        json!({
            "apiVersion": "safedetach.io/v1alpha1",
            "kind": "Volume",
            "metadata": { "name": volume, "labels": labels },
            "spec": { "driver": driver, "volumeHandle": handle },
        }),
    )
    .await;
    create(&client, attachment_object(&attachment, &labels, &volume)).await;

    // A new policy takes a moment to load. Probe with a dry run, which passes admission but
    // changes nothing, until the admin's status edit is refused.
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let started = Instant::now();
    let (code, message) = eventually(
        "the policy refuses the admin's status edit",
        WAIT,
        POLL,
        || async {
            refusal(
                attachments
                    .patch_status(&attachment, &dry_run, &reset_state())
                    .await,
            )
        },
    )
    .await;
    println!(
        "FIGURE: policy effective {:?} after it was applied",
        started.elapsed()
    );
    assert_eq!(code, 403, "{message}");

    // The operator, under its own identity, writes status as usual: it attaches.
    let _operator = Operator::start(&shard, &operator_config(&driver, &qsd)).await;
    let attached = eventually(
        "the operator attaches under the policy",
        WAIT,
        POLL,
        || async {
            let current = attachments.get(&attachment).await.ok()?;
            attached_and_confirmed(&current).then_some(current)
        },
    )
    .await;
    let status_managers: Vec<_> = attached
        .managed_fields()
        .iter()
        .filter(|f| f.subresource.as_deref() == Some("status"))
        .filter_map(|f| f.manager.clone())
        .collect();
    assert_eq!(
        status_managers,
        ["safe-detach"],
        "only the operator wrote status"
    );
    let exports = qsd.export_ids().await;
    assert_eq!(
        exports.len(),
        1,
        "the backend exports the volume: {exports:?}"
    );

    // The administrator's reset-state, for real this time: refused, naming the safe way.
    let (code, message) = refusal(
        attachments
            .patch_status(&attachment, &PatchParams::default(), &reset_state())
            .await,
    )
    .expect("the admin's hand edit of the status is refused");
    assert_eq!(code, 403, "{message}");
    for expected in [
        format!("ValidatingAdmissionPolicy '{POLICY}'"),
        format!(
            "volumeattachments.safedetach.io {attachment} is written only by the safe-detach operator ({OPERATOR_IDENTITY})"
        ),
        format!(
            "kubectl annotate volumeattachments.safedetach.io {attachment} \
             {FORCE_DETACH_ANNOTATION}=$(date +%s) --overwrite"
        ),
    ] {
        assert!(
            message.contains(&expected),
            "expected {expected:?} in {message:?}"
        );
    }
    // As the admin sees it in kubectl.
    let stderr = kubectl_refused(&[
        "patch",
        "volumeattachments.safedetach.io",
        &attachment,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Detached","attached":false}}"#,
    ])
    .await;
    assert!(
        stderr.contains("is forbidden") && stderr.contains(FORCE_DETACH_ANNOTATION),
        "{stderr}"
    );
    println!("FIGURE: kubectl says: {}", stderr.trim());
    // The Volume's status is guarded too.
    let (code, message) = refusal(
        volumes
            .patch_status(
                &volume,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "phase": "Available", "connectedNodes": [] } })),
            )
            .await,
    )
    .expect("the admin's hand edit of a Volume's status is refused");
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains(&format!("volumes.safedetach.io {volume}"))
            && message.contains(FORCE_DETACH_ANNOTATION),
        "{message}"
    );

    // Nothing changed: the record still says what the backend says.
    let unchanged = attachments.get(&attachment).await.expect("the attachment");
    assert!(attached_and_confirmed(&unchanged), "{:?}", unchanged.status);
    assert_eq!(qsd.export_ids().await, exports);

    // The safe way works under the policy: the operator force-detaches through the backend,
    // records it, and attaches again from a clean state.
    let token = format!("reset-{}", jiff::Timestamp::now().as_second());
    attachments
        .patch(
            &attachment,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { FORCE_DETACH_ANNOTATION: token } } }),
            ),
        )
        .await
        .expect("annotate the attachment");
    let forced = eventually(
        "the force-detach is confirmed and the volume re-attached",
        WAIT,
        POLL,
        || async {
            let current = attachments.get(&attachment).await.ok()?;
            let force = current.status.as_ref()?.force_detach.as_ref()?;
            (force.token.as_deref() == Some(token.as_str())
                && force.state == ForceDetachState::Succeeded
                && attached_and_confirmed(&current))
            .then_some(current)
        },
    )
    .await;
    assert_eq!(
        qsd.export_ids().await.len(),
        1,
        "re-attached: {:?}",
        forced.status
    );
}

/// deploy/volume-hold-policy.yaml closes the apiserver's delete/finalizer race
/// (kubernetes/kubernetes#77988): a Volume carries the operator's finalizer from its creation, so
/// a DELETE sent at once, while the operator's controllers are taking the new Volume up, only
/// marks it deleting; never does the apiserver remove it at once. An attachment then keeps its
/// Volume, and the operator releases the Volumes as soon as nothing names them. Without the
/// policy the same DELETEs find the Volumes unheld and remove them at once (about one in four
/// on this machine found the operator's hold added a moment before and removed it anyway).
#[tokio::test(flavor = "multi_thread")]
async fn volumes_held_from_their_creation_are_never_deleted_at_once() {
    let client = admin_client().await;
    let attachments = Api::<VolumeAttachment>::all(client.clone());
    let volumes = Api::<Volume>::all(client.clone());
    const RACED: usize = 20;

    let qsd = Qsd::start();
    let mut objects = TestObjects::default();
    let shard = unique_name("shard");
    let driver = format!("nbd-{shard}");
    let handle = "disk-held";
    qsd.create_image(handle);
    let labels = json!({ SHARD_LABEL: shard, HOLD_LABEL: HOLD_VALUE });
    volume_hold::install(&client).await;
    let _operator = Operator::start(&shard, &operator_config(&driver, &qsd)).await;

    // A Volume with an attachment on it: deleted, it stays while the attachment names it.
    let kept = objects.volume("held-volume");
    let attachment = objects.attachment("held-attachment");
    let created = volumes
        .create(
            &PostParams::default(),
            &volume_object(&kept, &labels, &driver, handle),
        )
        .await
        .expect("create the Volume");
    assert!(
        created.finalizers().iter().any(|f| f == VOLUME_FINALIZER),
        "the apiserver's answer to the create carries the finalizer: {:?}",
        created.finalizers()
    );
    create(&client, attachment_object(&attachment, &labels, &kept)).await;
    eventually("the attachment is attached", WAIT, POLL, || async {
        attached_and_confirmed(&attachments.get(&attachment).await.ok()?).then_some(())
    })
    .await;

    // Volumes created and deleted at once, all together, while the operator takes them up.
    let raced: Vec<String> = (0..RACED).map(|_| objects.volume("raced-volume")).collect();
    let answers = futures::future::join_all(raced.iter().map(|name| {
        let volumes = volumes.clone();
        let object = volume_object(name, &labels, &driver, &format!("{name}-disk"));
        async move {
            volumes
                .create(&PostParams::default(), &object)
                .await
                .expect("create a Volume");
            volumes
                .delete(name, &Default::default())
                .await
                .expect("delete the Volume")
        }
    }))
    .await;
    let deleting = answers
        .iter()
        .filter(|answer| {
            answer
                .as_ref()
                .left()
                .is_some_and(|v| v.metadata.deletion_timestamp.is_some())
        })
        .count();
    assert_eq!(
        deleting, RACED,
        "every DELETE only marked its Volume deleting; answers: {answers:?}"
    );
    volumes
        .delete(&kept, &Default::default())
        .await
        .expect("delete the Volume the attachment names");

    // The operator releases every Volume that nothing names, and keeps the one named.
    for name in &raced {
        eventually("the operator releases the Volume", WAIT, POLL, || async {
            volumes.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    let still = volumes.get(&kept).await.expect("the named Volume stays");
    assert!(still.metadata.deletion_timestamp.is_some());
    assert!(
        attached_and_confirmed(&attachments.get(&attachment).await.expect("the attachment")),
        "the attachment stays attached"
    );
    attachments
        .delete(&attachment, &Default::default())
        .await
        .expect("delete the attachment");
    eventually("the attachment and its Volume go", WAIT, POLL, || async {
        (attachments.get_opt(&attachment).await.ok()?.is_none()
            && volumes.get_opt(&kept).await.ok()?.is_none())
        .then_some(())
    })
    .await;
    assert!(
        qsd.export_ids().await.is_empty(),
        "nothing is exported once everything went"
    );
}

/// The operator's configuration in these tests: the daemon of `qsd` as driver `driver`.
fn operator_config(driver: &str, qsd: &Qsd) -> String {
    ConfigFile {
        default_stuck_after: Some("30s".into()),
        resync_interval: Some("5s".into()),
        drivers: vec![DriverEntry::nbd(driver, qsd.config()).with_deadline("5s")],
        ..ConfigFile::default()
    }
    .to_text()
    .expect("the daemon's paths are UTF-8")
}

/// A VolumeAttachment of `volume` on node-a.
fn attachment_object(name: &str, labels: &Value, volume: &str) -> Value {
    json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "VolumeAttachment",
        "metadata": { "name": name, "labels": labels },
        "spec": { "volumeName": volume, "nodeName": "node-a" },
    })
}

fn volume_object(name: &str, labels: &Value, driver: &str, handle: &str) -> Volume {
    serde_json::from_value(json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "Volume",
        "metadata": { "name": name, "labels": labels },
        "spec": { "driver": driver, "volumeHandle": handle },
    }))
    .expect("a Volume")
}
