//! # edgefleet-shell — the process shell of the edgefleet binaries
//!
//! What every `main.rs` of the workspace does around its library: install the
//! TLS crypto provider ([`install_crypto_provider`]), start tracing
//! ([`init_tracing`]), turn SIGINT/SIGTERM into a graceful stop
//! ([`shutdown_signal`]), and exit with [`EX_USAGE`] on bad usage or
//! configuration. Binaries stay thin: parse flags and config, call these,
//! run the library's `App`/`Agent`.
//!
//! It knows nothing about the hub or the agent; it lives below `protocols/`
//! only because the top-level layout is fixed.

use std::future::Future;

/// Exit code for bad usage or configuration (`EX_USAGE` of BSD `sysexits.h`).
pub const EX_USAGE: u8 = 64;

/// The signal that asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (systemd, Kubernetes, `kill`).
    Terminate,
}

/// A future that resolves on the first SIGINT or SIGTERM (Ctrl-C only where
/// there is no SIGTERM).
///
/// The handlers are installed by this call, not when the future is first
/// polled: call it before starting the service, and a signal that arrives
/// during startup is kept (instead of killing the process) and ends the
/// future as soon as it is awaited. A handler that cannot be installed is
/// logged and never fires; the other one still works.
///
/// Must be called inside a Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = Signal> + Send + 'static {
    imp::shutdown_signal()
}

/// Installs the `tracing` subscriber: formatted to stdout, filtered by
/// `RUST_LOG` when it is set, else by `default_filter` (a directive list such
/// as `"info,rumqttc=warn"`). A second call does nothing.
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

/// [`init_tracing`] writing to stderr, for tools whose stdout is their
/// result (`fleet-sim` prints its JSON report there).
pub fn init_tracing_to_stderr(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs rustls' ring crypto provider for the process (the workspace
/// builds rustls without a default provider). Does nothing if a provider is
/// already installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(unix)]
mod imp {
    use std::future::Future;

    use tokio::signal::unix::{SignalKind, signal};

    use super::Signal;

    pub(super) fn shutdown_signal() -> impl Future<Output = Signal> + Send + 'static {
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            tokio::select! {
                () = recv(interrupt) => Signal::Interrupt,
                () = recv(terminate) => Signal::Terminate,
            }
        }
    }

    fn listen(kind: SignalKind, name: &str) -> Option<tokio::signal::unix::Signal> {
        match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(signal = name, error = %e, "cannot install the signal handler");
                None
            }
        }
    }

    /// Resolves on the next delivery; never, without a handler.
    async fn recv(s: Option<tokio::signal::unix::Signal>) {
        match s {
            Some(mut s) => {
                if s.recv().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use std::future::Future;

    use super::Signal;

    pub(super) fn shutdown_signal() -> impl Future<Output = Signal> + Send + 'static {
        async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "cannot install the Ctrl-C handler");
                std::future::pending::<()>().await;
            }
            Signal::Interrupt
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use std::time::Duration;

    use super::*;

    fn kill(sig: &str) {
        let pid = std::process::id().to_string();
        let status = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {pid}: {status}");
    }

    // One test: SIGTERM and SIGINT go to the whole test process, so they
    // are sent only while this test's handlers are installed.
    #[tokio::test]
    async fn resolves_on_sigterm_and_on_sigint_sent_before_it_is_polled() {
        let stop = shutdown_signal();
        kill("-TERM");
        let got = tokio::time::timeout(Duration::from_secs(10), stop).await;
        assert_eq!(got.unwrap(), Signal::Terminate);

        let stop = shutdown_signal();
        kill("-INT");
        let got = tokio::time::timeout(Duration::from_secs(10), stop).await;
        assert_eq!(got.unwrap(), Signal::Interrupt);

        // Nothing pending: a fresh future does not resolve by itself.
        let idle = tokio::time::timeout(Duration::from_millis(200), shutdown_signal()).await;
        assert!(idle.is_err());
    }
}
