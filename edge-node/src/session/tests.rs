#![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
use super::*;
use protocols::signing::SigningKey;

const DESIRED: &str = "edgefleet/v1/nodes/n-1/desired";
const ACK: &str = "edgefleet/v1/nodes/n-1/ack";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn desired(node: &str, revision: u64) -> DesiredState {
    DesiredState {
        node: node.into(),
        revision,
        functions: Vec::new(),
        devices: Vec::new(),
        models: Vec::new(),
        config: protocols::NodeConfig {
            report_interval_ms: 1_234,
            batch_max_age_ms: 500,
            ..protocols::NodeConfig::default()
        },
    }
}

fn signed(node: &str, revision: u64, key: &SigningKey) -> SignedDesired {
    SignedDesired::sign(&desired(node, revision), key).unwrap()
}

fn doc(node: &str, revision: u64, key: &SigningKey) -> Vec<u8> {
    signed(node, revision, key).encode().unwrap()
}

fn published(out: &[Output], kind: TopicKind) -> Vec<Vec<u8>> {
    let t = Topics::default();
    out.iter()
        .filter_map(|o| match o {
            Output::Publish { topic, payload, .. }
                if t.parse(topic).map(|(_, k)| k) == Some(kind) =>
            {
                Some(payload.clone())
            }
            _ => None,
        })
        .collect()
}

fn report(out: &[Output]) -> ReportedState {
    let reports: Vec<&ReportedState> = out
        .iter()
        .filter_map(|o| match o {
            Output::Report { topic, state } => {
                assert_eq!(topic, "edgefleet/v1/nodes/n-1/reported");
                Some(&**state)
            }
            _ => None,
        })
        .collect();
    assert_eq!(reports.len(), 1, "one report in {out:?}");
    reports[0].clone()
}

fn event(out: &[Output]) -> Event {
    serde_json::from_slice(&published(out, TopicKind::Events)[0]).unwrap()
}

fn bare() -> Session {
    Session::new("n-1", Topics::default(), Arc::default(), 10)
}

fn session(hub: &SigningKey) -> Session {
    bare().trusting(hub.verifying_key())
}

fn deliver(s: &mut Session, topic: &str, payload: &[u8], now: u64) -> Vec<Output> {
    s.handle(Input::Message { topic, payload }, now)
}

fn counter(s: &Session, name: &str) -> u64 {
    s.counters.snapshot()[name]
}

#[test]
fn connect_subscribes_and_announces_like_the_agent() {
    let hub = key(1);
    let mut s = session(&hub);
    let out = s.handle(Input::Connected, 20);
    assert_eq!(out[0], Output::Subscribe(vec![DESIRED.into(), ACK.into()]));
    assert!(out.contains(&Output::LinkUp));
    let status: NodeStatus =
        serde_json::from_slice(&published(&out, TopicKind::Status)[0]).unwrap();
    assert_eq!(status.state, NodeState::Online);
    let rep = report(&out);
    assert_eq!((rep.applied_revision, rep.offline_since_ms), (0, Some(10)));
    let (topic, will) = s.last_will(30);
    assert_eq!(topic, "edgefleet/v1/nodes/n-1/status");
    let will: NodeStatus = serde_json::from_slice(&will).unwrap();
    assert_eq!(will.state, NodeState::Offline);
    assert_eq!(counter(&s, "connects"), 1);
}

#[test]
fn a_signed_newer_revision_is_persisted_then_applied_and_reported() {
    let hub = key(1);
    let mut s = session(&hub);
    s.handle(Input::Connected, 20);
    let payload = doc("n-1", 3, &hub);
    let out = deliver(&mut s, DESIRED, &payload, 30);
    assert_eq!(out[0], Output::PersistDesired(signed("n-1", 3, &hub)));
    match &out[1] {
        Output::Apply { desired, previous } => {
            assert_eq!(desired.revision, 3);
            assert!(previous.is_none());
        }
        other => panic!("expected apply, got {other:?}"),
    }
    assert_eq!(out[2], Output::Applied { revision: 3 });
    let rep = report(&out);
    assert_eq!(rep.applied_revision, 3);
    assert_eq!(rep.offline_since_ms, None);
    assert_eq!(rep.counters["desired_applied"], 1);
    assert_eq!(event(&out).kind, EventKind::DesiredApplied { revision: 3 });
    assert_eq!(s.report_interval_ms(), 1_234);
    // The next revision names this one as the previous.
    let out = deliver(&mut s, DESIRED, &doc("n-1", 4, &hub), 35);
    assert!(matches!(
        &out[1],
        Output::Apply { desired, previous: Some(p) } if desired.revision == 4 && p.revision == 3
    ));
}

#[test]
fn a_redelivered_revision_does_nothing() {
    let hub = key(1);
    let mut s = session(&hub);
    let payload = doc("n-1", 3, &hub);
    deliver(&mut s, DESIRED, &payload, 30);
    assert!(deliver(&mut s, DESIRED, &payload, 40).is_empty());
    assert!(
        deliver(&mut s, DESIRED, b"", 41).is_empty(),
        "cleared retained"
    );
    assert_eq!(counter(&s, "desired_applied"), 1);
    assert_eq!(counter(&s, "desired_rejected"), 0);
}

#[test]
fn a_stale_revision_is_refused_and_the_applied_one_stays() {
    let hub = key(1);
    let mut s = session(&hub);
    deliver(&mut s, DESIRED, &doc("n-1", 7, &hub), 30);
    let out = deliver(&mut s, DESIRED, &doc("n-1", 6, &hub), 40);
    assert_eq!(
        out[0],
        Output::Rejected {
            revision: Some(6),
            reason: "stale revision 6 (applied 7)".into()
        }
    );
    assert_eq!(
        event(&out).kind,
        EventKind::DesiredRejected { revision: Some(6) }
    );
    assert_eq!(out.len(), 3, "no persist or apply: {out:?}");
    let rep = report(&out);
    assert_eq!(rep.applied_revision, 7);
    assert_eq!(rep.received_revision, 7);
    assert_eq!(
        rep.rejected,
        Some(Rejection {
            revision: Some(6),
            reason: "stale revision 6 (applied 7)".into(),
            at_ms: 40
        })
    );
    assert_eq!(s.applied_revision(), 7);
}

#[test]
fn forged_foreign_and_garbage_documents_are_refused() {
    let hub = key(1);
    let mut s = session(&hub);
    s.handle(Input::Connected, 20);
    let mut bad_sig = signed("n-1", 5, &hub);
    bad_sig.payload = bad_sig.payload.replace("\"revision\":5", "\"revision\":9");
    let cases = [
        (doc("n-1", 5, &key(2)), Some(5), "untrusted key"),
        (doc("n-2", 5, &hub), Some(5), "for node"),
        (bad_sig.encode().unwrap(), Some(9), "does not verify"),
        (b"{not json".to_vec(), None, "signed desired state"),
    ];
    for (payload, rev, why) in cases {
        let out = deliver(&mut s, DESIRED, &payload, 30);
        match &out[0] {
            Output::Rejected { revision, reason } => {
                assert_eq!(*revision, rev);
                assert!(reason.contains(why), "{reason} should say {why}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(
            event(&out).kind,
            EventKind::DesiredRejected { revision: rev }
        );
        assert_eq!(out.len(), 3, "rejection, event, report: {out:?}");
        let rep = report(&out);
        assert_eq!(rep.received_revision, 0, "nothing verified was received");
        let rejected = rep.rejected.unwrap();
        assert_eq!((rejected.revision, rejected.at_ms), (rev, 30));
        assert!(rejected.reason.contains(why), "{rejected:?}");
    }
    assert_eq!(s.applied_revision(), 0);
    assert_eq!(counter(&s, "desired_rejected"), 4);
}

#[test]
fn a_key_is_pinned_only_with_an_accepted_document() {
    let hub = key(1);
    let mut s = bare();
    // A forged signature, a foreign node's document: nothing pinned.
    let mut forged = signed("n-1", 5, &key(3));
    forged.payload = forged.payload.replace("\"revision\":5", "\"revision\":6");
    for payload in [forged.encode().unwrap(), doc("n-2", 5, &key(3))] {
        let out = deliver(&mut s, DESIRED, &payload, 30);
        assert!(matches!(out[0], Output::Rejected { .. }), "{out:?}");
        assert!(!out.iter().any(|o| matches!(o, Output::PinKey(_))));
        assert_eq!(s.trusted_key(), None);
    }
    // The first valid one pins its signer, before it is persisted.
    let out = deliver(&mut s, DESIRED, &doc("n-1", 5, &hub), 40);
    assert_eq!(out[0], Output::PinKey(key_to_hex(&hub.verifying_key())));
    assert!(matches!(out[1], Output::PersistDesired(_)));
    assert_eq!(s.trusted_key(), Some(hub.verifying_key()));
    // From then on only that key is trusted, and it is not pinned again.
    let out = deliver(&mut s, DESIRED, &doc("n-1", 6, &key(3)), 50);
    assert!(matches!(&out[0], Output::Rejected { reason, .. } if reason.contains("untrusted")));
    let out = deliver(&mut s, DESIRED, &doc("n-1", 6, &hub), 60);
    assert!(matches!(out[0], Output::PersistDesired(_)), "{out:?}");
}

#[test]
fn a_restart_reapplies_from_disk_and_ignores_the_retained_redelivery() {
    let hub = key(1);
    let restored = Restored {
        hub_key: Some(key_to_hex(&hub.verifying_key())),
        current: Some(signed("n-1", 4, &hub)),
        previous: Some(signed("n-1", 3, &hub)),
        clean_stop: true,
        last_commit_ms: Some(5),
        last_commit_lag_ms: 0,
        loss_windows: vec![LossWindow {
            from_ms: 1,
            to_ms: 2,
        }],
    };
    let mut s = bare();
    let out = s.handle(Input::Restore(&restored), 100);
    assert_eq!(out.len(), 1, "a clean stop records no window: {out:?}");
    assert!(matches!(
        &out[0],
        Output::Apply { desired, previous: Some(p) } if desired.revision == 4 && p.revision == 3
    ));
    assert_eq!(s.applied_revision(), 4);
    // The broker re-delivers the retained document on connect.
    s.handle(Input::Connected, 110);
    assert!(deliver(&mut s, DESIRED, &doc("n-1", 4, &hub), 120).is_empty());
    let out = deliver(&mut s, DESIRED, &doc("n-1", 3, &hub), 130);
    assert!(matches!(&out[0], Output::Rejected { reason, .. } if reason.contains("stale")));
    let rep = s.reported(140);
    assert_eq!(
        rep.loss_windows,
        vec![LossWindow {
            from_ms: 1,
            to_ms: 2
        }]
    );
}

#[test]
fn an_unclean_restart_records_a_loss_window_and_reports_it() {
    let hub = key(1);
    let restored = Restored {
        hub_key: Some(key_to_hex(&hub.verifying_key())),
        current: Some(signed("n-1", 4, &hub)),
        previous: None,
        clean_stop: false,
        last_commit_ms: Some(1_000),
        last_commit_lag_ms: 0,
        loss_windows: Vec::new(),
    };
    let mut s = bare();
    let out = s.handle(Input::Restore(&restored), 2_000);
    // The window starts one batch age (500 ms) before the last commit.
    let w = LossWindow {
        from_ms: 500,
        to_ms: 2_000,
    };
    assert_eq!(out[1], Output::RecordLossWindow(w));
    assert_eq!(
        event(&out).kind,
        EventKind::UncleanRestart {
            from_ms: 500,
            to_ms: 2_000
        }
    );
    assert_eq!(s.reported(2_001).loss_windows, vec![w]);
    // A stored document that does not verify with the trusted key is not applied.
    let mut other = bare();
    let restored = Restored {
        current: Some(signed("n-1", 4, &key(2))),
        ..restored
    };
    let out = other.handle(Input::Restore(&restored), 2_000);
    assert!(!out.iter().any(|o| matches!(o, Output::Apply { .. })));
    assert_eq!(
        out[0],
        Output::RecordLossWindow(LossWindow {
            from_ms: 1_000,
            to_ms: 2_000
        })
    );
}

fn signed_ack(node: &str, stream: &str, up_to_seq: u64, key: &SigningKey) -> Vec<u8> {
    let ack = protocols::Ack {
        stream: stream.into(),
        up_to_seq,
    };
    SignedAck::sign(node, &ack, key).unwrap().encode().unwrap()
}

/// Acks are signed by the hub for this node since issue 12 (C3): the bare
/// JSON ack this test used to route, and garbage, are now refused and counted
/// as unsigned without an event (a flood of forged acks must not become a
/// flood of events); a signed ack with an invalid stream still raises one.
#[test]
fn acks_are_routed_to_their_stream_and_bad_ones_counted() {
    let hub = key(1);
    let mut s = session(&hub);
    let out = deliver(&mut s, ACK, &signed_ack("n-1", "raw", 42, &hub), 10);
    assert_eq!(
        out,
        vec![Output::Ack {
            stream: "raw".into(),
            up_to: 42
        }]
    );
    let out = deliver(&mut s, ACK, b"{garbage", 11);
    assert!(out.is_empty());
    let out = deliver(&mut s, ACK, &signed_ack("n-1", "../x", 1, &hub), 12);
    assert_eq!(
        event(&out).kind,
        EventKind::BadMessage { topic: ACK.into() }
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Ack { .. })));
    // Another node's ack topic is not ours.
    let out = deliver(
        &mut s,
        "edgefleet/v1/nodes/n-2/ack",
        &signed_ack("n-2", "raw", 42, &hub),
        13,
    );
    assert!(out.is_empty());
    assert_eq!(counter(&s, "bad_messages"), 1);
    assert_eq!(counter(&s, "acks_refused_unsigned"), 1);
    assert_eq!(counter(&s, "acks_refused_invalid"), 1);
}

#[test]
fn forged_acks_are_refused_by_reason_and_never_acted_on() {
    let hub = key(1);
    let mut s = session(&hub);
    let forged: [(&[u8], &str); 4] = [
        (
            br#"{"stream":"raw","up_to_seq":18446744073709551615}"#,
            "acks_refused_unsigned",
        ),
        (
            &signed_ack("n-1", "raw", u64::MAX, &key(2)),
            "acks_refused_bad_signature",
        ),
        // Signed by the hub, but for n-2: replayed on n-1's topic.
        (
            &signed_ack("n-2", "raw", u64::MAX, &hub),
            "acks_refused_wrong_node",
        ),
        (
            br#"{"payload":"{}","signature":"AA=="}"#,
            "acks_refused_bad_signature",
        ),
    ];
    for (i, (payload, reason)) in forged.iter().enumerate() {
        let before = counter(&s, reason);
        let out = deliver(&mut s, ACK, payload, 20 + i as u64);
        assert!(out.is_empty(), "{reason}: {out:?}");
        assert_eq!(counter(&s, reason), before + 1, "{reason}");
    }
    // A node that trusts no key yet refuses even a correctly signed ack.
    let mut fresh = bare();
    assert!(deliver(&mut fresh, ACK, &signed_ack("n-1", "raw", 5, &hub), 30).is_empty());
    assert_eq!(counter(&fresh, "acks_refused_no_key"), 1);
}

#[test]
fn reports_only_while_connected_and_foreign_topics_are_counted() {
    let hub = key(1);
    let mut s = session(&hub);
    assert!(s.handle(Input::ReportTick, 11).is_empty());
    s.handle(Input::Connected, 12);
    report(&s.handle(Input::ReportTick, 13));
    assert_eq!(s.handle(Input::Disconnected, 14), vec![Output::LinkDown]);
    assert!(s.handle(Input::Disconnected, 14).is_empty());
    assert!(s.handle(Input::ReportTick, 15).is_empty());
    assert_eq!(s.reported(15).offline_since_ms, Some(14));
    let out = deliver(&mut s, "edgefleet/v1/nodes/n-2/desired", b"x", 16);
    assert!(out.is_empty());
    assert_eq!(counter(&s, "bad_messages"), 1);
    assert_eq!(counter(&s, "disconnects"), 1);
    s.handle(Input::Connected, 17);
    assert_eq!(s.reported(18).offline_since_ms, None);
    let out = s.handle(Input::Stopping, 19);
    let status: NodeStatus =
        serde_json::from_slice(&published(&out, TopicKind::Status)[0]).unwrap();
    assert_eq!(status.state, NodeState::Offline);
}

#[test]
fn a_lagging_pipeline_widens_the_loss_window_and_a_wild_clock_is_capped() {
    let hub = key(1);
    let base = Restored {
        hub_key: Some(key_to_hex(&hub.verifying_key())),
        current: Some(signed("n-1", 4, &hub)),
        previous: None,
        clean_stop: false,
        last_commit_ms: Some(100_000),
        last_commit_lag_ms: 700,
        loss_windows: Vec::new(),
    };
    // Appends ran 700 ms behind the samples' time: the window starts twice
    // that before the last commit, not one batch age (500 ms).
    let out = bare().handle(Input::Restore(&base), 101_000);
    assert_eq!(
        out[1],
        Output::RecordLossWindow(LossWindow {
            from_ms: 98_600,
            to_ms: 101_000
        })
    );
    let wild = Restored {
        last_commit_lag_ms: 10_000_000,
        ..base
    };
    let out = bare().handle(Input::Restore(&wild), 101_000);
    assert_eq!(
        out[1],
        Output::RecordLossWindow(LossWindow {
            from_ms: 100_000 - super::MAX_LOSS_LAG_MS,
            to_ms: 101_000
        })
    );
}

#[test]
fn a_rejoined_node_refuses_documents_older_than_its_join_floor() {
    let hub = key(1);
    // Wiped store (nothing applied), joined while the hub was at revision 5.
    let mut s = session(&hub).with_revision_floor(5);
    let out = deliver(&mut s, DESIRED, &doc("n-1", 4, &hub), 10);
    assert!(
        matches!(&out[0], Output::Rejected { revision: Some(4), reason } if reason.contains("when this node joined")),
        "{out:?}"
    );
    assert_eq!(counter(&s, "desired_applied"), 0);
    let out = deliver(&mut s, DESIRED, &doc("n-1", 5, &hub), 20);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Applied { revision: 5 })),
        "{out:?}"
    );
}

#[test]
fn received_revision_is_reported_on_accept_and_after_restart() {
    let hub = key(1);
    let mut s = session(&hub);
    assert_eq!(s.reported(1).received_revision, 0);
    let out = deliver(&mut s, DESIRED, &doc("n-1", 5, &hub), 30);
    assert_eq!(report(&out).received_revision, 5);
    assert_eq!(report(&out).rejected, None);
    // A refusal later does not lower what was received.
    let out = deliver(&mut s, DESIRED, &doc("n-1", 3, &hub), 40);
    let rep = report(&out);
    assert_eq!((rep.received_revision, rep.applied_revision), (5, 5));
    assert_eq!(rep.rejected.unwrap().revision, Some(3));
    // After a restart, the stored document counts as received.
    let restored = Restored {
        hub_key: Some(key_to_hex(&hub.verifying_key())),
        current: Some(signed("n-1", 5, &hub)),
        previous: None,
        clean_stop: true,
        last_commit_ms: None,
        last_commit_lag_ms: 0,
        loss_windows: Vec::new(),
    };
    let mut s = bare();
    s.handle(Input::Restore(&restored), 100);
    let rep = s.reported(110);
    assert_eq!((rep.received_revision, rep.rejected), (5, None));
}
