//! Registries as the push sees them: where a repository lives, how the
//! engine reaches it (TLS or, for insecure registries, plain HTTP too), and
//! whether a tag already exists there, asked with a HEAD on
//! `/v2/<name>/manifests/<tag>` after the distribution spec's auth flow
//! (anonymous, Basic, or a Bearer token from the registry's token service).
//!
//! The engine does the push; this module only reads, so the version can be
//! refused before anything is built.

use super::credentials::{self, Credential};
use super::engine::{Engine, error_chain};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, WWW_AUTHENTICATE};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// Where dockerd reads extra CAs for a registry; the check trusts the same.
pub const CERTS_DIR: &str = "/etc/docker/certs.d";

/// Every manifest type a push makes, so a registry answers for any of them.
const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A repository split as the docker CLI splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRepository {
    /// The repository as written (`registry.example.com/team/app`, `app`).
    pub name: String,
    /// `host[:port]`, or `docker.io` for Docker Hub.
    pub registry: String,
    /// The name within the registry (`team/app`, `library/app`).
    pub path: String,
}

impl RemoteRepository {
    pub fn parse(name: &str) -> RemoteRepository {
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" {
            "docker.io".to_owned()
        } else {
            registry
        };
        let path = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        RemoteRepository {
            name: name.to_owned(),
            registry,
            path,
        }
    }

    /// The host the registry API answers on.
    fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

/// How dockerd talks to a registry: only verified TLS, or (an insecure
/// registry: loopback, `--insecure-registry`) TLS without verification, then
/// plain HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Secure,
    Insecure,
}

/// What dockerd says about `registry`: its own entry when it has one, else
/// whether the host's addresses fall in its insecure ranges (127.0.0.0/8
/// by default, also without an engine to ask).
pub async fn transport(engine: Option<&Engine>, registry: &str) -> Transport {
    let config = match engine {
        Some(engine) => engine
            .quick()
            .info()
            .await
            .ok()
            .and_then(|info| info.registry_config),
        None => None,
    };
    let (index, cidrs) = match config {
        Some(config) => (
            config.index_configs.unwrap_or_default(),
            config.insecure_registry_cidrs.unwrap_or_default(),
        ),
        None => (Default::default(), vec!["127.0.0.0/8".to_owned()]),
    };
    if let Some(secure) = index.get(registry).and_then(|entry| entry.secure) {
        return if secure {
            Transport::Secure
        } else {
            Transport::Insecure
        };
    }
    let host = host_of(registry);
    let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, 0))
            .await
            .map(|found| found.map(|a| a.ip()).collect())
            .unwrap_or_default(),
    };
    if addresses
        .iter()
        .any(|ip| cidrs.iter().any(|cidr| cidr_contains(cidr, *ip)))
    {
        Transport::Insecure
    } else {
        Transport::Secure
    }
}

/// `host` of `host[:port]` (an IPv6 literal keeps its brackets off).
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let Ok(cidr) = imgbuild_core::cidr::Cidr::parse(cidr) else {
        return false;
    };
    let prefix = u32::from(cidr.prefix());
    match (cidr.address(), ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

#[derive(Debug, Error)]
pub enum RemoteError {
    #[error(
        "cannot reach the registry {registry} ({detail}); is it running and reachable from here? (for TLS problems: dockerd and imgbuild trust the CA in {CERTS_DIR}/{registry}/ca.crt)"
    )]
    Unreachable { registry: String, detail: String },
    #[error(
        "the registry {registry} needs credentials to read {repository} and none are configured: log in with `docker login {registry}` (or set DOCKER_CONFIG to a directory whose config.json has them)"
    )]
    NeedsLogin {
        registry: String,
        repository: String,
    },
    #[error(
        "the registry {registry} refused {credentials} for {repository} (HTTP {status}): check the user and password with `docker login {registry}`"
    )]
    Refused {
        registry: String,
        repository: String,
        credentials: &'static str,
        status: u16,
    },
    #[error(
        "the registry {registry} answered HTTP {status} for {url}; is the registry healthy? try again later"
    )]
    Unexpected {
        registry: String,
        url: String,
        status: u16,
    },
    #[error("the registry {registry} asks for an authentication imgbuild cannot do: {challenge}")]
    UnknownChallenge { registry: String, challenge: String },
}

/// Whether `repository:tag` exists, and with which manifest digest.
pub async fn find_tag(
    repository: &RemoteRepository,
    tag: &str,
    credential: &Credential,
    transport: Transport,
) -> Result<Option<String>, RemoteError> {
    let schemes: &[&str] = match transport {
        Transport::Secure => &["https"],
        Transport::Insecure => &["https", "http"],
    };
    let mut last = None;
    for scheme in schemes {
        let client = client(&repository.registry, transport)?;
        let url = format!(
            "{scheme}://{}/v2/{}/manifests/{tag}",
            repository.api_host(),
            repository.path
        );
        match head_manifest(&client, &url, repository, credential).await {
            Err(RemoteError::Unreachable { detail, .. }) => last = Some(detail),
            other => return other,
        }
    }
    Err(RemoteError::Unreachable {
        registry: repository.registry.clone(),
        detail: last.unwrap_or_default(),
    })
}

fn client(registry: &str, transport: Transport) -> Result<reqwest::Client, RemoteError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("imgbuild/", env!("CARGO_PKG_VERSION")));
    match transport {
        // As dockerd: an insecure registry's certificate is not checked.
        Transport::Insecure => builder = builder.danger_accept_invalid_certs(true),
        Transport::Secure => {
            for certificate in registry_cas(&Path::new(CERTS_DIR).join(registry)) {
                builder = builder.add_root_certificate(certificate);
            }
        }
    }
    builder.build().map_err(|err| RemoteError::Unreachable {
        registry: registry.to_owned(),
        detail: format!("cannot set up an HTTP client: {err}"),
    })
}

/// The `*.crt` files dockerd trusts for one registry.
fn registry_cas(dir: &Path) -> Vec<reqwest::Certificate> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "crt"))
        .filter_map(|entry| std::fs::read(entry.path()).ok())
        .filter_map(|pem| reqwest::Certificate::from_pem(&pem).ok())
        .collect()
}

async fn head_manifest(
    client: &reqwest::Client,
    url: &str,
    repository: &RemoteRepository,
    credential: &Credential,
) -> Result<Option<String>, RemoteError> {
    let registry = &repository.registry;
    let send = |authorization: Option<String>| {
        let mut request = client.head(url).header(ACCEPT, MANIFEST_TYPES);
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request.send()
    };
    let unreachable = |err: reqwest::Error| RemoteError::Unreachable {
        registry: registry.clone(),
        detail: error_chain(&err),
    };
    let first = send(None).await.map_err(unreachable)?;
    let answer = if first.status() == StatusCode::UNAUTHORIZED {
        let challenge = first
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let authorization = authorize(client, &challenge, repository, credential).await?;
        send(Some(authorization)).await.map_err(unreachable)?
    } else {
        first
    };
    match answer.status() {
        status if status.is_success() => Ok(Some(digest_of(answer.headers()))),
        StatusCode::NOT_FOUND => Ok(None),
        status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            Err(refused(repository, credential, status))
        }
        status => Err(RemoteError::Unexpected {
            registry: registry.clone(),
            url: url.to_owned(),
            status: status.as_u16(),
        }),
    }
}

fn refused(
    repository: &RemoteRepository,
    credential: &Credential,
    status: StatusCode,
) -> RemoteError {
    if *credential == Credential::Anonymous {
        RemoteError::NeedsLogin {
            registry: repository.registry.clone(),
            repository: repository.name.clone(),
        }
    } else {
        RemoteError::Refused {
            registry: repository.registry.clone(),
            repository: repository.name.clone(),
            credentials: credential.describe(),
            status: status.as_u16(),
        }
    }
}

fn digest_of(headers: &HeaderMap) -> String {
    headers
        .get("docker-content-digest")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("unknown digest")
        .to_owned()
}

/// The `Authorization` answering `challenge`: Basic with the credential, or
/// a Bearer token fetched from the realm it names.
async fn authorize(
    client: &reqwest::Client,
    challenge: &str,
    repository: &RemoteRepository,
    credential: &Credential,
) -> Result<String, RemoteError> {
    let (scheme, params) = parse_challenge(challenge);
    let needs_login = || refused(repository, credential, StatusCode::UNAUTHORIZED);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => match credential {
            Credential::Basic { username, password } => Ok(basic(username, password)),
            _ => Err(needs_login()),
        },
        "bearer" => {
            let realm = params
                .get("realm")
                .ok_or_else(|| RemoteError::UnknownChallenge {
                    registry: repository.registry.clone(),
                    challenge: challenge.to_owned(),
                })?;
            let scope = params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| format!("repository:{}:pull", repository.path));
            let service = params.get("service").cloned().unwrap_or_default();
            let unreachable = |err: reqwest::Error| RemoteError::Unreachable {
                registry: repository.registry.clone(),
                detail: format!("its token service {realm}: {}", error_chain(&err)),
            };
            let request = match credential {
                Credential::IdentityToken(token) => client
                    .post(realm)
                    .body(form(&[
                        ("grant_type", "refresh_token"),
                        ("service", &service),
                        ("scope", &scope),
                        ("client_id", "imgbuild"),
                        ("refresh_token", token),
                    ]))
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    ),
                Credential::Basic { username, password } => client
                    .get(realm)
                    .query(&[("service", &service), ("scope", &scope)])
                    .header(AUTHORIZATION, basic(username, password)),
                Credential::Anonymous => client
                    .get(realm)
                    .query(&[("service", &service), ("scope", &scope)]),
            };
            let response = request.send().await.map_err(unreachable)?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(refused(repository, credential, status));
            }
            if !status.is_success() {
                return Err(RemoteError::Unexpected {
                    registry: repository.registry.clone(),
                    url: realm.clone(),
                    status: status.as_u16(),
                });
            }
            let body = response.bytes().await.map_err(unreachable)?;
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let token = body["token"]
                .as_str()
                .or_else(|| body["access_token"].as_str())
                .ok_or_else(|| RemoteError::UnknownChallenge {
                    registry: repository.registry.clone(),
                    challenge: format!("its token service {realm} answered without a token"),
                })?;
            Ok(format!("Bearer {token}"))
        }
        _ => Err(RemoteError::UnknownChallenge {
            registry: repository.registry.clone(),
            challenge: challenge.to_owned(),
        }),
    }
}

fn basic(username: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

/// `Bearer realm="...",service="..."` → ("Bearer", {realm, service}).
fn parse_challenge(challenge: &str) -> (String, BTreeMap<String, String>) {
    let challenge = challenge.trim();
    let (scheme, rest) = challenge.split_once(' ').unwrap_or((challenge, ""));
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    (scheme.to_owned(), params)
}

/// The manifest digest `repository:tag` has in its registry now, `None`
/// when the tag is not there: whether a pushed image can still be pulled.
/// Asks the local engine how to reach the registry when one answers.
pub async fn current_digest(repository: &str, tag: &str) -> Result<Option<String>, String> {
    let remote = RemoteRepository::parse(repository);
    let credential = credentials::lookup_async(&remote.registry)
        .await
        .map_err(|err| err.to_string())?;
    let engine = Engine::connect().await.ok();
    let transport = transport(engine.as_ref(), &remote.registry).await;
    find_tag(&remote, tag, &credential, transport)
        .await
        .map_err(|err| err.to_string())
}

/// The credential for `registry`, its secrets registered with the log's
/// redactor before anything could show them.
pub async fn credential_for(
    registry: &str,
    log: &imgbuild_core::BuildLog,
) -> Result<Credential, String> {
    let credential = credentials::lookup_async(registry)
        .await
        .map_err(|err| err.to_string())?;
    for secret in credential.secrets() {
        log.redactor().add(secret);
    }
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_split_as_the_docker_cli_splits_them() {
        let parse = |name: &str| {
            let r = RemoteRepository::parse(name);
            (r.registry, r.path)
        };
        assert_eq!(parse("app"), ("docker.io".into(), "library/app".into()));
        assert_eq!(parse("team/app"), ("docker.io".into(), "team/app".into()));
        assert_eq!(
            parse("127.0.0.1:5000/team/app"),
            ("127.0.0.1:5000".into(), "team/app".into())
        );
        assert_eq!(parse("localhost/app"), ("localhost".into(), "app".into()));
        assert_eq!(
            parse("index.docker.io/app"),
            ("docker.io".into(), "library/app".into())
        );
        assert_eq!(
            RemoteRepository::parse("app").api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn challenges_are_parsed_with_quoted_commas() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(params["realm"], "https://auth.example.com/token");
        assert_eq!(params["service"], "registry.example.com");
        assert_eq!(params["scope"], "repository:a/b:pull,push");
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(params["realm"], "Registry Realm");
    }

    #[test]
    fn insecure_ranges_match_like_dockerd() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(cidr_contains("127.0.0.0/8", ip("127.0.0.1")));
        assert!(cidr_contains("127.0.0.0/8", ip("127.200.3.4")));
        assert!(!cidr_contains("127.0.0.0/8", ip("128.0.0.1")));
        assert!(cidr_contains("10.1.0.0/16", ip("10.1.200.1")));
        assert!(!cidr_contains("10.1.0.0/16", ip("10.2.0.1")));
        assert!(cidr_contains("::1/128", ip("::1")));
        assert!(!cidr_contains("127.0.0.0/8", ip("::1")));
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5000"), "::1");
    }
}
