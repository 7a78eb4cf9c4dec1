//! A small client for the QEMU Machine Protocol: JSON lines over the unix
//! socket QEMU is launched with (`-qmp unix:<path>,server=on,wait=off`).
//!
//! A session reads QEMU's greeting, leaves capabilities negotiation with
//! `qmp_capabilities`, then runs commands one at a time. Asynchronous events
//! QEMU sends in between are kept in arrival order for a caller that waits
//! on one (a migration's progress, a shutdown), never mistaken for a reply.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to QEMU's monitor at {path}: {source}; is the VM still running?")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to QEMU's monitor at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU's monitor at {path} closed the connection (did QEMU exit?)")]
    Closed { path: PathBuf },
    #[error("QEMU's monitor at {path} sent something that is not QMP: {text}")]
    Protocol { path: PathBuf, text: String },
    #[error("QEMU refused `{command}`: {class}: {description}")]
    Command {
        command: String,
        class: String,
        description: String,
    },
}

/// An open QMP session, past capabilities negotiation.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    /// QEMU's version and capabilities, from its greeting.
    pub greeting: Value,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the monitor socket at `path` and negotiates.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut session = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
            next_id: 0,
            greeting: Value::Null,
            events: Vec::new(),
        };
        let greeting = session.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(session.protocol(format!("expected a greeting, got {greeting}")));
        }
        session.greeting = greeting;
        session.execute("qmp_capabilities", None).await?;
        Ok(session)
    }

    /// Runs `command` with `arguments` and returns what QEMU returned.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = format!("imgbuild-{}", self.next_id);
        let mut message = json!({"execute": command, "id": id});
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| self.io(source))?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                return Err(self.protocol(format!("a reply to another command: {reply}")));
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = reply.get("error") {
                let text = |field: &str| {
                    error
                        .get(field)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    description: text("desc"),
                });
            }
            return Err(self.protocol(format!("a reply with neither return nor error: {reply}")));
        }
    }

    /// The events QEMU sent so far, oldest first, handed over once.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|source| self.io(source))?;
        if read == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&line).map_err(|_| self.protocol(line.trim().to_owned()))
    }

    fn io(&self, source: std::io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn protocol(&self, text: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;

    /// Serves one connection: sends the greeting, then answers each line
    /// it reads with what `answer` makes of it (several lines allowed), and
    /// records every request.
    fn serve(
        path: &Path,
        answer: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            write
                .write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(read).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).unwrap();
                for reply in answer(&request) {
                    write
                        .write_all(format!("{reply}\n").as_bytes())
                        .await
                        .unwrap();
                }
                seen.push(request);
            }
            seen
        })
    }

    fn ok(request: &Value, value: Value) -> String {
        json!({"return": value, "id": request["id"]}).to_string()
    }

    #[tokio::test]
    async fn negotiates_then_runs_commands_with_arguments_and_keeps_events_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = serve(&path, |request| match request["execute"].as_str() {
            Some("qmp_capabilities") => vec![ok(request, json!({}))],
            Some("query-status") => vec![
                r#"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}"#.into(),
                ok(request, json!({"status": "running", "running": true})),
            ],
            _ => vec![ok(request, request["arguments"].clone())],
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.greeting["QMP"]["version"]["qemu"]["major"], 7);
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        let echoed = qmp
            .execute("blockdev-snapshot-sync", Some(json!({"device": "disk0"})))
            .await
            .unwrap();
        assert_eq!(echoed, json!({"device": "disk0"}));
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event"], "RESUME");
        assert!(qmp.take_events().is_empty());
        drop(qmp);

        let seen = server.await.unwrap();
        let commands: Vec<_> = seen.iter().map(|r| r["execute"].clone()).collect();
        assert_eq!(
            commands,
            ["qmp_capabilities", "query-status", "blockdev-snapshot-sync"]
        );
        assert_eq!(seen[2]["arguments"], json!({"device": "disk0"}));
        assert!(seen[1].get("arguments").is_none(), "{}", seen[1]);
        let ids: std::collections::HashSet<_> = seen.iter().map(|r| r["id"].clone()).collect();
        assert_eq!(ids.len(), 3, "every command has its own id");
    }

    #[tokio::test]
    async fn a_refused_command_is_an_error_naming_the_command_and_qemus_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let _server = serve(&path, |request| {
            match request["execute"].as_str() {
            Some("qmp_capabilities") => vec![ok(request, json!({}))],
            _ => vec![
                json!({"error": {"class": "GenericError", "desc": "Device 'nope' not found"}, "id": request["id"]})
                    .to_string(),
            ],
        }
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let err = qmp
            .execute("blockdev-snapshot-sync", Some(json!({"device": "nope"})))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { command, class, .. } if command == "blockdev-snapshot-sync" && class == "GenericError"),
            "{err:?}"
        );
        assert!(err.to_string().contains("Device 'nope' not found"), "{err}");
    }

    #[tokio::test]
    async fn a_monitor_that_closes_or_talks_nonsense_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("silent.sock")).unwrap();
        let silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (_, mut write) = stream.into_split();
            write.write_all(b"not json\n").await.unwrap();
        });
        let err = Qmp::connect(&dir.path().join("silent.sock"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, QmpError::Protocol { .. }), "{err:?}");
        silent.await.unwrap();

        let listener = UnixListener::bind(dir.path().join("gone.sock")).unwrap();
        let gone = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream);
        });
        let err = Qmp::connect(&dir.path().join("gone.sock"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, QmpError::Closed { .. }), "{err:?}");
        gone.await.unwrap();

        let err = Qmp::connect(&dir.path().join("absent.sock"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }
}
