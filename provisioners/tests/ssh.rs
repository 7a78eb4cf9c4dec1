//! The SSH communicator against a real OpenSSH server on loopback.

use imgbuild_core::{CancellationToken, Event, Level, Stream};
use imgbuild_provisioners::communicator::{ByteStream, CommError, Communicator, ExitStatus};
use imgbuild_provisioners::ssh::{SshAuth, SshCommunicator, TemporaryKey, load_private_key};
use imgbuild_test_support::common::{test_log, wait_until};
use imgbuild_test_support::sshd::{
    self, Lines, PasswordUser, ServerOptions, SshServer, process_running, test_wait_options,
};
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_util::io::SyncIoBridge;

const MIB: u64 = 1024 * 1024;
/// A bound that only catches a hang: far beyond what any check here needs
/// even on a loaded machine.
const HANG: Duration = Duration::from_secs(60);

/// Builds a tar archive on a blocking thread and streams it, so nothing
/// holds the whole archive in memory.
fn tar_stream<F>(build: F) -> (ByteStream, tokio::task::JoinHandle<io::Result<()>>)
where
    F: FnOnce(&mut tar::Builder<SyncIoBridge<tokio::io::DuplexStream>>) -> io::Result<()>
        + Send
        + 'static,
{
    let (writer, reader) = tokio::io::duplex(MIB as usize);
    let bridge = SyncIoBridge::new(writer);
    let producer = tokio::task::spawn_blocking(move || {
        let mut builder = tar::Builder::new(bridge);
        builder.follow_symlinks(false);
        build(&mut builder)?;
        let mut bridge = builder.into_inner()?;
        bridge.shutdown()
    });
    (Box::new(reader), producer)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `size` bytes of incompressible pseudo-random data, returning
/// their sha256.
fn write_pseudo_random(path: &Path, size: u64) -> io::Result<String> {
    let mut file = io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        hasher.update(&chunk);
        file.write_all(&chunk)?;
    }
    file.flush()?;
    Ok(hex(&hasher.finalize()))
}

fn sha256_file(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; MIB as usize];
    loop {
        let read = file.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        hasher.update(&chunk[..read]);
    }
    Ok(hex(&hasher.finalize()))
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn info_messages(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message {
                level: Level::Info,
                message,
                ..
            } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

async fn run(comm: &SshCommunicator, command: &str) -> (ExitStatus, Lines) {
    let lines = Lines::default();
    let status = comm.exec(command, &lines).await.unwrap();
    (status, lines)
}

#[tokio::test]
async fn runs_commands_and_streams_their_output() {
    let server = SshServer::started().unwrap();
    let key = server.authorized_key().unwrap();
    let comm = server.connect(key.auth()).await.unwrap();
    assert_eq!(
        comm.target(),
        format!("{}@127.0.0.1:{}", server.username(), server.port())
    );
    eprintln!("negotiated cipher: {:?}", comm.cipher());

    let (status, lines) = run(
        &comm,
        "echo out1; echo err1 >&2; echo 'out 2'; printf 'no newline'; exit 3",
    )
    .await;
    assert_eq!(status, ExitStatus::Code(3));
    assert_eq!(lines.of(Stream::Stdout), ["out1", "out 2", "no newline"]);
    assert_eq!(lines.of(Stream::Stderr), ["err1"]);

    let (status, _) = run(&comm, "true").await;
    assert_eq!(status, ExitStatus::Code(0));

    let (status, _) = run(&comm, "kill -TERM $$").await;
    assert_eq!(status, ExitStatus::Signal("TERM".to_owned()));
}

#[tokio::test]
async fn many_lines_arrive_complete_and_in_order() {
    let server = SshServer::started().unwrap();
    let comm = server
        .connect(server.authorized_key().unwrap().auth())
        .await
        .unwrap();
    let (status, lines) = run(&comm, "seq 1 200000; seq 1 5000 >&2").await;
    assert_eq!(status, ExitStatus::Code(0));
    let expected: Vec<String> = (1..=200_000).map(|n| n.to_string()).collect();
    assert!(lines.of(Stream::Stdout) == expected, "stdout lines differ");
    let expected: Vec<String> = (1..=5000).map(|n| n.to_string()).collect();
    assert!(lines.of(Stream::Stderr) == expected, "stderr lines differ");
}

#[tokio::test]
async fn commands_from_several_tasks_run_side_by_side() {
    let server = SshServer::started().unwrap();
    let comm = server
        .connect(server.authorized_key().unwrap().auth())
        .await
        .unwrap();
    // The first command only finishes once the second has run, so running
    // them one after the other would hang.
    let flag = server.home().join("flag");
    let waiter = format!(
        "until [ -e {0} ]; do sleep 0.05; done; echo a",
        flag.display()
    );
    let setter = format!("sleep 0.3; touch {0}; echo b", flag.display());
    let (a, b) = tokio::time::timeout(HANG, async {
        tokio::join!(run(&comm, &waiter), run(&comm, &setter))
    })
    .await
    .expect("the commands did not run side by side");
    assert_eq!(a.1.of(Stream::Stdout), ["a"]);
    assert_eq!(b.1.of(Stream::Stdout), ["b"]);
}

#[tokio::test]
async fn uploads_and_downloads_a_tree_with_modes_and_symlinks() {
    let server = SshServer::started().unwrap();
    let comm = server
        .connect(server.authorized_key().unwrap().auth())
        .await
        .unwrap();

    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("tree");
    std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(src.join("run.sh"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(src.join("secret.txt"), "s3cret\n").unwrap();
    std::fs::set_permissions(src.join("secret.txt"), PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(src.join("nested/deeper/file.txt"), "deep\n").unwrap();
    symlink("run.sh", src.join("link")).unwrap();

    // A destination that needs quoting and does not exist yet.
    let dest = server.home().join("it's a dest/sub");
    let tree = src.clone();
    let (archive, producer) = tar_stream(move |b| b.append_dir_all("tree", &tree));
    comm.upload_tar(dest.to_str().unwrap(), archive)
        .await
        .unwrap();
    producer.await.unwrap().unwrap();

    let up = dest.join("tree");
    assert_eq!(mode(&up.join("run.sh")), 0o755);
    assert_eq!(mode(&up.join("secret.txt")), 0o600);
    assert_eq!(
        std::fs::read_to_string(up.join("nested/deeper/file.txt")).unwrap(),
        "deep\n"
    );
    assert_eq!(
        std::fs::read_link(up.join("link")).unwrap(),
        PathBuf::from("run.sh")
    );
    assert!(up.join("empty").is_dir());
    let script = up.join("run.sh");
    let script = shell_escape::unix::escape(script.to_str().unwrap().into());
    let (_, lines) = run(&comm, &script).await;
    assert_eq!(lines.of(Stream::Stdout), ["hi"]);

    // And back again, trailing slash and all.
    let mut download = comm
        .download_tar(&format!("{}/", up.display()))
        .await
        .unwrap();
    let mut bytes = Vec::new();
    download.read_to_end(&mut bytes).await.unwrap();
    let back = local.path().join("back");
    let mut archive = tar::Archive::new(io::Cursor::new(bytes));
    archive.set_preserve_permissions(true);
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("tree")), "{names:?}");
    let mut archive = tar::Archive::new(io::Cursor::new(archive.into_inner().into_inner()));
    archive.set_preserve_permissions(true);
    archive.unpack(&back).unwrap();
    assert_eq!(mode(&back.join("tree/run.sh")), 0o755);
    assert_eq!(mode(&back.join("tree/secret.txt")), 0o600);
    assert_eq!(
        std::fs::read_link(back.join("tree/link")).unwrap(),
        PathBuf::from("run.sh")
    );
    assert_eq!(
        std::fs::read_to_string(back.join("tree/nested/deeper/file.txt")).unwrap(),
        "deep\n"
    );
}

#[tokio::test]
async fn failing_transfers_report_tar_errors() {
    let server = SshServer::started().unwrap();
    let comm = server
        .connect(server.authorized_key().unwrap().auth())
        .await
        .unwrap();

    // mkdir fails while 16 MiB are still to be sent: the upload must end
    // with tar's story instead of waiting for window space forever.
    let blocker = server.home().join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let (archive, _producer) = tar_stream(|b| {
        let data = vec![7u8; 16 * MIB as usize];
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        b.append_data(&mut header, "big", data.as_slice())
    });
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        comm.upload_tar(blocker.join("sub").to_str().unwrap(), archive),
    )
    .await
    .expect("the upload hung")
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CommError::Operation { .. }), "{text}");
    assert!(text.contains("tar failed with exit code"), "{text}");
    assert!(text.contains("Not a directory"), "{text}");

    let mut download = comm.download_tar("/nonexistent/imgbuild").await.unwrap();
    let mut bytes = Vec::new();
    let err = download.read_to_end(&mut bytes).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("tar -c of /nonexistent/imgbuild"), "{text}");
    assert!(text.contains("exit code 2"), "{text}");
    assert!(text.contains("No such file"), "{text}");

    // The connection is still good afterwards.
    let (status, _) = run(&comm, "true").await;
    assert_eq!(status, ExitStatus::Code(0));
}

#[tokio::test]
async fn an_abandoned_upload_ends_the_remote_tar() {
    let server = SshServer::started().unwrap();
    let comm = Arc::new(
        server
            .connect(server.authorized_key().unwrap().auth())
            .await
            .unwrap(),
    );
    // An archive that starts and then stalls: tar waits for the rest.
    let (mut writer, reader) = tokio::io::duplex(64 * 1024);
    tokio::io::AsyncWriteExt::write_all(&mut writer, &[0u8; 1000])
        .await
        .unwrap();
    let dest = server.home().join("abandoned");
    let remote_tar = format!("tar -x -f - -C {}", dest.display());
    let upload = {
        let (comm, dest) = (comm.clone(), dest.clone());
        tokio::spawn(async move {
            comm.upload_tar(dest.to_str().unwrap(), Box::new(reader))
                .await
        })
    };
    wait_until("tar runs", HANG, || process_running(&remote_tar)).await;
    // Cancelling the build drops the upload; the channel must be closed so
    // tar sees the end of its input instead of waiting forever.
    upload.abort();
    wait_until("tar is gone", HANG, || !process_running(&remote_tar)).await;
    drop(writer);
    let (status, _) = run(&comm, "true").await;
    assert_eq!(status, ExitStatus::Code(0));
}

/// A directory on tmpfs if there is one, else in the server's home.
fn scratch_dir(server: &SshServer) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm.to_owned()
    } else {
        server.home()
    };
    tempfile::Builder::new()
        .prefix("imgbuild-ssh-test-")
        .tempdir_in(parent)
        .unwrap()
}

/// Uploads `file` (as `big.bin`) into `dest`, streamed from a tar builder.
async fn upload_file(comm: &SshCommunicator, file: &Path, dest: &Path) {
    let file = file.to_owned();
    let (archive, producer) = tar_stream(move |b| b.append_path_with_name(&file, "big.bin"));
    comm.upload_tar(dest.to_str().unwrap(), archive)
        .await
        .unwrap();
    producer.await.unwrap().unwrap();
}

/// The cipher sshd says it agreed on, from its DEBUG1 log.
fn ciphers_sshd_negotiated(server: &SshServer) -> Vec<String> {
    server
        .log()
        .lines()
        .filter_map(|l| l.split("kex: client->server cipher: ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Integrity only: how the transfer's speed compares with scp is measured
/// by bench/ (the "imgbuild transfer time <= 2x plain scp" target), where
/// nothing else competes for the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_downloads_256_mib_intact_streaming_with_each_cipher() {
    let local = tempfile::tempdir().unwrap();
    let big = local.path().join("big.bin");
    let expected = write_pseudo_random(&big, 256 * MIB).unwrap();
    let key = TemporaryKey::generate().unwrap();

    let server = SshServer::started_with(ServerOptions {
        log_level: "DEBUG1".to_owned(),
        ..ServerOptions::default()
    })
    .unwrap();
    server.authorize_key(key.public_openssh()).unwrap();
    let comm = server.connect(key.auth()).await.unwrap();
    // What the communicator reports is what the server agreed to.
    let cipher = comm.cipher().expect("no cipher reported");
    assert_eq!(ciphers_sshd_negotiated(&server), [cipher]);

    // On tmpfs when possible, to spare the disk three 256 MiB writes.
    let scratch = scratch_dir(&server);
    let dest = scratch.path().join("upload");
    upload_file(&comm, &big, &dest).await;
    // Checked on the far side of the connection, with the machine's tools.
    let remote_file = dest.join("big.bin");
    let remote_file = shell_escape::unix::escape(remote_file.to_str().unwrap().into());
    let (status, lines) = run(&comm, &format!("sha256sum {remote_file}")).await;
    assert_eq!(status, ExitStatus::Code(0));
    let remote = lines.of(Stream::Stdout).join("");
    assert!(remote.starts_with(&expected), "{remote} != {expected}");

    // And back, streamed through a tar reader without landing anywhere.
    let download = comm
        .download_tar(dest.join("big.bin").to_str().unwrap())
        .await
        .unwrap();
    let reader = SyncIoBridge::new(download);
    let downloaded = tokio::task::spawn_blocking(move || -> io::Result<(String, u64)> {
        let mut archive = tar::Archive::new(reader);
        let mut entry = archive.entries()?.next().expect("an empty archive")?;
        assert_eq!(entry.path()?.to_str(), Some("big.bin"));
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; MIB as usize];
        let mut total = 0;
        loop {
            let read = io::Read::read(&mut entry, &mut chunk)?;
            if read == 0 {
                break;
            }
            total += read as u64;
            hasher.update(&chunk[..read]);
        }
        // Drain the end-of-archive blocks, so tar's exit status is seen.
        io::copy(&mut archive.into_inner(), &mut io::sink())?;
        Ok((hex(&hasher.finalize()), total))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(downloaded, (expected.clone(), 256 * MIB));
    std::fs::remove_file(dest.join("big.bin")).unwrap();

    // The same with each cipher forced by the server.
    for cipher in ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"] {
        let server = SshServer::started_with(ServerOptions {
            extra_config: vec![format!("Ciphers {cipher}")],
            ..ServerOptions::default()
        })
        .unwrap();
        server.authorize_key(key.public_openssh()).unwrap();
        let comm = server.connect(key.auth()).await.unwrap();
        assert_eq!(comm.cipher().as_deref(), Some(cipher));
        let dest = scratch.path().join("upload");
        upload_file(&comm, &big, &dest).await;
        assert_eq!(
            sha256_file(&dest.join("big.bin")).unwrap(),
            expected,
            "with {cipher}"
        );
        std::fs::remove_file(dest.join("big.bin")).unwrap();
    }
}

#[tokio::test]
async fn waits_for_an_sshd_that_starts_later() {
    let mut server = SshServer::new(ServerOptions::default()).unwrap();
    server.keep_port();
    let key = server.authorized_key().unwrap();
    let (log, sink) = test_log();
    let started = Instant::now();
    let connecting = tokio::spawn(SshCommunicator::connect(
        server.target(),
        server.username(),
        key.auth(),
        test_wait_options(Duration::from_secs(30)),
        CancellationToken::new(),
        log,
        None,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start().unwrap();
    let listening = started.elapsed();
    let comm = connecting.await.unwrap().unwrap();
    let connected = started.elapsed();
    // How soon after sshd listens the connection lands is a speed matter,
    // measured by the benchmarks, not asserted here.
    eprintln!("sshd listening after {listening:?}, connected after {connected:?}");
    let (status, _) = run(&comm, "true").await;
    assert_eq!(status, ExitStatus::Code(0));
    let infos = info_messages(&sink.events());
    assert_eq!(infos.len(), 2, "{infos:?}");
    assert!(infos[0].starts_with("Waiting for SSH on"), "{infos:?}");
    assert!(infos[1].starts_with("Connected to"), "{infos:?}");
}

/// QEMU's user-mode networking accepts a forwarded connection before the
/// guest listens, then says nothing. Such a silent connection must not use
/// up the whole wait: the attempt is retried on a new connection.
#[tokio::test]
async fn a_port_that_accepts_but_stays_silent_is_retried_on_a_new_connection() {
    let mut server = SshServer::new(ServerOptions::default()).unwrap();
    server.keep_port();
    let key = server.authorized_key().unwrap();
    let silent = std::net::TcpListener::bind(("127.0.0.1", server.port())).unwrap();
    let held = std::thread::spawn(move || {
        // Accept one connection and hold it open without a word.
        let (connection, _) = silent.accept().unwrap();
        connection
    });
    let (log, _sink) = test_log();
    let mut options = test_wait_options(Duration::from_secs(30));
    // Longer than the whole wait: one attempt on the silent connection
    // would exhaust it.
    options.connect_timeout = Duration::from_secs(120);
    let connecting = tokio::spawn(SshCommunicator::connect(
        server.target(),
        server.username(),
        key.auth(),
        options,
        CancellationToken::new(),
        log,
        None,
    ));
    let silent_connection = tokio::task::spawn_blocking(move || held.join().unwrap())
        .await
        .unwrap();
    server.start().unwrap();
    let comm = connecting.await.unwrap().unwrap();
    let (status, _) = run(&comm, "true").await;
    assert_eq!(status, ExitStatus::Code(0));
    drop(silent_connection);
}

#[tokio::test]
async fn gives_up_after_the_timeout_naming_what_it_saw() {
    let port = sshd::free_port().unwrap();
    let started = Instant::now();
    let wait = Duration::from_millis(1500);
    let connecting = SshCommunicator::connect(
        imgbuild_provisioners::ssh::SshTarget {
            host: "127.0.0.1".to_owned(),
            port,
        },
        "builder".to_owned(),
        TemporaryKey::generate().unwrap().auth(),
        test_wait_options(wait),
        CancellationToken::new(),
        test_log().0,
        None,
    );
    let err = tokio::time::timeout(HANG, connecting)
        .await
        .expect("the wait never ended")
        .err()
        .expect("nothing listens, yet it connected");
    let elapsed = started.elapsed();
    let text = err.to_string();
    eprintln!("{text} (after {elapsed:?})");
    assert!(matches!(err, CommError::Connect { .. }));
    assert!(
        text.contains(&format!("builder@127.0.0.1:{port}")),
        "{text}"
    );
    assert!(text.contains("within 1.5s"), "{text}");
    assert!(text.contains("connection refused"), "{text}");
    // Not before the timeout: a refused connection is retried, as when
    // sshd is not up yet. (How soon after it the wait ends is not a
    // property a loaded test machine can check.)
    assert!(elapsed >= wait, "gave up after {elapsed:?}");
}

#[tokio::test]
async fn cancellation_and_liveness_stop_the_wait() {
    let target = imgbuild_provisioners::ssh::SshTarget {
        host: "127.0.0.1".to_owned(),
        port: sshd::free_port().unwrap(),
    };
    let auth = TemporaryKey::generate().unwrap().auth();
    // Far longer than `HANG`, so that only cancellation or liveness can
    // end the wait in time.
    let wait = test_wait_options(HANG * 10);

    let cancel = CancellationToken::new();
    let (log, sink) = test_log();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            // Cancelled once the wait is under way, not before it starts.
            wait_until("the wait starts", HANG, || {
                info_messages(&sink.events())
                    .iter()
                    .any(|m| m.starts_with("Waiting for SSH on"))
            })
            .await;
            cancel.cancel();
        })
    };
    let err = tokio::time::timeout(
        HANG,
        SshCommunicator::connect(
            target.clone(),
            "root".to_owned(),
            auth.clone(),
            wait,
            cancel,
            log,
            None,
        ),
    )
    .await
    .expect("cancellation did not stop the wait")
    .err()
    .unwrap();
    canceller.await.unwrap();
    assert!(err.to_string().contains("cancelled"), "{err}");

    // The machine is reported gone on the third question, so the answer
    // must come from asking during the wait, not only before it.
    let asked = Arc::new(AtomicUsize::new(0));
    let liveness: imgbuild_provisioners::ssh::Liveness = {
        let asked = asked.clone();
        Arc::new(move || {
            let times = asked.fetch_add(1, Ordering::SeqCst) + 1;
            (times >= 3).then(|| "QEMU exited: exit status: 1".to_owned())
        })
    };
    let err = tokio::time::timeout(
        HANG,
        SshCommunicator::connect(
            target,
            "root".to_owned(),
            auth,
            wait,
            CancellationToken::new(),
            test_log().0,
            Some(liveness),
        ),
    )
    .await
    .expect("liveness did not stop the wait")
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("QEMU exited: exit status: 1"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_key_is_reported_as_rejected() {
    let server = SshServer::started().unwrap();
    server.authorized_key().unwrap();
    let wrong = TemporaryKey::generate().unwrap();
    let fingerprint = wrong.auth().describe();
    let err = SshCommunicator::connect(
        server.target(),
        server.username(),
        wrong.auth(),
        test_wait_options(Duration::from_secs(3)),
        CancellationToken::new(),
        test_log().0,
        None,
    )
    .await
    .err()
    .unwrap();
    let text = err.to_string();
    eprintln!("{text}");
    assert!(
        text.contains("authentication failed: the SSH server rejected the ssh-ed25519 key SHA256:"),
        "{text}"
    );
    assert!(text.contains(&fingerprint), "{text}");
    assert!(
        text.contains(&format!("for user {}", server.username())),
        "{text}"
    );
    assert!(text.contains("the server accepts: publickey"), "{text}");
}

/// Slow (30 s): shows that rejection ends the wait long before `timeout`.
#[tokio::test]
async fn persistent_rejection_ends_the_wait_early() {
    let server = SshServer::started().unwrap();
    let (log, sink) = test_log();
    let started = Instant::now();
    // The bound below is half the wait's timeout: a wait that runs to its
    // timeout fails the test.
    let connecting = SshCommunicator::connect(
        server.target(),
        server.username(),
        TemporaryKey::generate().unwrap().auth(),
        test_wait_options(HANG * 10),
        CancellationToken::new(),
        log,
        None,
    );
    let err = tokio::time::timeout(HANG * 5, connecting)
        .await
        .expect("rejection did not end the wait before its timeout")
        .err()
        .unwrap();
    let elapsed = started.elapsed();
    let text = err.to_string();
    eprintln!("{text} (after {elapsed:?})");
    assert!(!text.contains("timed out"), "{text}");
    // Not before the rejection window the log announced: a key that
    // cloud-init installs late must still get its chance.
    let infos = info_messages(&sink.events());
    let window = infos
        .iter()
        .find_map(|m| m.split("retrying for up to ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|limit| humantime::parse_duration(limit).unwrap())
        .unwrap_or_else(|| panic!("the rejection window was not announced: {infos:?}"));
    assert!(
        elapsed >= window,
        "gave up after {elapsed:?}, before {window:?}"
    );
    let rejected_for = text
        .split("on every attempt for ")
        .nth(1)
        .and_then(|rest| rest.split([' ', ';']).next())
        .map(|d| humantime::parse_duration(d).unwrap())
        .unwrap_or_else(|| panic!("does not say how long it was rejected: {text}"));
    assert!(rejected_for >= window, "{text}");
}

/// A restored machine's server was running when its state was saved: a
/// rejection there is final, and the caller boots instead of waiting.
#[tokio::test]
async fn a_zero_rejection_limit_gives_up_at_the_first_rejection() {
    let server = SshServer::started().unwrap();
    let (log, sink) = test_log();
    let connecting = SshCommunicator::connect(
        server.target(),
        server.username(),
        TemporaryKey::generate().unwrap().auth(),
        imgbuild_provisioners::ssh::WaitOptions {
            rejection_limit: Duration::ZERO,
            ..test_wait_options(HANG * 10)
        },
        CancellationToken::new(),
        log,
        None,
    );
    // Well under the default rejection window of 30 s.
    let err = tokio::time::timeout(Duration::from_secs(20), connecting)
        .await
        .expect("a rejection with no window to retry in was retried")
        .err()
        .unwrap();
    assert!(matches!(err, CommError::Rejected { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("rejected"), "{text}");
    let infos = info_messages(&sink.events());
    assert!(
        !infos.iter().any(|m| m.contains("retrying for up to")),
        "{infos:?}"
    );
}

#[tokio::test]
async fn a_dropped_connection_is_reported_and_reconnect_waits_for_the_restart() {
    let mut server = SshServer::started().unwrap();
    server.keep_port();
    let comm = Arc::new(
        server
            .connect(server.authorized_key().unwrap().auth())
            .await
            .unwrap(),
    );

    // A command whose own connection goes away, as with `reboot`.
    let err = comm
        .exec("echo bye; kill -9 $PPID; sleep 5", &Lines::default())
        .await
        .unwrap_err();
    assert!(matches!(err, CommError::Disconnected { .. }), "{err}");
    comm.reconnect().await.unwrap();
    let (status, _) = run(&comm, "true").await;
    assert_eq!(status, ExitStatus::Code(0));

    // The whole server dies in the middle of a command...
    let lines = Arc::new(Lines::default());
    let running = {
        let (comm, lines) = (comm.clone(), lines.clone());
        tokio::spawn(async move { comm.exec("echo started; sleep 30", &*lines).await })
    };
    assert!(lines.wait_for("started", HANG).await);
    let killed = Instant::now();
    server.stop();
    let result = tokio::time::timeout(HANG, running)
        .await
        .expect("exec did not notice the disconnect")
        .unwrap();
    eprintln!("disconnect noticed after {:?}", killed.elapsed());
    assert_eq!(lines.of(Stream::Stdout), ["started"]);
    let err = result.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, CommError::Disconnected { .. }), "{err}");
    assert!(err.to_string().contains(&comm.target()), "{err}");
    // Noticed from the connection closing, not from keepalives going
    // unanswered long after.
    assert!(!err.to_string().contains("keepalives"), "{err}");

    // ...and comes back a second later, on the same port.
    let restart = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(1));
        server.start().unwrap();
        server
    });
    let err = run_expecting_error(&comm).await;
    assert!(matches!(err, CommError::Disconnected { .. }), "{err}");
    comm.reconnect().await.unwrap();
    let _server = restart.await.unwrap();
    let (status, lines) = run(&comm, "echo back").await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(lines.of(Stream::Stdout), ["back"]);
}

#[tokio::test]
async fn keepalives_keep_quiet_commands_alive_and_notice_a_hung_machine() {
    // sshd drops clients that do not answer its own keepalive probes.
    let mut server = SshServer::started_with(ServerOptions {
        extra_config: vec![
            "ClientAliveInterval 1".to_owned(),
            "ClientAliveCountMax 2".to_owned(),
        ],
        ..ServerOptions::default()
    })
    .unwrap();
    let key = server.authorized_key().unwrap();
    let comm = SshCommunicator::connect(
        server.target(),
        server.username(),
        key.auth(),
        imgbuild_provisioners::ssh::WaitOptions {
            keepalive_interval: Duration::from_secs(1),
            ..test_wait_options(Duration::from_secs(20))
        },
        CancellationToken::new(),
        test_log().0,
        None,
    )
    .await
    .unwrap();
    let (status, lines) = run(&comm, "sleep 4; echo still here").await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(lines.of(Stream::Stdout), ["still here"]);

    // A machine that stops answering without closing the connection is
    // only noticed through our own keepalives going unanswered.
    let comm = Arc::new(comm);
    let lines = Arc::new(Lines::default());
    let running = {
        let (comm, lines) = (comm.clone(), lines.clone());
        tokio::spawn(async move { comm.exec("echo started; sleep 60", &*lines).await })
    };
    assert!(lines.wait_for("started", HANG).await);
    server.freeze_sessions();
    let frozen = Instant::now();
    let err = tokio::time::timeout(HANG, running)
        .await
        .expect("a hung machine was never noticed")
        .unwrap()
        .unwrap_err();
    eprintln!("hung machine noticed after {:?}: {err}", frozen.elapsed());
    assert!(matches!(err, CommError::Disconnected { .. }), "{err}");
    assert!(err.to_string().contains("keepalives"), "{err}");
}

async fn run_expecting_error(comm: &SshCommunicator) -> CommError {
    comm.exec("true", &Lines::default()).await.unwrap_err()
}

#[tokio::test]
async fn key_files_load_or_explain_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let keygen = |name: &str, args: &[&str]| {
        let path = dir.path().join(name);
        let status = Command::new("ssh-keygen")
            .args(["-q", "-C", "test"])
            .args(args)
            .arg("-f")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        path
    };

    let missing = dir.path().join("missing");
    let err = load_private_key(&missing).unwrap_err().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let encrypted = keygen("encrypted", &["-t", "ed25519", "-N", "hunter22"]);
    let err = load_private_key(&encrypted).unwrap_err().to_string();
    assert!(err.contains(&encrypted.display().to_string()), "{err}");
    assert!(err.contains("passphrase"), "{err}");

    let public = encrypted.with_extension("pub");
    let err = load_private_key(&public).unwrap_err().to_string();
    assert!(err.contains("does not hold a private key"), "{err}");

    // An RSA key also needs the signature hash negotiated; log in with one.
    let rsa = keygen("rsa", &["-t", "rsa", "-b", "2048", "-N", ""]);
    let server = SshServer::started().unwrap();
    server
        .authorize_key(&std::fs::read_to_string(rsa.with_extension("pub")).unwrap())
        .unwrap();
    let comm = server
        .connect(SshAuth::from_key_file(&rsa).unwrap())
        .await
        .unwrap();
    let (status, _) = run(&comm, "true").await;
    assert_eq!(status, ExitStatus::Code(0));
}

#[tokio::test]
async fn logs_in_with_a_password() {
    // A test that returned here would report a pass without checking
    // anything; CI runs as root, so not being root is a broken setup.
    assert!(
        sshd::is_root(),
        "password logins need a local user with a password, and creating one needs root: \
         run the provisioners tests as root, as CI does"
    );
    let user = PasswordUser::create().unwrap_or_else(|err| {
        panic!("cannot create the local user imgbuild-ssh-test with a password: {err}")
    });
    let server = SshServer::started_with(ServerOptions {
        password_authentication: true,
        ..ServerOptions::default()
    })
    .unwrap();
    let (log, _sink) = test_log();
    let comm = SshCommunicator::connect(
        server.target(),
        user.name.clone(),
        SshAuth::Password(user.password.clone()),
        test_wait_options(Duration::from_secs(20)),
        CancellationToken::new(),
        log.clone(),
        None,
    )
    .await
    .unwrap();
    let (status, lines) = run(&comm, "id -un").await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(lines.of(Stream::Stdout), [user.name.as_str()]);
    // The password is now masked in everything the build reports.
    assert_eq!(log.redactor().redact(&user.password), "<sensitive>");

    let err = SshCommunicator::connect(
        server.target(),
        user.name.clone(),
        SshAuth::Password("wrong-password".to_owned()),
        test_wait_options(Duration::from_secs(3)),
        CancellationToken::new(),
        test_log().0,
        None,
    )
    .await
    .err()
    .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("rejected the password for user imgbuild-ssh-test"),
        "{text}"
    );
    assert!(!text.contains("wrong-password"), "{text}");
}
