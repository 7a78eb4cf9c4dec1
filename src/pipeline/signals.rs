//! Ctrl-C and SIGTERM: the first cancels every build, which then cleans up;
//! later ones are acknowledged but never cut cleanup of launched machines
//! short. (A SIGKILL still can; the run journal then lists what is left for
//! `imgbuild clean`.)

use imgbuild_core::{BuildLog, CancellationToken};
use tokio::signal::unix::{SignalKind, signal};

pub fn watch(
    cancel: CancellationToken,
    log: BuildLog,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(tokio::spawn(async move {
        let mut received = 0u32;
        loop {
            let name = tokio::select! {
                Some(()) = interrupt.recv() => "interrupt",
                Some(()) = terminate.recv() => "terminate signal",
                else => return,
            };
            received += 1;
            if received == 1 {
                log.warn(format!(
                    "{name} received: cancelling all builds and cleaning up what they created"
                ));
                cancel.cancel();
            } else {
                log.warn(format!(
                    "{name} received again: still cleaning up launched machines, please wait (a forced kill would leave them for `imgbuild clean`)"
                ));
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgbuild_core::Redactor;
    use imgbuild_core::events::{Event, MemorySink};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn the_first_signal_cancels_and_later_ones_are_only_acknowledged() {
        let sink = Arc::new(MemorySink::default());
        let log = BuildLog::root(sink.clone(), Redactor::new());
        let cancel = CancellationToken::new();
        let watcher = watch(cancel.clone(), log).unwrap();
        let messages = || -> Vec<String> {
            sink.events()
                .into_iter()
                .filter_map(|e| match e {
                    Event::Message { message, .. } => Some(message),
                    _ => None,
                })
                .collect()
        };
        let wait_for = |count: usize| async move {
            for _ in 0..200 {
                if messages().len() >= count {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("no acknowledgement of signal {count}");
        };

        unsafe { libc::raise(libc::SIGINT) };
        wait_for(1).await;
        assert!(cancel.is_cancelled());
        assert!(messages()[0].contains("cancelling all builds"));

        unsafe { libc::raise(libc::SIGTERM) };
        wait_for(2).await;
        assert!(messages()[1].contains("still cleaning up launched machines"));
        watcher.abort();
    }
}
