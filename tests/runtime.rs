//! The operator as it runs in a cluster, on the real control plane and a real
//! `qemu-storage-daemon`: leader election between two replicas, the HTTP endpoints the
//! Deployment probes and Prometheus scrapes, a missing permission reported rather than a silent
//! stall, and deploy/ itself accepted by the apiserver.
//!
//! Run with `--nocapture` to see the `FIGURE:` lines.

mod support;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use safe_detach::api::{ATTACHMENT_FINALIZER, FORCE_DETACH_ANNOTATION, ForceDetachState};
use safe_detach::config::{Config, ConfigError};
use safe_detach::runtime::metrics::Metrics;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::cluster::{admin_kubeconfig, eventually, kubectl, unique_name};
use support::operator::http_get;
use support::qmp_proxy::Fault;
use support::scenario::{FIRST_REPLICA, POLL, Scenario, Setup, WAIT, attached};
use tokio::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The identity of the replica that joins the scenario's own in an election.
const SECOND_REPLICA: &str = "replica-2";

/// A scenario whose operator is one replica of an election for a Lease lasting `lease`.
async fn election(lease: &'static str) -> Scenario {
    Scenario::with(Setup {
        leader_election: Some(lease),
        deadline: "5s",
        ..Setup::default()
    })
    .await
}

/// `kubeApiQps` holds the controllers to their rate. At one request a second (burst 1), the
/// requests of one attach (the attachment's finalizer, its intent and its `Attached`, an Event)
/// take seconds, where at the default rate they take a fraction of one.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_rate_limit_holds_the_controllers_to_their_rate() {
    let mut s = Scenario::with(Setup {
        api_rate: Some((1, 1)),
        ..Setup::default()
    })
    .await;
    let volume = s.volume("rate", "disk-rate", json!({})).await;
    let created = Instant::now();
    let (name, _) = s.attach("rate", &volume, "node-a").await;
    let took = created.elapsed();
    println!("FIGURE: one attach at 1 request a second: Attached {took:?} after its create");
    assert!(
        took >= Duration::from_millis(2500),
        "{name} was Attached {took:?} after its create: its 4 requests were not held to 1 a second"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_replica_acts_and_another_takes_over_when_it_dies() {
    let lease_duration = Duration::from_secs(5);
    let mut s = election("5s").await;
    s.wait_leader(FIRST_REPLICA, WAIT).await;
    let (follower, _follower_api) = s.second_operator(SECOND_REPLICA).await;
    // A follower is ready while it stands by: it has joined the election.
    assert_eq!(follower.wait_ok("/readyz").await, "ready");

    let volume = s.volume("rt-volume", "disk-1", json!({})).await;
    let (one, _) = s.attach("rt-attachment", &volume, "node-a").await;

    // Only the leader acted: the follower reconciled nothing.
    assert_eq!(s.lease_holder().await.as_deref(), Some(FIRST_REPLICA));
    assert_eq!(
        follower
            .scrape()
            .await
            .samples("safedetach_reconciles_total"),
        [],
        "the follower reconciled"
    );
    assert!(
        s.operator.scrape().await.sum(
            "safedetach_reconciles_total",
            &[("kind", "VolumeAttachment")]
        ) >= 1.0
    );

    // The leader dies without a word: its lease runs out, and the follower takes over.
    s.operator.kill();
    let killed = Instant::now();
    s.wait_leader(SECOND_REPLICA, WAIT).await;
    let takeover = killed.elapsed();
    println!(
        "FIGURE: takeover {takeover:?} after SIGKILL of the leader (lease {lease_duration:?})"
    );
    assert!(
        takeover <= lease_duration + Duration::from_secs(5),
        "takeover took {takeover:?} with a lease of {lease_duration:?}"
    );

    // The new leader resumes: a new attachment is attached, the old one stays attached.
    let other = s.volume("rt-volume", "disk-2", json!({})).await;
    s.attach("rt-attachment", &other, "node-b").await;
    println!(
        "FIGURE: new attachment Attached {:?} after SIGKILL of the leader",
        killed.elapsed()
    );
    let kept = s.get_attachment(&one).await.expect("the first attachment");
    assert!(attached(&kept), "{kept:?}");
    assert!(
        follower.scrape().await.sum(
            "safedetach_reconciles_total",
            &[("kind", "VolumeAttachment")]
        ) >= 1.0,
        "the new leader reconciled nothing"
    );
    let exports = s.qsd.export_ids().await;
    assert_eq!(exports.len(), 2, "{exports:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_with_sigterm_hands_over_at_once() {
    // A long lease, so that a handover by expiry cannot pass for a release.
    let lease_duration = Duration::from_secs(30);
    let mut s = election("30s").await;
    s.wait_leader(FIRST_REPLICA, WAIT).await;
    let (follower, _follower_api) = s.second_operator(SECOND_REPLICA).await;
    assert_eq!(follower.wait_ok("/readyz").await, "ready");

    let status = s.operator.terminate().expect("the leader was running");
    assert!(status.success(), "the leader exited with {status}");
    let stopped = Instant::now();
    let released = s.lease_holder().await;
    assert_ne!(
        released.as_deref(),
        Some(FIRST_REPLICA),
        "the leader exited still holding the lease; its log:\n{}",
        s.operator.log()
    );
    s.wait_leader(SECOND_REPLICA, WAIT).await;
    let handover = stopped.elapsed();
    println!(
        "FIGURE: handover {handover:?} after SIGTERM of the leader (lease {lease_duration:?})"
    );
    assert!(handover < lease_duration / 3, "handover took {handover:?}");
}

/// A leader stopped while a driver call of its own is still under way at the backend (the
/// daemon's reply to an attach held back longer than the shutdown's grace) drops that reconcile
/// after the grace, and exits without giving the lease up: a next leader that took over at once
/// could probe and act while the call still lands. It takes over when the lease runs out.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_cut_short_mid_call_leaves_its_lease_to_run_out() {
    let mut s = Scenario::with(Setup {
        leader_election: Some("30s"),
        via_proxy: true,
        deadline: "60s",
        ..Setup::default()
    })
    .await;
    s.wait_leader(FIRST_REPLICA, WAIT).await;
    let volume = s.volume("cut", "disk-cut", json!({})).await;
    s.proxy().arm(
        "block-export-add",
        Fault::DelayReply(Duration::from_secs(40)),
    );
    let name = s.attachment("cut", &volume, "node-a").await;
    eventually("the attach reached the daemon", WAIT, POLL, || async {
        (!s.proxy().calls_of("block-export-add").is_empty()).then_some(())
    })
    .await;
    let asked = Instant::now();
    let status = s.operator.terminate().expect("the leader was running");
    let stopped = asked.elapsed();
    assert!(status.success(), "the leader exited with {status}");
    assert!(
        stopped >= Duration::from_secs(15),
        "the leader exited {stopped:?} after SIGTERM, before its grace for the reconciles under way"
    );
    let log = s.operator.log();
    assert_eq!(
        s.lease_holder().await.as_deref(),
        Some(FIRST_REPLICA),
        "the leader gave its lease up with a driver call under way; its log:\n{log}"
    );
    assert!(
        log.contains("leaving the lease to run out"),
        "{name}: no word of the reconcile cut short; the log:\n{log}"
    );
}

/// A replica killed and started again under the same name (a container restarted in its pod)
/// finds the lease naming it: an earlier process of it may have left driver calls under way, so
/// it waits for that lease to run out, as another replica would, before it renews it and acts.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_restarted_under_its_own_name_waits_for_its_earlier_lease_to_run_out() {
    let lease_duration = Duration::from_secs(5);
    let mut s = election("5s").await;
    s.wait_leader(FIRST_REPLICA, WAIT).await;
    let before = s
        .lease_renewed()
        .await
        .expect("the leader renewed its lease");
    s.operator.kill();
    // Renewed after the kill only by the process started again.
    s.operator.restart();
    let after = eventually(
        "the restarted replica renews the lease",
        WAIT,
        POLL,
        || async { s.lease_renewed().await.filter(|renewed| *renewed > before) },
    )
    .await;
    let waited = after.duration_since(before);
    println!("FIGURE: renewed {waited:?} after the last renewal of the killed process");
    assert!(
        waited >= jiff::SignedDuration::try_from(lease_duration).expect("a duration"),
        "the restarted replica took its own lease over {waited:?} after its last renewal, before it ran out ({lease_duration:?}); its log:\n{}",
        s.operator.log()
    );
    assert!(
        s.operator
            .log()
            .contains("the lease names this identity from an earlier process"),
        "{}",
        s.operator.log()
    );
    assert_eq!(s.lease_holder().await.as_deref(), Some(FIRST_REPLICA));
}

/// SIGTERM before the caches have synced (the apiserver unreachable from the start): nothing is
/// under way, and the operator exits at once rather than waiting for reconciles that cannot start
/// (the controllers hold them until the caches sync, which their stopped watches never do).
#[tokio::test(flavor = "multi_thread")]
async fn a_sigterm_before_the_caches_sync_ends_the_operator_at_once() {
    let mut s = Scenario::with(Setup {
        api_proxy: true,
        api_frozen: true,
        ..Setup::default()
    })
    .await;
    assert_eq!(s.operator.wait_ok("/healthz").await, "ok");
    s.operator.send_sigterm().expect("the operator runs");
    let asked = Instant::now();
    // A hang is seen as a timeout here rather than as a test that never ends.
    let status = loop {
        if let Some(status) = s.operator.exited() {
            break status;
        }
        assert!(
            asked.elapsed() < WAIT,
            "the operator still runs {WAIT:?} after SIGTERM:\n{}",
            s.operator.log()
        );
        tokio::time::sleep(POLL).await;
    };
    let took = asked.elapsed();
    assert!(status.success(), "the operator exited with {status}");
    println!("FIGURE: exit {took:?} after SIGTERM with the caches never synced");
    let log = s.operator.log();
    assert!(
        log.contains("controllers stopped while waiting for their caches: nothing was under way"),
        "{log}"
    );
    assert!(!log.contains("caches synced"), "{log}");
    s.api().thaw();
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_report_health_readiness_and_metrics() {
    let mut s = Scenario::with(Setup {
        deadline: "5s",
        ..Setup::default()
    })
    .await;
    let address = s.operator.http_address();

    assert_eq!(s.operator.wait_ok("/healthz").await, "ok");
    assert_eq!(s.operator.wait_ok("/readyz").await, "ready");
    assert_eq!(
        http_get(address, "/nothing-here")
            .await
            .map(|(code, _)| code),
        Some(404)
    );

    let volume = s.volume("rt-volume", "disk-1", json!({})).await;
    let (name, _) = s.attach("rt-attachment", &volume, "node-a").await;
    // The gauges are computed from the caches at each scrape: wait until the cache has caught up.
    let scrape = eventually(
        "the metrics show one Attached attachment",
        WAIT,
        POLL,
        || async {
            let scrape = s.operator.scrape().await;
            // A reconcile is counted when it returns, a moment after its write reached the cache;
            // the Volume's waits for its turn while an attachment of it is being attached.
            (scrape.sum("safedetach_attachments", &[("phase", "Attached")]) == 1.0
                && scrape.sum(
                    "safedetach_reconciles_total",
                    &[("kind", "VolumeAttachment")],
                ) >= 1.0
                && scrape.sum("safedetach_reconciles_total", &[("kind", "Volume")]) >= 1.0)
                .then_some(scrape)
        },
    )
    .await;
    // Force-detach series exist from the start, at zero, so that alerts see the first one;
    // reconcile errors appear with their first sample. None forced and none failed yet.
    for family in ["safedetach_force_detaches", "safedetach_force_detach_calls"] {
        assert!(scrape.has_family(family), "no {family} in:\n{}", scrape.0);
        assert_eq!(
            scrape.sum(&format!("{family}_total"), &[]),
            0.0,
            "{}",
            scrape.0
        );
    }
    assert_eq!(
        scrape.samples("safedetach_force_detaches_total").len(),
        4,
        "one series per reason:\n{}",
        scrape.0
    );
    assert!(
        !scrape.has_family("safedetach_reconcile_errors"),
        "{}",
        scrape.0
    );
    for family in [
        "safedetach_driver_call_duration_seconds",
        "safedetach_reconciles",
        "safedetach_attachments",
        "safedetach_stuck_attachments",
        "safedetach_oldest_stuck_attachment_seconds",
        "safedetach_orphans",
    ] {
        assert!(scrape.has_family(family), "no {family} in:\n{}", scrape.0);
    }
    assert_eq!(
        scrape.samples("safedetach_attachments").len(),
        1,
        "{}",
        scrape.0
    );
    assert_eq!(scrape.sum("safedetach_stuck_attachments", &[]), 0.0);
    assert_eq!(
        scrape.sum("safedetach_oldest_stuck_attachment_seconds", &[]),
        0.0
    );
    assert_eq!(scrape.sum("safedetach_orphans", &[]), 0.0);
    let call = |operation| {
        [
            ("driver", "nbd"),
            ("operation", operation),
            ("result", "ok"),
        ]
    };
    assert!(
        scrape.sum(
            "safedetach_driver_call_duration_seconds_count",
            &call("attach")
        ) >= 1.0
    );
    assert!(
        scrape.sum(
            "safedetach_driver_call_duration_seconds_count",
            &call("probe")
        ) >= 1.0
    );
    let attach_seconds = scrape.sum(
        "safedetach_driver_call_duration_seconds_sum",
        &call("attach"),
    );
    assert!(
        attach_seconds > 0.0 && attach_seconds < 5.0,
        "{attach_seconds}"
    );
    assert!(
        scrape.sum(
            "safedetach_reconciles_total",
            &[("kind", "VolumeAttachment")]
        ) >= 1.0
    );
    assert!(scrape.sum("safedetach_reconciles_total", &[("kind", "Volume")]) >= 1.0);
    println!(
        "FIGURE: attach call {:.1} ms on qemu-storage-daemon",
        attach_seconds * 1000.0
    );

    // A requested force-detach is counted by reason and result.
    let token = "metrics-1";
    s.attachments
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { FORCE_DETACH_ANNOTATION: token } } }),
            ),
        )
        .await
        .expect("annotate");
    eventually(
        "the force-detach is confirmed and the volume re-attached",
        WAIT,
        POLL,
        || async {
            let attachment = s.attachments.get(&name).await.ok()?;
            let force = attachment.status.as_ref()?.force_detach.as_ref()?;
            (force.token.as_deref() == Some(token)
                && force.state == ForceDetachState::Succeeded
                && attached(&attachment))
            .then_some(())
        },
    )
    .await;
    let scrape = s.operator.scrape().await;
    assert_eq!(
        scrape.sum(
            "safedetach_force_detaches_total",
            &[("reason", "Requested")]
        ),
        1.0,
        "{}",
        scrape.0
    );
    assert!(
        scrape.sum(
            "safedetach_driver_call_duration_seconds_count",
            &call("force_detach")
        ) >= 1.0
    );
    assert_eq!(
        scrape.sum(
            "safedetach_reconcile_errors_total",
            &[("reason", "KubeApi")]
        ),
        0.0
    );

    // The backend goes away: the acting replica is no longer ready, and says which driver.
    s.qsd.stop();
    let why = eventually(
        "/readyz reports the unreachable driver",
        WAIT,
        POLL,
        || async {
            http_get(address, "/readyz")
                .await
                .filter(|(code, _)| *code == 503)
                .map(|(_, body)| body)
        },
    )
    .await;
    assert!(why.contains("drivers unreachable: nbd"), "{why}");
    assert_eq!(
        s.operator.wait_ok("/healthz").await,
        "ok",
        "alive all the same"
    );
}

/// The operator's ClusterRole from deploy/rbac.yaml, renamed, without `patch` on
/// volumeattachments/status.
async fn cluster_role_without_attachment_status(name: &str) -> Value {
    let file = Path::new(REPO).join("deploy/rbac.yaml");
    let rendered = kubectl(&[
        "create",
        "--dry-run=client",
        "-o",
        "json",
        "-f",
        file.to_str().expect("a UTF-8 path"),
    ])
    .await;
    // One JSON document per object.
    let mut role = serde_json::Deserializer::from_str(&rendered)
        .into_iter::<Value>()
        .map(|item| item.expect("kubectl prints JSON"))
        .find(|item| item["kind"] == "ClusterRole")
        .expect("deploy/rbac.yaml has a ClusterRole");
    role["metadata"] = json!({ "name": name });
    let mut removed = false;
    for rule in role["rules"].as_array_mut().expect("rules") {
        let resources = rule["resources"].as_array_mut().expect("resources");
        let before = resources.len();
        resources.retain(|r| r != "volumeattachments/status");
        removed |= resources.len() < before;
    }
    assert!(
        removed,
        "deploy/rbac.yaml grants patch on volumeattachments/status"
    );
    role
}

/// The admin's kubeconfig, impersonating `user` (kubeconfig `as:`), written to `dir`.
async fn kubeconfig_as(user: &str, dir: &Path) -> PathBuf {
    let mut kubeconfig =
        Kubeconfig::read_from(admin_kubeconfig().await).expect("read the admin kubeconfig");
    for named in &mut kubeconfig.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            auth.impersonate = Some(user.to_owned());
        }
    }
    let path = dir.join("kubeconfig");
    // JSON is YAML: kubeconfig readers take it as it is.
    std::fs::write(
        &path,
        serde_json::to_string(&kubeconfig).expect("encode the kubeconfig"),
    )
    .expect("write the kubeconfig");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_permission_is_reported_not_a_silent_stall() {
    let client = support::cluster::admin_client().await;
    let user = unique_name("safe-detach-without-status");
    let roles = Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone());
    let role = cluster_role_without_attachment_status(&user).await;
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(role).expect("a ClusterRole"),
        )
        .await
        .expect("create the ClusterRole");
    let bindings = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client);
    let binding = json!({
        "metadata": { "name": user },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user }],
    });
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(binding).expect("a ClusterRoleBinding"),
        )
        .await
        .expect("create the ClusterRoleBinding");

    let dir = tempfile::tempdir().expect("a folder for the kubeconfig");
    let mut s = Scenario::with(Setup {
        deadline: "5s",
        kubeconfig: Some(kubeconfig_as(&user, dir.path()).await),
        ..Setup::default()
    })
    .await;
    s.clean_up("ClusterRole", user.clone());
    s.clean_up("ClusterRoleBinding", user.clone());
    assert_eq!(s.operator.wait_ok("/readyz").await, "ready");

    let volume = s.volume("rt-volume", "disk-1", json!({})).await;
    let name = s.attachment("rt-attachment", &volume, "node-a").await;
    // What the person reading the operator's log is told: the verb and the resource refused.
    let expected = format!(
        "User \"{user}\" cannot patch resource \"volumeattachments/status\" in API group \
         \"safedetach.io\""
    );
    let line = eventually(
        "the log names the forbidden verb and resource",
        WAIT,
        POLL,
        || async {
            s.operator
                .log()
                .lines()
                .find(|line| line.contains("reconcile failed") && line.contains(&expected))
                .map(str::to_owned)
        },
    )
    .await;
    println!("FIGURE: the operator logs: {line}");
    let errors = async || {
        s.operator.scrape().await.sum(
            "safedetach_reconcile_errors_total",
            &[("kind", "VolumeAttachment"), ("reason", "KubeApi")],
        )
    };
    let first = eventually("the error is counted", WAIT, POLL, || async {
        Some(errors().await).filter(|n| *n > 0.0)
    })
    .await;
    // Retried with backoff, not given up on: the count keeps growing.
    eventually("the failing reconcile is retried", WAIT, POLL, || async {
        (errors().await > first).then_some(())
    })
    .await;

    // The intent could not be recorded, so the backend was never asked to attach.
    let attachment = s.get_attachment(&name).await.expect("the attachment");
    assert!(
        attachment
            .finalizers()
            .iter()
            .any(|f| f == ATTACHMENT_FINALIZER),
        "the finalizer (a patch it may make) is in place"
    );
    assert_eq!(
        attachment.status.as_ref().and_then(|s| s.phase),
        None,
        "nothing was recorded"
    );
    assert_eq!(s.qsd.export_ids().await, Vec::<String>::new());
}

/// deploy/ as an administrator installs it: it renders, the apiserver accepts every object (a
/// server-side dry run), the CSI component and the examples render, and both driver
/// configurations are read by the operator's own parser.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_renders_and_the_apiserver_accepts_it() {
    let deploy = Path::new(REPO).join("deploy");
    let base = kubectl(&["kustomize", deploy.to_str().expect("a UTF-8 path")]).await;
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
        "CustomResourceDefinition",
    ] {
        assert!(
            base.contains(&format!("\nkind: {kind}\n")),
            "no {kind} in deploy/"
        );
    }
    assert!(
        !base.contains("\nkind: Volume\n"),
        "example Volumes are not in the base"
    );
    let applied = kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-k",
        deploy.to_str().expect("a UTF-8 path"),
    ])
    .await;
    // One line per object, each accepted.
    let objects = base.split("\n---\n").count();
    assert_eq!(applied.lines().count(), objects, "{applied}");
    assert!(
        applied
            .lines()
            .all(|line| line.ends_with("(server dry run)")),
        "{applied}"
    );

    // The CSI component, through an overlay as a user would write it (inside the repository:
    // kustomize refuses absolute paths).
    let inside = Path::new(REPO).join("target");
    std::fs::create_dir_all(&inside).expect("a folder inside the repository");
    let overlay = tempfile::tempdir_in(&inside).expect("an overlay folder");
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        "resources: [../../deploy]\ncomponents: [../../deploy/csi-sidecar]\n",
    )
    .expect("write the overlay");
    let csi = kubectl(&["kustomize", overlay.path().to_str().expect("a UTF-8 path")]).await;
    for expected in [
        "name: csi-plugin",
        "endpoint: unix:///csi/csi.sock",
        "mountPath: /csi",
    ] {
        assert!(csi.contains(expected), "no {expected:?} in the CSI layout");
    }
    for gone in ["/run/qsd", "nbd-backend", "hostPath"] {
        assert!(!csi.contains(gone), "{gone:?} left in the CSI layout");
    }
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-k",
        overlay.path().to_str().expect("a UTF-8 path"),
    ])
    .await;
    // The overlay docs/operations.md gives for clusters that do not serve MutatingAdmissionPolicy
    // v1: the base without the volume-hold policy, and nothing else left out.
    let operations = std::fs::read_to_string(Path::new(REPO).join("docs/operations.md"))
        .expect("docs/operations.md");
    let before_1_36 = operations
        .split("```yaml\n# kustomization.yaml of an overlay for Kubernetes 1.30 to 1.35\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/operations.md gives the overlay for Kubernetes 1.30 to 1.35");
    let overlay = tempfile::tempdir_in(&inside).expect("an overlay folder");
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        before_1_36.replace("- deploy/", "- ../../deploy/"),
    )
    .expect("write the overlay");
    let older = kubectl(&["kustomize", overlay.path().to_str().expect("a UTF-8 path")]).await;
    assert!(!older.contains("kind: MutatingAdmissionPolicy"), "{older}");
    assert_eq!(
        older.split("\n---\n").count(),
        objects - 2,
        "only the policy and its binding are left out"
    );
    let examples = kubectl(&[
        "kustomize",
        deploy.join("examples").to_str().expect("UTF-8"),
    ])
    .await;
    assert_eq!(examples.matches("kind: VolumeAttachment").count(), 2);

    // The driver configurations, read by the operator's parser. The nbd image folder must exist
    // and the CSI plugin must answer for a driver to load: a failure there means the file parsed.
    let observer = Arc::new(Metrics::default());
    let images = tempfile::tempdir().expect("an image folder");
    let nbd = std::fs::read_to_string(deploy.join("operator.yaml"))
        .expect("deploy/operator.yaml")
        .replace(
            "/var/lib/safe-detach/images",
            images.path().to_str().expect("UTF-8"),
        );
    let config = Config::parse(&nbd, observer.clone())
        .await
        .unwrap_or_else(|e| panic!("deploy/operator.yaml: {e}"));
    assert_eq!(config.drivers.keys().collect::<Vec<_>>(), ["nbd"]);
    assert_eq!(config.default_stuck_after, Duration::from_secs(120));
    assert_eq!(config.concurrency, 16);
    let none_at_once = nbd.replace("concurrency: 16", "concurrency: 0");
    match Config::parse(&none_at_once, observer.clone()).await {
        Err(error @ ConfigError::Concurrency(0)) => {
            assert_eq!(
                error.to_string(),
                "concurrency: 0 is not between 1 and 1024"
            );
        }
        Err(other) => panic!("concurrency: 0 refused for another reason: {other}"),
        Ok(_) => panic!("concurrency: 0 accepted"),
    }
    let csi = std::fs::read_to_string(deploy.join("csi-sidecar/operator.yaml"))
        .expect("deploy/csi-sidecar/operator.yaml");
    match Config::parse(&csi, observer).await {
        Err(ConfigError::Driver { name, .. }) => assert_eq!(name, "csi"),
        Err(other) => panic!("deploy/csi-sidecar/operator.yaml: {other}"),
        Ok(_) => panic!("a CSI plugin answered on /csi/csi.sock on this machine"),
    }
}
