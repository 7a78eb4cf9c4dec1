#!/usr/bin/env python3
"""imgbuild vs Packer 1.6.6 on the same builds. Started by bench/run.sh,
which documents the usage; bench/README.md documents the method.

Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import sampler  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCENARIOS = ["qemu", "warm", "docker", "ec2", "upload", "parallel", "cache"]
TOOLS = ["imgbuild", "packer"]
FIXTURE_PASSWORD = "fixture-password"
MOTO_REGION = "us-east-1"
KEY_PAIR = "imgbuild-bench"
SSH_USER = "bench"
PAYLOAD_VM = 64 * 2**20
PAYLOAD_CONTAINER = 256 * 2**20
HASH_FILE_SIZE = 2**30
# What provision.sh leaves on every machine, per tool.
RELEASE_FILE = "/etc/bench-release"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(argv, *, env=None, cwd=None, check=True, capture=True, timeout=None) -> str:
    res = subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} failed ({res.returncode}):\n"
            f"{(res.stderr or '')[-3000:]}"
        )
    return (res.stdout or "").strip()


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def cpu_of_comms(comms: set[str]) -> float:
    """Seconds of CPU used so far by every process whose comm is in `comms`."""
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = sampler.read_stat(int(name))
            if st and st[0] in comms:
                total += st[2]
    return total / sampler.CLK_TCK


def cpu_of_pid(pid: int | None) -> float:
    if not pid:
        return 0.0
    st = sampler.read_stat(pid)
    return st[2] / sampler.CLK_TCK if st else 0.0


ENGINE_COMMS = {"dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "docker-proxy"}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------
# moto: the EC2 Query API without an SDK (moto does not check signatures; the
# Authorization header only tells it the region and account).
# ---------------------------------------------------------------------------


class Moto:
    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def call(self, action: str, **params) -> str:
        data = {"Action": action, "Version": "2016-11-15"}
        data.update(params)
        req = urllib.request.Request(
            self.url + "/",
            data=urllib.parse.urlencode(data).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/"
                f"{MOTO_REGION}/ec2/aws4_request, SignedHeaders=host, Signature=bench",
            },
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read().decode()

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/moto-api/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=30).read()

    def import_key(self, name: str, public_key: bytes) -> None:
        self.call(
            "ImportKeyPair",
            KeyName=name,
            PublicKeyMaterial=base64.b64encode(public_key).decode(),
        )

    def images(self, name: str) -> dict[str, dict[str, str]]:
        """The AMIs named `name`: their ids and tags."""
        xml = self.call(
            "DescribeImages", **{"Owner.1": "self", "Filter.1.Name": "name", "Filter.1.Value.1": name}
        )
        return parse_images(xml)

    def pid(self) -> int | None:
        try:
            return int(Path(f"/tmp/imgbuild-moto-{self.port}.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def parse_images(xml: str) -> dict[str, dict[str, str]]:
    """DescribeImages' answer: {ami id: {tag key: value}}."""
    # Any namespace: moto's lacks the trailing slash of EC2's.
    root = ET.fromstring(xml)
    images = {}
    for item in root.iterfind("{*}imagesSet/{*}item"):
        tags = {
            tag.findtext("{*}key", ""): tag.findtext("{*}value", "")
            for tag in item.iterfind("{*}tagSet/{*}item")
        }
        images[item.findtext("{*}imageId", "")] = tags
    return images


def release_line(tool: str) -> str:
    """What provision.sh writes to RELEASE_FILE when `tool` runs it."""
    return f"bench image built by {tool}\n"


def read_from_disk(image: Path, inside: str, scratch: Path) -> str:
    """The file `inside` of a disk image's first partition (qcow2 or raw, MBR
    like the fixture), read from a read-only loop mount without booting it:
    what the image really holds. Needs root, like the rest of the benchmark.
    Mirrors `with_mounted_disk` of tests/support."""
    return read_files_from_disk(image, [inside], scratch)[inside]


def read_files_from_disk(image: Path, paths: list[str], scratch: Path) -> dict[str, str]:
    """{path: its text, or "unreadable: ..."} for each of `paths` inside the
    image, from one mount (see read_from_disk)."""
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / "disk.raw"
    root = scratch / "root"
    root.mkdir(exist_ok=True)
    loop = None
    try:
        sh(["qemu-img", "convert", "-O", "raw", str(image), str(raw)])
        with open(raw, "rb") as f:
            mbr = f.read(512)
        if len(mbr) < 512 or mbr[510:] != b"\x55\xaa":
            raise RuntimeError(f"{image} has no MBR")
        start = int.from_bytes(mbr[454:458], "little")
        if not start:
            raise RuntimeError(f"{image} has no first partition")
        loop = sh(["losetup", "--find", "--show", "--read-only", "--offset", str(start * 512), str(raw)])
        sh(["mount", "-o", "ro,noload", loop, str(root)])
        try:
            out = {}
            for inside in paths:
                try:
                    out[inside] = (root / inside.lstrip("/")).read_text()
                except OSError as err:
                    out[inside] = f"unreadable: {err}"
            return out
        finally:
            sh(["umount", str(root)], check=False)
    finally:
        if loop:
            sh(["losetup", "-d", loop], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


PAYLOAD_HASH = re.compile(r"BENCH_SHA256 ([0-9a-f]{64})")


def payload_hashes(tool: str, lines) -> dict[str, str]:
    """{build: the SHA-256 the machine computed of /tmp/payload.bin}, from the
    `BENCH_SHA256 <hex>` lines the upload scenario's last provisioner prints."""
    out = {}
    for _, text in lines:
        if tool == "imgbuild":
            try:
                ev = json.loads(text)
            except ValueError:
                continue
            if not isinstance(ev, dict) or ev.get("event") != "output":
                continue
            build, text = ev.get("build"), ev.get("line", "")
        else:
            p = PACKER_PREFIX.match(text)
            build = p.group(1) if p else None
        m = PAYLOAD_HASH.search(text)
        if m and build:
            out[build] = m.group(1)
    return out


# ---------------------------------------------------------------------------
# Environment: tools, fixtures, moto, the SSH target
# ---------------------------------------------------------------------------


class Env:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).expanduser().resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_dir = self.work / "runs" / self.stamp
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.imgbuild = ROOT / "target" / "release" / "imgbuild"
        self.moto = Moto(args.moto_port)
        self.target_cid = None
        self.target_ip = None
        self.key = self.work / "ec2" / "key"
        self.base_image = None
        self.base_sha256 = None
        self.docker_image = None
        self.payload_vm = self.work / "payload-64MiB.bin"
        self.payload_container = self.work / "payload-256MiB.bin"
        self.versions = {}
        # cache scenario: the work digest each build's first image held.
        self.cache_digests = {}

    # -- setup ---------------------------------------------------------------

    def apt_install(self, *packages):
        missing = [p for p in packages if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
        ).stdout.find("install ok installed") < 0]
        if not missing:
            return
        log(f"apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh(["apt-get", "update", "-q"], env=env, capture=False)
        sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, capture=False)

    def setup(self, wanted: set):
        """Installs and starts what the `wanted` scenarios need."""
        if not self.args.skip_setup:
            if shutil.which("packer") is None:
                self.apt_install("packer")
            self.apt_install("sshpass", "openssl", "openssh-client")
            log("tests/setup.sh (QEMU, Docker, moto, fixtures)")
            sh(["bash", "tests/setup.sh"], cwd=ROOT, capture=False)
            log("cargo build --release")
            sh(["cargo", "build", "--release"], cwd=ROOT, capture=False)
        if not self.imgbuild.exists():
            raise SystemExit(f"{self.imgbuild} is missing: run without --skip-setup")
        self.versions = {
            "imgbuild": sh([str(self.imgbuild), "--version"]),
            "imgbuild_git": sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False),
            "imgbuild_dirty": bool(sh(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, check=False)),
            "packer": sh(["packer", "version"]).splitlines()[0],
            "qemu": sh(["qemu-system-x86_64", "--version"]).splitlines()[0],
            "docker": sh(["docker", "version", "--format", "{{.Server.Version}}"], check=False),
            "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
        }
        if wanted & {"qemu", "warm", "upload", "parallel", "scp", "cache"}:
            self.base_image = Path(sh(["bash", "tests/fixtures/base-vm-image.sh"], cwd=ROOT))
            self.base_sha256 = self.cached_sha256(self.base_image)
            # Both tools read the base image: start both with it in the page cache.
            with open(self.base_image, "rb") as f:
                while f.read(1 << 24):
                    pass
        if wanted & {"docker", "upload", "parallel", "ec2", "cache"}:
            sh(["bash", ".ci/start-dockerd.sh"], cwd=ROOT, capture=False)
        if wanted & {"docker", "upload", "parallel", "cache"}:
            self.docker_image = sh(["bash", "tests/fixtures/docker-base-image.sh"], cwd=ROOT)
        if wanted & {"ec2", "parallel"}:
            self.start_moto()
            self.start_target()
        if wanted & {"upload", "scp"}:
            self.make_payload(self.payload_vm, PAYLOAD_VM)
            self.make_payload(self.payload_container, PAYLOAD_CONTAINER)

    def cached_sha256(self, path: Path) -> str:
        st = path.stat()
        cache = self.work / "sha256-cache.json"
        data = json.loads(cache.read_text()) if cache.exists() else {}
        key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
        if key not in data:
            data[key] = sha256_of(path)
            cache.write_text(json.dumps(data, indent=1))
        return data[key]

    def make_payload(self, path: Path, size: int):
        if path.exists() and path.stat().st_size == size:
            return
        log(f"writing {size >> 20} MiB of random data to {path}")
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
        tmp.rename(path)

    def start_moto(self):
        env = dict(os.environ, IMGBUILD_MOTO_PORT=str(self.moto.port))
        sh(["bash", ".ci/start-moto.sh"], cwd=ROOT, env=env, capture=False)
        self.key.parent.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imgbuild-bench", "-f", str(self.key)])
        os.chmod(self.key.with_suffix(".pub"), 0o644)
        self.reset_moto()

    def reset_moto(self):
        """Our own moto server (not the tests' one): a clean state per run."""
        self.moto.reset()
        self.moto.import_key(KEY_PAIR, self.key.with_suffix(".pub").read_bytes())

    def start_target(self):
        net = Path("/run/imgbuild-dockerd.network")
        if net.exists() and net.read_text().strip() == "host-only":
            raise SystemExit("the ec2 scenarios need dockerd with a bridge network (see .ci/start-dockerd.sh)")
        out = sh(["bash", "tests/fixtures/sshd-target/start.sh", SSH_USER, str(self.key.with_suffix(".pub"))], cwd=ROOT)
        self.target_cid = out.split()[0]
        # Both tools connect to the container's bridge address, port 22: the
        # committed configs need no per-run port, and no docker-proxy hop.
        self.target_ip = sh(["docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", self.target_cid])
        log(f"SSH target container {self.target_cid[:12]} at {self.target_ip}:22")

    def teardown(self):
        if self.target_cid:
            subprocess.run(["docker", "rm", "-f", self.target_cid], capture_output=True)

    # -- per tool/run configuration ------------------------------------------

    def aws_env(self, env):
        env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION=MOTO_REGION,
            AWS_REGION=MOTO_REGION,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE="/nonexistent/imgbuild-bench-aws-config",
            AWS_SHARED_CREDENTIALS_FILE="/nonexistent/imgbuild-bench-aws-credentials",
            NO_PROXY="127.0.0.1,localhost",
        )
        env.pop("AWS_PROFILE", None)
        env.pop("AWS_SESSION_TOKEN", None)
        return env

    def variables(self, scenario: str, tool: str, version: str, out: Path) -> dict:
        v = {}
        if scenario in ("qemu", "warm", "upload", "parallel", "cache"):
            v.update(base_image=str(self.base_image), base_sha256=self.base_sha256, output_dir=str(out / "output"))
            if tool == "packer":
                v["serial_log"] = str(out / "serial.log")
        if scenario in ("docker", "upload", "parallel", "cache"):
            key = "base_image" if scenario == "docker" else "docker_image"
            v[key] = self.docker_image
            v["repository"] = f"bench-{scenario}-{tool}"
        if scenario in ("ec2", "parallel"):
            v.update(
                endpoint=self.moto.url,
                ssh_host=self.target_ip,
                ssh_username=SSH_USER,
                private_key_file=str(self.key),
                key_pair_name=KEY_PAIR,
                ami_name=f"bench-{scenario}-{tool}-{version}",
            )
        if scenario == "upload":
            v.update(payload_vm=str(self.payload_vm), payload_container=str(self.payload_container))
        v["version"] = version
        return v

    def command(self, scenario: str, tool: str, version: str, out: Path, *, sdir: Path | None = None,
                manifest: Path | None = None, extra: tuple = ()):
        """The tool's command line and environment. `sdir`: the scenario's
        directory (default: the committed one); `manifest`: imgbuild's
        (default: one per run in `out`); `extra`: more arguments for build."""
        sdir = sdir or BENCH / "scenarios" / scenario
        v = self.variables(scenario, tool, version, out)
        env = self.aws_env(dict(os.environ))
        if tool == "imgbuild":
            argv = [str(self.imgbuild), "build", "--output", "json", "-v", "--color", "never",
                    "--manifest", str(manifest or out / "manifest.json"), *extra]
            if scenario == "upload":
                argv += ["--parallel", "1"]
            for k, val in v.items():
                argv += ["--var", f"{k}={val}"]
            argv.append(str(sdir / "imgbuild.toml"))
            env["IMGBUILD_STATE_DIR"] = str(self.work / "imgbuild-state")
            env["NO_COLOR"] = "1"
            # The step cache is on by default: every scenario but `cache`
            # measures a whole build, as Packer does one, so none of its runs
            # may start from steps an earlier run kept.
            env["IMGBUILD_NO_CACHE"] = "false" if scenario in ("cache", "warm") else "true"
            if scenario == "warm":
                # The state bench.py primes and every timed build restores.
                env["IMGBUILD_CACHE_DIR"] = str(self.work / "warm-store")
        else:
            argv = ["packer", "build", "-color=false", *extra]
            if scenario == "upload":
                argv.append("-parallel-builds=1")
            for k, val in v.items():
                argv += ["-var", f"{k}={val}"]
            argv.append(str(sdir / "packer.json"))
            env["PACKER_CACHE_DIR"] = str(self.work / "packer_cache")
            # No update check against checkpoint-api.hashicorp.com: a network
            # call that is not part of building.
            env["CHECKPOINT_DISABLE"] = "1"
            env.pop("PACKER_LOG", None)
        return argv, env, v

    # -- checks and cleanup ----------------------------------------------------

    def check_artifacts(self, scenario: str, tool: str, v: dict, out: Path, lines) -> list[str]:
        """What the run should have produced and did not: not only that the
        artifacts exist, but that they hold the provisioners' work, checked
        the same way for both tools."""
        problems = []
        want = release_line(tool)
        if scenario in ("qemu", "warm", "upload", "parallel"):
            outdir = Path(v["output_dir"])
            images = [p for p in outdir.glob("*.qcow2")] if outdir.exists() else []
            sums = [p for p in outdir.glob("*.sha256")] if outdir.exists() else []
            if len(images) != 1:
                problems.append(f"{len(images)} qcow2 files in {outdir}, not 1")
            if len(sums) != 1:
                problems.append(f"{len(sums)} .sha256 files in {outdir}, not 1")
            for img in images:
                info = json.loads(sh(["qemu-img", "info", "--output", "json", str(img)]))
                if info.get("format") != "qcow2":
                    problems.append(f"{img} is {info.get('format')}, not qcow2")
                if info.get("backing-filename"):
                    problems.append(f"{img} has a backing file")
                if len(sums) == 1:
                    # Both tools write "<hex><space or tab><name>".
                    listed = (sums[0].read_text().split() or [""])[0]
                    if listed != sha256_of(img):
                        problems.append(f"{sums[0]} says {listed!r}, not the sha256 of {img.name}")
                if scenario != "upload":
                    try:
                        got = read_from_disk(img, RELEASE_FILE, out / "disk-check")
                    except Exception as err:  # noqa: BLE001 - a failed check, not a crash
                        got = f"unreadable: {err}"
                    if got != want:
                        problems.append(f"{RELEASE_FILE} in {img.name} is {got!r}, not {want!r}")
        if scenario in ("docker", "upload", "parallel"):
            ref = f"{v['repository']}:{v['version']}"
            if subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode != 0:
                problems.append(f"no Docker image {ref}")
            elif scenario != "upload":
                res = subprocess.run(["docker", "run", "--rm", "--entrypoint", "cat", ref, RELEASE_FILE],
                                     capture_output=True, text=True)
                got = res.stdout if res.returncode == 0 else f"unreadable: {res.stderr.strip()}"
                if got != want:
                    problems.append(f"{RELEASE_FILE} in {ref} is {got!r}, not {want!r}")
        if scenario == "upload":
            # The last provisioner hashes the payload on the machine.
            hashes = payload_hashes(tool, lines)
            for build, payload in (("vm", self.payload_vm), ("container", self.payload_container)):
                got = hashes.get(build)
                if got != self.cached_sha256(payload):
                    problems.append(f"the payload on {build} has sha256 {got}, not that of {payload.name}")
        if scenario in ("ec2", "parallel"):
            images = self.moto.images(v["ami_name"])
            if len(images) != 1:
                problems.append(f"{len(images)} AMIs named {v['ami_name']}, not 1")
            want_tags = {"bench": scenario, "tool": tool}
            for ami, tags in images.items():
                missing = {k: val for k, val in want_tags.items() if tags.get(k) != val}
                if missing:
                    problems.append(f"{ami} lacks the tags {missing} (has {tags})")
            # moto's AMIs hold no data: what the AMI would contain is on the
            # sshd container that played the instance (cleared before each run).
            got = self.target_file(RELEASE_FILE)
            if got != want:
                problems.append(f"{RELEASE_FILE} on the SSH target is {got!r}, not {want!r}")
        return problems

    def target_file(self, path: str) -> str:
        res = subprocess.run(["docker", "exec", self.target_cid, "cat", path], capture_output=True, text=True)
        return res.stdout if res.returncode == 0 else f"unreadable: {res.stderr.strip()}"

    def clear_target(self):
        """Removes what an earlier run provisioned on the SSH target, so a run
        is checked only on what it did itself."""
        sh(["docker", "exec", self.target_cid, "rm", "-f", RELEASE_FILE])

    def cleanup(self, scenario: str, tool: str, v: dict, out: Path):
        if scenario in ("docker", "upload", "parallel"):
            ref = f"{v['repository']}:{v['version']}"
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
        shutil.rmtree(out / "output", ignore_errors=True)


# ---------------------------------------------------------------------------
# Output parsing
# ---------------------------------------------------------------------------

MARK = re.compile(r"BENCH_MARK ([abc]) ([0-9]+\.[0-9]+)")
PACKER_PREFIX = re.compile(r"^\s*(?:==> )?([A-Za-z0-9_.-]+)(?: \([^)]*\))?: ")


def parse_imgbuild(lines):
    steps, marks, errors = [], {}, []
    for t, text in lines:
        try:
            ev = json.loads(text)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        kind = ev.get("event")
        if kind == "step_finished":
            steps.append({"build": ev.get("build"), "step": ev.get("step"),
                          "s": round(ev.get("duration_ms", 0) / 1000, 3), "at": round(t, 3)})
        elif kind == "output":
            m = MARK.search(ev.get("line", ""))
            if m:
                marks.setdefault(ev.get("build"), {})[m.group(1)] = float(m.group(2))
        elif kind == "build_finished" and ev.get("status") != "succeeded":
            errors.append(f"{ev.get('build')}: {ev.get('error')}")
    return steps, marks, errors


def parse_packer(lines):
    timeline, marks = [], {}
    for t, text in lines:
        m = MARK.search(text)
        if m:
            p = PACKER_PREFIX.match(text)
            build = p.group(1) if p else "?"
            marks.setdefault(build, {})[m.group(1)] = float(m.group(2))
        if text.startswith("==> ") or text.startswith("Build '"):
            timeline.append({"at": round(t, 3), "line": text[:160]})
    return timeline, marks


def transfer_times(marks: dict) -> dict:
    """(c - b) - (b - a) per build: the upload minus one provisioner hand-over."""
    out = {}
    for build, m in marks.items():
        if all(k in m for k in "abc"):
            out[build] = {
                "handover_s": round(m["b"] - m["a"], 3),
                "upload_gap_s": round(m["c"] - m["b"], 3),
                "transfer_s": round((m["c"] - m["b"]) - (m["b"] - m["a"]), 3),
            }
    return out


def phases_from_timeline(timeline, wall):
    """Packer: time from each '==>' line to the next, summed by message."""
    out = {}
    for i, item in enumerate(timeline):
        end = timeline[i + 1]["at"] if i + 1 < len(timeline) else wall
        key = re.sub(r"\s+", " ", item["line"])[:80]
        out[key] = round(out.get(key, 0) + end - item["at"], 3)
    return out


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_once(env: Env, scenario: str, tool: str, index: int, order: int) -> dict:
    version = f"{env.stamp.lower()}.{index}"
    out = env.run_dir / scenario / f"{tool}-{index}"
    out.mkdir(parents=True, exist_ok=True)
    if scenario in ("ec2", "parallel"):
        env.reset_moto()
        env.clear_target()
    argv, penv, v = env.command(scenario, tool, version, out)
    log(f"{scenario}: {tool} run {index} ...")
    res, record = measure(env, argv, penv, out)
    record = {"tool": tool, "run": index, "order": order, "version": version, **record}
    if tool == "imgbuild":
        steps, marks, errors = parse_imgbuild(res.lines)
        record["steps"] = steps
        if errors:
            record["errors"] = errors
    else:
        timeline, marks = parse_packer(res.lines)
        record["timeline"] = timeline
        record["phases"] = phases_from_timeline(timeline, res.wall_s)
    if scenario == "upload":
        record["marks"] = marks
        record["transfer"] = transfer_times(marks)
    problems = []
    if res.returncode != 0:
        problems.append(f"exit code {res.returncode}")
        tail = [text for _, text in res.lines[-15:]]
        record["log_tail"] = tail
    if res.timed_out:
        problems.append("timed out")
    if res.returncode == 0:
        problems += env.check_artifacts(scenario, tool, v, out, res.lines)
    record["ok"] = not problems
    if problems:
        record["problems"] = problems
    env.cleanup(scenario, tool, v, out)
    status = "ok" if record["ok"] else "FAILED: " + "; ".join(problems)
    log(f"{scenario}: {tool} run {index}: {res.wall_s:.1f} s wall, {res.own_cpu_s:.2f} s CPU, "
        f"{record['peak_mem_mib']:.1f} MiB peak, load {record['loadavg_start'][0]:.1f} -> {record['loadavg_end'][0]:.1f}: {status}")
    return record


def measure(env: Env, argv, penv, out: Path):
    """Runs one tool command in `out`, sampled: (the sampler's result, the
    record of what it cost)."""
    (out / "command.txt").write_text(" ".join(map(str, argv)) + "\n")
    load0 = loadavg()
    busy0, total0 = cpu_times()
    engine0 = cpu_of_comms(ENGINE_COMMS)
    moto0 = cpu_of_pid(env.moto.pid())
    res = sampler.run(argv, cwd=str(out), env=penv, log_path=out / "output.log",
                      interval=env.args.interval, timeout=env.args.timeout)
    busy1, total1 = cpu_times()
    record = {
        **res.to_json(),
        # The footprint: PSS summed over the tool's processes, but never less
        # than the exact high-water mark of its largest process.
        "peak_mem_mib": round(max(res.own_peak_pss, res.own_max_hwm) / 2**20, 2),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "machine_cpu_busy_pct": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
        "engine_cpu_s": round(cpu_of_comms(ENGINE_COMMS) - engine0, 3),
        "moto_cpu_s": round(cpu_of_pid(env.moto.pid()) - moto0, 3),
        "log": str(out / "output.log"),
    }
    return res, record


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["ok"]]
    s = {
        "runs": len(records),
        "ok_runs": len(ok),
        "wall_s": median([r["wall_s"] for r in ok]),
        "own_cpu_s": median([r["own_cpu_s"] for r in ok]),
        "peak_mem_mib": median([r["peak_mem_mib"] for r in ok]),
        "max_peak_mem_mib": max([r["peak_mem_mib"] for r in records if r["peak_mem_mib"] is not None], default=None),
        "external_cpu_s": median([r["external_cpu_s"] for r in ok]),
        "engine_cpu_s": median([r["engine_cpu_s"] for r in ok]),
        "loadavg_start": median([r["loadavg_start"][0] for r in records]),
    }
    if any("transfer" in r for r in ok):
        builds = sorted({b for r in ok for b in r.get("transfer", {})})
        s["transfer_s"] = {b: median([r["transfer"][b]["transfer_s"] for r in ok if b in r.get("transfer", {})]) for b in builds}
    if not ok and records:
        s["failure"] = records[-1].get("problems", ["?"]) + records[-1].get("errors", [])
    return s


def run_guarded(env: Env, scenario: str, tool: str, index: int, order: int) -> dict:
    try:
        return run_once(env, scenario, tool, index, order)
    except Exception as err:  # noqa: BLE001 - one broken run must not end the benchmark
        log(f"{scenario}: {tool} run {index}: bench error: {err}")
        return {"tool": tool, "run": index, "order": order, "ok": False, "problems": [f"bench error: {err}"],
                "wall_s": None, "own_cpu_s": None, "peak_mem_mib": None, "external_cpu_s": None,
                "engine_cpu_s": None, "loadavg_start": loadavg(), "loadavg_end": loadavg()}


def run_scenarios(env: Env, results: dict) -> dict:
    for scenario in env.args.scenario:
        if scenario == "cache":
            run_cache(env, results)
            continue
        records = {t: [] for t in TOOLS}
        if scenario == "warm":
            # Saves the machine state the timed builds restore; a state an
            # earlier bench run left is discarded first, so this one is made
            # by the imgbuild being measured.
            shutil.rmtree(env.work / "warm-store", ignore_errors=True)
            primed = run_guarded(env, scenario, "imgbuild", 0, 0)
            if not primed["ok"]:
                log(f"warm: priming failed: {primed.get('problems')}; the timed builds will boot")
        for i in range(1, env.args.runs + 1):
            # Alternate who goes first, so neither tool always meets a
            # machine the other has just warmed up (or loaded).
            order = TOOLS if i % 2 == 1 else list(reversed(TOOLS))
            for pos, tool in enumerate(order):
                records[tool].append(run_guarded(env, scenario, tool, i, pos))
                time.sleep(env.args.pause)
        summary = {t: summarize(records[t]) for t in TOOLS}
        results[scenario] = {"records": records, "summary": summary, "ratios": ratios(summary)}
        report.write_partial(env, results)
    return results


def ratios(summary: dict) -> dict:
    a, b = summary["imgbuild"], summary["packer"]

    def r(x, y):
        return round(x / y, 3) if x is not None and y not in (None, 0) else None

    out = {
        "wall": r(a["wall_s"], b["wall_s"]),
        "cpu": r(a["own_cpu_s"], b["own_cpu_s"]),
        "peak_mem": r(a["peak_mem_mib"], b["peak_mem_mib"]),
    }
    if "transfer_s" in a and "transfer_s" in b:
        for build in a["transfer_s"]:
            ta, tb = a["transfer_s"].get(build), b["transfer_s"].get(build)
            # Throughput ratio: Packer's transfer time over imgbuild's.
            out[f"upload_{build}_throughput"] = r(tb, ta) if ta and ta > 0 else None
    return out


# ---------------------------------------------------------------------------
# The `cache` scenario: per builder, a sequence of builds by each tool
# ---------------------------------------------------------------------------

# The builds of bench/scenarios/cache, in the order they run, and the
# phases each goes through. Packer has no `cached` phase: with no cache it
# does the same full rebuild as in `unchanged`, which stands for it there.
CACHE_PHASES = {
    "container": ["scratch", "changed", "unchanged"],
    "vm": ["scratch", "changed", "unchanged", "cached"],
}
CACHE_BUILDER = {"container": "docker", "vm": "qemu"}
# The revision finish.sh writes in each phase: `changed` edits it.
PHASE_REVISION = {"scratch": 1, "changed": 2, "unchanged": 2, "cached": 2}
WORK_FILE = "/var/lib/bench/work.sha256"
CACHE_REPOSITORY = "imgbuild-cache"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def cache_release(tool: str, revision: int) -> str:
    return f"bench image built by {tool}\nrevision {revision}\n"


def set_revision(sdir: Path, revision: int) -> None:
    """Changes the last step only: the REVISION line of finish.sh in the copy."""
    script = sdir / "scripts" / "finish.sh"
    text = script.read_text()
    new = re.sub(r"^REVISION=\d+$", f"REVISION={revision}", text, count=1, flags=re.M)
    if new == text and f"REVISION={revision}\n" not in text:
        raise RuntimeError(f"{script} has no REVISION= line to change")
    script.write_text(new)


def manifest_keys(manifest: Path) -> set[str]:
    """Every step key a manifest records (any 64-hex `key`, wherever it sits)."""
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return set()
    keys = set()

    def walk(node):
        if isinstance(node, dict):
            for k, val in node.items():
                if k == "key" and isinstance(val, str) and HEX64.match(val):
                    keys.add(val)
                else:
                    walk(val)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return keys


def remove_cache_images(keys) -> int:
    """Removes the Docker step cache's images for `keys` (and only those: the
    tests share the engine and keep their own). Returns how many went."""
    removed = 0
    for key in sorted(keys):
        ref = f"{CACHE_REPOSITORY}:{key}"
        if subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0:
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
            removed += 1
    return removed


def parse_cache_events(lines) -> dict:
    """What imgbuild's JSON events say about the cache: how many steps it
    started past (`steps_cached`), which provisioners ran, and the version
    that stood instead of a build (`build_skipped`)."""
    out = {"steps_cached": 0, "provisioners_run": [], "skipped_for": None}
    for _, text in lines:
        try:
            ev = json.loads(text)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        kind = ev.get("event")
        if kind == "steps_cached":
            out["steps_cached"] = ev.get("steps", 0)
        elif kind == "build_skipped":
            out["skipped_for"] = ev.get("version")
        elif kind == "message":
            m = ev.get("message", "")
            if m.startswith("provisioner ") and " done in " not in m:
                out["provisioners_run"].append(m.split(":")[0])
    return out


class CacheRun:
    """One tool's side of one run of one build: its copy of the scenario
    (which `changed` edits), its manifest, step cache and outputs, kept
    across the phases."""

    def __init__(self, env: Env, build: str, tool: str, index: int):
        self.build, self.tool = build, tool
        self.work = env.run_dir / "cache" / f"{build}-{index}" / tool
        self.sdir = self.work / "scenario"
        shutil.copytree(BENCH / "scenarios" / "cache", self.sdir)
        self.manifest = self.work / "manifest.json"
        self.cache_dir = self.work / "steps"
        self.cache_dir.mkdir(parents=True)
        self.versions = []


def check_cache_phase(env: Env, run: CacheRun, phase: str, v: dict, imgbuild_events: dict | None) -> tuple[list, list, str | None]:
    """(problems with what the build made, expectations of the cache it did
    not meet, the work digest the image holds). Problems fail the run;
    unmet cache expectations are reported beside its timing, which still
    says what the build cost."""
    problems, unmet, digest = [], [], None
    build, tool = run.build, run.tool
    skipping = tool == "imgbuild" and phase == "unchanged"
    want_release = cache_release(tool, PHASE_REVISION[phase])
    files = {}
    if build == "vm":
        outdir = Path(v["output_dir"]) / v["version"]
        images = list(outdir.glob("*.qcow2")) if outdir.exists() else []
        if skipping:
            if images:
                problems.append(f"a skipped build wrote {images[0]}")
        else:
            sums = list(outdir.glob("*.sha256")) if outdir.exists() else []
            if len(images) != 1 or len(sums) != 1:
                problems.append(f"{len(images)} qcow2 and {len(sums)} .sha256 files in {outdir}, not 1 and 1")
            for img in images[:1]:
                info = json.loads(sh(["qemu-img", "info", "--output", "json", str(img)]))
                if info.get("format") != "qcow2" or info.get("backing-filename"):
                    problems.append(f"{img} is {info.get('format')} with backing file {info.get('backing-filename')}")
                if len(sums) == 1 and (sums[0].read_text().split() or [""])[0] != sha256_of(img):
                    problems.append(f"{sums[0]} is not the sha256 of {img.name}")
                try:
                    files = read_files_from_disk(img, [RELEASE_FILE, WORK_FILE], run.work / "disk-check")
                except Exception as err:  # noqa: BLE001 - a failed check, not a crash
                    problems.append(f"{img.name} unreadable: {err}")
    else:
        ref = f"{v['repository']}:{v['version']}"
        exists = subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0
        if skipping:
            if exists:
                problems.append(f"a skipped build made the image {ref}")
        elif not exists:
            problems.append(f"no Docker image {ref}")
        else:
            for path in (RELEASE_FILE, WORK_FILE):
                res = subprocess.run(["docker", "run", "--rm", "--entrypoint", "cat", ref, path],
                                     capture_output=True, text=True)
                files[path] = res.stdout if res.returncode == 0 else f"unreadable: {res.stderr.strip()}"
    if files:
        if files.get(RELEASE_FILE) != want_release:
            problems.append(f"{RELEASE_FILE} is {files.get(RELEASE_FILE)!r}, not {want_release!r}")
        digest = (files.get(WORK_FILE) or "").strip()
        if not HEX64.match(digest):
            problems.append(f"{WORK_FILE} is {files.get(WORK_FILE)!r}, not a SHA-256")
            digest = None
    if imgbuild_events is not None:
        ev = imgbuild_events
        steps = 2
        if phase == "scratch" and ev["steps_cached"]:
            unmet.append(f"started past {ev['steps_cached']} cached steps: the cache was not empty")
        if phase == "changed":
            if ev["steps_cached"] != steps - 1:
                unmet.append(f"{ev['steps_cached']} steps cached, not {steps - 1}")
            if ev["provisioners_run"] != [f"provisioner {steps} of {steps}"]:
                unmet.append(f"ran {ev['provisioners_run'] or 'no provisioner'}, not only the last")
        if phase == "unchanged" and ev["skipped_for"] != (run.versions[-1] if run.versions else None):
            unmet.append(f"not skipped for the previous version (build_skipped names {ev['skipped_for']})")
        if phase == "cached":
            if ev["steps_cached"] != steps or ev["provisioners_run"]:
                unmet.append(f"{ev['steps_cached']} steps cached, ran {ev['provisioners_run']}: not fully cached")
    return problems, unmet, digest


def run_cache_phase(env: Env, run: CacheRun, phase: str, index: int, order: int) -> dict:
    build, tool = run.build, run.tool
    version = f"{env.stamp.lower()}.{index}.{phase}"
    out = run.work / phase
    out.mkdir(parents=True, exist_ok=True)
    if tool == "imgbuild":
        extra = ["--only", build] + (["--skip-unchanged"] if phase == "unchanged" else [])
    else:
        extra = [f"-only={build}"]
    # The outputs go under one directory per tool (a version below it), so
    # nothing but the version differs between the phases' inputs.
    argv, penv, v = env.command("cache", tool, version, run.work, sdir=run.sdir, manifest=run.manifest,
                                extra=tuple(extra))
    if tool == "imgbuild":
        penv["IMGBUILD_CACHE_DIR"] = str(run.cache_dir)
    log(f"cache/{build}: {tool} {phase} (run {index}) ...")
    res, record = measure(env, argv, penv, out)
    record = {"tool": tool, "build": build, "phase": phase, "run": index, "order": order,
              "version": version, **record}
    events = None
    if tool == "imgbuild":
        steps, _, errors = parse_imgbuild(res.lines)
        events = parse_cache_events(res.lines)
        record.update(steps=steps, cache=events)
        if errors:
            record["errors"] = errors
    else:
        timeline, _ = parse_packer(res.lines)
        record.update(timeline=timeline, phases=phases_from_timeline(timeline, res.wall_s))
    # Whether a VM ran at all (a fully cached QEMU build boots none).
    record["booted_vm"] = any(k.startswith("qemu-system") for k in res.to_json()["external"])
    problems = []
    if res.returncode != 0:
        problems.append(f"exit code {res.returncode}")
        record["log_tail"] = [text for _, text in res.lines[-15:]]
    if res.timed_out:
        problems.append("timed out")
    if res.returncode == 0:
        found, unmet, digest = check_cache_phase(env, run, phase, v, events)
        problems += found
        if unmet:
            record["cache_unmet"] = unmet
        if digest:
            record["work_digest"] = digest
            first = env.cache_digests.setdefault(build, digest)
            if digest != first:
                problems.append(f"{WORK_FILE} holds {digest}, another build of {build} {first}: the work is not the same")
        if not (tool == "imgbuild" and phase == "unchanged"):
            run.versions.append(version)
    record["ok"] = not problems
    if problems:
        record["problems"] = problems
    # What the phase made: checked, so gone (the next phase makes its own).
    subprocess.run(["docker", "rmi", "-f", f"{v['repository']}:{version}"], capture_output=True)
    shutil.rmtree(Path(v["output_dir"]) / version, ignore_errors=True)
    status = "ok" if record["ok"] else "FAILED: " + "; ".join(problems)
    if record.get("cache_unmet"):
        status += " (cache: " + "; ".join(record["cache_unmet"]) + ")"
    log(f"cache/{build}: {tool} {phase} (run {index}): {res.wall_s:.2f} s wall, {res.own_cpu_s:.2f} s CPU, "
        f"{record['peak_mem_mib']:.1f} MiB peak: {status}")
    return record


def run_cache_phase_guarded(env: Env, run: CacheRun, phase: str, index: int, order: int) -> dict:
    try:
        return run_cache_phase(env, run, phase, index, order)
    except Exception as err:  # noqa: BLE001 - one broken run must not end the benchmark
        log(f"cache/{run.build}: {run.tool} {phase} (run {index}): bench error: {err}")
        return {"tool": run.tool, "build": run.build, "phase": phase, "run": index, "order": order, "ok": False,
                "problems": [f"bench error: {err}"], "wall_s": None, "own_cpu_s": None, "peak_mem_mib": None,
                "external_cpu_s": None, "engine_cpu_s": None, "loadavg_start": loadavg(), "loadavg_end": loadavg()}


def run_cache(env: Env, results: dict) -> None:
    """Per build and run: both tools from scratch, then both after the same
    change to the last script, then both unchanged with a new version
    (imgbuild with --skip-unchanged), then (QEMU) imgbuild fully cached with
    a new version. Who goes first alternates between runs."""
    records = {b: {t: {p: [] for p in CACHE_PHASES[b] if not (t == "packer" and p == "cached")}
                   for t in TOOLS} for b in CACHE_PHASES}
    leftovers = set()
    for manifest in (env.work / "runs").glob("*/cache/*/imgbuild/manifest.json"):
        leftovers |= manifest_keys(manifest)
    if remove_cache_images(leftovers):
        log("cache: removed step images earlier runs left in the engine")
    for build in CACHE_PHASES:
        for i in range(1, env.args.runs + 1):
            order = TOOLS if i % 2 == 1 else list(reversed(TOOLS))
            runs = {t: CacheRun(env, build, t, i) for t in TOOLS}
            try:
                for phase in CACHE_PHASES[build]:
                    if phase == "changed":
                        for run in runs.values():
                            set_revision(run.sdir, PHASE_REVISION[phase])
                    for pos, tool in enumerate(order):
                        if tool == "packer" and phase == "cached":
                            continue
                        records[build][tool][phase].append(run_cache_phase_guarded(env, runs[tool], phase, i, pos))
                        time.sleep(env.args.pause)
            finally:
                # The step cache this run filled: its layers, its images.
                remove_cache_images(manifest_keys(runs["imgbuild"].manifest))
                for run in runs.values():
                    shutil.rmtree(run.cache_dir, ignore_errors=True)
                    shutil.rmtree(run.work / "output", ignore_errors=True)
        summary = {t: {p: summarize(recs) for p, recs in records[build][t].items()} for t in TOOLS}
        for t in TOOLS:
            for p, recs in records[build][t].items():
                unmet = sorted({u for r in recs for u in r.get("cache_unmet", [])})
                if unmet:
                    summary[t][p]["cache_unmet"] = unmet
        results.setdefault("cache", {"kind": "phases", "builds": {}})["builds"][build] = {
            "builder": CACHE_BUILDER[build],
            "records": records[build],
            "summary": summary,
            "ratios": cache_ratios(build, summary),
        }
        report.write_partial(env, results)


def cache_ratios(build: str, summary: dict) -> dict:
    """Per phase: imgbuild's median wall over its own from-scratch one, and
    over Packer's doing the same (for `cached`, Packer's `unchanged`: the
    same full rebuild)."""

    def r(x, y):
        return round(x / y, 3) if x is not None and y not in (None, 0) else None

    img, pk = summary["imgbuild"], summary["packer"]
    scratch = img["scratch"]["wall_s"]
    out = {}
    for phase in CACHE_PHASES[build]:
        packer_phase = "unchanged" if phase == "cached" else phase
        out[phase] = {
            "vs_scratch": r(img[phase]["wall_s"], scratch),
            "vs_packer": r(img[phase]["wall_s"], pk[packer_phase]["wall_s"]),
            "packer_vs_scratch": r(pk[packer_phase]["wall_s"], pk["scratch"]["wall_s"]),
        }
    return out


# ---------------------------------------------------------------------------
# scp baseline: one QEMU VM from an overlay of the fixture, as the tools boot it
# ---------------------------------------------------------------------------


def scp_baseline(env: Env) -> dict:
    vmdir = env.run_dir / "scp-vm"
    vmdir.mkdir(parents=True, exist_ok=True)
    overlay = vmdir / "overlay.qcow2"
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(env.base_image), "-F", "qcow2", str(overlay)])
    port = free_port()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "max",
         "-m", "1024", "-smp", "2", "-nodefaults", "-display", "none",
         "-serial", f"file:{vmdir / 'serial.log'}",
         "-drive", f"file={overlay},if=virtio,format=qcow2,cache=writeback",
         "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
         "-device", "virtio-net-pci,netdev=net0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(vmdir / "qemu.log", "w"),
        start_new_session=True,
    )
    ctl = vmdir / "ctl"
    key = env.work / "scp" / "key"
    key.parent.mkdir(parents=True, exist_ok=True)
    if not key.exists():
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imgbuild-bench-scp", "-f", str(key)])
    common = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
              "-o", "ConnectTimeout=10", "-o", "IdentitiesOnly=yes", "-i", str(key)]
    ssh_opts = common + ["-p", str(port)]
    scp_opts = common + ["-P", str(port)]
    mux = ["-o", f"ControlPath={ctl}"]
    dest = "imgbuild@127.0.0.1"
    result = {"method": "OpenSSH scp (SFTP protocol), key login, of the 64 MiB payload to /tmp/payload.bin in a QEMU VM "
                        "booted like the builders boot it (TCG, -cpu max, 1024 MiB, 2 vCPUs, virtio, user networking); "
                        "transfer_s: over an open master connection (ControlMaster), plain_s: a new connection each time"}

    def run(argv):
        subprocess.run(argv, check=True, capture_output=True, timeout=600)

    try:
        log("scp baseline: booting a VM from an overlay of the fixture")
        t0 = time.monotonic()
        pub = key.with_suffix(".pub").read_bytes()
        while True:
            if qemu.poll() is not None:
                raise RuntimeError("QEMU exited while booting the scp VM")
            if time.monotonic() - t0 > 600:
                raise RuntimeError("no SSH on the scp VM after 10 minutes")
            # Password login once, to authorize the key.
            rc = subprocess.run(
                ["sshpass", "-p", FIXTURE_PASSWORD, "ssh", *ssh_opts, "-o", "PubkeyAuthentication=no", dest,
                 "mkdir -p ~/.ssh && cat >> ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys"],
                input=pub, capture_output=True).returncode
            if rc == 0:
                break
            time.sleep(2)
        log(f"scp baseline: SSH up after {time.monotonic() - t0:.0f} s")
        run(["ssh", *ssh_opts, *mux, "-o", "ControlMaster=yes", "-o", "ControlPersist=600", "-fN", dest])
        plain, muxed, connect = [], [], []
        for _ in range(max(3, env.args.runs)):
            t = time.monotonic()
            run(["ssh", *ssh_opts, dest, "true"])
            connect.append(time.monotonic() - t)
            t = time.monotonic()
            run(["scp", "-q", *scp_opts, str(env.payload_vm), f"{dest}:/tmp/payload.bin"])
            plain.append(time.monotonic() - t)
            run(["ssh", *ssh_opts, *mux, dest, "rm -f /tmp/payload.bin; sync"])
            t = time.monotonic()
            run(["scp", "-q", *scp_opts, *mux, str(env.payload_vm), f"{dest}:/tmp/payload.bin"])
            muxed.append(time.monotonic() - t)
            run(["ssh", *ssh_opts, *mux, dest, "rm -f /tmp/payload.bin; sync"])
        result.update(
            runs=len(plain),
            plain_s=[round(x, 3) for x in plain],
            connection_reused_s=[round(x, 3) for x in muxed],
            ssh_connect_login_s=[round(x, 3) for x in connect],
            transfer_s=round(median(muxed), 3),
            plain_median_s=round(median(plain), 3),
            mib_per_s=round(64 / median(muxed), 1),
        )
        subprocess.run(["ssh", *ssh_opts, *mux, "-O", "exit", dest], capture_output=True)
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        result["error"] = str(err)
        log(f"scp baseline failed: {err}")
    finally:
        try:
            os.killpg(qemu.pid, signal.SIGTERM)
            qemu.wait(20)
        except Exception:  # noqa: BLE001
            os.killpg(qemu.pid, signal.SIGKILL)
        shutil.rmtree(vmdir, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------
# Micro-benchmarks: criterion (cargo bench) and openssl speed
# ---------------------------------------------------------------------------


def micro(env: Env) -> dict:
    out = {}
    hash_file = env.work / "hash-1GiB.bin"
    env.make_payload(hash_file, HASH_FILE_SIZE)
    big_config = env.work / "config-bench"
    menv = dict(os.environ, IMGBUILD_BENCH_HASH_FILE=str(hash_file), IMGBUILD_BENCH_CONFIG_DIR=str(big_config))
    log("cargo bench (criterion): hashing and config loading")
    res = subprocess.run(["cargo", "bench", "--bench", "hash", "--bench", "config_load", "--", "--noplot"],
                         cwd=ROOT, env=menv, text=True, capture_output=True)
    (env.run_dir / "criterion.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        out["error"] = "cargo bench failed; see " + str(env.run_dir / "criterion.log")
        log(out["error"])
    crit = ROOT / "target" / "criterion"

    def estimate(group, name):
        p = crit / group / name / "new" / "estimates.json"
        if not p.exists():
            return None
        e = json.loads(p.read_text())
        return e["median"]["point_estimate"] / 1e9  # seconds

    for name in ("imgbuild_sha256_file", "sha256sum"):
        s = estimate("sha256_1GiB", name)
        if s:
            out[name] = {"s_per_GiB": round(s, 3), "GB_per_s": round(HASH_FILE_SIZE / s / 1e9, 3)}
    for name in ("load_200_builders_1000_provisioners",):
        s = estimate("config", name)
        if s:
            out[name] = {"ms": round(s * 1000, 2)}
    meta = big_config / "stats.json"
    if meta.exists():
        out["config_stats"] = json.loads(meta.read_text())
    # The SHA-NI limit: OpenSSL's SHA-256 on 16 KiB blocks in memory.
    try:
        text = sh(["openssl", "speed", "-evp", "sha256", "-bytes", "16384", "-seconds", "3", "-mr"])
        m = re.search(r"\+F:\d+:sha256:([0-9.]+)", text)
        if m:
            out["openssl_speed_evp_sha256"] = {"block": 16384, "GB_per_s": round(float(m.group(1)) / 1e9, 3)}
    except Exception as err:  # noqa: BLE001
        out["openssl_error"] = str(err)
    out["cpu_flags_sha_ni"] = "sha_ni" in Path("/proc/cpuinfo").read_text()
    return out


# ---------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/run.sh", description="imgbuild vs Packer 1.6.6 on the same builds")
    p.add_argument("--runs", type=int, default=3, help="runs per tool and scenario (default 3)")
    p.add_argument("--scenario", action="append", choices=SCENARIOS + ["scp", "micro"],
                   help="run only this (repeatable); default: every scenario, then scp and micro")
    p.add_argument("--skip-setup", action="store_true", help="no apt-get, tests/setup.sh or cargo build")
    p.add_argument("--no-micro", action="store_true", help="leave out the criterion micro-benchmarks")
    p.add_argument("--work", default="~/.cache/imgbuild/bench", help="work directory (payloads, outputs, logs)")
    p.add_argument("--moto-port", type=int, default=5057, help="port of the benchmark's own moto server (default 5057)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one tool run may take (default 1800)")
    p.add_argument("--pause", type=float, default=3, help="seconds between runs (default 3)")
    p.add_argument("--interval", type=float, default=0.05, help="sampling interval in seconds (default 0.05)")
    args = p.parse_args(argv)
    selected = args.scenario or SCENARIOS + ["scp", "micro"]
    if args.no_micro:
        selected = [s for s in selected if s != "micro"]
    args.scenario = [s for s in SCENARIOS if s in selected]
    extras = [s for s in ("scp", "micro") if s in selected]
    env = Env(args)
    started = time.time()
    load_start = loadavg()
    scenarios, scp, micro_results = {}, None, None
    try:
        env.setup(set(selected))
        run_scenarios(env, scenarios)
        if "scp" in extras:
            scp = scp_baseline(env)
        if "micro" in extras:
            micro_results = micro(env)
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured so far")
    finally:
        env.teardown()
    doc = report.build(env, scenarios, scp, micro_results, load_start, started)
    report.write(env, doc)


if __name__ == "__main__":
    main()
