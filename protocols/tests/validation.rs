//! Bad documents get errors that name the field.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use protocols::codec::decode_desired;

fn doc(devices: &str) -> String {
    format!(r#"{{"node":"n1","revision":1,"devices":{devices}}}"#)
}

fn err(json: &str) -> String {
    decode_desired(json.as_bytes()).unwrap_err().to_string()
}

#[test]
fn out_of_range_address_names_its_path() {
    let points: Vec<String> = (0..8)
        .map(|i| {
            let addr = if i == 7 { 70_000 } else { i };
            format!(
                r#"{{"index":{i},"name":"p{i}","address":{{"kind":"modbus","table":"holding","address":{addr}}}}}"#
            )
        })
        .collect();
    let dev = |id: u32, pts: &str| {
        format!(
            r#"{{"id":"d{id}","protocol":{{"kind":"modbus-tcp","host":"h"}},"groups":[{{"name":"g","interval_ms":100,"points":[{pts}]}}]}}"#
        )
    };
    let ok_points = r#"{"index":100,"name":"x","address":{"kind":"modbus","table":"coil","address":1,"data_type":"bool"}}"#;
    let devices = format!(
        "[{},{},{},{}]",
        dev(0, ok_points),
        dev(1, &ok_points.replace("100", "101")),
        dev(2, &ok_points.replace("100", "102")),
        dev(3, &points.join(","))
    );
    let e = err(&doc(&devices));
    assert!(
        e.contains(
            "devices[3].groups[0].points[7].address.address: 70000 is out of range 0..=65535"
        ),
        "{e}"
    );
}

#[test]
fn unknown_field_and_wrong_type_name_their_path() {
    let e = err(r#"{"node":"n1","revision":1,"colour":"red"}"#);
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = err(&doc(
        r#"[{"id":"d","protocol":{"kind":"synthetic"},"groups":[{"name":"g","interval_ms":"fast","points":[]}]}]"#,
    ));
    assert!(e.contains("devices[0].groups[0].interval_ms"), "{e}");
}

#[test]
fn semantic_errors_are_all_reported() {
    let e = err(&doc(
        r#"[{"id":"bad/id","protocol":{"kind":"modbus-rtu","path":"","unit":0},"groups":[{"name":"g","interval_ms":1,"points":[
            {"index":1,"name":"a","address":{"kind":"modbus","table":"coil","address":65535,"data_type":"f32"}},
            {"index":1,"name":"a","address":{"kind":"opc-ua","node_id":"ns=1;s=x"}}]}]}]"#,
    ));
    for want in [
        "devices[0].id: \"bad/id\" contains '/'",
        "devices[0].protocol.path: must not be empty",
        "devices[0].protocol.unit: 0 is out of range 1..=247",
        "devices[0].groups[0].interval_ms: 1 is out of range",
        "devices[0].groups[0].points[0].address.address: 65535 + 2 registers of F32 runs past 65535",
        "devices[0].groups[0].points[0].address.data_type: Coil holds single bits",
        "devices[0].groups[0].points[1].name: duplicate point name",
        "devices[0].groups[0].points[1].address: a opc-ua address does not fit a modbus-rtu device",
        "devices[0].groups[0].points[1].index: point index 1 is already used by devices[0].groups[0].points[0]",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn functions_must_reference_defined_things() {
    let json = r#"{"node":"n1","revision":0,"functions":[{"name":"f","module_sha256":"XYZ","module_size":0,
        "inputs":[9],"granted_devices":["nope"],"granted_models":["m"],"outputs":[],"limits":{"memory_bytes":1,"fuel_per_call":0,"deadline_ms":0}}],
        "config":{"batch_max_samples":0}}"#;
    let e = err(json);
    for want in [
        "revision: revisions start at 1",
        "functions[0].module_sha256: \"XYZ\" is not a lower-case hex sha256",
        "functions[0].module_size: 0 is out of range 1..=1073741824",
        "functions[0].inputs[0]: point index 9 is not defined by any device",
        "functions[0].granted_devices[0]: device \"nope\" is not defined",
        "functions[0].granted_models[0]: model \"m\" is not defined",
        "functions[0].outputs: a function needs at least one output stream",
        "functions[0].limits.memory_bytes: 1 is out of range",
        "functions[0].limits.fuel_per_call: 0 is out of range 1..=",
        "functions[0].limits.deadline_ms: 0 is out of range",
        "config.batch_max_samples: 0 is out of range 1..=100000",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for bad in [&b""[..], b"null", b"[]", b"{", b"\xff\xfe", b"{\"node\":1}"] {
        assert!(decode_desired(bad).is_err());
    }
}

#[test]
fn mqtt_device_errors_name_their_field() {
    let e = err(&doc(
        r#"[{"id":"m","protocol":{"kind":"mqtt","host":" ","port":0,"topic":"a/#/b","qos":2,"client_id":""},"groups":[{"name":"g","interval_ms":1000,"points":[
            {"index":1,"name":"a","address":{"kind":"mqtt","key":""}},
            {"index":2,"name":"b","address":{"kind":"mqtt","key":"x"}},
            {"index":3,"name":"c","address":{"kind":"mqtt","key":"x"}},
            {"index":4,"name":"d","address":{"kind":"modbus","table":"holding","address":1}}]}]},
          {"id":"n","protocol":{"kind":"modbus-tcp","host":"h"},"groups":[{"name":"g","interval_ms":1000,"points":[
            {"index":5,"name":"e","address":{"kind":"mqtt","key":"k"}}]}]}]"#,
    ));
    for want in [
        "devices[0].protocol.host: must not be empty",
        "devices[0].protocol.port: 0 is not a usable port",
        "devices[0].protocol.topic: \"a/#/b\": `#` must be a whole level and the last one",
        "devices[0].protocol.qos: 2 must be 0 or 1",
        "devices[0].protocol.client_id: must be 1..=128 bytes",
        "devices[0].groups[0].points[0].address.key: must be 1..=256 bytes",
        "devices[0].groups[0].points[2].address.key: duplicate key \"x\"",
        "devices[0].groups[0].points[3].address: a modbus address does not fit a mqtt device",
        "devices[1].groups[0].points[0].address: a mqtt address does not fit a modbus-tcp device",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    let e = err(&doc(
        r#"[{"id":"m","protocol":{"kind":"mqtt","host":"h"},"groups":[]}]"#,
    ));
    assert!(e.contains("devices[0].protocol"), "{e}");
    assert!(e.contains("topic"), "{e}");
}

#[test]
fn mqtt_device_tls_and_login_name_only_files_in_the_secrets_dir() {
    let mqtt = |extra: &str| {
        doc(&format!(
            r#"[{{"id":"m","protocol":{{"kind":"mqtt","host":"h","topic":"t"{extra}}},"groups":[{{"name":"g","interval_ms":1000,"points":[{{"index":1,"name":"a","address":{{"kind":"mqtt","key":"a"}}}}]}}]}}]"#
        ))
    };
    // Optional: absent is what every existing document says.
    decode_desired(mqtt("").as_bytes()).unwrap();
    let ok = decode_desired(
        mqtt(r#","ca_file":"plant-ca.pem","username":"edge","password_file":"plant-broker.pw""#)
            .as_bytes(),
    )
    .unwrap();
    let protocols::DeviceProtocol::Mqtt {
        ca_file,
        username,
        password_file,
        ..
    } = &ok.devices[0].protocol
    else {
        panic!("not mqtt");
    };
    assert_eq!(ca_file.as_deref(), Some("plant-ca.pem"));
    assert_eq!(username.as_deref(), Some("edge"));
    assert_eq!(password_file.as_deref(), Some("plant-broker.pw"));
    // A path is not a name: the document cannot make the gateway read
    // (and send to a broker it chose) any file it likes.
    let e = err(&mqtt(
        r#","ca_file":"/etc/ssl/x.pem","username":"","password_file":"../identity/node.key""#,
    ));
    for want in [
        "devices[0].protocol.ca_file: \"/etc/ssl/x.pem\": must be a plain file name",
        "devices[0].protocol.password_file: \"../identity/node.key\": must be a plain file name",
        "devices[0].protocol.username: must be 1..=256 bytes",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    let e = err(&mqtt(r#","password_file":".pw""#));
    assert!(
        e.contains("devices[0].protocol.password_file: \".pw\": must not start with '.'"),
        "{e}"
    );
    assert!(
        e.contains("devices[0].protocol.password_file: needs username"),
        "{e}"
    );
}

#[test]
fn mqtt_device_payload_format() {
    use protocols::MqttDevicePayload;
    let p: MqttDevicePayload =
        serde_json::from_str(r#"{"ts_ms":5,"values":{"a":1.5,"b":null}}"#).unwrap();
    assert_eq!(p.ts_ms, Some(5));
    assert_eq!(p.values["a"], Some(1.5));
    assert_eq!(p.values["b"], None);
    let p: MqttDevicePayload = serde_json::from_str(r#"{"values":{}}"#).unwrap();
    assert_eq!(p.ts_ms, None);
    for bad in [
        r#"{"values":{"a":"1"}}"#,
        r#"{"ts_ms":-1,"values":{}}"#,
        r#"{"values":{},"extra":1}"#,
        r#"{"ts_ms":1}"#,
        "[1,2]",
    ] {
        assert!(
            serde_json::from_str::<MqttDevicePayload>(bad).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn desired_documents_are_bounded_and_the_bound_is_named() {
    let points: Vec<_> = (0..3)
        .map(|i| serde_json::json!({"index": i, "name": format!("p{i}"),
            "address": {"kind": "synthetic", "signal": {"shape": "sine", "amplitude": 1.0, "period_s": 1.0}}}))
        .collect();
    let devices: Vec<_> = (0..=protocols::limits::MAX_DESIRED_DEVICES)
        .map(|i| serde_json::json!({"id": format!("d{i}"), "protocol": {"kind": "synthetic"},
            "groups": [{"name": "g", "interval_ms": 1000, "points": if i == 0 { points.clone() } else { Vec::new() }}]}))
        .collect();
    let doc = serde_json::json!({"node": "n", "revision": 1, "devices": devices,
        "models": [{"name": "m", "sha256": "a".repeat(64), "size": protocols::limits::MAX_ARTIFACT_BYTES + 1}],
        "functions": [{"name": "f", "module_sha256": "b".repeat(64), "module_size": 10, "inputs": [0], "outputs": (0..17).map(|i| format!("s{i}")).collect::<Vec<_>>(),
            "limits": {"memory_bytes": 128 << 20, "fuel_per_call": u64::MAX, "deadline_ms": 1001}}]});
    let e = decode_desired(&serde_json::to_vec(&doc).unwrap())
        .unwrap_err()
        .to_string();
    for want in [
        "devices: 4097 entries, more than the limit of 4096 (limits::MAX_DESIRED_DEVICES)",
        "models[0].size: 1073741825 is more than 1073741824 (limits::MAX_ARTIFACT_BYTES)",
        "functions[0].outputs: 17 streams, more than the limit of 16 (limits::MAX_FUNCTION_OUTPUTS)",
        "functions[0].limits.memory_bytes: 134217728 is out of range 65536..=67108864",
        "functions[0].limits.fuel_per_call: 18446744073709551615 is out of range",
        "functions[0].limits.deadline_ms: 1001 is out of range 1..=1000 (limits::MAX_FUNCTION_DEADLINE_MS)",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}
