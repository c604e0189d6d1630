//! The kubectl plugin, end to end: the built `kubectl-safe_detach` binary against the real
//! control plane, a real operator for the scenario's shard and a real `qemu-storage-daemon`.
//! Every check is what a person sees (the plugin's output and exit status) held against what the
//! backend and the objects show: the client's reads, the Events, the recorded tokens. Clocks are
//! those of `support::scenario` (`defaultStuckAfter: 5s`).

mod support;

use safe_detach::api::{AttachmentPhase, FORCE_DETACH_ANNOTATION, ForceDetachState};
use serde_json::{Value, json};
use std::process::Output;
use support::qsd::{NbdClient, ReadOutcome};
use support::scenario::{Scenario, attached, condition, has, phase, show};

const VA: &str = "VolumeAttachment";
const NODE: &str = "node-a";
const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-safe_detach");

/// Runs the plugin as the cluster's admin.
async fn plugin(args: &[&str]) -> Output {
    let kubeconfig = support::cluster::admin_kubeconfig().await;
    tokio::process::Command::new(PLUGIN)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {PLUGIN}: {e}"))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status,
        stdout(output),
        stderr(output)
    )
}

/// Runs the plugin and requires success.
async fn plugin_ok(args: &[&str]) -> String {
    let output = plugin(args).await;
    assert!(
        output.status.success(),
        "kubectl safe-detach {} failed: {}",
        args.join(" "),
        describe(&output)
    );
    stdout(&output)
}

fn uri_of(attachment: &safe_detach::api::VolumeAttachment) -> String {
    attachment
        .status
        .as_ref()
        .and_then(|st| st.connection_info.get("uri").cloned())
        .expect("an NBD URI")
}

/// Case 4 as a person lives it: an attachment deleted while a client holds its export, on a
/// Volume with autoForceDetach off. `status` says it is stuck, why, and what to do; `force
/// --wait` cuts the client off through the backend and prints the confirmed outcome.
#[tokio::test(flavor = "multi_thread")]
async fn status_explains_a_stuck_detach_and_force_wait_confirms_it() {
    let mut s = Scenario::start().await;
    let volume = s
        .volume(
            "plugin-held",
            "plugin-held",
            json!({ "autoForceDetach": false, "stuckAfter": "5s" }),
        )
        .await;
    let (name, attachment) = s.attach("plugin-held", &volume, NODE).await;
    let mut client = NbdClient::connect_uri(&uri_of(&attachment))
        .await
        .expect("a client holds the export");
    let deleted = tokio::time::Instant::now();
    s.delete_attachment(&name).await;
    s.wait_attachment(&name, "Detaching", |a| {
        phase(a) == Some(AttachmentPhase::Detaching)
    })
    .await;

    // Before the deadline: not stuck yet, and the deadline is the Volume's. Checked only when
    // the command ran well inside the 5s (a loaded machine may take longer to get here).
    let early = plugin_ok(&["status", &name]).await;
    if deleted.elapsed() < std::time::Duration::from_secs(4) {
        assert!(
            early.contains("Stuck:") && early.contains("counts as stuck at"),
            "{early}"
        );
    }
    assert!(early.contains("stuckAfter 5s, from the Volume"), "{early}");

    let stuck = s
        .wait_attachment(&name, "Stuck", |a| {
            has(condition(a, "Stuck"), "True", Some("StuckDetaching"))
        })
        .await;
    let detail = plugin_ok(&["status", &name]).await;
    for expected in [
        "Detaching (deleting)",
        "Backend said:",
        "Connected [node-a]",
        "yes, for",
        "autoForceDetach is off for Volume",
        &format!("kubectl safe-detach force {name} --wait"),
        "the backend still shows it connected to node-a",
    ] {
        assert!(
            detail.contains(expected),
            "status does not say {expected:?}:\n{detail}\n{}",
            show(Some(&stuck))
        );
    }
    let json: Value = serde_json::from_str(&plugin_ok(&["status", &name, "-o", "json"]).await)
        .expect("status -o json prints JSON");
    assert_eq!(json["clock"]["stuck"], true, "{json:#}");
    assert_eq!(json["clock"]["source"], "Volume", "{json:#}");
    assert_eq!(json["autoForceDetach"], false, "{json:#}");
    assert!(
        json["advice"]
            .as_str()
            .is_some_and(|a| a.contains("safe-detach force")),
        "{json:#}"
    );
    // The table of several attachments (selected by the shard's label) carries the same advice.
    let table = plugin_ok(&[
        "status",
        "-l",
        &format!("{}={}", support::operator::SHARD_LABEL, s.shard),
    ])
    .await;
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.contains(&format!("{name}: stuck Detaching")),
        "{table}"
    );
    assert_eq!(client.read().await, ReadOutcome::Ok, "nothing forced yet");

    let forced = plugin(&[
        "force",
        &name,
        "--reason",
        "node-a is being drained",
        "--wait",
        "--timeout",
        "30s",
    ])
    .await;
    assert!(forced.status.success(), "{}", describe(&forced));
    let out = stdout(&forced);
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("forced:"))
        .and_then(|l| l.rsplit_once("token "))
        .map(|(_, t)| t.trim().to_owned())
        .unwrap_or_else(|| panic!("no token in the output: {}", describe(&forced)));
    for expected in [
        "Requested by a person: node-a is being drained",
        "confirmed:  the backend confirmed",
        "disconnected from node-a at",
        "not attached again: the attachment was being deleted and is released",
    ] {
        assert!(
            out.contains(expected),
            "force does not say {expected:?}:\n{out}"
        );
    }
    // What it printed is what happened: the client is cut off, the attachment released, and the
    // operator's Event names the token the plugin chose.
    assert_ne!(
        client.read().await,
        ReadOutcome::Ok,
        "the client still reads"
    );
    assert!(s.get_attachment(&name).await.is_none(), "not released");
    s.wait_event(VA, &name, "ForceDetached", &[&token]).await;
}

/// A live attachment forced with an explicit token: forced, confirmed and attached again; the
/// same token is then refused without touching the annotation; a name that does not exist is
/// refused; and with the operator gone, `--wait` gives up with a clear message.
#[tokio::test(flavor = "multi_thread")]
async fn force_refuses_what_cannot_act_and_gives_up_on_time() {
    let mut s = Scenario::start().await;
    let volume = s.volume("plugin-live", "plugin-live", json!({})).await;
    let (name, _) = s.attach("plugin-live", &volume, NODE).await;

    let out = plugin_ok(&[
        "force",
        &name,
        "--token",
        "t1",
        "--wait",
        "--timeout",
        "30s",
        "-o",
        "json",
    ])
    .await;
    let report: Value = serde_json::from_str(&out).expect("force -o json prints JSON");
    assert_eq!(report["token"], "t1", "{report:#}");
    assert_eq!(report["confirmed"]["reason"], "Requested", "{report:#}");
    assert!(report["confirmed"]["finishedAt"].is_string(), "{report:#}");
    assert_eq!(report["afterwards"]["state"], "AttachedAgain", "{report:#}");
    let now = s.get_attachment(&name).await.expect("present");
    let record = now.status.as_ref().and_then(|st| st.force_detach.clone());
    assert!(
        record.is_some_and(
            |f| f.token.as_deref() == Some("t1") && f.state == ForceDetachState::Succeeded
        ),
        "{}",
        show(Some(&now))
    );
    assert!(attached(&now), "{}", show(Some(&now)));

    let again = plugin(&["force", &name, "--token", "t1"]).await;
    assert!(!again.status.success(), "{}", describe(&again));
    assert!(
        stderr(&again).contains("already handled"),
        "{}",
        describe(&again)
    );
    let unchanged = s.get_attachment(&name).await.expect("present");
    assert_eq!(
        unchanged.metadata.resource_version, now.metadata.resource_version,
        "a refused token was written"
    );

    for args in [
        vec!["force", "no-such-attachment", "--wait"],
        vec!["status", "no-such-attachment"],
    ] {
        let missing = plugin(&args).await;
        assert!(!missing.status.success(), "{}", describe(&missing));
        assert!(
            stderr(&missing).contains("\"no-such-attachment\" not found"),
            "{}",
            describe(&missing)
        );
    }

    // No operator to take the request: the wait ends at its timeout, saying so.
    s.operator.kill();
    let started = std::time::Instant::now();
    let late = plugin(&["force", &name, "--wait", "--timeout", "1s"]).await;
    assert!(!late.status.success(), "{}", describe(&late));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the timeout was not kept"
    );
    let message = stderr(&late);
    assert!(
        message.contains("timed out after 1s") && message.contains("has not taken the request"),
        "{}",
        describe(&late)
    );
    let annotated = s.get_attachment(&name).await.expect("present");
    let written = annotated
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FORCE_DETACH_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains(&written) && written != "t1",
        "the message names another token than the one written ({written}): {message}"
    );
}

/// An attachment the operator has not seen yet (no operator serves its shard) is refused: a
/// token found at creation is recorded without acting, so writing one would ask nothing.
#[tokio::test(flavor = "multi_thread")]
async fn force_refuses_an_attachment_the_operator_has_not_seen() {
    let mut objects = support::cluster::TestObjects::default();
    let name = objects.attachment("plugin-unseen");
    let client = support::cluster::admin_client().await;
    let api: kube::Api<safe_detach::api::VolumeAttachment> = kube::Api::all(client);
    let object = json!({
        "apiVersion": "safedetach.io/v1alpha1",
        "kind": "VolumeAttachment",
        "metadata": {
            "name": name,
            "labels": { support::operator::SHARD_LABEL: support::cluster::unique_name("unserved") },
        },
        "spec": { "volumeName": "nowhere", "nodeName": NODE },
    });
    api.patch(
        &name,
        &kube::api::PatchParams::apply("safe-detach-e2e"),
        &kube::api::Patch::Apply(&object),
    )
    .await
    .expect("create the attachment");
    let refused = plugin(&["force", &name]).await;
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        stderr(&refused).contains("has not reconciled this attachment yet"),
        "{}",
        describe(&refused)
    );
    let after = api.get(&name).await.expect("present");
    assert!(
        !after
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(FORCE_DETACH_ANNOTATION),
        "a token was written"
    );
}

/// An export no attachment claims (made behind the operator's back) is listed by `orphans`, with
/// its Volume's policy.
#[tokio::test(flavor = "multi_thread")]
async fn orphans_lists_unclaimed_connections() {
    let mut s = Scenario::start().await;
    let volume = s.volume("plugin-orphan", "plugin-orphan", json!({})).await;
    s.export_out_of_band("plugin-orphan", "node-z", false).await;
    s.wait_for(
        &s.volumes,
        &volume,
        "an orphan on node-z",
        support::scenario::WAIT,
        |v| {
            v.and_then(|v| v.status.as_ref())
                .is_some_and(|st| st.orphans.iter().any(|o| o.node == "node-z"))
        },
    )
    .await;
    let selector = format!("{}={}", support::operator::SHARD_LABEL, s.shard);
    let json: Value =
        serde_json::from_str(&plugin_ok(&["orphans", "-l", &selector, "-o", "json"]).await)
            .expect("orphans -o json prints JSON");
    assert_eq!(
        json.as_array().map(Vec::len),
        Some(1),
        "one orphan in the shard: {json:#}"
    );
    assert_eq!(json[0]["volume"], volume.as_str(), "{json:#}");
    assert_eq!(json[0]["node"], "node-z", "{json:#}");
    assert_eq!(json[0]["orphanPolicy"], "Report", "{json:#}");
    let table = plugin_ok(&["orphans", "-l", &selector]).await;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&volume) && l.contains("node-z") && l.contains("Report")),
        "{table}"
    );
    let yaml = plugin_ok(&["orphans", "-l", &selector, "-o", "yaml"]).await;
    assert!(yaml.contains("node: node-z"), "{yaml}");
    // A context the kubeconfig does not have is refused by name, not replaced by another.
    let elsewhere = plugin(&["--context", "no-such-context", "orphans"]).await;
    assert!(!elsewhere.status.success(), "{}", describe(&elsewhere));
    assert!(
        stderr(&elsewhere).contains("no-such-context"),
        "{}",
        describe(&elsewhere)
    );
    let none = plugin_ok(&["orphans", "-l", "safedetach.io/test-shard=nothing-here"]).await;
    assert!(
        none.starts_with("No orphaned backend connections"),
        "{none}"
    );
}

/// Each command has its help, naming its flags; a bad flag is a usage error.
#[tokio::test]
async fn every_command_has_help() {
    for (command, flags) in [
        ("force", &["--reason", "--wait", "--timeout", "--token"][..]),
        ("status", &["--selector", "--default-stuck-after"][..]),
        ("orphans", &["--selector"][..]),
    ] {
        let help = std::process::Command::new(PLUGIN)
            .args([command, "--help"])
            .output()
            .expect("run the plugin");
        let text = stdout(&help);
        assert!(help.status.success(), "{}", describe(&help));
        for flag in flags
            .iter()
            .chain(&["--kubeconfig", "--context", "--output"])
        {
            assert!(
                text.contains(flag),
                "{command} --help lacks {flag}:\n{text}"
            );
        }
    }
    let bad = std::process::Command::new(PLUGIN)
        .args(["force", "x", "--timeout", "1s"])
        .output()
        .expect("run the plugin");
    assert_eq!(bad.status.code(), Some(2), "{}", describe(&bad));
    assert!(stderr(&bad).contains("--wait"), "{}", describe(&bad));
}

/// The krew manifest installs this binary under the name kubectl looks for, at this version.
#[test]
fn the_krew_manifest_names_this_binary_and_version() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/plugins/safe-detach.yaml"
    ))
    .expect("read plugins/safe-detach.yaml");
    let manifest: Value = serde_saphyr::from_str(&text).expect("the manifest is YAML");
    assert_eq!(manifest["kind"], "Plugin");
    assert_eq!(manifest["metadata"]["name"], "safe-detach");
    assert_eq!(
        manifest["spec"]["version"],
        format!("v{}", env!("CARGO_PKG_VERSION"))
    );
    let platforms = manifest["spec"]["platforms"].as_array().expect("platforms");
    assert!(!platforms.is_empty());
    for platform in platforms {
        assert_eq!(platform["bin"], "kubectl-safe_detach", "{platform:#}");
        let files = platform["files"].as_array().expect("files");
        assert!(
            files.iter().any(|f| f["from"] == "kubectl-safe_detach"),
            "{platform:#}"
        );
    }
}
