//! Waiting for EC2 to get somewhere: an instance running, stopped or gone,
//! an AMI available.
//!
//! The SDK's own waiters poll at a fixed interval and treat a missing
//! resource as final. EC2 is eventually consistent: an AMI or instance id
//! just returned by CreateImage or RunInstances can be unknown to the next
//! Describe call for a while, and an AMI can read `available` once before
//! it settles. So these pollers start fast (about 1 s, most waits on small
//! volumes are short), back off to 15 s (so a 30-minute copy does not spend
//! the account's API rate), treat "not found" as pending for a grace
//! period, and want an AMI `available` on two consecutive reads, as
//! Bottlerocket's AMI publisher does.

use super::api::{Ec2Api, ImageDescription, InstanceDescription};
use imgbuild_core::{BuildLog, StepError};
use std::time::Duration;
use tokio::time::Instant;

/// How long a freshly created id may be unknown to Describe calls.
pub const NOT_FOUND_GRACE: Duration = Duration::from_secs(120);
/// Consecutive `available` reads before an AMI counts as available.
pub const AVAILABLE_READS: u32 = 2;

/// Delays between polls: `initial`, growing by half each time, up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { next: initial, max }
    }

    pub fn standard() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(15))
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.mul_f64(1.5).min(self.max);
        delay
    }

    /// Polls again soon: used to confirm a state just reached.
    pub fn reset(&mut self, initial: Duration) {
        self.next = initial;
    }
}

/// One look at what is being waited for.
#[derive(Debug)]
pub enum Poll<T> {
    Ready(T),
    /// Not there yet; the text says what was seen ("pending").
    Pending(String),
}

/// Paces a polling loop and ends it when time is up:
///
/// ```ignore
/// let mut poller = Poller::new("AMI ami-1 in us-east-1", timeout, Backoff::standard(), Some(log));
/// loop {
///     match look().await? {
///         Poll::Ready(value) => return Ok(value),
///         Poll::Pending(status) => poller.pending(status).await?,
///     }
/// }
/// ```
///
/// Each new status is logged once as "`what`: status". Not cancellable by
/// itself: cleanup must be able to wait after a cancellation, and steps are
/// cancelled around it.
pub struct Poller<'a> {
    what: String,
    timeout: Duration,
    backoff: Backoff,
    started: Instant,
    last: Option<String>,
    log: Option<&'a BuildLog>,
}

impl<'a> Poller<'a> {
    pub fn new(
        what: impl Into<String>,
        timeout: Duration,
        backoff: Backoff,
        log: Option<&'a BuildLog>,
    ) -> Self {
        Poller {
            what: what.into(),
            timeout,
            backoff,
            started: Instant::now(),
            last: None,
            log,
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn backoff(&mut self) -> &mut Backoff {
        &mut self.backoff
    }

    /// Notes what was seen, then sleeps until the next look; fails once
    /// the timeout has passed.
    pub async fn pending(&mut self, status: impl Into<String>) -> Result<(), StepError> {
        let status = status.into();
        if self.last.as_deref() != Some(status.as_str()) {
            if let Some(log) = self.log {
                log.info(format!("{}: {status}", self.what));
            }
            self.last = Some(status);
        }
        let elapsed = self.started.elapsed();
        if elapsed >= self.timeout {
            return Err(StepError::failed(format!(
                "{}: still {} after {}",
                self.what,
                self.last.as_deref().unwrap_or("pending"),
                humantime::format_duration(Duration::from_secs(self.timeout.as_secs()))
            )));
        }
        tokio::time::sleep(self.backoff.next_delay().min(self.timeout - elapsed)).await;
        Ok(())
    }
}

/// Looks with `find` until it finds something, backing off from 1 s to
/// 10 s, for up to `lookup`: for a resource whose create call never
/// answered, which EC2's lagging tag filters may show only later. `None`
/// when nothing showed up in time (it may still be on its way).
pub async fn look_until_found<T, F, Fut>(
    what: String,
    lookup: Duration,
    log: Option<&BuildLog>,
    mut find: F,
) -> Result<Option<Vec<T>>, StepError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, StepError>>,
{
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    let mut poller = Poller::new(what, lookup, backoff, log);
    loop {
        let found = find().await?;
        if !found.is_empty() {
            return Ok(Some(found));
        }
        if poller.pending("not visible yet").await.is_err() {
            return Ok(None);
        }
    }
}

/// What one DescribeImages said about an AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSeen {
    NotFound,
    State {
        state: String,
        reason: Option<String>,
    },
}

/// Decides, read by read, whether an AMI is available, still coming, or
/// failed. Kept apart from the API calls so the rules can be tested.
#[derive(Debug)]
pub struct ImageWatch {
    created: Instant,
    available_reads: u32,
}

impl ImageWatch {
    pub fn new(created: Instant) -> Self {
        ImageWatch {
            created,
            available_reads: 0,
        }
    }

    pub fn observe(&mut self, now: Instant, seen: &ImageSeen) -> Result<Poll<()>, String> {
        let state = match seen {
            ImageSeen::NotFound => {
                self.available_reads = 0;
                if now.duration_since(self.created) < NOT_FOUND_GRACE {
                    return Ok(Poll::Pending("not visible yet".to_owned()));
                }
                return Err(format!(
                    "EC2 still does not know the AMI {} after it was created; it may have been deregistered by someone else",
                    humantime::format_duration(NOT_FOUND_GRACE)
                ));
            }
            ImageSeen::State { state, reason } => match state.as_str() {
                "available" => {
                    self.available_reads += 1;
                    if self.available_reads >= AVAILABLE_READS {
                        return Ok(Poll::Ready(()));
                    }
                    return Ok(Poll::Pending("available, confirming".to_owned()));
                }
                // `transient` is documented as an intermediate state.
                "pending" | "transient" => state.clone(),
                failed => {
                    return Err(match reason {
                        Some(reason) => format!("the AMI is {failed}: {reason}"),
                        None => format!("the AMI is {failed}"),
                    });
                }
            },
        };
        self.available_reads = 0;
        Ok(Poll::Pending(state))
    }
}

fn image_seen(image: Option<&ImageDescription>) -> ImageSeen {
    match image {
        None => ImageSeen::NotFound,
        Some(image) => ImageSeen::State {
            state: image.state.clone(),
            reason: image.reason.clone(),
        },
    }
}

/// Waits until `image_id` is available and returns it as last described.
pub async fn wait_for_image(
    api: &dyn Ec2Api,
    image_id: &str,
    timeout: Duration,
    log: &BuildLog,
) -> Result<ImageDescription, StepError> {
    let mut watch = ImageWatch::new(Instant::now());
    let mut poller = Poller::new(
        format!("AMI {image_id} in {}", api.region()),
        timeout,
        Backoff::standard(),
        Some(log),
    );
    loop {
        let image = api.describe_image(image_id).await?;
        let seen = image_seen(image.as_ref());
        match watch.observe(Instant::now(), &seen) {
            Ok(Poll::Ready(())) => return Ok(image.expect("a ready AMI was described")),
            Ok(Poll::Pending(status)) => {
                if status.starts_with("available") {
                    // The confirming read need not wait out the backoff.
                    poller.backoff().reset(Duration::from_secs(1));
                }
                poller.pending(status).await.map_err(|err| match err {
                    StepError::Failed(message) => StepError::Failed(format!(
                        "{message}; large volumes and cross-region copies can take long: raise `ami_timeout` if it is still on its way"
                    )),
                    other => other,
                })?;
            }
            Err(message) => return Err(StepError::failed(format!("{}: {message}", poller.what()))),
        }
    }
}

/// Why the instance is in its state, as EC2 explains it
/// ("Client.InstanceInitiatedShutdown: ..."), for after the state.
pub fn instance_reason(instance: &InstanceDescription) -> String {
    match &instance.reason {
        Some(reason) => format!(" ({reason})"),
        None => String::new(),
    }
}

/// The states an instance passes through on the way to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceTarget {
    Running,
    Stopped,
    Terminated,
}

impl InstanceTarget {
    fn name(self) -> &'static str {
        match self {
            InstanceTarget::Running => "running",
            InstanceTarget::Stopped => "stopped",
            InstanceTarget::Terminated => "terminated",
        }
    }

    /// Ready, still on its way, or never going to get there.
    fn judge(self, state: &str) -> Result<bool, ()> {
        match (self, state) {
            (target, state) if state == target.name() => Ok(true),
            (InstanceTarget::Running, "pending") => Ok(false),
            (InstanceTarget::Running, _) => Err(()),
            // Right after StopInstances a read may still say running.
            (InstanceTarget::Stopped, "stopping" | "running" | "pending") => Ok(false),
            (InstanceTarget::Stopped, _) => Err(()),
            (InstanceTarget::Terminated, _) => Ok(false),
        }
    }
}

/// Waits for the instance to reach `target`. An instance EC2 no longer
/// knows counts as terminated; while it is new, as pending.
pub async fn wait_for_instance(
    api: &dyn Ec2Api,
    instance_id: &str,
    target: InstanceTarget,
    timeout: Duration,
    log: Option<&BuildLog>,
) -> Result<Option<InstanceDescription>, StepError> {
    let started = Instant::now();
    let mut poller = Poller::new(
        format!("instance {instance_id} in {}", api.region()),
        timeout,
        Backoff::standard(),
        log,
    );
    loop {
        let Some(instance) = api.describe_instance(instance_id).await? else {
            if target == InstanceTarget::Terminated {
                return Ok(None);
            }
            if started.elapsed() < NOT_FOUND_GRACE {
                poller.pending("not visible yet").await?;
                continue;
            }
            return Err(StepError::failed(format!(
                "{} no longer exists",
                poller.what()
            )));
        };
        let state = instance.state.clone();
        match target.judge(&state) {
            Ok(true) => return Ok(Some(instance)),
            Ok(false) => poller.pending(state).await?,
            Err(()) => {
                return Err(StepError::failed(format!(
                    "{} is {state}{} instead of {}",
                    poller.what(),
                    instance_reason(&instance),
                    target.name()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str) -> ImageSeen {
        ImageSeen::State {
            state: name.to_owned(),
            reason: None,
        }
    }

    #[test]
    fn backoff_grows_by_half_up_to_the_cap() {
        let mut backoff = Backoff::standard();
        let delays: Vec<u64> = (0..9)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            vec![1000, 1500, 2250, 3375, 5062, 7593, 11390, 15000, 15000]
        );
    }

    #[test]
    fn an_ami_needs_two_consecutive_available_reads() {
        let start = Instant::now();
        let mut watch = ImageWatch::new(start);
        assert!(matches!(
            watch.observe(start, &state("pending")),
            Ok(Poll::Pending(_))
        ));
        assert!(matches!(
            watch.observe(start, &state("available")),
            Ok(Poll::Pending(_))
        ));
        // A flap back to pending starts the count again.
        assert!(matches!(
            watch.observe(start, &state("pending")),
            Ok(Poll::Pending(_))
        ));
        assert!(matches!(
            watch.observe(start, &state("available")),
            Ok(Poll::Pending(_))
        ));
        assert!(matches!(
            watch.observe(start, &state("available")),
            Ok(Poll::Ready(()))
        ));
    }

    #[test]
    fn not_found_is_pending_only_for_the_grace_period() {
        let start = Instant::now();
        let mut watch = ImageWatch::new(start);
        assert!(matches!(
            watch.observe(start, &ImageSeen::NotFound),
            Ok(Poll::Pending(_))
        ));
        let late = start + NOT_FOUND_GRACE + Duration::from_secs(1);
        assert!(
            watch
                .observe(late, &ImageSeen::NotFound)
                .unwrap_err()
                .contains("still does not know")
        );
    }

    #[test]
    fn failed_amis_fail_with_their_reason() {
        let mut watch = ImageWatch::new(Instant::now());
        let failed = ImageSeen::State {
            state: "failed".to_owned(),
            reason: Some("Client.InternalError: snapshot failed".to_owned()),
        };
        let err = watch.observe(Instant::now(), &failed).unwrap_err();
        assert_eq!(
            err,
            "the AMI is failed: Client.InternalError: snapshot failed"
        );
        assert!(
            watch
                .observe(Instant::now(), &state("deregistered"))
                .is_err()
        );
    }

    /// On tokio's paused clock: the sleeps take no real time and the number
    /// of looks is exact, so a loaded machine cannot change it.
    #[tokio::test(start_paused = true)]
    async fn polling_backs_off_and_times_out_with_the_last_status() {
        let started = Instant::now();
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        let mut poller = Poller::new("thing", Duration::from_millis(300), backoff, None);
        let mut looks = 0;
        let message = loop {
            looks += 1;
            if let Err(err) = poller.pending("pending").await {
                break err.to_string();
            }
        };
        assert_eq!(message, "thing: still pending after 0s");
        // 10 + 15 + 22.5 + 33.75 + 40 + 40 + 40 + 40 + 40, then the 18.75
        // left of the timeout: ten sleeps, and the eleventh look fails.
        assert_eq!(looks, 11);
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        // The last sleep is cut to what is left of the timeout; the timer
        // wheel rounds each deadline up to the millisecond.
        assert!(elapsed <= Duration::from_millis(310), "{elapsed:?}");
    }

    #[test]
    fn instance_targets_know_dead_ends() {
        assert_eq!(InstanceTarget::Running.judge("pending"), Ok(false));
        assert_eq!(InstanceTarget::Running.judge("running"), Ok(true));
        assert_eq!(InstanceTarget::Running.judge("terminated"), Err(()));
        assert_eq!(InstanceTarget::Stopped.judge("stopping"), Ok(false));
        assert_eq!(InstanceTarget::Stopped.judge("shutting-down"), Err(()));
        assert_eq!(InstanceTarget::Terminated.judge("shutting-down"), Ok(false));
    }
}
