//! Talking to EC2: one SDK configuration per build (credentials and
//! endpoint from the standard AWS chain), a client per region, and errors
//! that say which call failed, in which region, and what AWS answered.

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use imgbuild_core::StepError;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Attempts per call, the first included. The standard retry mode retries
/// throttling (`RequestLimitExceeded`, `Throttling`), 5xx answers and
/// connection errors with exponential backoff and a client-side token
/// bucket; a large account's DescribeImages and CreateTags are throttled
/// often enough that the SDK's default of 3 gives up too early.
const MAX_ATTEMPTS: u32 = 8;

/// Loads credentials, region and endpoint the way the AWS CLI does
/// (environment, profiles and SSO, container and instance roles), with
/// `region` and `endpoint_url` from the config taking precedence.
pub async fn load_sdk_config(region: Option<&str>, endpoint_url: Option<&str>) -> SdkConfig {
    // Pinned rather than `latest()`, so an SDK upgrade cannot change retry
    // or timeout behaviour without this line changing too.
    let mut loader = aws_config::defaults(BehaviorVersion::v2026_01_12())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(MAX_ATTEMPTS)
                .with_max_backoff(Duration::from_secs(20)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                // One attempt of one call; polls and waits have their own limits.
                .operation_attempt_timeout(Duration::from_secs(90))
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// EC2 clients sharing one SDK configuration, one per region.
#[derive(Clone)]
pub struct Ec2Clients {
    sdk: SdkConfig,
    clients: Arc<Mutex<BTreeMap<String, Client>>>,
}

impl Ec2Clients {
    pub fn new(sdk: SdkConfig) -> Self {
        Ec2Clients {
            sdk,
            clients: Arc::default(),
        }
    }

    pub async fn load(region: Option<&str>, endpoint_url: Option<&str>) -> Self {
        Ec2Clients::new(load_sdk_config(region, endpoint_url).await)
    }

    /// The EC2 endpoint when it is not AWS's own: `endpoint_url` from the
    /// config, else `AWS_ENDPOINT_URL_EC2` or `AWS_ENDPOINT_URL`, which the
    /// SDK reads too (an `endpoint_url` in an AWS profile is not seen here).
    pub fn custom_endpoint(&self) -> Option<String> {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|url| !url.trim().is_empty())
        };
        self.sdk
            .endpoint_url()
            .map(str::to_owned)
            .or_else(|| from_env("AWS_ENDPOINT_URL_EC2"))
            .or_else(|| from_env("AWS_ENDPOINT_URL"))
    }

    /// The region from the config or the AWS chain.
    pub fn default_region(&self) -> Option<String> {
        self.sdk.region().map(|r| r.to_string())
    }

    pub fn get(&self, region: &str) -> Client {
        let mut clients = self.clients.lock().expect("client cache lock poisoned");
        clients
            .entry(region.to_owned())
            .or_insert_with(|| {
                let config = aws_sdk_ec2::config::Builder::from(&self.sdk)
                    .region(Region::new(region.to_owned()))
                    .build();
                Client::from_conf(config)
            })
            .clone()
    }
}

/// A failed EC2 call.
#[derive(Debug, Clone)]
pub struct AwsError {
    pub operation: &'static str,
    pub region: String,
    /// AWS's error code (`InvalidAMIID.NotFound`), absent when the call
    /// never got an answer.
    pub code: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
    /// The HTTP status of AWS's answer, absent when there was none.
    pub status: Option<u16>,
}

/// Client-error codes that do not mean EC2 decided against the request:
/// throttling (retried, and the last try may have raced an earlier one
/// that went through), and a client token already used for a different
/// request, which means something was made.
const NOT_A_REFUSAL: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestTimeout",
    "IdempotentParameterMismatch",
];

impl AwsError {
    pub fn new<E>(operation: &'static str, region: &str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let request_id = err.request_id().map(str::to_owned);
        let status = err.raw_response().map(|r| r.status().as_u16());
        let (code, message) = match &err {
            SdkError::ServiceError(_) => (
                err.code().map(str::to_owned),
                err.message().unwrap_or("(AWS gave no message)").to_owned(),
            ),
            SdkError::TimeoutError(_) => (None, "no answer before the timeout".to_owned()),
            SdkError::DispatchFailure(_) => (
                None,
                format!(
                    "the request could not be sent: {}",
                    DisplayErrorContext(&err)
                ),
            ),
            _ => (None, DisplayErrorContext(&err).to_string()),
        };
        AwsError {
            operation,
            region: region.to_owned(),
            code,
            message,
            request_id,
            status,
        }
    }

    /// Whether EC2 answered that it would not do what was asked, so
    /// nothing was made: a 4xx answer other than throttling. Without an
    /// answer (a timeout, a cancelled call) or with a 5xx the call may
    /// still have gone through.
    pub fn is_refusal(&self) -> bool {
        matches!(self.status, Some(400..=499))
            && self
                .code
                .as_deref()
                .is_some_and(|code| !NOT_A_REFUSAL.contains(&code))
    }

    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// What the person running the build can do about it.
    fn hint(&self) -> Option<String> {
        let operation = self.operation;
        let hint = match self.code.as_deref() {
            Some(
                "AuthFailure" | "UnauthorizedOperation" | "InvalidClientTokenId" | "SignatureDoesNotMatch"
                | "ExpiredToken" | "RequestExpired" | "UnrecognizedClientException",
            ) => format!(
                "check the AWS credentials (environment, ~/.aws profile, SSO login, instance role) and that they allow ec2:{operation}; `aws sts get-caller-identity` shows who you are"
            ),
            Some("OptInRequired") => format!(
                "region {} is not enabled for this account; enable it in the AWS console or leave it out of `ami_regions`",
                self.region
            ),
            Some("InstanceLimitExceeded" | "VcpuLimitExceeded" | "MaxSpotInstanceCountExceeded") => {
                "the account's EC2 quota in this region is used up; stop other instances or ask AWS for a quota increase".to_owned()
            }
            Some("InsufficientInstanceCapacity" | "Unsupported") => {
                "AWS cannot place this instance type there right now; try another `instance_type` or a `subnet_id` in another availability zone".to_owned()
            }
            Some("InvalidAMIName.Duplicate") => {
                "an AMI with this name already exists; bump `image.version` or set `ami_name`".to_owned()
            }
            Some("InvalidKeyPair.NotFound") => {
                "check `key_pair_name`: key pairs belong to one region".to_owned()
            }
            Some("InvalidAMIID.NotFound" | "InvalidAMIID.Malformed") if operation == "DescribeImages" => {
                "AMIs belong to one region: check `source_ami` and `region`".to_owned()
            }
            Some(_) => return None,
            // EC2 answered, just not with what was needed.
            None if self.status.is_some_and(|status| status < 400) => return None,
            None if self.message.contains("credentials") => {
                "configure AWS credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, `aws sso login`, or an instance role".to_owned()
            }
            None => "check the network, any HTTPS proxy settings and `endpoint_url`".to_owned(),
        };
        Some(hint)
    }
}

impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EC2 {} in {} failed: ", self.operation, self.region)?;
        match &self.code {
            Some(code) => write!(f, "{code}: {}", self.message)?,
            None => f.write_str(&self.message)?,
        }
        if let Some(id) = &self.request_id {
            write!(f, " (request id {id})")?;
        }
        if let Some(hint) = self.hint() {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for AwsError {}

impl From<AwsError> for StepError {
    fn from(err: AwsError) -> Self {
        StepError::failed(err)
    }
}

/// `call.send().await.aws("CreateImage", region)?`
pub trait AwsResultExt<T> {
    fn aws(self, operation: &'static str, region: &str) -> Result<T, AwsError>;
}

impl<T, E> AwsResultExt<T> for Result<T, SdkError<E, HttpResponse>>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    fn aws(self, operation: &'static str, region: &str) -> Result<T, AwsError> {
        self.map_err(|err| AwsError::new(operation, region, err))
    }
}

pub fn tags(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(key, value)| Tag::builder().key(key).value(value).build())
        .collect()
}

pub fn tag_spec(resource: ResourceType, values: &BTreeMap<String, String>) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(resource)
        .set_tags(Some(tags(values)))
        .build()
}

pub fn filter(name: &str, value: impl Into<String>) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// The tag that ties every resource to its run, so `imgbuild clean` and
/// people reading the console can tell whose it is.
pub const RUN_ID_TAG: &str = "imgbuild:run-id";
/// On the instance, so it can be found when the RunInstances answer was
/// lost (EC2's own `client-token` filter is not implemented everywhere,
/// moto included; a tag applied at launch is as atomic).
pub const CLIENT_TOKEN_TAG: &str = "imgbuild:client-token";

#[cfg(test)]
mod tests {
    use super::*;

    fn error(operation: &'static str, code: Option<&str>, message: &str) -> AwsError {
        AwsError {
            operation,
            region: "eu-west-1".to_owned(),
            code: code.map(str::to_owned),
            message: message.to_owned(),
            request_id: Some("req-1".to_owned()),
            status: Some(400),
        }
    }

    #[test]
    fn errors_name_the_call_the_region_the_code_and_what_to_do() {
        let denied = error(
            "RunInstances",
            Some("UnauthorizedOperation"),
            "You are not authorized",
        );
        let text = denied.to_string();
        assert!(
            text.starts_with(
                "EC2 RunInstances in eu-west-1 failed: UnauthorizedOperation: You are not authorized (request id req-1); check the AWS credentials"
            ),
            "{text}"
        );
        assert!(text.contains("allow ec2:RunInstances"), "{text}");
        assert!(denied.is("UnauthorizedOperation"));

        let unknown = error("CreateTags", Some("SomethingNew"), "odd");
        assert_eq!(
            unknown.to_string(),
            "EC2 CreateTags in eu-west-1 failed: SomethingNew: odd (request id req-1)"
        );

        let unreachable = AwsError {
            request_id: None,
            ..error(
                "DescribeImages",
                None,
                "the request could not be sent: dns error",
            )
        };
        assert!(
            unreachable
                .to_string()
                .ends_with("; check the network, any HTTPS proxy settings and `endpoint_url`")
        );
    }

    #[test]
    fn only_a_decided_client_error_counts_as_a_refusal() {
        assert!(error("RunInstances", Some("InvalidParameterValue"), "bad type").is_refusal());
        for code in ["RequestLimitExceeded", "IdempotentParameterMismatch"] {
            assert!(
                !error("RunInstances", Some(code), "x").is_refusal(),
                "{code}"
            );
        }
        let server = AwsError {
            status: Some(500),
            ..error("RunInstances", Some("InternalError"), "x")
        };
        assert!(!server.is_refusal());
        let unanswered = AwsError {
            status: None,
            ..error("RunInstances", None, "no answer before the timeout")
        };
        assert!(!unanswered.is_refusal());
    }

    #[test]
    fn an_answer_missing_what_was_asked_for_gets_no_network_hint() {
        let answered = AwsError {
            status: Some(200),
            ..error("CreateImage", None, "the answer holds no image id")
        };
        assert_eq!(
            answered.to_string(),
            "EC2 CreateImage in eu-west-1 failed: the answer holds no image id (request id req-1)"
        );
        assert!(!answered.is_refusal());
    }
}
