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
