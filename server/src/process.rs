//! What a server binary does around its node: the runtime, the malloc
//! arena cap, the ready line, and waiting for SIGINT or SIGTERM.

use std::future::Future;
use std::net::SocketAddr;

/// Catches SIGINT and SIGTERM from this call on, and returns a future
/// that resolves on the first of them.
///
/// Call it before printing a ready line ([`announce_ready`] does): a
/// supervisor (a test, a service manager, `flagmesh-topology`) may send
/// SIGTERM the moment it reads that line, and a signal that came before
/// the handlers were installed would end the process without its graceful
/// stop. Must be called within the runtime.
pub fn signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        let mut ctrl_c = tokio::signal::windows::ctrl_c()?;
        Ok(async move {
            let _ = ctrl_c.recv().await;
        })
    }
}

/// Catches SIGINT and SIGTERM ([`signal`]), then prints the ready line
/// scripts and tests wait for: `flagmesh ready grpc=ADDR http=ADDR`
/// (`http=-` without an HTTP listener). Returns the future that resolves
/// on the first signal: the handlers come first, since whoever reads the
/// line may stop the node at once.
pub fn announce_ready(
    grpc: SocketAddr,
    http: Option<SocketAddr>,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let stopped = signal()?;
    let http = http.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!("flagmesh ready grpc={grpc} http={http}");
    Ok(stopped)
}

/// Caps glibc's malloc at `arenas` arenas. With the default (eight per
/// core), memory freed after applying a large change stays spread over
/// many arenas and resident memory ends up far above what the node holds
/// (measured: 104 MiB instead of 75 MiB for a PoP with 10,000 flags with
/// two arenas). An operator's own `MALLOC_ARENA_MAX` (which glibc reads)
/// is left in force. Call first thing in `main`, before any thread starts.
pub fn limit_malloc_arenas(arenas: u8) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists, so nothing races with it.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, i32::from(arenas.max(1)));
    }
}

/// Hands memory malloc holds free back to the system (glibc's
/// `malloc_trim`): applying a large change allocates far more, for a
/// moment, than the node then keeps, and without this the resident size
/// stays at that peak. Blocks for the walk over the heap (about a
/// millisecond per 100 MB); call it from a blocking task.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the system; it takes
    // malloc's own locks and is safe to call from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Calls [`release_free_memory`] once activity has stopped for a moment:
/// `activity` is sampled twice a second (a count that moves with each
/// applied change, each flag compiled, ...) and memory is released after
/// the first quiet sample following a busy one, until `stop`.
pub fn release_memory_when_quiet(
    activity: impl Fn() -> u64 + Send + 'static,
    tasks: &tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) {
    tasks.spawn(when_quiet(
        activity,
        || async {
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        },
        stop,
    ));
}

/// Runs `action` after the first quiet sample of `activity` that follows a
/// busy one (samples twice a second), until `stop`.
async fn when_quiet<F, Fut>(
    activity: impl Fn() -> u64,
    action: F,
    stop: tokio_util::sync::CancellationToken,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    const SAMPLE: std::time::Duration = std::time::Duration::from_millis(500);
    let mut seen = activity();
    let mut busy = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE) => {}
        }
        let now = activity();
        if now != seen {
            (seen, busy) = (now, true);
        } else if busy {
            busy = false;
            action().await;
        }
    }
}

/// Runs a node binary's body on a multi-threaded runtime, after capping
/// malloc at `malloc_arenas` arenas ([`limit_malloc_arenas`]); an error
/// exits non-zero with one line `PROGRAM: error`.
pub fn run_main<F, E>(program: &str, malloc_arenas: u8, body: F)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    limit_malloc_arenas(malloc_arenas);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(body) {
        eprintln!("{program}: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A SIGTERM that arrives as soon as the caller has asked for the stop
    /// signal (a ready line printed just after, read by a supervisor that
    /// stops the node at once) is caught, never the default action that
    /// ends the process without a graceful stop.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_sigterm_right_after_asking_is_caught() {
        let stop = super::signal().expect("the handlers are installed");
        // SAFETY: raise only sends a signal to this process.
        #[allow(unsafe_code)]
        unsafe {
            libc::raise(libc::SIGTERM);
        }
        let caught = tokio::time::timeout(Duration::from_secs(10), stop).await;
        assert!(caught.is_ok(), "SIGTERM not seen within 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn acts_once_after_each_burst_and_never_while_busy_or_idle() {
        let (activity, acted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = tokio_util::sync::CancellationToken::new();
        let (a, n) = (activity.clone(), acted.clone());
        let task = tokio::spawn(super::when_quiet(
            move || a.load(Ordering::Relaxed),
            move || {
                let n = n.clone();
                async move {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            },
            stop.clone(),
        ));
        // idle from the start: nothing to release
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(acted.load(Ordering::Relaxed), 0);
        // busy for three seconds: not while it lasts
        for _ in 0..12 {
            activity.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(acted.load(Ordering::Relaxed), 0);
        // quiet again: once, and not again while it stays quiet
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(acted.load(Ordering::Relaxed), 1);
        // another burst: once more
        activity.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(acted.load(Ordering::Relaxed), 2);
        stop.cancel();
        let _ = task.await;
    }
}
