//! The harnesses imgbuild's integration tests share, one copy each, by topic:
//!
//! - [`common`]: the repository, fixture images, unique names, a test build
//!   log, polling;
//! - [`harness`]: one build's `StepContext` with a real journal, and
//!   provisioners made as a config would make them;
//! - [`sshd`]: a real OpenSSH server on loopback, and a machine to provision;
//! - [`docker`]: the Docker Engine, its containers and images, and the sshd
//!   container that plays a remote machine;
//! - [`ec2`] (feature `ec2`): moto, and a proxy that injects EC2 faults;
//! - [`cli`]: the `imgbuild` binary run as users run it;
//! - [`sbom`]: SBOM documents checked by the reference libraries and dpkg.

pub mod cli;
pub mod common;
pub mod docker;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod harness;
pub mod sbom;
pub mod sshd;
