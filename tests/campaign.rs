//! The campaign: seeded schedules of concurrent attach, detach and force-detach requests, NBD
//! clients holding exports, Volume deletes, and faults (lost and late QMP replies, QMP outages,
//! SIGKILL of the operator, leader hand-overs, a restarted qemu-storage-daemon), judged by an
//! observer independent of the operator. See docs/reliability.md.
//!
//! `cargo test --test campaign` runs the short campaign (fixed seeds, a few minutes);
//! `make campaign SCHEDULES=N SEED=S` runs `long_campaign` and writes its figures to
//! docs/reliability.md. Any violation prints the seed, the rule and the history around it.

mod support;

use std::time::Duration;
use support::campaign::campaign;
use support::cluster::admin_client;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
        .unwrap_or(default)
}

fn fail_on_violations(summary: &support::campaign::Summary) {
    // Each violation's report (seed, rule, history) was printed with its schedule's outcome.
    assert!(
        summary.violations.is_empty(),
        "the campaign found violations (rule: seeds) {:?}; the VIOLATION reports above tell each seed's history",
        summary.violations
    );
}

/// The short campaign `make test` runs: the same seeds every time, so that a failure is a rule
/// broken by a schedule anyone can run again, never a different draw.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_campaign() {
    admin_client().await;
    let first = env_number("CAMPAIGN_SEED", 1);
    let schedules = env_number("CAMPAIGN_SCHEDULES", 20);
    let seeds: Vec<u64> = (first..first + schedules).collect();
    let summary = campaign(&seeds, 4, Duration::from_secs(10)).await;
    println!("{}", summary.table(first, "this tree"));
    fail_on_violations(&summary);
}

/// The long campaign of `make campaign`: `CAMPAIGN_SCHEDULES` schedules from `CAMPAIGN_SEED`,
/// its figures written to docs/reliability.md between the markers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: run with make campaign"]
async fn long_campaign() {
    admin_client().await;
    let first = env_number("CAMPAIGN_SEED", 1000);
    let schedules = env_number("CAMPAIGN_SCHEDULES", 50);
    let parallel = env_number("CAMPAIGN_PARALLEL", 4) as usize;
    let active = Duration::from_secs(env_number("CAMPAIGN_ACTIVE_SECS", 15));
    let seeds: Vec<u64> = (first..first + schedules).collect();
    // The code under test, read and copied before it runs: a commit or a build made meanwhile
    // is not what ran.
    let binary = support::operator::pin_binary();
    let code = std::process::Command::new("git")
        .args(["-C", REPO, "rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let dirty = std::process::Command::new("git")
        .args([
            "-C",
            REPO,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "src",
        ])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    let code = if dirty {
        format!("{code} with changes in src/")
    } else {
        code
    };
    // Another operator than this tree's (to compare a fix with what came before it).
    let code = match std::env::var("SAFE_DETACH_OPERATOR_BIN") {
        Ok(other) => format!("campaign of {code}, operator {other}"),
        Err(_) => code,
    };
    let summary = campaign(&seeds, parallel, active).await;
    let _ = std::fs::remove_file(binary);
    let table = summary.table(first, &format!("commit {code}"));
    println!("{table}");
    let path = format!("{REPO}/docs/reliability.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let doc = replace_between(&doc, "campaign figures", &table);
    let date = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
    let doc = append_to_ledger(&doc, &summary.ledger_row(first, &code, &date));
    std::fs::write(&path, doc).unwrap_or_else(|e| panic!("write {path}: {e}"));
    fail_on_violations(&summary);
}

/// `doc` with the text between `<!-- {marker} -->` and `<!-- end of {marker} -->` replaced.
fn replace_between(doc: &str, marker: &str, text: &str) -> String {
    let (begin, end) = (
        format!("<!-- {marker} -->"),
        format!("<!-- end of {marker} -->"),
    );
    let (Some(from), Some(to)) = (doc.find(&begin), doc.find(&end)) else {
        panic!("docs/reliability.md lacks the markers {begin} and {end}");
    };
    format!("{}{begin}\n{text}{}", &doc[..from], &doc[to..])
}

/// `doc` with `row` added to the ledger of every long campaign, and the ledger's totals counted
/// again from its rows.
fn append_to_ledger(doc: &str, row: &str) -> String {
    let (begin, end) = (
        "<!-- campaign ledger -->",
        "<!-- end of campaign ledger -->",
    );
    let (Some(from), Some(to)) = (doc.find(begin), doc.find(end)) else {
        panic!("docs/reliability.md lacks the markers {begin} and {end}");
    };
    let mut rows: Vec<&str> = doc[from + begin.len()..to]
        .lines()
        .filter(|line| line.starts_with("| 20"))
        .collect();
    rows.push(row);
    // Columns: date, code, seeds, schedules, faults, violations, wall.
    let column = |row: &str, i: usize| -> u64 {
        row.split('|')
            .nth(i + 1)
            .and_then(|cell| cell.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let schedules: u64 = rows.iter().map(|r| column(r, 3)).sum();
    let faults: u64 = rows.iter().map(|r| column(r, 4)).sum();
    let violations: u64 = rows.iter().map(|r| column(r, 5)).sum();
    let wall: u64 = rows.iter().map(|r| column(r, 6)).sum();
    let mut text = String::from(
        "| date | code | seeds | schedules | faults | violations | wall |\n|---|---|---|---|---|---|---|\n",
    );
    for row in &rows {
        text.push_str(row);
        text.push('\n');
    }
    text.push_str(&format!(
        "| **total** | | | **{schedules}** | {faults} | **{violations}** | {:.1} h |\n",
        wall as f64 / 3600.0
    ));
    replace_between(doc, "campaign ledger", &text)
}

#[test]
fn the_ledger_adds_a_row_and_counts_its_totals_again() {
    let doc = "before\n<!-- campaign ledger -->\n| date | code | seeds | schedules | faults | violations | wall |\n|---|---|---|---|---|---|---|\n| 2026-12-01 | abc | 1..=100 | 100 | 900 | 0 | 700 s |\n| **total** | | | **100** | 900 | **0** | 0.2 h |\n<!-- end of campaign ledger -->\nafter\n";
    let row = "| 2026-12-02 | def | 101..=400 | 300 | 2700 | 2 (no-convergence [7, 9]) | 2900 s |";
    let updated = append_to_ledger(doc, row);
    assert!(
        updated.starts_with("before\n") && updated.ends_with("after\n"),
        "{updated}"
    );
    assert!(
        updated.contains("| 2026-12-01 | abc |") && updated.contains(row),
        "{updated}"
    );
    assert!(
        updated.contains("| **total** | | | **400** | 3600 | **2** | 1.0 h |"),
        "{updated}"
    );
    assert_eq!(updated.matches("**total**").count(), 1, "{updated}");
}

/// The checker judged on rounds made up here: each rule must fire on the history that breaks it
/// and stay quiet on the orderings the design allows, or the campaign could not fail.
mod observe {
    use safe_detach::api::AttachmentPhase;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use support::campaign::observe::{
        CreateWindow, History, Observer, OrphanMade, Record, Round, Rule, VolumeCreate,
        VolumeDelete, VolumeId, judge_orphan_forces,
    };
    use support::campaign::plan::ORPHAN_NODE;
    use tokio::time::Instant;

    use super::support;

    fn observer() -> Observer {
        observer_of(Arc::default(), false)
    }

    /// An observer of a schedule whose workload sent the Volume DELETEs `volume_deletes`, with or
    /// without the admission policy's hold at create.
    fn observer_of(
        volume_deletes: Arc<Mutex<Vec<VolumeDelete>>>,
        hold_at_create: bool,
    ) -> Observer {
        let handles = [("va".to_owned(), "h0".to_owned())].into();
        let single = ["va".to_owned()].into();
        Observer::new(
            handles,
            single,
            Arc::default(),
            Arc::default(),
            volume_deletes,
            hold_at_create,
            History::new(),
        )
    }

    fn record(uid: &str, rv: &str, phase: AttachmentPhase, deleting: bool) -> Record {
        Record {
            name: format!("a-{uid}"),
            uid: uid.to_owned(),
            resource_version: rv.to_owned(),
            volume: "va".to_owned(),
            node: "n0".to_owned(),
            phase: Some(phase),
            attached: phase == AttachmentPhase::Attached,
            deleting,
            phase_since: None,
            token: None,
            forcing: false,
            bound_uid: None,
            attach_failed: false,
        }
    }

    fn round(records: Vec<Record>, nodes: &[&str]) -> Round {
        let now = Instant::now();
        Round {
            listed_at: now,
            backend_at: now,
            records,
            volumes: Some(vec![volume("v1", true)]),
            volumes_at: now,
            exports: Some(
                nodes
                    .iter()
                    .map(|n| ("h0".to_owned(), (*n).to_owned()))
                    .collect(),
            ),
            stray: Vec::new(),
            backend_epoch: 0,
        }
    }

    fn rules(observer: &Observer) -> Vec<Rule> {
        observer.violations.iter().map(|v| v.rule).collect()
    }

    #[test]
    fn a_deleted_attachment_recorded_detached_while_exported_is_a_violation() {
        let mut o = observer();
        o.check(&round(
            vec![record("u", "1", AttachmentPhase::Detaching, true)],
            &["n0"],
        ));
        assert!(rules(&o).is_empty());
        o.check(&round(
            vec![record("u", "2", AttachmentPhase::Detached, true)],
            &["n0"],
        ));
        assert_eq!(rules(&o), [Rule::DetachedWhileExported]);
    }

    #[test]
    fn an_attachment_released_while_exported_is_a_violation_unless_a_create_races() {
        let mut o = observer();
        o.check(&round(
            vec![record("u", "1", AttachmentPhase::Attached, false)],
            &["n0"],
        ));
        let creates = o.creates.clone();
        creates.lock().expect("creates").push(CreateWindow {
            volume: "va".into(),
            node: "n0".into(),
            sent: Instant::now(),
            answered: None,
            uid: None,
        });
        o.check(&round(Vec::new(), &["n0"]));
        assert!(
            rules(&o).is_empty(),
            "a create in flight may own the export"
        );
        creates.lock().expect("creates").clear();
        o.check(&round(Vec::new(), &["n0"]));
        assert_eq!(rules(&o), [Rule::DetachedWhileExported]);
    }

    #[test]
    fn a_live_detached_record_that_moves_on_is_the_allowed_order_and_one_that_stays_is_not() {
        let mut o = observer();
        // Detached, then the intent to attach again is written and the export added in between.
        o.check(&round(
            vec![record("u", "5", AttachmentPhase::Detached, false)],
            &["n0"],
        ));
        o.check(&round(
            vec![record("u", "6", AttachmentPhase::Attaching, false)],
            &["n0"],
        ));
        assert!(rules(&o).is_empty());
        let mut o = observer();
        o.check(&round(
            vec![record("u", "5", AttachmentPhase::Detached, false)],
            &["n0"],
        ));
        o.check(&round(
            vec![record("u", "5", AttachmentPhase::Detached, false)],
            &["n0"],
        ));
        assert_eq!(rules(&o), [Rule::DetachedWhileExported]);
    }

    #[test]
    fn another_attachment_of_the_pair_claims_the_export() {
        let mut o = observer();
        let mut other = record("w", "9", AttachmentPhase::Attached, false);
        other.name = "other".into();
        o.check(&round(
            vec![record("u", "2", AttachmentPhase::Detached, true), other],
            &["n0"],
        ));
        assert!(rules(&o).is_empty());
    }

    #[test]
    fn a_connection_handed_over_to_an_attachment_not_attached_yet_is_claimed() {
        let mut o = observer();
        o.check(&round(
            vec![
                record("u", "1", AttachmentPhase::Attached, false),
                record("w", "2", AttachmentPhase::Pending, false),
            ],
            &["n0"],
        ));
        o.check(&round(
            vec![record("w", "2", AttachmentPhase::Pending, false)],
            &["n0"],
        ));
        o.check(&round(
            vec![record("w", "2", AttachmentPhase::Pending, false)],
            &["n0"],
        ));
        assert!(rules(&o).is_empty());
    }

    #[test]
    fn a_connection_left_to_a_failed_attachment_is_a_violation() {
        let mut o = observer();
        o.check(&round(
            vec![
                record("u", "1", AttachmentPhase::Attached, false),
                record("w", "2", AttachmentPhase::Failed, false),
            ],
            &["n0"],
        ));
        o.check(&round(
            vec![record("w", "2", AttachmentPhase::Failed, false)],
            &["n0"],
        ));
        o.check(&round(
            vec![record("w", "2", AttachmentPhase::Failed, false)],
            &["n0"],
        ));
        assert_eq!(rules(&o), [Rule::DetachedWhileExported]);
    }

    #[test]
    fn a_record_that_lost_its_connection_yet_is_exported_is_a_violation() {
        let mut o = observer();
        o.check(&round(
            vec![record("u", "1", AttachmentPhase::Attached, false)],
            &["n0"],
        ));
        o.check(&round(
            vec![record("u", "2", AttachmentPhase::Pending, false)],
            &["n0"],
        ));
        o.check(&round(
            vec![record("u", "2", AttachmentPhase::Pending, false)],
            &["n0"],
        ));
        assert_eq!(rules(&o), [Rule::DetachedWhileExported]);
    }

    /// Round `k` exports the pair under an Attached record; then it is gone. A cut unless the
    /// record moves on by the round after (a forced detach records its intent before its call),
    /// the backend restarted meanwhile, or the attachment is being deleted.
    #[test]
    fn a_connection_cut_under_an_unchanged_attached_record_is_a_violation() {
        let attached = || vec![record("u", "3", AttachmentPhase::Attached, false)];
        let mut o = observer();
        o.check(&round(attached(), &["n0"]));
        o.check(&round(attached(), &[]));
        assert!(
            rules(&o).is_empty(),
            "one round may list the cut before the record"
        );
        o.check(&round(attached(), &[]));
        assert_eq!(rules(&o), [Rule::CutWhileAttached]);

        // The record moves on: a forced detach's intent, written before its call.
        let mut o = observer();
        o.check(&round(attached(), &["n0"]));
        o.check(&round(attached(), &[]));
        o.check(&round(
            vec![record("u", "4", AttachmentPhase::Detaching, false)],
            &[],
        ));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        // The backend restarted between the rounds: every connection went with it.
        let mut o = observer();
        o.check(&round(attached(), &["n0"]));
        let mut restarted = round(attached(), &[]);
        restarted.backend_epoch = 2;
        o.check(&restarted);
        let mut after = round(attached(), &[]);
        after.backend_epoch = 2;
        o.check(&after);
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        // A restart between the round that missed the connection and the one that would
        // confirm the cut: that round cannot tell a cut from the restart's loss, so the cut is
        // not judged (conservative: a violation must be one).
        let mut o = observer();
        o.check(&round(attached(), &["n0"]));
        o.check(&round(attached(), &[]));
        let mut after = round(attached(), &[]);
        after.backend_epoch = 1;
        o.check(&after);
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        // Being deleted, the attachment's own detach cuts it (and says so when it is done).
        let deleting = || vec![record("u", "3", AttachmentPhase::Attached, true)];
        let mut o = observer();
        o.check(&round(deleting(), &["n0"]));
        o.check(&round(deleting(), &[]));
        o.check(&round(deleting(), &[]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        // A person's token on another live claim of the same connection cuts it for both
        // (design.md, "Hand-over"): the other record shows the force.
        let mut o = observer();
        let mut other = record("w", "5", AttachmentPhase::Attached, false);
        other.name = "other".into();
        o.check(&round(vec![attached()[0].clone(), other.clone()], &["n0"]));
        let mut forcing = record("w", "6", AttachmentPhase::Attaching, false);
        forcing.name = "other".into();
        forcing.token = Some("t1".into());
        o.check(&round(vec![attached()[0].clone(), forcing.clone()], &[]));
        o.check(&round(vec![attached()[0].clone(), forcing], &[]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
        // Nor a forced detach under way on a claim being deleted (decided before its deletion,
        // or before the other claim was seen): it goes on, and tells the others once confirmed.
        let mut o = observer();
        let mut deleted = record("w", "5", AttachmentPhase::Detaching, true);
        deleted.name = "other".into();
        deleted.forcing = true;
        o.check(&round(
            vec![attached()[0].clone(), deleted.clone()],
            &["n0"],
        ));
        o.check(&round(vec![attached()[0].clone(), deleted.clone()], &[]));
        o.check(&round(vec![attached()[0].clone(), deleted], &[]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
        // But not a deleted claim's plain detach: that one hands the connection over instead.
        let mut o = observer();
        let mut deleted = record("w", "5", AttachmentPhase::Attached, true);
        deleted.name = "other".into();
        o.check(&round(
            vec![attached()[0].clone(), deleted.clone()],
            &["n0"],
        ));
        deleted.phase = Some(AttachmentPhase::Detaching);
        deleted.resource_version = "6".into();
        o.check(&round(vec![attached()[0].clone(), deleted.clone()], &[]));
        o.check(&round(attached(), &[]));
        assert_eq!(rules(&o), [Rule::CutWhileAttached]);

        // Not attached yet: nothing was promised.
        let pending = || vec![record("u", "3", AttachmentPhase::Pending, false)];
        let mut o = observer();
        o.check(&round(pending(), &["n0"]));
        o.check(&round(pending(), &[]));
        o.check(&round(pending(), &[]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
    }

    #[test]
    fn a_single_attach_volume_on_two_nodes_is_a_double_attach() {
        let mut o = observer();
        let mut on_n1 = record("w", "3", AttachmentPhase::Attached, false);
        on_n1.node = "n1".into();
        o.check(&round(
            vec![record("u", "2", AttachmentPhase::Attached, false), on_n1],
            &["n0", "n1"],
        ));
        o.finish();
        assert_eq!(rules(&o), [Rule::DoubleAttach]);
    }

    /// Volume `vb` names `va`'s backend volume `h0`: an export of `h0` is claimed by the records
    /// of either, and two nodes of `h0` at once are a double attach, whichever Volume each came
    /// through.
    #[test]
    fn an_alias_is_judged_by_the_backend_volume_it_names() {
        let aliased = || {
            let handles = [
                ("va".to_owned(), "h0".to_owned()),
                ("vb".to_owned(), "h0".to_owned()),
            ]
            .into();
            let single = ["va".to_owned()].into();
            Observer::new(
                handles,
                single,
                Arc::default(),
                Arc::default(),
                Arc::default(),
                false,
                History::new(),
            )
        };
        let through_vb = |uid: &str, node: &str, phase| Record {
            volume: "vb".into(),
            node: node.into(),
            ..record(uid, "1", phase, false)
        };
        let mut o = aliased();
        o.check(&round(
            vec![through_vb("u", "n0", AttachmentPhase::Attached)],
            &["n0"],
        ));
        o.check(&round(
            vec![through_vb("u", "n0", AttachmentPhase::Attached)],
            &["n0"],
        ));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        let mut o = aliased();
        o.check(&round(
            vec![
                record("u", "1", AttachmentPhase::Attached, false),
                through_vb("w", "n1", AttachmentPhase::Attached),
            ],
            &["n0", "n1"],
        ));
        o.finish();
        assert_eq!(rules(&o), [Rule::DoubleAttach]);

        // Once the single-attach Volume is gone, its multi-attach alias owns the backend volume.
        let mut o = aliased();
        let on = |node: &str| through_vb(node, node, AttachmentPhase::Attached);
        o.check(&Round {
            volumes: Some(vec![VolumeId {
                name: "vb".into(),
                ..volume("v2", true)
            }]),
            ..round(vec![on("n0"), on("n1")], &["n0", "n1"])
        });
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        // A single-attach alias created while its multi-attach alias is exported to two nodes does
        // not make those exports a double attach; an export seen after its create does, and so
        // does every export once the backend went unanswered (it may have restarted).
        let only_vb = || {
            Some(vec![VolumeId {
                name: "vb".into(),
                ..volume("v2", true)
            }])
        };
        let both = || {
            Some(vec![
                volume("v1", true),
                VolumeId {
                    name: "vb".into(),
                    ..volume("v2", true)
                },
            ])
        };
        let on_nodes = |nodes: &[&str]| -> Vec<Record> { nodes.iter().map(|n| on(n)).collect() };
        // vb exported to n0 and n1, then the single-attach va created (at version 10).
        let alias_created_over_two_exports = || {
            let mut o = aliased();
            o.check(&Round {
                volumes: only_vb(),
                ..round(on_nodes(&["n0", "n1"]), &["n0", "n1"])
            });
            o.volume_creates
                .lock()
                .expect("volume creates")
                .insert("va".into(), created_at(10));
            o
        };
        let mut o = alias_created_over_two_exports();
        o.check(&Round {
            volumes: both(),
            ..round(on_nodes(&["n0", "n1"]), &["n0", "n1"])
        });
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
        o.check(&Round {
            volumes: both(),
            ..round(on_nodes(&["n0", "n1", "n2"]), &["n0", "n1", "n2"])
        });
        o.finish();
        assert_eq!(rules(&o), [Rule::DoubleAttach]);
        let mut o = alias_created_over_two_exports();
        o.check(&Round {
            exports: None,
            volumes: both(),
            ..round(on_nodes(&["n0", "n1"]), &[])
        });
        o.check(&Round {
            volumes: both(),
            ..round(on_nodes(&["n0", "n1"]), &["n0", "n1"])
        });
        o.finish();
        assert_eq!(rules(&o), [Rule::DoubleAttach]);

        // An export seen after the single-attach alias's create, of an attach whose intent was
        // written before it (a lower resourceVersion than the created Volume's, no failed try
        // since): decided before the alias existed, the window design.md accepts. Written after
        // it, or after a failed try, it is judged.
        let intent = |version: &str, failed: bool| Record {
            resource_version: version.into(),
            attach_failed: failed,
            ..through_vb("w", "n2", AttachmentPhase::Attaching)
        };
        for (version, failed, judged) in
            [("5", false, false), ("15", false, true), ("5", true, true)]
        {
            let mut o = alias_created_over_two_exports();
            let mut records = on_nodes(&["n0", "n1"]);
            records.push(intent(version, failed));
            o.check(&Round {
                volumes: both(),
                ..round(records, &["n0", "n1", "n2"])
            });
            o.finish();
            let expected: &[Rule] = if judged { &[Rule::DoubleAttach] } else { &[] };
            assert_eq!(rules(&o), expected, "intent at {version}, failed {failed}");
        }

        // The same, with the intent written and followed by Attached between two rounds: no
        // round lists it, the watch of the attachments delivers it. Only the latest intent of an
        // attachment the round lists for the pair counts: an older one, followed by a detach and
        // a new intent, decided nothing the export shows.
        for (watched, judged) in [
            (&[("w", "5")][..], false),
            (&[("w", "15")][..], true),
            (&[("w", "5"), ("w", "15")][..], true),
            (&[("gone", "5")][..], true),
            (&[][..], true),
        ] {
            let mut o = alias_created_over_two_exports();
            for (uid, version) in watched {
                o.intents.lock().expect("intents").push(Record {
                    uid: (*uid).into(),
                    ..intent(version, false)
                });
            }
            let mut records = on_nodes(&["n0", "n1"]);
            records.push(Record {
                resource_version: "3".into(),
                ..through_vb("w", "n2", AttachmentPhase::Pending)
            });
            o.check(&Round {
                volumes: both(),
                ..round(records, &["n0", "n1", "n2"])
            });
            assert!(rules(&o).is_empty(), "judged a round later");
            o.finish();
            let expected: &[Rule] = if judged { &[Rule::DoubleAttach] } else { &[] };
            assert_eq!(rules(&o), expected, "watched intents {watched:?}");
        }

        let mut o = aliased();
        o.check(&round(
            vec![through_vb("u", "n0", AttachmentPhase::Failed)],
            &["n0"],
        ));
        o.check(&round(
            vec![through_vb("u", "n0", AttachmentPhase::Failed)],
            &["n0"],
        ));
        assert_eq!(rules(&o), [Rule::DetachedWhileExported]);
    }

    /// A Volume create sent now and answered at `version`.
    fn created_at(version: u64) -> VolumeCreate {
        VolumeCreate {
            sent: Instant::now(),
            version: Some(version),
        }
    }

    /// Volume `va` with uid `uid`, carrying the operator's finalizer or not.
    fn volume(uid: &str, held: bool) -> VolumeId {
        VolumeId {
            name: "va".to_owned(),
            uid: uid.to_owned(),
            held,
            deleting: false,
        }
    }

    /// Volume `va` with uid `uid`, held and deleted.
    fn deleted(uid: &str) -> VolumeId {
        VolumeId {
            deleting: true,
            ..volume(uid, true)
        }
    }

    /// Records that the workload created attachment `uid` now.
    fn created(o: &Observer, uid: &str) {
        o.creates.lock().expect("creates").push(CreateWindow {
            volume: "va".into(),
            node: "n0".into(),
            sent: Instant::now(),
            answered: Some(Instant::now()),
            uid: Some(uid.to_owned()),
        });
    }

    /// A round without exports in which the shard's Volumes are `volumes`.
    fn with_volumes(records: Vec<Record>, volumes: &[VolumeId]) -> Round {
        Round {
            volumes: Some(volumes.to_vec()),
            exports: None,
            ..round(records, &[])
        }
    }

    #[test]
    fn a_volume_released_while_an_attachment_named_it_throughout_is_a_violation() {
        let mut o = observer();
        let named = || vec![record("u", "1", AttachmentPhase::Attached, false)];
        o.check(&with_volumes(named(), &[volume("v1", true)]));
        o.check(&with_volumes(named(), &[]));
        assert!(
            rules(&o).is_empty(),
            "the attachment may have gone just before the release: one more round tells"
        );
        o.check(&with_volumes(named(), &[]));
        assert_eq!(rules(&o), [Rule::ReleasedWhileNamed]);
    }

    #[test]
    fn a_volume_released_after_its_last_attachment_went_or_named_after_it_went_is_no_violation() {
        let mut o = observer();
        o.check(&with_volumes(
            vec![record("u", "1", AttachmentPhase::Detaching, true)],
            &[volume("v1", true)],
        ));
        o.check(&with_volumes(Vec::new(), &[]));
        o.check(&with_volumes(Vec::new(), &[]));
        // An attachment created for the Volume after it went, and the Volume created again.
        o.check(&with_volumes(
            vec![record("w", "1", AttachmentPhase::Pending, false)],
            &[],
        ));
        o.check(&with_volumes(
            vec![record("w", "1", AttachmentPhase::Pending, false)],
            &[volume("v2", true)],
        ));
        o.check(&with_volumes(
            vec![record("w", "2", AttachmentPhase::Attached, false)],
            &[volume("v2", true)],
        ));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
    }

    #[test]
    fn an_attachment_created_after_the_volume_was_deleted_does_not_hold_it_unless_it_claimed_a_connection()
     {
        // Created once a round had listed the Volume deleting, never attached: the Volume may go.
        let mut o = observer();
        o.check(&with_volumes(Vec::new(), &[deleted("v1")]));
        created(&o, "u");
        let named = || vec![record("u", "1", AttachmentPhase::Pending, false)];
        o.check(&with_volumes(named(), &[deleted("v1")]));
        o.check(&with_volumes(named(), &[]));
        o.check(&with_volumes(named(), &[]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        // The same, but created before any round listed the Volume deleting: it holds it.
        let mut o = observer();
        created(&o, "u");
        o.check(&with_volumes(Vec::new(), &[deleted("v1")]));
        o.check(&with_volumes(named(), &[deleted("v1")]));
        o.check(&with_volumes(named(), &[]));
        o.check(&with_volumes(named(), &[]));
        assert_eq!(rules(&o), [Rule::ReleasedWhileNamed]);

        // Created late, but recorded Attaching once: it claimed a connection and holds the Volume.
        let mut o = observer();
        o.check(&with_volumes(Vec::new(), &[deleted("v1")]));
        created(&o, "u");
        let attaching = vec![record("u", "1", AttachmentPhase::Attaching, false)];
        o.check(&with_volumes(attaching, &[deleted("v1")]));
        o.check(&with_volumes(named(), &[]));
        o.check(&with_volumes(named(), &[]));
        assert_eq!(rules(&o), [Rule::ReleasedWhileNamed]);
    }

    #[test]
    fn a_volume_deleted_before_the_operator_held_it_is_gone_at_once_unless_an_attach_had_begun() {
        let mut o = observer();
        let named = || vec![record("u", "1", AttachmentPhase::Pending, false)];
        o.check(&with_volumes(named(), &[volume("v1", false)]));
        o.check(&with_volumes(named(), &[]));
        o.check(&with_volumes(named(), &[]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);

        // Unless an attachment had claimed a connection to it: an attach holds its Volume first.
        let mut o = observer();
        let attaching = || vec![record("u", "1", AttachmentPhase::Attaching, false)];
        o.check(&with_volumes(attaching(), &[volume("v1", false)]));
        o.check(&with_volumes(attaching(), &[]));
        o.check(&with_volumes(attaching(), &[]));
        assert_eq!(rules(&o), [Rule::ReleasedWhileNamed]);

        // A claim that shows only after the Volume went counts too.
        let mut o = observer();
        let pending = vec![record("u", "1", AttachmentPhase::Pending, false)];
        o.check(&with_volumes(pending.clone(), &[volume("v1", false)]));
        o.check(&with_volumes(pending.clone(), &[]));
        o.check(&with_volumes(pending, &[]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
        o.check(&with_volumes(attaching(), &[]));
        assert_eq!(rules(&o), [Rule::ReleasedWhileNamed]);

        // But not a claim on the Volume created again under the same name.
        let mut o = observer();
        let mut on_v2 = record("u", "2", AttachmentPhase::Attaching, false);
        on_v2.bound_uid = Some("v2".into());
        o.check(&with_volumes(named(), &[volume("v1", false)]));
        o.check(&with_volumes(named(), &[]));
        o.check(&with_volumes(vec![on_v2.clone()], &[volume("v2", true)]));
        o.check(&with_volumes(vec![on_v2], &[volume("v2", true)]));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
    }

    #[test]
    fn a_held_volume_the_apiserver_removed_at_once_holds_only_attachments_that_claimed_it() {
        let delete = |removed_at_once| VolumeDelete {
            uid: "v1".into(),
            sent: Instant::now(),
            removed_at_once,
        };
        // One DELETE of v1, sent now: before the rounds below first list it held.
        let deletes = |removed_at_once| Arc::new(Mutex::new(vec![delete(removed_at_once)]));
        let pending = || vec![record("u", "1", AttachmentPhase::Pending, false)];
        let judge = |o: &mut Observer, first: Vec<Record>| {
            created(o, "u");
            o.check(&with_volumes(first, &[volume("v1", true)]));
            o.check(&with_volumes(pending(), &[]));
            o.check(&with_volumes(pending(), &[]));
            rules(o)
        };

        // Seen held, its DELETE sent before that and answered by its removal: the apiserver's
        // race, not a release.
        let mut o = observer_of(deletes(true), false);
        assert!(judge(&mut o, pending()).is_empty(), "{:?}", o.violations);
        assert_eq!(o.apiserver_races, 1);

        // Unless the attachment claimed a connection to it.
        let mut o = observer_of(deletes(true), false);
        let attaching = vec![record("u", "1", AttachmentPhase::Attaching, false)];
        assert_eq!(judge(&mut o, attaching), [Rule::ReleasedWhileNamed]);

        // A DELETE answered by marking it deleting: the Volume went by a release.
        let mut o = observer_of(deletes(false), false);
        assert_eq!(judge(&mut o, pending()), [Rule::ReleasedWhileNamed]);

        // Removed at once by a DELETE sent after a list showed it held: the DELETE read it held,
        // so its finalizer went some other way.
        let sent_later = Arc::default();
        let mut o = observer_of(Arc::clone(&sent_later), false);
        created(&o, "u");
        o.check(&with_volumes(pending(), &[volume("v1", true)]));
        sent_later.lock().expect("deletes").push(delete(true));
        o.check(&with_volumes(pending(), &[]));
        o.check(&with_volumes(pending(), &[]));
        assert_eq!(rules(&o), [Rule::ReleasedWhileNamed]);

        // Listed deleting before it went: it had the finalizer when deleted, a release removed it.
        let mut o = observer_of(deletes(true), false);
        created(&o, "u");
        o.check(&with_volumes(pending(), &[deleted("v1")]));
        o.check(&with_volumes(pending(), &[]));
        o.check(&with_volumes(pending(), &[]));
        assert_eq!(rules(&o), [Rule::ReleasedWhileNamed]);

        // Under the admission policy's hold no DELETE can find the Volume unheld: the rule stands.
        let mut o = observer_of(deletes(true), true);
        assert_eq!(judge(&mut o, pending()), [Rule::ReleasedWhileNamed]);
    }

    /// An observer of multi-attach Volume `va` on `h0`, under `orphanPolicy: Detach` or not.
    fn orphan_observer(detach: bool) -> Observer {
        let mut o = Observer::new(
            [("va".to_owned(), "h0".to_owned())].into(),
            Default::default(),
            Arc::default(),
            Arc::default(),
            Arc::default(),
            false,
            History::new(),
        );
        if detach {
            o.orphans.forced_first = ["va".to_owned()].into();
        }
        o
    }

    /// Round `k` from `start`, 10 ms apart: its Volumes listed, then the backend read, showing
    /// `h0` exported to the orphan node or nothing.
    fn orphan_round(start: Instant, k: u32, volumes: &[VolumeId], orphan: bool) -> Round {
        let at = start + Duration::from_millis(10) * k;
        let exports = if orphan {
            [("h0".to_owned(), ORPHAN_NODE.to_owned())].into()
        } else {
            Default::default()
        };
        Round {
            listed_at: at,
            volumes_at: at + Duration::from_millis(2),
            backend_at: at + Duration::from_millis(4),
            records: Vec::new(),
            volumes: Some(volumes.to_vec()),
            exports: Some(exports),
            stray: Vec::new(),
            backend_epoch: 0,
        }
    }

    /// Rounds: `va` held with its orphan exported, then deleting, then `last` (its Volumes) with
    /// the orphan still exported or not.
    fn released(o: &mut Observer, last: &[VolumeId], orphan_stays: bool) -> Vec<Rule> {
        let start = Instant::now();
        o.check(&orphan_round(start, 0, &[volume("v1", true)], true));
        o.check(&orphan_round(start, 1, &[deleted("v1")], true));
        o.check(&orphan_round(start, 2, last, orphan_stays));
        rules(o)
    }

    #[test]
    fn a_volume_under_orphan_policy_detach_released_while_its_orphan_is_exported_is_a_violation() {
        assert_eq!(
            released(&mut orphan_observer(true), &[], true),
            [Rule::ReleasedWithOrphan]
        );
        // Created again under its name meanwhile: the one deleted went with the orphan still there.
        assert_eq!(
            released(&mut orphan_observer(true), &[volume("v2", true)], true),
            [Rule::ReleasedWithOrphan]
        );
    }

    #[test]
    fn a_volume_released_once_its_orphan_is_gone_or_under_orphan_policy_report_is_no_violation() {
        // The orphan forced off in the round the release shows.
        assert!(released(&mut orphan_observer(true), &[], false).is_empty());
        // Forced off a round before the release.
        let mut o = orphan_observer(true);
        let start = Instant::now();
        o.check(&orphan_round(start, 0, &[volume("v1", true)], true));
        o.check(&orphan_round(start, 1, &[deleted("v1")], false));
        o.check(&orphan_round(start, 2, &[], false));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
        // Under Report the Volume goes and leaves the connection.
        assert!(released(&mut orphan_observer(false), &[], true).is_empty());
    }

    #[test]
    fn an_orphan_not_seen_before_the_release_or_made_again_meanwhile_is_not_judged() {
        // First seen only in the round that shows the Volume gone: it may have come after.
        let mut o = orphan_observer(true);
        let start = Instant::now();
        o.check(&orphan_round(start, 0, &[volume("v1", true)], false));
        o.check(&orphan_round(start, 1, &[deleted("v1")], false));
        o.check(&orphan_round(start, 2, &[], true));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
        // Asked for again between the rounds, answered made, or with no answer at all (asked
        // before the orphan was first seen, carried out any time after): it may be another
        // connection than the one seen.
        for (sent_ms, made) in [(15, Some(true)), (1, None)] {
            let mut o = orphan_observer(true);
            let start = Instant::now();
            o.orphans.made.lock().expect("made").push(OrphanMade {
                handle: "h0".into(),
                sent: start + Duration::from_millis(sent_ms),
                made,
            });
            o.check(&orphan_round(start, 0, &[volume("v1", true)], true));
            o.check(&orphan_round(start, 1, &[deleted("v1")], true));
            o.check(&orphan_round(start, 2, &[], true));
            assert!(rules(&o).is_empty(), "{made:?}: {:?}", o.violations);
        }
        // Asked for and refused: nothing was made, the rule stands.
        let mut o = orphan_observer(true);
        let start = Instant::now();
        o.orphans.made.lock().expect("made").push(OrphanMade {
            handle: "h0".into(),
            sent: start + Duration::from_millis(15),
            made: Some(false),
        });
        assert_eq!(released(&mut o, &[], true), [Rule::ReleasedWithOrphan]);
        // A Volume that never carried the operator's finalizer is not the operator's release.
        let mut o = orphan_observer(true);
        let start = Instant::now();
        o.check(&orphan_round(start, 0, &[volume("v1", false)], true));
        o.check(&orphan_round(start, 1, &[], true));
        assert!(rules(&o).is_empty(), "{:?}", o.violations);
    }

    /// The handle of Volume `va`'s backend volume under `orphanPolicy: Detach` (`h0`) or
    /// `Report` (`h1`); no other handle belongs to the schedule.
    fn policy_of(handle: &str) -> Option<bool> {
        match handle {
            "h0" => Some(true),
            "h1" => Some(false),
            _ => None,
        }
    }

    fn made(handle: &str, at: Instant, made: Option<bool>) -> OrphanMade {
        OrphanMade {
            handle: handle.into(),
            sent: at,
            made,
        }
    }

    #[test]
    fn an_orphan_forced_before_its_grace_or_under_orphan_policy_report_is_a_violation() {
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let early = judge_orphan_forces(
            policy_of,
            &[made("h0", t0, Some(true))],
            &[("h0".into(), t0 + s(3))],
            grace,
        );
        assert_eq!(early.len(), 1, "{early:?}");
        assert!(early[0].contains("after the orphan was made"), "{early:?}");
        let report = judge_orphan_forces(
            policy_of,
            &[made("h1", t0, Some(true))],
            &[("h1".into(), t0 + s(30))],
            grace,
        );
        assert_eq!(report.len(), 1, "{report:?}");
        assert!(report[0].contains("orphanPolicy Report"), "{report:?}");
    }

    #[test]
    fn an_orphan_forced_after_its_grace_or_one_that_may_have_replaced_another_is_no_violation() {
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // After the grace, with the second of slack for the operator's whole-second record.
        for at in [s(5), s(9) / 2, s(60)] {
            let forces = [("h0".to_owned(), t0 + at)];
            let found =
                judge_orphan_forces(policy_of, &[made("h0", t0, Some(true))], &forces, grace);
            assert!(found.is_empty(), "{at:?}: {found:?}");
        }
        // A second orphan of the same handle, forced on the first one's time: the operator may not
        // have seen the first go (a daemon restart between them).
        let makes = [
            made("h0", t0, Some(true)),
            made("h0", t0 + s(4), Some(true)),
        ];
        let forces = [("h0".to_owned(), t0 + s(6))];
        assert!(judge_orphan_forces(policy_of, &makes, &forces, grace).is_empty());
        // The first ask of unknown outcome: when the orphan came is not known.
        let makes = [made("h0", t0, None), made("h0", t0 + s(4), Some(true))];
        let forces = [("h0".to_owned(), t0 + s(6))];
        assert!(judge_orphan_forces(policy_of, &makes, &forces, grace).is_empty());
        // A refused ask made nothing: the first orphan is the next one, judged.
        let makes = [
            made("h0", t0, Some(false)),
            made("h0", t0 + s(4), Some(true)),
        ];
        let forces = [("h0".to_owned(), t0 + s(6))];
        assert_eq!(
            judge_orphan_forces(policy_of, &makes, &forces, grace).len(),
            1
        );
    }
}

mod plan {
    use super::support::campaign::backend::CSI_METHODS;
    use super::support::campaign::plan::{Backend, FaultOp, Op, Plan};
    use super::support::csi::DRIVER_NAME;
    use super::support::grpc_proxy::Fault as GrpcFault;
    use std::time::Duration;

    #[test]
    fn a_seed_names_one_schedule() {
        let a = Plan::draw(42, Duration::from_secs(10));
        let b = Plan::draw(42, Duration::from_secs(10));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let c = Plan::draw(43, Duration::from_secs(10));
        assert_ne!(format!("{a:?}"), format!("{c:?}"));
    }

    /// A schedule on the csi backend attaches to the plugin's one node and spoils only what the
    /// plugin serves: its two calls, or all of them for a while; never a QMP command or the
    /// daemon. About a third of the seeds are drawn for it.
    #[test]
    fn a_schedule_on_the_csi_backend_names_the_plugin_and_faults_only_its_calls() {
        let plans: Vec<Plan> = (0..1000)
            .map(|seed| Plan::draw(seed, Duration::from_secs(15)))
            .collect();
        let csi: Vec<&Plan> = plans.iter().filter(|p| p.backend == Backend::Csi).collect();
        assert!(
            (200..=400).contains(&csi.len()),
            "{} of 1000 on csi",
            csi.len()
        );
        let mut plugin_faults = 0;
        let mut late_calls = 0;
        for plan in &csi {
            assert_eq!(plan.nodes, [DRIVER_NAME], "seed {}", plan.seed);
            assert!(!plan.faults.qsd_restart, "seed {}", plan.seed);
            for (_, fault) in &plan.fault_ops {
                match fault {
                    FaultOp::Grpc { method, fault, .. } => {
                        assert!(CSI_METHODS.contains(method), "seed {}", plan.seed);
                        plugin_faults += 1;
                        // Past the driver's deadline of 2 s, half a second within one more.
                        if let GrpcFault::Late(hold) = fault {
                            assert!(
                                (Duration::from_millis(2200)..=Duration::from_millis(3500))
                                    .contains(hold),
                                "seed {}: {hold:?}",
                                plan.seed
                            );
                            late_calls += 1;
                        }
                    }
                    FaultOp::PluginOutage(_) => plugin_faults += 1,
                    FaultOp::Qmp { .. } | FaultOp::Outage(_) | FaultOp::RestartQsd => {
                        panic!("seed {}: {fault} on the csi backend", plan.seed)
                    }
                    _ => {}
                }
            }
        }
        assert!(plugin_faults > csi.len(), "{plugin_faults} plugin faults");
        // About a fifth of the call faults.
        assert!(
            (plugin_faults / 10..plugin_faults / 3).contains(&late_calls),
            "{late_calls} late calls of {plugin_faults} plugin faults"
        );
        for plan in plans.iter().filter(|p| p.backend == Backend::Nbd) {
            assert!(
                !plan
                    .fault_ops
                    .iter()
                    .any(|(_, f)| matches!(f, FaultOp::Grpc { .. } | FaultOp::PluginOutage(_))),
                "seed {}",
                plan.seed
            );
        }
    }

    /// Orphans are drawn on nbd only, for multi-attach Volumes that alone name their backend
    /// volume, in some schedules, in time order with the rest of the workload.
    #[test]
    fn orphans_are_made_only_where_no_other_rule_is_changed_by_them() {
        let mut with_orphans = 0;
        for seed in 0..1000 {
            let plan = Plan::draw(seed, Duration::from_secs(15));
            let orphans: Vec<usize> = plan
                .ops
                .iter()
                .filter_map(|(_, op)| match op {
                    Op::Orphan { volume } => Some(*volume),
                    _ => None,
                })
                .collect();
            if orphans.is_empty() {
                continue;
            }
            with_orphans += 1;
            assert_eq!(plan.backend, Backend::Nbd, "seed {seed}");
            for volume in orphans {
                let drawn = &plan.volumes[volume];
                assert!(drawn.multi_attach, "seed {seed}");
                let sharing = plan.volumes.iter().filter(|v| v.handle == drawn.handle);
                assert_eq!(sharing.count(), 1, "seed {seed}");
            }
            assert!(
                plan.ops.windows(2).all(|w| w[0].0 <= w[1].0),
                "seed {seed}: in time order"
            );
        }
        assert!(
            (80..=300).contains(&with_orphans),
            "{with_orphans} of 1000 with orphans"
        );
    }
}
