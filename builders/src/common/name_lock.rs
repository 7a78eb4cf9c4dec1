//! A lock held across processes while a build checks that a name (a Docker
//! tag, say) is free and takes it. Engines whose "take" overwrites (Docker's
//! tag API) would otherwise let two builds of one version both pass the
//! check and the later one silently move the tag.
//!
//! The lock is a file in the state directory, so it serialises every
//! imgbuild of this user on this machine; builds sharing one engine from
//! several machines are not covered (the engine offers nothing to lock).

use imgbuild_core::BuildLog;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::path::PathBuf;

pub struct NameLock {
    _file: File,
}

impl NameLock {
    /// Waits for the lock on `name` (any text that identifies the name in
    /// its namespace, engine included), saying so in `log` when another
    /// build holds it.
    pub async fn acquire(name: &str, log: &BuildLog) -> Result<NameLock, String> {
        let path = lock_path(name);
        let log = log.clone();
        let waiting = format!("waiting for another build that holds {name}");
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().expect("lock files live in a directory");
            std::fs::create_dir_all(dir)
                .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|err| format!("cannot open the lock {}: {err}", path.display()))?;
            let locked = match file.try_lock() {
                Ok(()) => Ok(()),
                Err(std::fs::TryLockError::WouldBlock) => {
                    log.info(waiting);
                    file.lock()
                }
                Err(std::fs::TryLockError::Error(err)) => Err(err),
            };
            locked.map_err(|err| format!("cannot lock {}: {err}", path.display()))?;
            Ok(NameLock { _file: file })
        })
        .await
        .map_err(|err| err.to_string())?
    }
}

fn lock_path(name: &str) -> PathBuf {
    let digest = hex::encode(Sha256::digest(name.as_bytes()));
    imgbuild_core::journal::default_state_dir()
        .join("locks")
        .join(format!("{}.lock", &digest[..32]))
}
