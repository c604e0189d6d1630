//! The driver conformance suite: what docs/drivers.md asks of every driver, written once as
//! generic checks over `Arc<dyn Driver>` and run against each real backend through a
//! [`Fixture`].
//!
//! The driver under test is built the way the operator builds it: from a configuration file
//! read by `safe_detach::config::Config`, so it carries the operator's `Deadlined` wrapper and
//! whatever the file says (for CSI, `trustPublishedNodes`). Every claim a check makes about the
//! backend is read from the backend itself ([`Fixture::connected`], [`Fixture::state`]), never
//! from the driver under test; the driver's own probe is compared with it where the driver says
//! it can probe.

use async_trait::async_trait;
use safe_detach::config::{Config, ConfigFile, DriverEntry};
use safe_detach::driver::{
    AttachRequest, CallObserver, Connections, Driver, DriverError, ErrorClass, ok_if_not_connected,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The name the suite gives the driver in the configuration it writes.
const DRIVER_NAME: &str = "under-test";
/// The deadline of every call outside the deadline check: long enough never to fire.
const RELAXED_DEADLINE: &str = "20s";
/// The deadline of the deadline check.
pub const SHORT_DEADLINE: Duration = Duration::from_millis(500);
/// How far past its deadline a stalled call may return: timer and scheduling jitter only.
pub const DEADLINE_SLACK: Duration = Duration::from_millis(500);
/// How long a stalled call is held back: ten times the deadline.
const STALL: Duration = Duration::from_secs(5);

/// A driver call the fixture can stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Attach,
    ForceDetach,
}

/// One real backend, set up for the suite.
#[async_trait]
pub trait Fixture: Send + Sync {
    /// The driver's entry in the operator's configuration file, named `name` and without a
    /// deadline (the suite sets it). It must reach the backend through the fixture's fault
    /// injector, so that [`Fixture::stall`] works.
    fn driver_entry(&self, name: &str) -> DriverEntry;

    /// Whether the driver built from [`Fixture::driver_entry`] should say it can probe.
    fn probeable_by_config(&self) -> bool;

    /// Creates a new, unattached volume on the backend and returns its handle.
    async fn create_volume(&self, name: &str) -> String;

    /// A node the backend accepts.
    fn node(&self) -> String;

    /// Another node the backend accepts, if it has one.
    fn second_node(&self) -> Option<String>;

    /// A volume handle the backend does not have, valid in form.
    fn unknown_volume(&self) -> String;

    /// Holds back the backend's reply to the next `call` for `delay` (the call itself reaches
    /// the backend on time).
    async fn stall(&self, call: Call, delay: Duration);

    /// Undoes [`Fixture::stall`] (and checks that the stall was used, where that can be told).
    async fn unstall(&self, call: Call);

    /// The nodes the backend's own record says the volume is connected to, read without the
    /// driver under test.
    async fn connected(&self, volume: &str) -> BTreeSet<String>;

    /// Everything on the backend that a driver call could change, read without the driver under
    /// test, for "nothing changed" checks.
    async fn state(&self) -> String;
}

/// Every finished driver call, as the operator's metrics would see it.
#[derive(Default)]
pub struct Calls(Mutex<Vec<(String, String)>>);

impl CallObserver for Calls {
    fn call_finished(&self, _driver: &str, operation: &'static str, result: &str, _: Duration) {
        self.0
            .lock()
            .expect("calls lock")
            .push((operation.to_owned(), result.to_owned()));
    }
}

impl Calls {
    pub fn seen(&self, operation: &str, result: &str) -> bool {
        self.0
            .lock()
            .expect("calls lock")
            .iter()
            .any(|(o, r)| o == operation && r == result)
    }
}

/// The operator's configuration file with the fixture's backend as its only driver.
pub fn config_file(fixture: &dyn Fixture, deadline: &str) -> String {
    ConfigFile {
        drivers: vec![fixture.driver_entry(DRIVER_NAME).with_deadline(deadline)],
        ..ConfigFile::default()
    }
    .to_text()
    .expect("the fixture's paths are UTF-8")
}

/// The driver as the operator builds it from [`config_file`].
pub async fn driver_from_config(
    fixture: &dyn Fixture,
    deadline: &str,
) -> (Arc<dyn Driver>, Arc<Calls>) {
    let text = config_file(fixture, deadline);
    let calls = Arc::new(Calls::default());
    let config = Config::parse(&text, calls.clone())
        .await
        .unwrap_or_else(|e| panic!("the operator refuses the configuration\n{text}\n: {e}"));
    let driver = config
        .drivers
        .get(DRIVER_NAME)
        .cloned()
        .expect("the configured driver");
    (driver, calls)
}

fn request(volume: &str, node: &str) -> AttachRequest {
    AttachRequest {
        volume_handle: volume.to_owned(),
        node: node.to_owned(),
        connector: BTreeMap::from([(
            "initiator".to_owned(),
            "iqn.2026-11.io.safedetach:conformance".to_owned(),
        )]),
        read_only: false,
        exclusive: false,
    }
}

fn set(nodes: &[&str]) -> BTreeSet<String> {
    nodes.iter().map(|n| (*n).to_owned()).collect()
}

/// The driver's probe, where it says it can probe.
async fn probe_if_possible(driver: &dyn Driver, volume: &str) -> Option<Connections> {
    if !driver.can_probe() {
        return None;
    }
    Some(
        driver
            .probe(volume)
            .await
            .unwrap_or_else(|e| panic!("probe {volume}: {e}")),
    )
}

/// Attaching an attached volume returns the same connection info and changes nothing.
pub async fn attach_is_idempotent(fixture: &dyn Fixture) {
    let (driver, _) = driver_from_config(fixture, RELAXED_DEADLINE).await;
    let node = fixture.node();
    let volume = fixture.create_volume("idempotent").await;

    let first = driver
        .attach(&request(&volume, &node))
        .await
        .expect("attach");
    assert!(!first.is_empty(), "an attach returns connection info");
    let after_first = fixture.state().await;
    assert_eq!(fixture.connected(&volume).await, set(&[&node]));

    let second = driver
        .attach(&request(&volume, &node))
        .await
        .expect("attach again");
    assert_eq!(first, second, "the same connection info twice");
    assert_eq!(
        fixture.state().await,
        after_first,
        "the second attach changed the backend"
    );
    assert_eq!(fixture.connected(&volume).await, set(&[&node]));
    if let Some(probed) = probe_if_possible(driver.as_ref(), &volume).await {
        assert_eq!(probed, Connections::to([&node]));
    }
}

/// `force_detach` of what is not connected succeeds and changes nothing: neither another
/// volume's connection, nor (where the backend has a second node) the volume's connection to
/// another node, nor a volume already force-detached.
pub async fn force_detach_of_a_detached_volume_changes_nothing(fixture: &dyn Fixture) {
    let (driver, _) = driver_from_config(fixture, RELAXED_DEADLINE).await;
    let node = fixture.node();
    let held = fixture.create_volume("held").await;
    let free = fixture.create_volume("free").await;
    driver
        .attach(&request(&held, &node))
        .await
        .expect("attach the held volume");

    let before = fixture.state().await;
    let probed_free = probe_if_possible(driver.as_ref(), &free).await;
    let probed_held = probe_if_possible(driver.as_ref(), &held).await;
    for attempt in 1..=2 {
        driver
            .force_detach(&free, &node)
            .await
            .unwrap_or_else(|e| panic!("force_detach of a never attached volume ({attempt}): {e}"));
        assert_eq!(
            fixture.state().await,
            before,
            "force_detach of a never attached volume changed the backend ({attempt})"
        );
    }
    assert!(fixture.connected(&free).await.is_empty());
    assert_eq!(fixture.connected(&held).await, set(&[&node]));
    assert_eq!(probe_if_possible(driver.as_ref(), &free).await, probed_free);
    assert_eq!(probe_if_possible(driver.as_ref(), &held).await, probed_held);

    if let Some(other) = fixture.second_node() {
        driver
            .force_detach(&held, &other)
            .await
            .expect("force_detach from a node the volume is not on");
        assert_eq!(
            fixture.state().await,
            before,
            "force_detach from another node changed the backend"
        );
        assert_eq!(fixture.connected(&held).await, set(&[&node]));
        assert_eq!(probe_if_possible(driver.as_ref(), &held).await, probed_held);
    }

    // Once force-detached, a second force_detach finds nothing to do.
    driver
        .force_detach(&held, &node)
        .await
        .expect("force_detach");
    assert!(fixture.connected(&held).await.is_empty());
    let detached = fixture.state().await;
    let probed_detached = probe_if_possible(driver.as_ref(), &held).await;
    driver
        .force_detach(&held, &node)
        .await
        .expect("force_detach again");
    assert_eq!(
        fixture.state().await,
        detached,
        "the second force_detach changed the backend"
    );
    assert_eq!(
        probe_if_possible(driver.as_ref(), &held).await,
        probed_detached
    );
}

/// After a detach (the safe path, then the forced one) the backend shows no connection; the
/// driver's probe agrees where the driver says it can probe, and whether it can is what the
/// configuration says.
pub async fn no_connection_after_detach(fixture: &dyn Fixture) {
    let (driver, _) = driver_from_config(fixture, RELAXED_DEADLINE).await;
    assert_eq!(
        driver.can_probe(),
        fixture.probeable_by_config(),
        "can_probe() is not what the configuration says:\n{}",
        config_file(fixture, RELAXED_DEADLINE)
    );
    let node = fixture.node();
    let volume = fixture.create_volume("detach").await;

    for path in ["terminate_connection + detach", "force_detach"] {
        driver
            .attach(&request(&volume, &node))
            .await
            .unwrap_or_else(|e| panic!("attach before {path}: {e}"));
        assert_eq!(fixture.connected(&volume).await, set(&[&node]));
        if let Some(probed) = probe_if_possible(driver.as_ref(), &volume).await {
            assert!(probed.includes(&node), "before {path}: {probed:?}");
        }

        if path == "force_detach" {
            driver.force_detach(&volume, &node).await
        } else {
            ok_if_not_connected(driver.terminate_connection(&volume, &node).await)
                .and(ok_if_not_connected(driver.detach(&volume, &node).await))
        }
        .unwrap_or_else(|e| panic!("{path}: {e}"));

        assert!(
            fixture.connected(&volume).await.is_empty(),
            "the backend still connects the volume after {path}"
        );
        if let Some(probed) = probe_if_possible(driver.as_ref(), &volume).await {
            assert!(
                !probed.includes(&node),
                "the probe after {path} still shows {node}: {probed:?}"
            );
            assert_eq!(probed, Connections::default(), "after {path}");
        }
    }
}

/// Whether `error` says plainly that `volume` is unknown.
fn names_unknown_volume(error: &DriverError, volume: &str) -> bool {
    match error {
        DriverError::UnknownVolume(named) => named.contains(volume),
        DriverError::Invalid(message) => message.contains(volume),
        _ => false,
    }
}

/// An unknown volume is a clear, final error naming it, never a success or a silent "nowhere".
pub async fn unknown_volume_is_a_clear_error(fixture: &dyn Fixture) {
    let (driver, _) = driver_from_config(fixture, RELAXED_DEADLINE).await;
    let unknown = fixture.unknown_volume();
    let before = fixture.state().await;

    let error = driver
        .attach(&request(&unknown, &fixture.node()))
        .await
        .expect_err("attach of an unknown volume");
    assert!(
        names_unknown_volume(&error, &unknown),
        "attach of {unknown:?}: {error:?}"
    );
    assert_eq!(error.class(), ErrorClass::Final, "{error:?}");
    assert!(error.to_string().contains(&unknown), "{error}");

    if driver.can_probe() {
        let error = driver
            .probe(&unknown)
            .await
            .expect_err("probe of an unknown volume");
        assert!(
            names_unknown_volume(&error, &unknown),
            "probe of {unknown:?}: {error:?}"
        );
        assert_eq!(error.class(), ErrorClass::Final, "{error:?}");
    }
    assert_eq!(
        fixture.state().await,
        before,
        "an unknown volume changed the backend"
    );
}

/// A call whose reply is stalled returns `Timeout` (an unknown outcome) at the deadline, and the
/// idempotent call made again afterwards settles the question.
pub async fn deadlines_are_honoured(fixture: &dyn Fixture) {
    let deadline = format!("{}ms", SHORT_DEADLINE.as_millis());
    let (driver, calls) = driver_from_config(fixture, &deadline).await;
    let node = fixture.node();
    let volume = fixture.create_volume("deadline").await;

    for (call, operation) in [
        (Call::Attach, "attach"),
        (Call::ForceDetach, "force_detach"),
    ] {
        fixture.stall(call, STALL).await;
        let started = Instant::now();
        let result = match call {
            Call::Attach => driver.attach(&request(&volume, &node)).await.map(|_| ()),
            Call::ForceDetach => driver.force_detach(&volume, &node).await,
        };
        let elapsed = started.elapsed();
        fixture.unstall(call).await;

        // The driver's own deadline and the operator's are the same (the csi driver sends it
        // to the plugin as the gRPC timeout), so either may be the one that gives up first and
        // name the operation: the driver's call (`ControllerPublishVolume`) or the operator's.
        assert!(
            matches!(
                &result,
                Err(DriverError::Timeout { deadline, .. }) if *deadline == SHORT_DEADLINE
            ),
            "a stalled {operation}: {result:?}"
        );
        assert_eq!(
            result.unwrap_err().class(),
            ErrorClass::UnknownOutcome,
            "{operation}"
        );
        assert!(
            elapsed >= SHORT_DEADLINE && elapsed < SHORT_DEADLINE + DEADLINE_SLACK,
            "a stalled {operation} returned after {elapsed:?}, deadline {SHORT_DEADLINE:?}"
        );
        assert!(
            calls.seen(operation, "Timeout"),
            "the observer was not told of the {operation} timeout"
        );

        // The outcome is unknown; the idempotent call, made again, decides it.
        match call {
            Call::Attach => {
                driver
                    .attach(&request(&volume, &node))
                    .await
                    .expect("attach again after the timeout");
                assert_eq!(fixture.connected(&volume).await, set(&[&node]));
            }
            Call::ForceDetach => {
                driver
                    .force_detach(&volume, &node)
                    .await
                    .expect("force_detach again after the timeout");
                assert!(fixture.connected(&volume).await.is_empty());
            }
        }
    }
}
