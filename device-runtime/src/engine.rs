//! Engine configuration: pooling allocator, fuel, epoch watchdog and the
//! on-disk compiled-code cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
};

use crate::backoff::BackoffConfig;
use crate::budget::CpuBudget;
use crate::cache::CacheLimits;
use crate::error::{RuntimeError, boxed};
use crate::throttle::LogLimits;

/// Instance pool sizing. The pool reserves virtual address space up front
/// and makes instantiation a matter of handing out a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Function instances that can live at once. A hot swap briefly needs
    /// two instances of the same function, so keep headroom.
    pub max_instances: u32,
    /// Largest linear memory any instance may have (bytes); the per-function
    /// [`Limits::memory_bytes`](crate::Limits) must stay within it.
    pub max_memory_bytes: u64,
    /// Core wasm instances per component (the guest module plus the
    /// canonical-ABI shims `wit-component` adds).
    pub max_core_instances_per_component: u32,
    /// Table elements per table.
    pub table_elements: usize,
}

impl Default for PoolConfig {
    /// Sized for a gateway: 64 live instances of up to 64 MiB each.
    fn default() -> Self {
        Self {
            max_instances: 64,
            max_memory_bytes: 64 << 20,
            max_core_instances_per_component: 8,
            table_elements: 20_000,
        }
    }
}

/// Runtime-wide configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Instance pool sizing.
    pub pool: PoolConfig,
    /// Period of the epoch watchdog; per-call deadlines are rounded up to a
    /// multiple of it.
    pub epoch_tick: Duration,
    /// Directory for compiled code. `None` disables the disk cache (every
    /// load compiles). Entries are keyed by the module digest, the engine
    /// configuration and the wasmtime version, so a restart with the same
    /// modules loads machine code instead of compiling.
    pub cache_dir: Option<PathBuf>,
    /// Restart policy for crashed functions.
    pub backoff: BackoffConfig,
    /// Guest log rate limit, per function.
    pub log: LogLimits,
    /// Bounds of the in-memory compiled-component cache.
    pub component_cache: CacheLimits,
    /// Call time each function may use before it is held back.
    pub cpu: CpuBudget,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            pool: PoolConfig::default(),
            epoch_tick: Duration::from_millis(10),
            cache_dir: None,
            backoff: BackoffConfig::default(),
            log: LogLimits::default(),
            component_cache: CacheLimits::default(),
            cpu: CpuBudget::default(),
        }
    }
}

/// Builds the engine; also returns a handle to its compile cache (if any)
/// for hit/miss statistics.
pub(crate) fn build_engine(
    config: &RuntimeConfig,
) -> Result<(Engine, Option<Cache>), RuntimeError> {
    let mut pool = PoolingAllocationConfig::new();
    let instances = config.pool.max_instances.max(1);
    let per = config.pool.max_core_instances_per_component.max(1);
    let max_memory = usize::try_from(config.pool.max_memory_bytes).unwrap_or(usize::MAX);
    pool.total_component_instances(instances)
        .max_core_instances_per_component(per)
        .total_core_instances(instances.saturating_mul(per))
        .max_memories_per_component(2)
        .max_tables_per_component(4)
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .total_gc_heaps(0)
        .table_elements(config.pool.table_elements)
        .max_memory_size(max_memory);

    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .wasm_threads(false)
        .wasm_gc(false)
        .wasm_function_references(false)
        .wasm_stack_switching(false)
        .wasm_component_model_async(false);

    let mut cache_handle = None;
    if let Some(dir) = &config.cache_dir {
        std::fs::create_dir_all(dir).map_err(|source| RuntimeError::CacheDir {
            path: dir.clone(),
            source,
        })?;
        let mut cache_config = CacheConfig::new();
        cache_config.with_directory(dir);
        let cache = Cache::new(cache_config).map_err(|e| RuntimeError::Engine(boxed(e)))?;
        cache_handle = Some(cache.clone());
        wasm.cache(Some(cache));
    }
    let engine = Engine::new(&wasm).map_err(|e| RuntimeError::Engine(boxed(e)))?;
    Ok((engine, cache_handle))
}

/// Background thread that advances the engine epoch every `tick`.
///
/// # Invariants
/// Exactly one ticker per engine; it stops and is joined when dropped.
#[derive(Debug)]
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(crate) fn start(engine: &Engine, tick: Duration) -> Result<Self, RuntimeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let weak = engine.weak();
        let tick = tick.max(Duration::from_millis(1));
        let handle = std::thread::Builder::new()
            .name("device-runtime-epoch".to_owned())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(RuntimeError::Watchdog)?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            // A panicking ticker thread has nothing left to clean up.
            let _ = handle.join();
        }
    }
}
