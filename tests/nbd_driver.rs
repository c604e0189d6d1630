//! The `nbd` driver against a real `qemu-storage-daemon`, with real NBD clients (`qemu-io`) and a
//! fault-injecting proxy for the failures a daemon cannot make on demand.

mod support;

use safe_detach::driver::nbd::{NbdConfig, NbdDriver};
use safe_detach::driver::{AttachRequest, Connections, Deadlined, Driver, DriverError, ErrorClass};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::qmp_proxy::{Fault, QmpProxy};
use support::qsd::{NbdClient, Qsd, ReadOutcome};

fn driver(config: NbdConfig) -> NbdDriver {
    NbdDriver::new(config).expect("valid configuration")
}

fn request(volume: &str, node: &str) -> AttachRequest {
    AttachRequest {
        volume_handle: volume.into(),
        node: node.into(),
        connector: BTreeMap::new(),
        read_only: false,
        exclusive: false,
    }
}

fn export(volume: &str, node: &str) -> String {
    format!("sd_{volume}__{node}")
}

/// A daemon with the images `vol1` and `vol2`, and a driver for it.
fn setup() -> (Qsd, NbdDriver) {
    let qsd = Qsd::start();
    qsd.create_image("vol1");
    qsd.create_image("vol2");
    let driver = driver(qsd.config());
    (qsd, driver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_exports_the_volume_and_probe_shows_the_node() {
    let (qsd, driver) = setup();
    assert_eq!(driver.kind(), "nbd");
    assert_eq!(driver.probe("vol1").await, Ok(Connections::default()));

    let info = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach");
    let name = export("vol1", "node-a");
    assert_eq!(
        info["uri"],
        format!("nbd+unix:///{name}?socket={}", qsd.nbd_socket().display())
    );
    assert_eq!(info["exportName"], name);
    assert_eq!(qsd.export_ids().await, [name.as_str()]);
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
    assert_eq!(
        driver.probe("vol2").await,
        Ok(Connections::default()),
        "another volume is untouched"
    );

    // The connection info is what a node really uses.
    let mut client = NbdClient::connect_uri(&info["uri"])
        .await
        .expect("an NBD client reaches the export");
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_twice_is_idempotent() {
    let (qsd, driver) = setup();
    let first = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach");
    let second = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach again");
    assert_eq!(first, second);
    assert_eq!(qsd.export_ids().await, [export("vol1", "node-a")]);
    assert_eq!(qsd.block_nodes().await, ["sd-vol1"]);
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_can_hold_writable_exports_of_one_volume() {
    let (qsd, driver) = setup();
    let a = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach to node-a");
    let b = driver
        .attach(&request("vol1", "node-b"))
        .await
        .expect("attach to node-b");
    assert_ne!(a["uri"], b["uri"]);
    assert_eq!(
        driver.probe("vol1").await,
        Ok(Connections::to(["node-a", "node-b"]))
    );
    assert_eq!(
        qsd.block_nodes().await,
        ["sd-vol1"],
        "one block node serves both exports"
    );

    let mut client_a = NbdClient::connect_uri(&a["uri"])
        .await
        .expect("client on node-a");
    let mut client_b = NbdClient::connect_uri(&b["uri"])
        .await
        .expect("client on node-b");
    assert_eq!(client_a.read().await, ReadOutcome::Ok);
    assert_eq!(client_b.read().await, ReadOutcome::Ok);

    // Cutting node-a off leaves node-b connected and the block node in place.
    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("force_detach node-a");
    assert_eq!(client_a.read().await, ReadOutcome::IoError);
    assert_eq!(client_b.read().await, ReadOutcome::Ok);
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-b"])));
    assert_eq!(qsd.block_nodes().await, ["sd-vol1"]);

    client_b.close().await;
    driver
        .terminate_connection("vol1", "node-b")
        .await
        .expect("terminate node-b once its client left");
    driver
        .detach("vol1", "node-b")
        .await
        .expect("detach node-b");
    assert_eq!(driver.probe("vol1").await, Ok(Connections::default()));
    assert!(
        qsd.block_nodes().await.is_empty(),
        "the last detach releases the block node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_refuses_while_a_client_holds_the_export() {
    let (qsd, driver) = setup();
    let info = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach");
    let mut client = NbdClient::connect_uri(&info["uri"]).await.expect("client");

    let refused = driver.terminate_connection("vol1", "node-a").await;
    let Err(error @ DriverError::InUse { .. }) = &refused else {
        panic!("expected InUse, got {refused:?}")
    };
    assert_eq!(error.class(), ErrorClass::Retryable);
    assert!(error.to_string().contains("still in use"), "{error}");
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
    assert_eq!(
        client.read().await,
        ReadOutcome::Ok,
        "the client was not cut off"
    );

    // Detach does not release a block node an export still uses.
    driver
        .detach("vol1", "node-a")
        .await
        .expect("detach with the export left");
    assert_eq!(qsd.block_nodes().await, ["sd-vol1"]);
    assert_eq!(client.read().await, ReadOutcome::Ok);

    // Once the client has gone, the safe path works and is idempotent.
    client.close().await;
    driver
        .terminate_connection("vol1", "node-a")
        .await
        .expect("terminate");
    assert!(
        qsd.export_ids().await.is_empty(),
        "terminate returns only once the export is gone"
    );
    assert_eq!(
        driver.terminate_connection("vol1", "node-a").await,
        Err(DriverError::NotConnected {
            volume: "vol1".into(),
            node: "node-a".into()
        })
    );
    driver.detach("vol1", "node-a").await.expect("detach");
    driver.detach("vol1", "node-a").await.expect("detach again");
    assert!(qsd.block_nodes().await.is_empty());
    assert_eq!(driver.probe("vol1").await, Ok(Connections::default()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_detach_cuts_the_client_off() {
    let (qsd, driver) = setup();
    let info = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach");
    let mut client = NbdClient::connect_uri(&info["uri"]).await.expect("client");

    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("force_detach");
    assert_eq!(
        client.read().await,
        ReadOutcome::IoError,
        "the client's next read fails"
    );
    assert_eq!(driver.probe("vol1").await, Ok(Connections::default()));
    assert!(qsd.export_ids().await.is_empty());
    assert!(
        qsd.block_nodes().await.is_empty(),
        "force_detach also releases the block node"
    );

    // The volume can be attached again from a clean state.
    let again = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach after force_detach");
    assert_eq!(again, info);
    let mut fresh = NbdClient::connect_uri(&again["uri"])
        .await
        .expect("a new client");
    assert_eq!(fresh.read().await, ReadOutcome::Ok);
    fresh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_detach_of_a_detached_volume_succeeds_and_changes_nothing() {
    let (qsd, driver) = setup();
    let other = driver
        .attach(&request("vol2", "node-a"))
        .await
        .expect("attach vol2");
    let mut client = NbdClient::connect_uri(&other["uri"])
        .await
        .expect("client of vol2");
    let before = (qsd.export_ids().await, qsd.block_nodes().await);

    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("force_detach of a never attached volume");
    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("and again");
    // vol2's export on the same node is another volume's: untouched.
    driver
        .force_detach("vol1", "node-b")
        .await
        .expect("another node");

    assert_eq!((qsd.export_ids().await, qsd.block_nodes().await), before);
    assert_eq!(client.read().await, ReadOutcome::Ok);
    assert_eq!(driver.probe("vol2").await, Ok(Connections::to(["node-a"])));
    assert_eq!(driver.probe("vol1").await, Ok(Connections::default()));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_volumes_and_invalid_names_are_final_errors() {
    let (qsd, driver) = setup();
    let unknown = driver.attach(&request("missing", "node-a")).await;
    assert_eq!(unknown, Err(DriverError::UnknownVolume("missing".into())));
    assert_eq!(
        driver.probe("missing").await,
        Err(DriverError::UnknownVolume("missing".into()))
    );

    for (volume, node) in [
        ("vol1", "Node_A"),
        ("vol1", "node_a"),
        ("vol1", ""),
        ("../vol1", "node-a"),
        ("vol_1", "node-a"),
    ] {
        let attach = driver.attach(&request(volume, node)).await;
        assert!(
            matches!(attach, Err(DriverError::Invalid(_))),
            "attach {volume:?} {node:?}: {attach:?}"
        );
        let force = driver.force_detach(volume, node).await;
        assert!(
            matches!(force, Err(DriverError::Invalid(_))),
            "force_detach {volume:?} {node:?}: {force:?}"
        );
        assert_eq!(force.unwrap_err().class(), ErrorClass::Final);
    }
    assert!(matches!(
        driver.probe("a/b").await,
        Err(DriverError::Invalid(_))
    ));
    assert!(
        qsd.export_ids().await.is_empty(),
        "nothing reached the daemon"
    );
    assert!(qsd.block_nodes().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_attach_reply_is_an_unknown_outcome_and_the_probe_tells_the_truth() {
    let qsd = Qsd::start();
    qsd.create_image("vol1");
    let proxy = QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await;
    let driver = driver(qsd.config_via(proxy.socket()));

    proxy.arm("block-export-add", Fault::DropReply);
    let lost = driver.attach(&request("vol1", "node-a")).await;
    let Err(
        error @ DriverError::LostReply {
            operation: "attach",
            ..
        },
    ) = &lost
    else {
        panic!("expected LostReply, got {lost:?}")
    };
    assert_eq!(error.class(), ErrorClass::UnknownOutcome);
    assert_eq!(proxy.fired(), 1);

    // The command did run: the export exists, and the probe (through the same proxy) says so.
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
    assert_eq!(qsd.export_ids().await, [export("vol1", "node-a")]);
    // Attaching again after the unknown outcome converges on the existing export.
    let info = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach again");
    assert_eq!(info["exportName"], export("vol1", "node-a"));
    assert_eq!(qsd.export_ids().await, [export("vol1", "node-a")]);

    // A lost reply to a hard delete: the export is gone all the same, and force_detach is
    // idempotent, so calling it again settles the question.
    proxy.arm("block-export-del", Fault::DropReply);
    let lost = driver.force_detach("vol1", "node-a").await;
    assert!(
        matches!(
            lost,
            Err(DriverError::LostReply {
                operation: "force_detach",
                ..
            })
        ),
        "{lost:?}"
    );
    assert_eq!(driver.probe("vol1").await, Ok(Connections::default()));
    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("force_detach again");
    assert_eq!(proxy.fired(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_reply_past_the_deadline_is_a_timeout() {
    let qsd = Qsd::start();
    qsd.create_image("vol1");
    let proxy = QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await;
    let deadline = Duration::from_millis(500);
    let driver = Deadlined::new(Arc::new(driver(qsd.config_via(proxy.socket()))), deadline);

    proxy.arm(
        "block-export-add",
        Fault::DelayReply(Duration::from_secs(3)),
    );
    let started = tokio::time::Instant::now();
    let timed_out = driver.attach(&request("vol1", "node-a")).await;
    assert_eq!(
        timed_out,
        Err(DriverError::Timeout {
            operation: "attach",
            deadline
        })
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "gave up at the deadline, not after the delay"
    );
    assert_eq!(timed_out.unwrap_err().class(), ErrorClass::UnknownOutcome);
    assert_eq!(proxy.fired(), 1);

    // The daemon carried the command out; only its answer was late.
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_daemon_is_retryable_and_nothing_happens() {
    let qsd = Qsd::start();
    qsd.create_image("vol1");
    let proxy = QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await;
    let driver = driver(qsd.config_via(proxy.socket()));

    proxy.set_refusing(true).await;
    let refused = driver.attach(&request("vol1", "node-a")).await;
    let Err(error @ DriverError::Unreachable(_)) = &refused else {
        panic!("expected Unreachable, got {refused:?}")
    };
    assert_eq!(error.class(), ErrorClass::Retryable);
    assert!(matches!(
        driver.probe("vol1").await,
        Err(DriverError::Unreachable(_))
    ));
    assert!(matches!(
        driver.force_detach("vol1", "node-a").await,
        Err(DriverError::Unreachable(_))
    ));
    assert!(qsd.export_ids().await.is_empty(), "nothing was sent");

    proxy.set_refusing(false).await;
    driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach once the daemon is reachable");
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_is_not_running_is_unreachable() {
    let qsd = Qsd::start();
    let driver = driver(NbdConfig {
        qmp_socket: qsd.dir().join("nobody.sock"),
        ..qsd.config()
    });
    assert!(matches!(
        driver.probe("vol1").await,
        Err(DriverError::Unreachable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_attachments_get_a_read_only_export() {
    let (qsd, driver) = setup();
    let info = driver
        .attach(&AttachRequest {
            read_only: true,
            ..request("vol1", "node-a")
        })
        .await
        .expect("read-only attach");
    // QEMU's NBD client refuses to open a read-only export for writing.
    let writer = NbdClient::connect_uri(&info["uri"]).await;
    assert!(writer.is_err(), "a read-write client was let in");
    let mut reader = NbdClient::connect_uri_read_only(&info["uri"])
        .await
        .expect("read-only client");
    assert_eq!(reader.read().await, ReadOutcome::Ok);
    reader.close().await;
    assert_eq!(qsd.export_ids().await, [export("vol1", "node-a")]);
}

#[test]
fn configuration_errors_name_the_field() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let config = NbdConfig {
        qmp_socket: dir.path().join("qmp.sock"),
        nbd_socket: dir.path().join("nbd.sock"),
        image_dir: dir.path().join("missing"),
    };
    let error = NbdDriver::new(config).expect_err("a missing image folder");
    assert!(error.to_string().starts_with("imageDir: "), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_the_single_client_monitor() {
    let (qsd, driver) = setup();
    let driver = Arc::new(driver);
    let nodes: Vec<String> = (0..8).map(|i| format!("node-{i}")).collect();
    let calls = nodes.iter().map(|node| {
        let driver = driver.clone();
        let node = node.clone();
        tokio::spawn(async move { driver.attach(&request("vol1", &node)).await })
    });
    for result in futures::future::join_all(calls).await {
        result.expect("task").expect("attach");
    }
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(&nodes)));
    assert_eq!(qsd.block_nodes().await, ["sd-vol1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handles_get_a_hashed_block_node_that_still_works() {
    let (qsd, driver) = setup();
    let handle = format!("pvc-{}", "0123456789abcdef".repeat(3));
    qsd.create_image(&handle);
    let info = driver
        .attach(&request(&handle, "node-a"))
        .await
        .expect("attach");
    let nodes = qsd.block_nodes().await;
    assert_eq!(nodes.len(), 1);
    assert!(
        nodes[0].starts_with("sd_") && nodes[0].len() <= 31,
        "{nodes:?}"
    );
    assert_eq!(driver.probe(&handle).await, Ok(Connections::to(["node-a"])));
    let mut client = NbdClient::connect_uri(&info["uri"]).await.expect("client");
    assert_eq!(client.read().await, ReadOutcome::Ok);
    client.close().await;
    driver
        .force_detach(&handle, "node-a")
        .await
        .expect("force_detach");
    assert!(qsd.block_nodes().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_node_of_the_volume_name_serving_another_file_is_never_exported() {
    let (qsd, driver) = setup();
    // Someone else's node under the name the driver would give vol1, opened on vol2's image.
    let vol2 = qsd.image_dir().join("vol2");
    qsd.qmp(
        "blockdev-add",
        serde_json::json!({"driver": "raw", "node-name": "sd-vol1", "file": {"driver": "file", "filename": vol2}}),
    )
    .await
    .expect("blockdev-add");
    let refused = driver.attach(&request("vol1", "node-a")).await;
    let Err(DriverError::Refused(message)) = &refused else {
        panic!("expected Refused, got {refused:?}")
    };
    assert!(message.contains("serves"), "{message}");
    assert!(
        qsd.export_ids().await.is_empty(),
        "the wrong disk was not handed out"
    );
}

/// Exports vol1's block node under an id this driver does not give, as a person might by hand.
async fn export_by_hand(qsd: &Qsd) {
    qsd.qmp(
        "block-export-add",
        serde_json::json!({
            "type": "nbd", "id": "by-hand", "node-name": "sd-vol1", "name": "by-hand",
        }),
    )
    .await
    .expect("an export by hand");
}

fn exclusive(volume: &str, node: &str) -> AttachRequest {
    AttachRequest {
        exclusive: true,
        ..request(volume, node)
    }
}

/// A single-attach volume held by one node is refused to another, and the refusal names the
/// holder; the holder's own attach stays idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_attach_is_refused_while_another_node_holds_the_volume() {
    let (qsd, driver) = setup();
    driver
        .attach(&exclusive("vol1", "node-a"))
        .await
        .expect("attach to node-a");
    assert_eq!(
        driver.attach(&exclusive("vol1", "node-b")).await,
        Err(DriverError::HeldElsewhere {
            volume: "vol1".into(),
            holders: vec!["node-a".into()],
        })
    );
    assert_eq!(qsd.export_ids().await, [export("vol1", "node-a")]);
    driver
        .attach(&exclusive("vol1", "node-a"))
        .await
        .expect("the holder's attach is idempotent");
    // Another volume is not held by it.
    driver
        .attach(&exclusive("vol2", "node-b"))
        .await
        .expect("attach vol2 to node-b");
}

/// An export of the volume's block node that this driver did not make (added by hand, under
/// another id) holds the volume just the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_made_by_hand_holds_the_volume_against_an_exclusive_attach() {
    let (qsd, driver) = setup();
    driver
        .attach(&exclusive("vol1", "node-a"))
        .await
        .expect("attach to node-a");
    export_by_hand(&qsd).await;
    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("force node-a off");
    assert_eq!(
        driver.attach(&exclusive("vol1", "node-b")).await,
        Err(DriverError::HeldElsewhere {
            volume: "vol1".into(),
            holders: vec!["export by-hand".into()],
        })
    );
}

/// Exclusive attaches of one volume to many nodes at once, from two drivers that share nothing
/// but the daemon (as two operator replicas would): exactly one wins, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_exclusive_attaches_from_two_drivers_connect_exactly_one_node() {
    let (qsd, first) = setup();
    let second = driver(qsd.config());
    for round in 0..10 {
        let handle = format!("race{round}");
        qsd.create_image(&handle);
        let nodes = ["node-a", "node-b", "node-c", "node-d"];
        let attaches = nodes.iter().enumerate().map(|(i, node)| {
            let driver = if i % 2 == 0 { &first } else { &second };
            let request = exclusive(&handle, node);
            async move { driver.attach(&request).await }
        });
        let results = futures::future::join_all(attaches).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(DriverError::HeldElsewhere { .. })))
            .count();
        assert_eq!(
            (won, refused),
            (1, nodes.len() - 1),
            "round {round}: {results:?}"
        );
        let exports: Vec<String> = qsd
            .export_ids()
            .await
            .into_iter()
            .filter(|id| id.starts_with(&format!("sd_{handle}__")))
            .collect();
        assert_eq!(exports.len(), 1, "round {round}: {exports:?}");
    }
}

/// An export of the volume's block node under a name this driver does not give names no node:
/// the probe reports it as unattributed, never as "connected nowhere".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_made_by_hand_is_reported_as_unattributed() {
    let (qsd, driver) = setup();
    driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach to node-a");
    export_by_hand(&qsd).await;
    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("force node-a off");
    let connections = driver.probe("vol1").await.expect("probe");
    assert!(connections.nodes.is_empty(), "{connections:?}");
    assert_eq!(
        connections.unattributed,
        std::collections::BTreeSet::from(["by-hand".to_owned()])
    );
    assert_eq!(driver.probe("vol2").await, Ok(Connections::default()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_of_calls_shares_one_connection_and_one_listing() {
    let qsd = Qsd::start();
    let handles: Vec<String> = (0..24).map(|i| format!("wave{i}")).collect();
    for handle in &handles {
        qsd.create_image(handle);
    }
    let proxy = QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await;
    let driver = Arc::new(driver(qsd.config_via(proxy.socket())));
    let wave = |call: &'static str| {
        let driver = driver.clone();
        handles.iter().map(move |handle| {
            let (driver, handle) = (driver.clone(), handle.clone());
            tokio::spawn(async move {
                match call {
                    "attach" => {
                        let mut request = request(&handle, "node-a");
                        request.exclusive = true;
                        driver.attach(&request).await.map(drop)
                    }
                    "probe" => driver
                        .probe(&handle)
                        .await
                        .map(|c| assert_eq!(c, Connections::to(["node-a"]))),
                    _ => driver.force_detach(&handle, "node-a").await,
                }
            })
        })
    };
    for call in ["attach", "probe", "force_detach"] {
        for result in futures::future::join_all(wave(call)).await {
            result
                .expect("task")
                .unwrap_or_else(|e| panic!("{call}: {e}"));
        }
    }
    assert!(
        qsd.export_ids().await.is_empty(),
        "{:?}",
        qsd.export_ids().await
    );
    assert!(
        qsd.block_nodes().await.is_empty(),
        "{:?}",
        qsd.block_nodes().await
    );
    // 72 calls, each of which needs the daemon's exports: the calls waiting for their turn take
    // the connection over from the one before, with its listing, instead of listing again.
    let listings = proxy.calls_of("query-block-exports").len();
    let connections = proxy.calls_of("qmp_capabilities").len();
    assert!(
        listings < 24 && connections < 24,
        "{listings} listings on {connections} connections for 72 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_learns_of_deletions_from_the_daemon() {
    let (qsd, driver) = setup();
    let driver = Arc::new(driver);
    let info = driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach");
    // A client holds the export, so the hard delete's event follows its reply.
    let mut client = NbdClient::connect_uri(&info["uri"]).await.expect("client");
    assert_eq!(client.read().await, ReadOutcome::Ok);
    // Calls keep arriving, so the connection (and what it knows) passes from one to the next.
    let busy = {
        let driver = driver.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                let _ = driver.probe("vol2").await;
            }
        })
    };
    driver
        .force_detach("vol1", "node-a")
        .await
        .expect("force_detach");
    assert_eq!(driver.probe("vol1").await, Ok(Connections::default()));
    assert!(qsd.export_ids().await.is_empty());
    busy.await.expect("probes");
    client.close().await;
}

/// One listing answers for many volumes exactly as a probe of each would: nodes by the driver's
/// own exports, an export made by hand as unattributed, a volume connected nowhere as such, an
/// invalid handle left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_many_answers_each_volume_as_its_probe_does() {
    let (qsd, driver) = setup();
    qsd.create_image("vol3");
    for (volume, node) in [("vol1", "node-a"), ("vol1", "node-b"), ("vol2", "node-c")] {
        driver.attach(&request(volume, node)).await.expect("attach");
    }
    export_by_hand(&qsd).await;
    let handles: Vec<String> = ["vol1", "vol2", "vol3", "not/valid"]
        .map(str::to_owned)
        .to_vec();
    assert!(driver.can_probe_many());
    let answers = driver.probe_many(&handles).await.expect("probe_many");
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["vol1", "vol2", "vol3"],
        "{answers:?}"
    );
    for handle in ["vol1", "vol2", "vol3"] {
        assert_eq!(
            answers[handle],
            driver.probe(handle).await.expect("probe"),
            "{handle}"
        );
    }
    assert_eq!(answers["vol1"].nodes.len(), 2);
    assert!(answers["vol1"].unattributed.contains("by-hand"));
    assert_eq!(answers["vol3"], Connections::default());
}

/// Calls that follow one another milliseconds apart (each after an API write, in a storm)
/// share one connection and one listing: the connection lingers a moment for the next call. Once
/// the driver is idle it closes, and another client of the daemon gets its turn at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_quick_succession_share_a_connection_that_closes_when_idle() {
    let qsd = Qsd::start();
    qsd.create_image("vol1");
    let proxy = QmpProxy::start(&qsd.dir().join("proxy.sock"), &qsd.qmp_socket()).await;
    let driver = driver(qsd.config_via(proxy.socket()));
    driver
        .attach(&request("vol1", "node-a"))
        .await
        .expect("attach");
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
    }
    let connections = proxy.calls_of("qmp_capabilities").len();
    let listings = proxy.calls_of("query-block-exports").len();
    // Without the linger each call would connect and list anew: 11 of each. (A slow machine may
    // let a gap run past the linger now and then, so the bound is not 1.)
    assert!(
        connections < 11 && listings <= connections,
        "11 calls 2 ms apart: {connections} connections, {listings} listings"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    qsd.qmp("query-version", serde_json::json!({}))
        .await
        .expect("another client's turn");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "another client waited {:?} for an idle driver",
        started.elapsed()
    );
    assert_eq!(driver.probe("vol1").await, Ok(Connections::to(["node-a"])));
    assert_eq!(
        proxy.calls_of("qmp_capabilities").len(),
        connections + 1,
        "a new connection"
    );
}
