//! What the EC2 builder tests run against: moto (a fake EC2 API, started
//! with `.ci/start-moto.sh`), an sshd container standing in for the
//! instance (moto's instances have no SSH), and a small HTTP proxy that
//! answers chosen EC2 calls with AWS-shaped errors, for failures moto does
//! not produce on its own.

use imgbuild_builders::{BuildRequest, ImageInfo};
use imgbuild_core::events::{Event, EventSink, MemorySink};
use imgbuild_core::journal::Journal;
use imgbuild_core::{BuildLog, CancellationToken, OnError, Redactor, StepContext};
use imgbuild_provisioners::Provisioner;
use imgbuild_provisioners::shell::{ShellConfig, ShellProvisioner};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

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

fn run_script(script: &str, args: &[&str]) -> String {
    let output = Command::new("bash")
        .arg(workspace_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {script}: {err}"));
    assert!(
        output.status.success(),
        "{script} {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
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

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// What a target started without a key has in `authorized_keys` before the
/// build adds its own: a line the build must leave in place.
pub const PLACEHOLDER_KEY_LINE: &str = "# filled in by the test";

/// An sshd container standing in for the instance; keys are added to the
/// login user's `~/.ssh/authorized_keys` as cloud-init does on EC2.
pub struct SshTarget {
    pub cid: String,
    pub user: String,
    pub host: String,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl SshTarget {
    pub fn start(user: &str, initial_key: Option<&str>) -> SshTarget {
        static DOCKER: Once = Once::new();
        DOCKER.call_once(|| {
            run_script(".ci/start-dockerd.sh", &[]);
        });
        let dir = tempfile::tempdir().unwrap();
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(
            &authorized_keys,
            format!("{}\n", initial_key.unwrap_or(PLACEHOLDER_KEY_LINE)),
        )
        .unwrap();
        // sshd reads the file as the login user.
        set_mode(&authorized_keys, 0o644);
        let out = run_script(
            "tests/fixtures/sshd-target/start.sh",
            &[user, authorized_keys.to_str().unwrap()],
        );
        let mut fields = out.split_whitespace();
        let cid = fields.next().expect("container id").to_owned();
        let host = fields.next().expect("host").to_owned();
        let port = fields.next().expect("port").parse().expect("port number");
        SshTarget {
            cid,
            user: user.to_owned(),
            host,
            port,
            _dir: dir,
        }
    }

    /// The login user's `authorized_keys`.
    pub fn authorized_keys(&self) -> String {
        self.exec(&format!("cat ~{}/.ssh/authorized_keys", self.user))
    }

    /// What `command` printed. Panics when it fails: an empty output from
    /// a failed `cat` would otherwise read as "the file holds nothing".
    pub fn exec(&self, command: &str) -> String {
        let output = Command::new("docker")
            .args(["exec", &self.cid, "sh", "-c", command])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "`{command}` failed in the target container {} ({}): {}",
            self.cid,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for SshTarget {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.cid])
            .output();
    }
}

/// What cloud-init does with an instance's key pair.
fn append_authorized_key(cid: &str, user: &str, public_key: &str) {
    let output = Command::new("docker")
        .args(["exec", "-u", user, cid, "sh", "-c"])
        .arg(format!(
            "printf '%s\\n' \"$0\" >> ~{user}/.ssh/authorized_keys"
        ))
        .arg(public_key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cannot add a key in {cid}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Plays cloud-init: once the build has imported its temporary key pair
/// (found by the run's tag), the target trusts that public key. Returns the
/// key.
pub fn trust_imported_key(
    region: &str,
    run_id: &str,
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
                && let Some(key) = output.key_pairs().first().and_then(|k| k.public_key())
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

/// Cancels the build when a line containing `marker` is printed.
pub struct CancelOn {
    pub inner: Arc<MemorySink>,
    pub marker: String,
    pub cancel: CancellationToken,
}

impl EventSink for CancelOn {
    fn emit(&self, event: &Event) {
        self.inner.emit(event);
        if let Event::Output { line, .. } = event
            && line.contains(&self.marker)
        {
            self.cancel.cancel();
        }
    }
}

pub struct Harness {
    pub cx: StepContext,
    pub events: Arc<MemorySink>,
    /// Holds the run journal.
    _state_dir: tempfile::TempDir,
    pub config_dir: tempfile::TempDir,
}

impl Harness {
    pub fn new(build: &str) -> Harness {
        Harness::with_cancel_on(build, None)
    }

    /// With `marker`, the build is cancelled once a remote output line
    /// contains it.
    pub fn with_cancel_on(build: &str, marker: Option<&str>) -> Harness {
        init_env();
        let events = Arc::new(MemorySink::default());
        let cancel = CancellationToken::new();
        let sink: Arc<dyn EventSink> = match marker {
            Some(marker) => Arc::new(CancelOn {
                inner: events.clone(),
                marker: marker.to_owned(),
                cancel: cancel.clone(),
            }),
            None => events.clone(),
        };
        let log = BuildLog::root(sink, Redactor::new()).for_build(build);
        let state_dir = tempfile::tempdir().unwrap();
        let run_id = unique("run");
        let journal =
            Arc::new(Journal::create(state_dir.path(), &run_id, "image.toml".as_ref()).unwrap());
        Harness {
            cx: StepContext {
                log,
                journal,
                cancel,
                run_id,
            },
            events,
            _state_dir: state_dir,
            config_dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn request(&self, image: &str, provisioners: Vec<Provisioner>) -> BuildRequest {
        BuildRequest {
            image: ImageInfo {
                name: image.to_owned(),
                version: "1.0.0".to_owned(),
                description: Some("imgbuild EC2 test image".to_owned()),
                labels: Default::default(),
                revision: None,
                created: "2026-01-01T00:00:00Z".to_owned(),
            },
            build_name: self.cx.build_name().to_owned(),
            provisioners,
            on_error: OnError::Cleanup,
            config_dir: self.config_dir.path().to_path_buf(),
        }
    }

    /// Everything the build logged, for failure messages.
    pub fn transcript(&self) -> String {
        self.events
            .events()
            .iter()
            .map(|event| match event {
                Event::Message { level, message, .. } => format!("[{level:?}] {message}"),
                Event::Output { line, .. } => format!("  | {line}"),
                Event::StepStarted { step, .. } => format!("-- {step}"),
                Event::CleanupFailed { step, error, .. } => {
                    format!("[cleanup {step} failed] {error}")
                }
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn outstanding(&self) -> Vec<String> {
        self.cx
            .journal
            .outstanding()
            .iter()
            .map(|o| o.resource.describe())
            .collect()
    }
}

pub fn shell(lines: &[&str]) -> Provisioner {
    let config: ShellConfig =
        serde_json::from_value(serde_json::json!({ "inline": lines })).unwrap();
    Provisioner::new(ShellProvisioner::new(
        config,
        Vec::new(),
        serde_json::json!({}),
    ))
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
