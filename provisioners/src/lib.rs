//! How imgbuild talks to a machine and changes it.
//!
//! A [`Communicator`] runs commands and moves files; the SSH communicator is
//! one, the Docker builder's exec API another. Provisioners (shell, file) are
//! written against the trait and behave the same on every builder.

pub mod ansible;
pub mod ansible_local;
pub mod communicator;
pub mod file;
pub mod image_test;
pub mod provisioner;
pub mod registry;
pub mod sbom;
pub mod shell;
pub mod ssh;
pub mod transfer;
mod unpack;

pub use communicator::{CommError, Communicator, Endpoint, ExitStatus, OutputSink};
pub use provisioner::{Provision, ProvisionContext, ProvisionError, Provisioner};
pub use registry::{PROVISIONERS, ProvisionerKind};
