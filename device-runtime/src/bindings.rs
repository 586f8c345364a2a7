//! Host bindings generated from `wit/device.wit` by `wasmtime::component::bindgen!`.

#![allow(missing_docs, clippy::pedantic, missing_debug_implementations)]

wasmtime::component::bindgen!({
    path: "wit",
    world: "device-function",
    imports: { default: trappable },
    additional_derives: [PartialEq],
});
