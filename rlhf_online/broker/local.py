"""The local single-node Kafka broker: `rlhf-online kafka start|stop|status`.

Runs the official Apache Kafka 4.x broker (KRaft: broker and controller in one JVM) on 127.0.0.1, for the
demo and the tests. Its jars come from Maven Central through `mvn dependency:copy-dependencies` on the pom.xml
beside this file and are cached in ~/.cache/rlhf-online/kafka-<version>/libs: they resolve once per machine.

    rlhf-online kafka start     # resolve jars, format .rlhf/kafka, start in the background, create the topics
    rlhf-online kafka status    # exit code 0 when running, 3 when stopped
    rlhf-online kafka stop      # SIGTERM, then SIGKILL after --kafka-stop-timeout-s

The home folder holds server.properties, log4j2.properties, data/ (the log dirs), logs/ (server.log from
log4j, stdout.log from the JVM), broker.pid and broker.json (the ports it was started with).
"""

import argparse
import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_online.config import add_arguments, from_namespace
from rlhf_online.topics import DEFAULT_PREFIX, Topics

log = logging.getLogger(__name__)

POM = Path(__file__).with_name("pom.xml")
HOST = "127.0.0.1"
MIN_JAVA = 17  # Kafka 4.x brokers need Java 17+
HEAP_FLAGS = ["-Xmx512m", "-Xms256m"]
EXIT_STOPPED = 3
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_children: dict[int, subprocess.Popen] = {}  # brokers this process started, so their exit can be reaped


class BrokerError(RuntimeError):
    """The local broker could not be started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class BrokerStatus:
    """What `broker_status` found in a home folder."""

    running: bool
    home: Path
    pid: int | None = None
    bootstrap: str | None = None  # "127.0.0.1:PORT" from broker.json
    log_path: Path | None = None


@dataclass
class LocalKafkaConfig:
    """Start, stop or check the local single-node Kafka broker."""

    kafka_home: Path = field(
        default=Path(".rlhf/kafka"), metadata={"help": "folder of the broker's config, data, logs and pid"}
    )
    kafka_port: int = field(default=19092, metadata={"help": "client port on 127.0.0.1"})
    kafka_controller_port: int = field(default=19093, metadata={"help": "KRaft controller port on 127.0.0.1"})
    kafka_partitions: int = field(
        default=4, metadata={"help": "partitions of interactions and of feedback (co-partitioned)"}
    )
    topic_prefix: str = field(default=DEFAULT_PREFIX, metadata={"help": "prefix of the topics start creates"})
    kafka_start_timeout_s: float = field(
        default=120.0, metadata={"help": "seconds `start` waits for the broker to answer"}
    )
    kafka_stop_timeout_s: float = field(
        default=30.0, metadata={"help": "seconds `stop` waits after SIGTERM before SIGKILL"}
    )
    kafka_cache_dir: Path | None = field(
        default=None,
        metadata={"help": "where resolved jars are kept (default $XDG_CACHE_HOME or ~/.cache, /rlhf-online)"},
    )

    def __post_init__(self):
        for name in ("kafka_port", "kafka_controller_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name}={getattr(self, name)} is not a TCP port; use 1..65535")
        if self.kafka_port == self.kafka_controller_port:
            raise ValueError(f"kafka_port and kafka_controller_port are both {self.kafka_port}; use 2 ports")
        if self.kafka_partitions < 1:
            raise ValueError(f"kafka_partitions={self.kafka_partitions}; use 1 or more")
        if self.kafka_start_timeout_s <= 0 or self.kafka_stop_timeout_s <= 0:
            raise ValueError("kafka_start_timeout_s and kafka_stop_timeout_s must be > 0")


# ---------------------------------------------------------------------------------------------- public API


def start_broker(
    home: Path,
    *,
    port: int = 19092,
    controller_port: int = 19093,
    partitions: int = 4,
    timeout_s: float = 120.0,
    topics: Topics | None = None,
    cache_dir: Path | None = None,
) -> str:
    """Starts the broker in `home` (a no-op when it already runs there) and creates the topics.

    `topics` defaults to `Topics()` (prefix "rlhf"); interactions and feedback get `partitions` each.

    Returns:
        The bootstrap address, "127.0.0.1:PORT".

    Raises:
        BrokerError: no java, no mvn, Maven resolution failed, a port is taken (and by whom), or the broker
            exited or did not answer in time (with the tail of its log).
    """
    from rlhf_online.broker.clients import ensure_topics, wait_for_broker

    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with _locked(home):
        status = broker_status(home)
        if status.running:
            if status.bootstrap != f"{HOST}:{port}":
                raise BrokerError(
                    f"the broker in {home} already runs on {status.bootstrap} (pid {status.pid}), not on "
                    f"port {port}; use that address, or `rlhf-online kafka stop --kafka-home {home}` first"
                )
            log.info("kafka already running in %s (pid %s, %s)", home, status.pid, status.bootstrap)
            bootstrap = status.bootstrap
            try:
                wait_for_broker(bootstrap, max(deadline - time.monotonic(), 1.0))
            except TimeoutError as e:
                raise BrokerError(f"{e}\n{_log_tail_message(home)}") from None
        else:
            bootstrap = _start(home, port, controller_port, deadline, cache_dir)
    try:
        remaining = max(deadline - time.monotonic(), 10.0)
        ensure_topics(bootstrap, topics or Topics(), partitions=partitions, timeout_s=remaining)
    except Exception as e:
        raise BrokerError(f"the broker runs on {bootstrap}, but creating the topics failed: {e}") from e
    return bootstrap


def stop_broker(home: Path, *, timeout_s: float = 30.0) -> None:
    """Stops the broker of `home`: SIGTERM, then SIGKILL after `timeout_s`. A no-op when it is not running."""
    home = Path(home).resolve()
    with _locked(home):
        pid = _running_pid(home)
        if pid is None:
            _pid_file(home).unlink(missing_ok=True)
            return
        log.info("stopping kafka (pid %d)", pid)
        _signal(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout_s):
            log.warning("kafka (pid %d) still running %.0fs after SIGTERM; sending SIGKILL", pid, timeout_s)
            _signal(pid, signal.SIGKILL)
            if not _wait_exit(pid, 10.0):
                raise BrokerError(f"kafka (pid {pid}) survived SIGKILL; check `ps -p {pid}`")
        _pid_file(home).unlink(missing_ok=True)


def broker_status(home: Path) -> BrokerStatus:
    """Whether the broker of `home` runs (its pid is alive and is a Kafka JVM), with its pid and address."""
    home = Path(home).resolve()
    pid = _running_pid(home)
    if pid is None:
        return BrokerStatus(running=False, home=home, log_path=_log_path(home))
    state = _read_state(home)
    bootstrap = f"{HOST}:{state['port']}" if "port" in state else None
    return BrokerStatus(running=True, home=home, pid=pid, bootstrap=bootstrap, log_path=_log_path(home))


def kafka_version() -> str:
    """The Kafka version pinned in pom.xml."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise BrokerError(f"{POM} has no <kafka.version> property")
    return node.text.strip()


def resolve_jars(cache_dir: Path | None = None) -> Path:
    """The folder of the broker's jars; Maven resolves them into `cache_dir`/kafka-<version>/libs once."""
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "rlhf-online").expanduser()
    root = cache_dir / f"kafka-{kafka_version()}"
    libs = root / "libs"
    if (root / "libs.complete").exists():
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if (root / "libs.complete").exists():  # another process resolved them while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                "mvn (Apache Maven) is not on PATH; it fetches the Kafka broker's jars from Maven Central "
                "once. Install it (Debian/Ubuntu: `apt-get install maven`, macOS: `brew install maven`) "
                "and run again."
            )
        work = Path(tempfile.mkdtemp(prefix="resolve-", dir=root))
        try:
            shutil.copy(POM, work / "pom.xml")
            cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "dependency:copy-dependencies"]
            cmd.append(f"-DoutputDirectory={work / 'libs'}")
            log.info("resolving the Kafka %s jars from Maven Central into %s", kafka_version(), libs)
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired as e:
                raise BrokerError("Maven did not finish resolving the Kafka jars within 15 minutes") from e
            if proc.returncode != 0:
                output = _tail(_ANSI.sub("", proc.stdout + proc.stderr), 30)
                raise BrokerError(
                    f"Maven could not resolve org.apache.kafka:kafka_2.13:{kafka_version()} from Maven "
                    f"Central (exit {proc.returncode}):\n{output}\n"
                    "Check that Maven Central is reachable and ~/.m2/settings.xml (proxies, mirrors)."
                )
            shutil.rmtree(libs, ignore_errors=True)
            (work / "libs").rename(libs)
            (root / "libs.complete").write_text(f"{time.monotonic() - t0:.1f}s\n")
            log.info("resolved %d jars in %.1fs", len(list(libs.glob("*.jar"))), time.monotonic() - t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return libs


# ---------------------------------------------------------------------------------------------- start


def _start(home: Path, port: int, controller_port: int, deadline: float, cache_dir: Path | None) -> str:
    """Resolves, checks, formats and launches; returns the bootstrap address once the broker answers."""
    from rlhf_online.broker.clients import wait_for_broker

    _check_port_free(port, "client")
    _check_port_free(controller_port, "controller")
    java = _find_java()
    libs = resolve_jars(cache_dir)
    state = _read_state(home)
    formatted = (home / "data" / "meta.properties").exists()
    if formatted and state.get("controller_port", controller_port) != controller_port:
        raise BrokerError(
            f"{home} was formatted for controller port {state['controller_port']}, which KRaft recorded in "
            f"its quorum; start with --kafka-controller-port {state['controller_port']}, or delete "
            f"{home / 'data'}"
        )
    _write_configs(home, port, controller_port)
    if not formatted:
        _format_storage(java, libs, home)
    _write_state(home, {"port": port, "controller_port": controller_port, "version": kafka_version()})

    bootstrap = f"{HOST}:{port}"
    t0 = time.monotonic()
    proc, marks = _launch(java, libs, home)
    try:
        _wait_started(proc, bootstrap, home, deadline, marks)
        wait_for_broker(bootstrap, max(deadline - time.monotonic(), 1.0))
    except BaseException as e:
        _kill(proc)
        _pid_file(home).unlink(missing_ok=True)
        if isinstance(e, TimeoutError):
            raise BrokerError(f"{e}\nIt was stopped again. {_log_tail_message(home, marks)}") from None
        raise
    elapsed = time.monotonic() - t0
    log.info("kafka %s answering on %s after %.1fs (pid %d)", kafka_version(), bootstrap, elapsed, proc.pid)
    return bootstrap


def _find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            f"java is not on PATH; the Kafka broker needs Java {MIN_JAVA} or newer "
            "(Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match:
        major = int(match.group(1)) if match.group(1) != "1" else int(match.group(2) or 0)
        if major < MIN_JAVA:
            raise BrokerError(f"{java} is Java {major}; Kafka 4.x needs Java {MIN_JAVA} or newer")
    return java


def _check_port_free(port: int, what: str) -> None:
    # SO_REUSEADDR as the JVM sets it, so connections in TIME_WAIT from a previous broker do not count.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            holder = _port_holder(port)
            who = f"by {holder}" if holder else "(could not tell by whom)"
            raise BrokerError(
                f"cannot start kafka: the {what} port {HOST}:{port} is taken {who} [{e.strerror}]. "
                "Stop that process, or pick other ports with --kafka-port/--kafka-controller-port "
                "(RLHF_KAFKA_PORT/RLHF_KAFKA_CONTROLLER_PORT)."
            ) from None


def _port_holder(port: int) -> str | None:
    """'pid N (command line)' of the process holding local TCP `port`, read from /proc (Linux only)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] != "0":
                    inodes.add(cols[9])
    if not inodes:
        return None
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc_dir / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    cmdline = " ".join((proc_dir / "cmdline").read_bytes().decode(errors="replace").split())
                    return f"pid {proc_dir.name} ({_shorten(cmdline, 160)})"
    return "a socket whose owner is not visible to this user"


def _write_configs(home: Path, port: int, controller_port: int) -> None:
    (home / "logs").mkdir(exist_ok=True)
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(home / "data"),
        # One node: every internal topic has one replica, and small partition counts keep start-up quick.
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.retention.hours": "168",
    }
    text = "# written by rlhf-online kafka start; edits are overwritten\n"
    text += "".join(f"{k}={v}\n" for k, v in props.items())
    (home / "server.properties").write_text(text)
    logs = home / "logs"
    (home / "log4j2.properties").write_text(
        "status = warn\n"
        # Kafka logs its own shutdown from a JVM shutdown hook; log4j's hook must not close the file first.
        "shutdownHook = disable\n"
        "appender.file.type = RollingFile\n"
        "appender.file.name = FILE\n"
        f"appender.file.fileName = {logs / 'server.log'}\n"
        f"appender.file.filePattern = {logs / 'server.log.%i'}\n"
        "appender.file.layout.type = PatternLayout\n"
        "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
        "appender.file.policies.type = Policies\n"
        "appender.file.policies.size.type = SizeBasedTriggeringPolicy\n"
        "appender.file.policies.size.size = 20MB\n"
        "appender.file.strategy.type = DefaultRolloverStrategy\n"
        "appender.file.strategy.max = 2\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.file.ref = FILE\n"
        "logger.state.name = state.change.logger\n"
        "logger.state.level = WARN\n"
        # Every client and server config object dumps all its settings at INFO: thousands of lines.
        "logger.config.name = org.apache.kafka.common.config.AbstractConfig\n"
        "logger.config.level = WARN\n"
    )


def _jvm(java: str, libs: Path, home: Path, heap: list[str]) -> list[str]:
    return [
        java,
        *heap,
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        # C1 only: about 0.7s faster to start on 2 cores, and fast enough for a broker of tests and demos.
        "-XX:TieredStopAtLevel=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={home / 'logs'}",
        "-cp",
        f"{libs}/*",
    ]


def _format_storage(java: str, libs: Path, home: Path) -> None:
    cluster_id = _random_cluster_id()
    cmd = [
        *_jvm(java, libs, home, ["-Xmx256m"]),
        "kafka.tools.StorageTool", "format", "--standalone",
        "--cluster-id", cluster_id, "--config", str(home / "server.properties"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise BrokerError(
            f"formatting the broker's storage in {home / 'data'} failed (exit {proc.returncode}):\n"
            f"{_tail(proc.stdout + proc.stderr, 30)}"
        )
    log.info("formatted %s (cluster id %s)", home / "data", cluster_id)


def _random_cluster_id() -> str:
    """16 random bytes in URL-safe base64 without padding, as Kafka's Uuid.randomUuid; never starting with
    '-', which the storage tool would read as a flag."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _launch(java: str, libs: Path, home: Path) -> tuple[subprocess.Popen, dict[Path, int]]:
    """Starts the JVM; returns it and the sizes of its logs just before, for `_log_tail_message`."""
    cmd = [*_jvm(java, libs, home, HEAP_FLAGS), "kafka.Kafka", str(home / "server.properties")]
    with open(home / "logs" / "stdout.log", "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        marks = _log_marks(home)
        # Its own session: the broker outlives `rlhf-online kafka start` and ignores the terminal's Ctrl-C.
        proc = subprocess.Popen(
            cmd, cwd=home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    _children[proc.pid] = proc
    _pid_file(home).write_text(f"{proc.pid}\n")
    return proc, marks


def _wait_started(
    proc: subprocess.Popen, bootstrap: str, home: Path, deadline: float, marks: dict[Path, int]
) -> None:
    """Waits until the client port accepts connections; fails early, with the log, if the JVM exits."""
    port = int(bootstrap.rsplit(":", 1)[1])
    while True:
        code = proc.poll()
        if code is not None:
            message = _log_tail_message(home, marks)
            raise BrokerError(f"kafka exited with code {code} while starting.\n{message}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1.0):
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"kafka did not open {bootstrap} in time.\n{_log_tail_message(home, marks)}")
        time.sleep(0.1)


def _log_marks(home: Path) -> dict[Path, int]:
    """Sizes of the log files now, so an error can quote only what this launch wrote."""
    return {path: path.stat().st_size if path.exists() else 0 for path in _log_files(home)}


def _log_tail_message(home: Path, marks: dict[Path, int] | None = None) -> str:
    """The first ERROR lines and the last lines of the logs (since `marks`, where given)."""
    errors, parts = [], []
    for path in _log_files(home):
        with contextlib.suppress(OSError), open(path, "rb") as f:
            start = (marks or {}).get(path, 0)
            f.seek(start if start <= path.stat().st_size else 0)  # smaller: the log rolled over
            text = f.read().decode(errors="replace").strip()
            if text:
                errors += [line for line in text.splitlines() if " ERROR " in line or " FATAL " in line]
                parts.append(f"--- last lines of {path}:\n{_tail(text, 25)}")
    if not parts:
        return f"Nothing was written to {home / 'logs'}."
    head = "Errors logged:\n" + "\n".join(errors[:3]) + "\n" if errors else ""
    return head + "\n".join(parts)


def _log_files(home: Path) -> list[Path]:
    return [home / "logs" / "stdout.log", _log_path(home)]


# ---------------------------------------------------------------------------------------------- processes


def _running_pid(home: Path) -> int | None:
    """The pid in broker.pid when that process is alive and is a Kafka JVM (not a reused pid)."""
    try:
        pid = int(_pid_file(home).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _is_kafka(pid) else None


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:  # our own child: poll() reaps it, so a finished broker is not a zombie forever
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_kafka(pid: int) -> bool:
    try:
        return b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (macOS): trust the pid file
    except OSError:
        return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    _children.pop(pid, None)
    return True


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _children.pop(proc.pid, None)


# ---------------------------------------------------------------------------------------------- files


def _pid_file(home: Path) -> Path:
    return home / "broker.pid"


def _log_path(home: Path) -> Path:
    return home / "logs" / "server.log"


def _read_state(home: Path) -> dict:
    try:
        return json.loads((home / "broker.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_state(home: Path, state: dict) -> None:
    tmp = home / "broker.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(home / "broker.json")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder`, so two `start`s (two test sessions, say) do not race."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str], env: Mapping[str, str]) -> int:
    """`rlhf-online kafka start|stop|status [flags]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="rlhf-online kafka", description=LocalKafkaConfig.__doc__)
    parser.add_argument("action", choices=["start", "stop", "status"])
    add_arguments(parser, LocalKafkaConfig)
    args = parser.parse_args(list(argv))
    try:
        cfg = from_namespace(LocalKafkaConfig, args, env)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # kafka-python's connection retries are noise here
    cache_root = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache_dir = cfg.kafka_cache_dir or cache_root / "rlhf-online"
    home = Path(cfg.kafka_home)
    try:
        if args.action == "start":
            t0 = time.monotonic()
            bootstrap = start_broker(
                home, port=cfg.kafka_port, controller_port=cfg.kafka_controller_port,
                partitions=cfg.kafka_partitions, timeout_s=cfg.kafka_start_timeout_s,
                topics=Topics(cfg.topic_prefix), cache_dir=cache_dir,
            )  # fmt: skip
            status = broker_status(home)
            print(
                f"kafka: running, pid {status.pid}, bootstrap {bootstrap} "
                f"(home {home}, log {status.log_path}; ready in {time.monotonic() - t0:.1f}s)"
            )
            return 0
        if args.action == "stop":
            was = broker_status(home)
            stop_broker(home, timeout_s=cfg.kafka_stop_timeout_s)
            print(f"kafka: stopped (was pid {was.pid})" if was.running else f"kafka: not running ({home})")
            return 0
        status = broker_status(home)
        if status.running:
            print(f"kafka: running, pid {status.pid}, bootstrap {status.bootstrap} (home {home})")
            return 0
        print(f"kafka: stopped (home {home})")
        return EXIT_STOPPED
    except BrokerError as e:
        print(f"rlhf-online kafka {args.action}: {e}", file=sys.stderr)
        return 1
