//! Error types. Load errors happen before a function runs; call errors come
//! out of `init`, `process` and `tick`.

use std::time::Duration;

/// A boxed source error (wasmtime's own error type converts into it).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a runtime could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The wasmtime engine rejected the configuration (pool sizes, cache).
    #[error("engine configuration rejected")]
    Engine(#[source] BoxError),
    /// The compiled-code cache directory could not be created.
    #[error("cannot create compile cache directory {path}")]
    CacheDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The epoch watchdog thread could not be started.
    #[error("cannot start epoch watchdog thread")]
    Watchdog(#[source] std::io::Error),
}

/// Why a function could not be loaded (compiled, linked, instantiated or
/// initialised).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes do not hash to the digest the spec names.
    #[error("module digest mismatch: spec says {expected}, bytes hash to {actual}")]
    DigestMismatch {
        /// Digest from the spec.
        expected: String,
        /// Digest of the bytes.
        actual: String,
    },
    /// The embedder's module source could not provide the bytes.
    #[error("module {digest} not available")]
    ModuleUnavailable {
        /// Digest asked for.
        digest: String,
        /// What the source reported.
        #[source]
        source: BoxError,
    },
    /// The bytes are not valid WebAssembly (or not a valid component).
    #[error("malformed module")]
    Malformed(#[source] BoxError),
    /// The bytes are a core WebAssembly module, not a component.
    #[error("not a component: core wasm modules must be componentized first")]
    NotAComponent,
    /// The component imports something this function was not granted
    /// (including any WASI interface: WASI is denied).
    #[error("import `{import}` not granted to this function")]
    ImportNotGranted {
        /// The import name as the component spells it.
        import: String,
    },
    /// The component does not match the `device-function` world (missing
    /// export, wrong signature, unknown function in a granted interface).
    #[error("component does not match the edgefleet:device world")]
    Link(#[source] BoxError),
    /// The spec asks for more memory than the instance pool provides.
    #[error("memory limit {requested} bytes exceeds pool maximum {pool_max} bytes")]
    LimitTooLarge {
        /// `Limits::memory_bytes`.
        requested: u64,
        /// `PoolConfig::max_memory_bytes`.
        pool_max: u64,
    },
    /// Instantiation failed (pool exhausted, start function trapped, ...).
    #[error("instantiation failed")]
    Instantiate(#[source] BoxError),
    /// The guest's `init` failed.
    #[error("init failed")]
    Init(#[source] CallError),
}

/// Why a call into a guest failed. Every variant except
/// [`CallError::Guest`] and [`CallError::Unavailable`] means the instance is
/// no longer usable and is restarted with backoff.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call used up its fuel budget.
    #[error("out of fuel ({fuel} units per call)")]
    OutOfFuel {
        /// Budget per call.
        fuel: u64,
        /// The trap.
        #[source]
        source: BoxError,
    },
    /// The call ran past its epoch deadline (wall-clock timeout).
    #[error("timed out after {deadline:?}")]
    Timeout {
        /// Deadline per call.
        deadline: Duration,
        /// The trap.
        #[source]
        source: BoxError,
    },
    /// The guest tried to grow its memory (or tables) beyond its cap.
    #[error("memory limit exceeded: wanted {requested} bytes, cap {limit} bytes")]
    MemoryLimit {
        /// Cap from the spec.
        limit: u64,
        /// Size the guest asked for.
        requested: u64,
        /// The trap.
        #[source]
        source: BoxError,
    },
    /// The guest emitted more samples in one call than allowed.
    #[error("oversized emit: {attempted} samples in one call, limit {limit}")]
    OversizedEmit {
        /// `Limits::max_emit_samples`.
        limit: usize,
        /// Total the guest tried to emit.
        attempted: usize,
        /// The trap.
        #[source]
        source: BoxError,
    },
    /// The guest emitted a batch whose four columns differ in length, or to
    /// a stream it did not declare.
    #[error("malformed emit: {reason}")]
    MalformedEmit {
        /// What was wrong.
        reason: String,
        /// The trap.
        #[source]
        source: BoxError,
    },
    /// The guest trapped (unreachable, out-of-bounds access, stack overflow,
    /// division by zero, ...).
    #[error("guest trapped")]
    Trap(#[source] BoxError),
    /// The guest returned `err(message)`. The instance stays healthy.
    #[error("guest returned error: {0}")]
    Guest(String),
    /// The function is restarting after a failure and not yet due again.
    #[error("function `{function}` unavailable until {until_ms} ms (restart attempt {attempt})")]
    Unavailable {
        /// Function name.
        function: String,
        /// When the next restart will be tried.
        until_ms: u64,
        /// Consecutive failures so far.
        attempt: u32,
    },
    /// No function with that name is loaded.
    #[error("no function named `{0}`")]
    UnknownFunction(String),
    /// The restart (re-instantiation and `init`) itself failed.
    #[error("restart failed")]
    Restart(#[source] Box<LoadError>),
}

impl CallError {
    /// Whether the instance is dead after this error and must be restarted.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Self::Guest(_) | Self::Unavailable { .. } | Self::UnknownFunction(_)
        )
    }
}

/// Converts a wasmtime error into a [`BoxError`] for `#[source]`.
pub(crate) fn boxed(err: wasmtime::Error) -> BoxError {
    err.into_boxed_dyn_error()
}
