//! What the EC2 builder tests run against: moto (a fake EC2 API, started
//! with `.ci/start-moto.sh`) and a small HTTP proxy that answers chosen EC2
//! calls with AWS-shaped errors, for failures moto does not produce on its
//! own. moto's instances have no SSH: an sshd container
//! ([`crate::docker::SshTarget`]) plays the instance.

use crate::common::run_script;
use crate::docker::{SshTarget, append_authorized_key};
use crate::harness::Harness;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Static fake credentials, and nothing else from the environment or from
/// ~/.aws: the SDK must never reach real AWS or the instance metadata
/// service from a test.
pub fn init_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: runs once, first thing in every test, before that test
        // starts a runtime or threads; tests that run meanwhile are blocked
        // in `call_once` and read the environment only afterwards.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
            std::env::remove_var("AWS_SESSION_TOKEN");
            std::env::remove_var("AWS_PROFILE");
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
            std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/imgbuild-test-aws-config");
            std::env::set_var(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/imgbuild-test-aws-credentials",
            );
            std::env::set_var("NO_PROXY", "127.0.0.1,localhost");
        }
    });
}

/// The moto endpoint, started once per test binary (the script is
/// idempotent and shared with other test binaries).
pub fn moto() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        init_env();
        run_script(".ci/start-moto.sh", &[]);
        let port = std::env::var("IMGBUILD_MOTO_PORT").unwrap_or_else(|_| "5055".to_owned());
        format!("http://127.0.0.1:{port}")
    })
    .clone()
}

/// A client for checking what the build left in moto, straight to moto.
pub async fn ec2(region: &str) -> aws_sdk_ec2::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::v2026_01_12())
        .region(aws_config::Region::new(region.to_owned()))
        .endpoint_url(moto())
        .load()
        .await;
    aws_sdk_ec2::Client::new(&sdk)
}

/// A store over `url` (`s3://bucket/prefix`) in moto's S3; the bucket is
/// not made.
pub async fn moto_s3(url: &str) -> imgbuild_builders::common::object_store::S3Store {
    use imgbuild_builders::common::object_store::{S3Options, S3Store};
    let options = S3Options {
        endpoint_url: Some(moto()),
        region: Some("us-east-1".into()),
        ..S3Options::default()
    };
    S3Store::open(url, options)
        .await
        .unwrap_or_else(|err| panic!("cannot open {url} in moto: {err}"))
}

/// Makes the (empty) bucket `name` in moto's S3.
pub async fn create_moto_bucket(name: &str) {
    moto_s3(&format!("s3://{name}"))
        .await
        .client()
        .create_bucket()
        .bucket(name)
        .send()
        .await
        .unwrap_or_else(|err| panic!("cannot create the bucket {name} in moto: {err:?}"));
}

/// A fresh, empty bucket in moto's S3, named `prefix` plus a unique
/// suffix: tests share one moto and run in parallel.
pub async fn moto_bucket(prefix: &str) -> String {
    let name = crate::common::unique(prefix);
    create_moto_bucket(&name).await;
    name
}

/// The environment an imgbuild process needs to reach moto (S3, SSM, EC2)
/// with moto's fake credentials.
pub fn moto_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", moto()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
    ]
}

/// Plays cloud-init: once the build has imported its temporary key pair
/// (found by the run's tag), the target trusts that public key. Returns the
/// key.
pub fn trust_imported_key(
    region: &str,
    run_id: &str,
    target: &SshTarget,
) -> tokio::task::JoinHandle<Option<String>> {
    trust_key_pair(region, run_id, None, target)
}

/// [`trust_imported_key`] for the key pair called `name` only: a run that
/// tests its AMI imports a second key pair, for the test instance, which a
/// fresh instance's cloud-init would trust.
pub fn trust_imported_key_named(
    region: &str,
    run_id: &str,
    name: &str,
    target: &SshTarget,
) -> tokio::task::JoinHandle<Option<String>> {
    trust_key_pair(region, run_id, Some(name.to_owned()), target)
}

fn trust_key_pair(
    region: &str,
    run_id: &str,
    name: Option<String>,
    target: &SshTarget,
) -> tokio::task::JoinHandle<Option<String>> {
    let region = region.to_owned();
    let run_id = run_id.to_owned();
    let (cid, user) = (target.cid.clone(), target.user.clone());
    tokio::spawn(async move {
        let client = ec2(&region).await;
        for _ in 0..600 {
            let found = client
                .describe_key_pairs()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("tag:imgbuild:run-id")
                        .values(&run_id)
                        .build(),
                )
                .include_public_key(true)
                .send()
                .await;
            if let Ok(output) = found
                && let Some(key) = output
                    .key_pairs()
                    .iter()
                    .find(|k| name.is_none() || k.key_name() == name.as_deref())
                    .and_then(|k| k.public_key())
            {
                let key = key.trim().to_owned();
                append_authorized_key(&cid, &user, &key);
                return Some(key);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    })
}

/// What the fault proxy does to a matching request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with an EC2 error document instead of forwarding.
    Error {
        status: u16,
        code: String,
        message: String,
    },
    /// Forward, then replace `from` with `to` in the answer's body.
    Rewrite { from: String, to: String },
    /// Hold the request for this long, then forward it whether or not the
    /// caller is still waiting: a call EC2 carries out after the client
    /// gave up on it (a Ctrl-C, a killed process).
    Hold(Duration),
}

/// Noted in [`FaultProxy::injected`] once a held request got EC2's answer.
pub const FORWARDED_AFTER_HOLD: &str = "forwarded after hold";

/// Waits (a minute at most) until a request held by a [`Fault::Hold`] rule
/// for `action` has been carried out by EC2.
pub async fn held_request_done(proxy: &FaultProxy, action: &str) -> bool {
    for _ in 0..600 {
        if proxy
            .injected()
            .iter()
            .any(|(a, what)| a == action && what == FORWARDED_AFTER_HOLD)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// The EC2 `Action` (`CopyImage`).
    pub action: String,
    /// Only requests signed for this region.
    pub region: Option<String>,
    /// Only requests whose form body contains this text.
    pub body_contains: Option<String>,
    /// How many matching requests to hit; the rest pass through.
    pub times: usize,
    pub fault: Fault,
}

impl Rule {
    pub fn error(action: &str, code: &str, message: &str) -> Rule {
        Rule {
            action: action.to_owned(),
            region: None,
            body_contains: None,
            times: usize::MAX,
            fault: Fault::Error {
                status: 400,
                code: code.to_owned(),
                message: message.to_owned(),
            },
        }
    }

    /// Holds the first matching request for `delay` before forwarding it.
    pub fn hold(action: &str, delay: Duration) -> Rule {
        Rule {
            action: action.to_owned(),
            region: None,
            body_contains: None,
            times: 1,
            fault: Fault::Hold(delay),
        }
    }

    pub fn in_region(mut self, region: &str) -> Rule {
        self.region = Some(region.to_owned());
        self
    }

    pub fn times(mut self, times: usize) -> Rule {
        self.times = times;
        self
    }

    pub fn status(mut self, status: u16) -> Rule {
        if let Fault::Error { status: s, .. } = &mut self.fault {
            *s = status;
        }
        self
    }

    pub fn when_body_contains(mut self, text: &str) -> Rule {
        self.body_contains = Some(text.to_owned());
        self
    }
}

/// An HTTP proxy in front of moto that applies [`Rule`]s. One request per
/// connection, answered with `Connection: close`, which the SDK's client
/// handles like any server that does not keep connections alive.
pub struct FaultProxy {
    pub url: String,
    /// (action, code) of every fault injected.
    injected: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    pub async fn start(rules: Vec<Rule>) -> FaultProxy {
        let upstream = moto().trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let rules = Arc::new(Mutex::new(rules));
        let injected = Arc::new(Mutex::new(Vec::new()));
        let i = injected.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, i, upstream) = (rules.clone(), i.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = handle(stream, &upstream, &r, &i).await;
                });
            }
        });
        FaultProxy {
            url,
            injected,
            task,
        }
    }

    pub fn injected(&self) -> Vec<(String, String)> {
        self.injected.lock().unwrap().clone()
    }

    /// Cancels `h`'s build once a request for `action` is being held, that
    /// is while EC2 has yet to carry it out. True once it did.
    pub fn cancel_once_held(&self, h: &Harness, action: &str) -> tokio::task::JoinHandle<bool> {
        let injected = self.injected.clone();
        let cancel = h.cx.cancel.clone();
        let action = action.to_owned();
        tokio::spawn(async move {
            for _ in 0..6000 {
                let held = injected
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|(a, what)| *a == action && what.starts_with("hold "));
                if held {
                    cancel.cancel();
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 message with a Content-Length body (what the SDK
/// sends and moto answers), or until EOF when there is none.
async fn read_message(stream: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(end) = find(&buffer, b"\r\n\r\n") {
            break end;
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut body = buffer[head_end + 4..].to_vec();
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    match length {
        Some(length) => {
            while body.len() < length {
                let read = stream.read(&mut chunk).await?;
                if read == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..read]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await?;
        }
    }
    Ok((head, body))
}

/// The head with `Connection: close` and the given Content-Length.
fn rewrite_head(head: &str, length: usize) -> String {
    let mut lines: Vec<String> = head
        .lines()
        .filter(|line| {
            let name = line
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            name != "connection" && name != "content-length" && name != "keep-alive"
        })
        .map(str::to_owned)
        .collect();
    lines.push("Connection: close".to_owned());
    lines.push(format!("Content-Length: {length}"));
    format!("{}\r\n\r\n", lines.join("\r\n"))
}

fn form_value(body: &str, key: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// The region in the SigV4 credential scope: `Credential=AKID/DATE/REGION/ec2/aws4_request`.
fn signed_region(head: &str) -> String {
    head.lines()
        .find(|line| line.to_ascii_lowercase().starts_with("authorization:"))
        .and_then(|line| line.split("Credential=").nth(1))
        .and_then(|scope| scope.split('/').nth(2))
        .unwrap_or("")
        .to_owned()
}

async fn handle(
    mut client: TcpStream,
    upstream: &str,
    rules: &Mutex<Vec<Rule>>,
    injected: &Mutex<Vec<(String, String)>>,
) -> std::io::Result<()> {
    let (head, body) = read_message(&mut client).await?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let action = form_value(&text, "Action").unwrap_or_default();
    let region = signed_region(&head);

    let fault = {
        let mut rules = rules.lock().unwrap();
        rules
            .iter_mut()
            .find(|rule| {
                rule.times > 0
                    && rule.action == action
                    && rule.region.as_ref().is_none_or(|r| *r == region)
                    && rule
                        .body_contains
                        .as_ref()
                        .is_none_or(|t| text.contains(t.as_str()))
            })
            .map(|rule| {
                rule.times -= 1;
                rule.fault.clone()
            })
    };
    if let Some(Fault::Error {
        status,
        code,
        message,
    }) = &fault
    {
        injected
            .lock()
            .unwrap()
            .push((action.clone(), code.clone()));
        let document = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-proxy-0001</RequestID></Response>"
        );
        let head = format!("HTTP/1.1 {status} Injected\r\nContent-Type: text/xml;charset=UTF-8");
        client
            .write_all(rewrite_head(&head, document.len()).as_bytes())
            .await?;
        client.write_all(document.as_bytes()).await?;
        return client.shutdown().await;
    }

    if let Some(Fault::Hold(delay)) = &fault {
        injected
            .lock()
            .unwrap()
            .push((action.clone(), format!("hold {delay:?}")));
        tokio::time::sleep(*delay).await;
    }
    let mut server = TcpStream::connect(upstream).await?;
    server
        .write_all(rewrite_head(&head, body.len()).as_bytes())
        .await?;
    server.write_all(&body).await?;
    let (answer_head, mut answer) = read_message(&mut server).await?;
    if let Some(Fault::Hold(_)) = &fault {
        injected
            .lock()
            .unwrap()
            .push((action.clone(), FORWARDED_AFTER_HOLD.to_owned()));
    }
    if let Some(Fault::Rewrite { from, to }) = &fault {
        injected
            .lock()
            .unwrap()
            .push((action.clone(), format!("rewrite {from} -> {to}")));
        answer = String::from_utf8_lossy(&answer)
            .replace(from.as_str(), to)
            .into_bytes();
    }
    client
        .write_all(rewrite_head(&answer_head, answer.len()).as_bytes())
        .await?;
    client.write_all(&answer).await?;
    client.shutdown().await
}
