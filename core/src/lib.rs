//! Plumbing shared by every layer of imgbuild: the events a build reports,
//! the redaction of sensitive values, the durable journal of resources a run
//! creates, and the step runner that gives every builder its cleanup semantics.

pub mod checksum;
pub mod cidr;
pub mod duration;
pub mod events;
pub mod fsutil;
pub mod journal;
pub mod problem;
pub mod redact;
pub mod reproducible;
pub mod step;
pub mod template;
pub mod units;

pub use checksum::Sha256Digest;
pub use cidr::Cidr;
pub use events::{BuildLog, Event, EventSink, Level, Stream};
pub use journal::{BuilderResource, Journal, Resource, ResourceId};
pub use problem::ConfigProblem;
pub use redact::Redactor;
pub use step::{CleanupOutcome, OnError, Step, StepContext, StepError, cleanup_steps, run_steps};
pub use tokio_util::sync::CancellationToken;
pub use units::ByteSize;
