//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` existing proves little: under nested virtualisation KVM can
//! start and then fail mid-boot ("KVM internal error ... emulation failure")
//! or abort on an MSR it cannot set. So `auto` tries KVM for real and falls
//! back to TCG when the attempt fails in a KVM-shaped way, remembering the
//! verdict for the rest of the process.

use super::config::Accelerator;
use imgbuild_core::BuildLog;
use std::sync::atomic::{AtomicBool, Ordering};

static KVM_UNUSABLE: AtomicBool = AtomicBool::new(false);

pub fn mark_kvm_unusable() {
    KVM_UNUSABLE.store(true, Ordering::Relaxed);
}

fn kvm_device_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|err| format!("/dev/kvm: {err}"))
}

/// The accelerators to try, in order.
pub async fn candidates(requested: Accelerator, log: &BuildLog) -> Vec<Accelerator> {
    match requested {
        Accelerator::Kvm => vec![Accelerator::Kvm],
        Accelerator::Tcg => vec![Accelerator::Tcg],
        Accelerator::Auto => {
            if KVM_UNUSABLE.load(Ordering::Relaxed) {
                return vec![Accelerator::Tcg];
            }
            match kvm_device_usable() {
                Ok(()) => vec![Accelerator::Kvm, Accelerator::Tcg],
                Err(reason) => {
                    log.warn(format!(
                        "KVM is not available ({reason}); using TCG software emulation, which is much slower"
                    ));
                    vec![Accelerator::Tcg]
                }
            }
        }
    }
}

/// Whether a failed boot looks like KVM itself failing rather than the
/// guest or the config.
pub fn is_kvm_failure(message: &str) -> bool {
    const SIGNS: [&str; 5] = [
        "KVM internal error",
        "kvm_buf_set_msrs",
        "failed to initialize kvm",
        "failed to set MSR",
        "kvm run failed",
    ];
    SIGNS.iter().any(|sign| message.contains(sign))
}

/// The QEMU arguments selecting `accelerator`.
pub fn qemu_args(accelerator: Accelerator) -> Vec<String> {
    match accelerator {
        Accelerator::Kvm | Accelerator::Auto => {
            vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]
        }
        Accelerator::Tcg => vec![
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            "max".into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_kvm_failures_seen_in_nested_virtualisation() {
        assert!(is_kvm_failure(
            "QEMU exited: KVM internal error. Suberror: 1\nemulation failure"
        ));
        assert!(is_kvm_failure(
            "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
        ));
        assert!(!is_kvm_failure("ssh: authentication failed"));
    }
}
