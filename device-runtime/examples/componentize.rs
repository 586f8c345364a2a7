//! Turns a core wasm module (a C guest built with clang) into a component of
//! the `edgefleet:device/device-function` world.
//!
//! ```text
//! cargo run -p device-runtime --example componentize -- IN.wasm OUT.wasm
//! ```
//!
//! The WIT comes from this crate's `wit/` directory and is embedded here
//! (the `component-type` custom section), so guests need not link the
//! `*_component_type.o` object that `wit-bindgen c` writes. Output is
//! deterministic: the same input bytes give the same component bytes.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use wit_component::{ComponentEncoder, StringEncoding, embed_component_metadata};
use wit_parser::Resolve;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: componentize IN.wasm OUT.wasm");
    };
    let core = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
    let component = componentize(&core, &wit)?;
    std::fs::write(PathBuf::from(output), component)
        .with_context(|| format!("writing {output}"))?;
    Ok(())
}

fn componentize(core: &[u8], wit: &Path) -> anyhow::Result<Vec<u8>> {
    let mut resolve = Resolve::default();
    let (package, _) = resolve.push_dir(wit).context("parsing WIT")?;
    let world = resolve.select_world(&[package], Some("device-function"))?;
    let mut module = core.to_vec();
    embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)?;
    ComponentEncoder::default()
        .module(&module)?
        .validate(true)
        .encode()
}
