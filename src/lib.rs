//! imgbuild: builds immutable, versioned machine images (QEMU, Docker, EC2)
//! from one TOML file.
//!
//! The binary is a thin layer over this library: `cli` parses arguments and
//! maps results to exit codes, `config` reads and validates `image.toml`,
//! `pipeline` runs the builds, `manifest` records what they produced,
//! `catalog` moves versions through channels, and
//! `ui` presents it all.

pub mod attest;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod manifest;
pub mod outputs;
pub mod pipeline;
pub mod ui;
