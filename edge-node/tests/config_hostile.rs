//! Hostile config files: `examples/edge.toml` mutated at random (a value replaced
//! with an extreme one of any type, a line dropped, an unknown key added)
//! never panics the loader; a refusal names the file, and a file that loads
//! either validates or every problem names its field.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::PathBuf;

use edge_node::config::EdgeConfig;
use proptest::prelude::*;

fn example() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/edge.toml"))
        .unwrap()
}

fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("1e308".to_owned()),
        Just("nan".to_owned()),
        Just("true".to_owned()),
        Just("\"\"".to_owned()),
        Just("\"../../../etc/passwd\"".to_owned()),
        Just("\"0ms\"".to_owned()),
        Just("\"999999999days\"".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        "[a-z0-9:./\\-]{0,20}".prop_map(|s| format!("\"{s}\"")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn mutated_example_configs_never_panic_and_errors_name_their_place(
        line in any::<prop::sample::Index>(),
        with in nasty(),
        mode in 0..3u8,
    ) {
        let text = example();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let i = line.index(lines.len());
        match mode {
            0 => {
                if let Some((k, _)) = lines[i].clone().split_once('=') {
                    lines[i] = format!("{k}= {with}");
                }
            }
            1 => {
                lines.remove(i);
            }
            _ => lines.insert(i, format!("surprise_key = {with}")),
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, lines.join("\n")).unwrap();
        match EdgeConfig::load(Some(&path), |_| None) {
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("edge.toml") || msg.contains("environment"), "{msg}");
            }
            Ok(cfg) => {
                if let Err(errs) = cfg.validate() {
                    for e in errs.to_string().split("; ") {
                        prop_assert!(e.contains(':'), "an error without its field: {e}");
                    }
                }
            }
        }
    }
}
