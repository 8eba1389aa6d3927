"""Start, stop and probe the local single-node Kafka (KRaft) and Redis on loopback.

Kafka runs from the Maven Central jars that ``infra/kafka/pom.xml`` resolves, with the
machine's Java; Redis is the Debian ``redis-server``. Both run detached with a pid file
and a log under ``<home>/kafka`` or ``<home>/redis``, and count as running only when
they answer (Kafka metadata, Redis PING), never by pid alone.

Redis is not an open door: it listens on loopback only, in protected mode, and wants a
password, generated once per home and kept in ``<home>/redis.json`` (0600) beside the
read endpoint's file. The password reaches Redis through a 0600 config file, never the
command line; settings pick it up from the home (``aipipe.infra.settings.home_redis_password``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from aipipe.infra.kafka_acls import ADMIN, admin_config
from aipipe.infra.settings import REDIS_PASSWORD_FILE, home_redis_password
from aipipe.infra.topics import min_insync_replicas
from aipipe.schemas.errors import AipipeError

log = structlog.get_logger(__name__)

KAFKA_DIR = Path(__file__).parent.parent / "kafka"
POLL = 0.2
KAFKA_COMM, REDIS_COMM = "java", "redis-server"  # names in /proc/<pid>/stat
LOOPBACK = ("127.0.0.1", "localhost", "::1")
JVM_FLAGS = ["-Xmx512m", "-Xms256m", "-XX:+UseSerialGC", "-XX:CICompilerCount=2",
             "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]

# Processes this interpreter started, polled so that they are reaped rather than left
# as zombies that still look alive to ``kill(pid, 0)``.
_children: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(AipipeError):
    """A local Kafka or Redis would not start; the message names the log and the fix."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    running: bool
    pid: int | None
    detail: str
    protected: bool = False  # Redis: it refuses clients without the password


# --- Kafka -------------------------------------------------------------------------

def kafka_version() -> str:
    """The broker version pinned by ``<kafka.version>`` in ``infra/kafka/pom.xml``."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>",
                      (KAFKA_DIR / "pom.xml").read_text())
    if found is None:
        raise ServiceError(f"{KAFKA_DIR / 'pom.xml'} has no <kafka.version>; restore it.")
    return found.group(1).strip()


def ensure_kafka_jars(cache_dir: Path) -> Path:
    """Copy the broker's jars into ``cache_dir/kafka-<version>/lib`` once; return it."""
    root = cache_dir / f"kafka-{kafka_version()}"
    lib, marker, mvn_log = root / "lib", root / "complete", root / "mvn.log"
    if marker.exists():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Maven (mvn) is not on PATH, so the Kafka jars cannot be "
                           "fetched; install it with `apt-get install -y maven`.")
    shutil.rmtree(lib, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with mvn_log.open("wb") as out:
        code = subprocess.call(
            [mvn, "-q", "-B", "-f", str(KAFKA_DIR / "pom.xml"), "dependency:copy-dependencies",
             f"-DoutputDirectory={lib}", "-DincludeScope=runtime"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        raise ServiceError(f"mvn could not fetch the Kafka jars (exit {code}); read "
                           f"{mvn_log} and check that Maven Central is reachable.")
    marker.write_text(f"{kafka_version()}\n")
    log.info("kafka_jars_fetched", lib=str(lib), seconds=round(time.monotonic() - started, 1))
    return lib


def _kafka_probe(host: str, port: int, timeout: float = 2.0,
                 config: Mapping[str, str] | None = None) -> str | None:
    """A one-line description if a broker answers metadata at host:port, else None;
    ``config`` signs in (a SASL broker answers no one else)."""
    try:  # a refused connection answers fast and keeps librdkafka's retry logs quiet
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return None
    admin = AdminClient({**(config or {}), "bootstrap.servers": f"{host}:{port}",
                         "log_level": 0})
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException:  # e.g. a timeout while the broker is still coming up
        return None
    return f"{len(meta.brokers)} broker(s), {len(meta.topics)} topic(s)"


def kafka_status(host: str, port: int, home: Path,
                 config: Mapping[str, str] | None = None) -> ServiceStatus:
    """Whether a broker answers metadata at host:port, with the pid from ``home`` if any."""
    detail = _kafka_probe(host, port, config=config)
    return ServiceStatus("kafka", f"{host}:{port}", detail is not None,
                         _live_pid(home / "kafka" / "kafka.pid", KAFKA_COMM),
                         detail or "no broker answers metadata")


def start_kafka(host: str, port: int, home: Path, cache_dir: Path,
                timeout: float = 90, users: Mapping[str, str] | None = None) -> ServiceStatus:
    """Start a single-node KRaft broker (controller on port+1) unless one already answers.

    With ``users`` (name to password, ``admin`` among them: ``kafka_acls.ensure_kafka_users``)
    it requires SASL/SCRAM sign-in and enforces ACLs (``kafka/sasl.properties.template``);
    the users are created when the data dir is formatted, and ``admin`` is its super user.
    """
    admin = None if users is None else admin_config(f"{host}:{port}", users)
    status = kafka_status(host, port, home, admin)
    if status.running:
        return status
    started = time.monotonic()
    kdir = home / "kafka"
    data, props, server_log = kdir / "data", kdir / "server.properties", kdir / "server.log"
    pid_file = kdir / "kafka.pid"
    _check_sasl_marker(kdir, users is not None)
    pid = _live_pid(pid_file, KAFKA_COMM)
    if pid is None:  # nothing of ours is already starting up: launch a broker
        java_bin = shutil.which("java")
        if java_bin is None:
            raise ServiceError("Java (17+) is not on PATH, so Kafka cannot start; install it "
                               "with `apt-get install -y openjdk-17-jre-headless`.")
        lib = ensure_kafka_jars(cache_dir)
        data.mkdir(parents=True, exist_ok=True)
        text = (KAFKA_DIR / "server.properties.template").read_text()
        if users is not None:
            text += (KAFKA_DIR / SASL_TEMPLATE).read_text()
        template = string.Template(text)
        _write_private(props, template.substitute(
            host=host, port=port, controller_port=port + 1, data_dir=data, admin=ADMIN,
            admin_password=(users or {}).get(ADMIN, "")))
        java = [java_bin, *JVM_FLAGS, f"-Dkafka.logs.dir={kdir}",
                f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.yaml'}", "-cp", f"{lib}/*"]
        if not (data / "meta.properties").exists():
            _format_storage(java, props, kdir, _scram_arguments(users or {}))
            if users is not None:
                (kdir / SASL_MARKER).write_text("formatted with SASL/SCRAM users\n")
        pid = _spawn([*java, "kafka.Kafka", str(props)], kdir / "stdout.log", pid_file)
    _wait(lambda: _kafka_probe(host, port, config=admin) is not None, pid, timeout,
          f"Kafka at {host}:{port}", [server_log, kdir / "stdout.log"])
    status = kafka_status(host, port, home, admin)
    log.info("kafka_started", address=status.address, pid=status.pid,
             seconds=round(time.monotonic() - started, 1))
    return status


SASL_TEMPLATE = "sasl.properties.template"
SASL_MARKER = "sasl"  # <home>/kafka/sasl: the data dir holds SCRAM users and ACLs


def _check_sasl_marker(kdir: Path, sasl: bool) -> None:
    """A data dir formatted with SASL users is not started open, nor the reverse."""
    if not (kdir / "data" / "meta.properties").exists() or (kdir / SASL_MARKER).exists() == sasl:
        return
    if sasl:
        raise ServiceError(f"The Kafka data dir {kdir / 'data'} was formatted without SASL "
                           "users; stop Kafka and delete that directory (its topics go with "
                           "it), or unset AIPIPE_KAFKA_SECURITY_PROTOCOL.")
    raise ServiceError(f"The Kafka data dir {kdir / 'data'} was formatted with SASL users and "
                       "ACLs; set AIPIPE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT, or stop Kafka "
                       "and delete that directory.")


def _scram_arguments(users: Mapping[str, str]) -> list[str]:
    """StorageTool's ``--add-scram`` for each user, with both SCRAM mechanisms."""
    return [argument for name, password in sorted(users.items())
            for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256")
            for argument in ("--add-scram", f"{mechanism}=[name={name},password={password}]")]


def _format_storage(java: list[str], props: Path, kdir: Path,
                    extra: list[str] | None = None) -> None:
    cluster_id = "-"
    while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: "-x" reads as an option
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    # this user's only: the format prints what it writes, the SCRAM users' salted keys too
    out_path = kdir / "stdout.log"
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.chmod(out_path, 0o600)
    with os.fdopen(fd, "ab") as out:
        code = subprocess.call(
            [*java, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
             "-c", str(props), *(extra or [])],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        raise ServiceError(f"Formatting the Kafka data dir failed (exit {code}); read "
                           f"{kdir / 'stdout.log'}, then delete {kdir / 'data'} and retry.")


def stop_kafka(home: Path, timeout: float = 30) -> bool:
    """SIGTERM the broker started under ``home`` (SIGKILL after ``timeout``)."""
    return _stop(home / "kafka" / "kafka.pid", KAFKA_COMM, timeout)


def kill_kafka(home: Path, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Send ``sig`` to the broker started under ``home``; see :func:`kill_redis`."""
    return _kill(home / "kafka" / "kafka.pid", KAFKA_COMM, sig)


# --- Kafka: a local multi-node cluster ----------------------------------------------
# ``aipipe up --brokers 3``: every node is broker and controller (a static quorum of all
# of them), from the same jars, under ``<home>/kafka-cluster/node-<id>``. Node k listens
# on the base port + 2(k-1) and its controller on the port after that.

CLUSTER_DIR = "kafka-cluster"
CLUSTER_TEMPLATE = "cluster.properties.template"
# each node: a small heap, and the quick C1 compiler only: three JVMs share a small
# machine, and a restarted node answers sooner when it does not wait on C2's compiles
CLUSTER_HEAP = ["-Xmx384m", "-Xms128m", "-XX:TieredStopAtLevel=1"]


@dataclass(frozen=True)
class KafkaNode:
    node_id: int
    host: str
    port: int
    controller_port: int
    path: Path  # its directory: server.properties, data/, logs, pid file

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.path / "kafka.pid"


def cluster_nodes(host: str, port: int, brokers: int, home: Path) -> list[KafkaNode]:
    """The nodes of a ``brokers``-node local cluster whose first node listens at host:port."""
    return [KafkaNode(k, host, port + 2 * (k - 1), port + 2 * (k - 1) + 1,
                      home / CLUSTER_DIR / f"node-{k}") for k in range(1, brokers + 1)]


def cluster_bootstrap(nodes: list[KafkaNode]) -> str:
    """What AIPIPE_KAFKA_BOOTSTRAP should be for the cluster: every node's address."""
    return ",".join(node.address for node in nodes)


def kafka_cluster_status(host: str, port: int, brokers: int, home: Path) -> list[ServiceStatus]:
    """One status per node: running when that node answers metadata itself."""
    return [ServiceStatus(f"kafka{n.node_id}", n.address, (detail := _kafka_probe(
        n.host, n.port)) is not None, _live_pid(n.pid_file, KAFKA_COMM),
        detail or "no broker answers metadata")
        for n in cluster_nodes(host, port, brokers, home)]


def kafka_node_answers(node: KafkaNode) -> bool:
    """Whether ``node`` answers metadata itself."""
    return _kafka_probe(node.host, node.port) is not None


def _cluster_ready(nodes: list[KafkaNode]) -> bool:
    """Every node answers metadata, and each sees all of them as brokers."""
    for node in nodes:
        detail = _kafka_probe(node.host, node.port)
        if detail is None or not detail.startswith(f"{len(nodes)} broker(s)"):
            return False
    return True


def start_kafka_cluster(host: str, port: int, brokers: int, home: Path, cache_dir: Path,
                        timeout: float = 180) -> list[ServiceStatus]:
    """Start a ``brokers``-node KRaft cluster on ``host`` unless it answers already.

    Ready when every node answers metadata and sees every other as a broker. Nodes
    that run already are left as they are, so this also brings back a stopped node.
    """
    if brokers < 1:
        raise ServiceError(f"A cluster needs at least one broker, not {brokers}; pass "
                           "--brokers 1 or more.")
    if host not in LOOPBACK:
        raise ServiceError(f"aipipe starts Kafka on loopback only, not on {host}; point "
                           "AIPIPE_KAFKA_BOOTSTRAP at 127.0.0.1.")
    nodes = cluster_nodes(host, port, brokers, home)
    started = time.monotonic()
    if not _cluster_ready(nodes):
        for node in nodes:
            if _kafka_probe(node.host, node.port) is None:
                start_kafka_node(node, nodes, cache_dir, wait=False)
        pids = [_live_pid(n.pid_file, KAFKA_COMM) for n in nodes]
        first = next((pid for pid in pids if pid is not None), None)
        if first is None:
            raise ServiceError(f"No Kafka node of the cluster under {home / CLUSTER_DIR} "
                               "is running; read the nodes' server.log and start again.")
        _wait(lambda: _cluster_ready(nodes) or not all(
                  _live_pid(n.pid_file, KAFKA_COMM) for n in nodes),
              first, timeout, f"the Kafka cluster at {cluster_bootstrap(nodes)}",
              [nodes[0].path / "server.log", nodes[0].path / "stdout.log"])
        dead = [n for n in nodes if _live_pid(n.pid_file, KAFKA_COMM) is None]
        if dead:
            node_log = dead[0].path / "server.log"
            raise ServiceError(f"Kafka node {dead[0].node_id} exited while starting; read "
                               f"{node_log}, fix what it reports (often a port in use) and "
                               f"start again:\n{_tail(node_log)}")
    statuses = kafka_cluster_status(host, port, brokers, home)
    log.info("kafka_cluster_started", bootstrap=cluster_bootstrap(nodes),
             pids=[s.pid for s in statuses], seconds=round(time.monotonic() - started, 1))
    return statuses


def start_kafka_node(node: KafkaNode, nodes: list[KafkaNode], cache_dir: Path,
                     wait: bool = True, timeout: float = 120) -> int:
    """Start one node of the cluster ``nodes`` (formatting its data dir the first time);
    with ``wait``, until it answers metadata. Returns its pid."""
    pid = _live_pid(node.pid_file, KAFKA_COMM)
    if pid is None:
        java_bin = shutil.which("java")
        if java_bin is None:
            raise ServiceError("Java (17+) is not on PATH, so Kafka cannot start; install it "
                               "with `apt-get install -y openjdk-17-jre-headless`.")
        lib = ensure_kafka_jars(cache_dir)
        data, props = node.path / "data", node.path / "server.properties"
        data.mkdir(parents=True, exist_ok=True)
        props.write_text(cluster_properties(node, nodes))
        flags = [f for f in JVM_FLAGS if not f.startswith(("-Xmx", "-Xms"))]
        java = [java_bin, *CLUSTER_HEAP, *flags, f"-Dkafka.logs.dir={node.path}",
                f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.yaml'}", "-cp", f"{lib}/*"]
        if not (data / "meta.properties").exists():
            _format_node(java, props, node, _cluster_id(node.path.parent))
        pid = _spawn([*java, "kafka.Kafka", str(props)], node.path / "stdout.log",
                     node.pid_file)
    if wait:
        _wait(lambda: _kafka_probe(node.host, node.port) is not None, pid, timeout,
              f"Kafka node {node.node_id} at {node.address}",
              [node.path / "server.log", node.path / "stdout.log"])
    return pid


def cluster_properties(node: KafkaNode, nodes: list[KafkaNode]) -> str:
    """The server.properties of ``node`` in the cluster ``nodes``."""
    replicas = min(3, len(nodes))
    template = string.Template((KAFKA_DIR / CLUSTER_TEMPLATE).read_text())
    return template.substitute(
        node_id=node.node_id, host=node.host, port=node.port,
        controller_port=node.controller_port, data_dir=node.path / "data",
        voters=",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in nodes),
        replication_factor=replicas, min_insync_replicas=min_insync_replicas(replicas))


def _cluster_id(cluster_dir: Path) -> str:
    """The cluster's id, made once and kept in ``<cluster_dir>/cluster.id``."""
    kept = cluster_dir / "cluster.id"
    if kept.exists():
        return kept.read_text().strip()
    cluster_id = "-"
    while cluster_id.startswith("-"):  # as Kafka's Uuid.randomUuid: "-x" reads as an option
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    cluster_dir.mkdir(parents=True, exist_ok=True)
    kept.write_text(f"{cluster_id}\n")
    return cluster_id


def _format_node(java: list[str], props: Path, node: KafkaNode, cluster_id: str) -> None:
    with (node.path / "stdout.log").open("ab") as out:
        code = subprocess.call(
            [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        raise ServiceError(f"Formatting Kafka node {node.node_id}'s data dir failed (exit "
                           f"{code}); read {node.path / 'stdout.log'}, then delete "
                           f"{node.path / 'data'} and retry.")


def kill_kafka_node(node: KafkaNode, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Send ``sig`` to one node of the cluster; see :func:`kill_redis`."""
    return _kill(node.pid_file, KAFKA_COMM, sig)


def stop_kafka_cluster(home: Path, timeout: float = 30) -> int:
    """SIGTERM every node started under ``home`` at once (SIGKILL after ``timeout``), so
    that the last ones do not wait on a quorum already gone; returns how many ran."""
    pids = []
    for pid_file in sorted((home / CLUSTER_DIR).glob("node-*/kafka.pid")):
        pid = _live_pid(pid_file, KAFKA_COMM)
        if pid is not None:
            _signal(pid, signal.SIGCONT)
            _signal(pid, signal.SIGTERM)
            pids.append(pid)
        pid_file.unlink(missing_ok=True)
    for pid in pids:
        if not _wait_gone(pid, timeout):
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 10)
    if pids:
        log.info("kafka_cluster_stopped", pids=pids)
    return len(pids)


# --- Redis -------------------------------------------------------------------------

def _redis_answer(host: str, port: int, password: str | None,
                  timeout: float = 1.0) -> tuple[bool, str] | None:
    """(True, "redis 7.0.15") if a Redis answers INFO with ``password``; (False, its error)
    if one answers but refuses; None if none answers at host:port."""
    # redis-py retries a failed connect with backoff by default (~5 s); a probe must not.
    client = redis.Redis(host=host, port=port, password=password, socket_timeout=timeout,
                         socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    try:
        return True, f"redis {client.info('server').get('redis_version', '?')}"
    except redis.AuthenticationError as exc:
        return False, str(exc)
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


def redis_status(host: str, port: int, home: Path, password: str | None = None) -> ServiceStatus:
    """Whether a Redis answers at host:port, whether it wants a password, and whether
    ``password`` (else the one kept under ``home``) opens it; with the pid from ``home``."""
    pid = _live_pid(home / "redis" / "redis.pid", REDIS_COMM)
    address = f"{host}:{port}"
    bare = _redis_answer(host, port, None)
    if bare is None:
        return ServiceStatus("redis", address, False, pid, "no Redis answers PING")
    if bare[0]:
        return ServiceStatus("redis", address, True, pid, f"{bare[1]}, no password: open to "
                             "every local user (if `aipipe up` started it, `aipipe down` then "
                             "`aipipe up` restarts it protected)")
    password = password or home_redis_password(home, host, port)
    opened = _redis_answer(host, port, password) if password else None
    if opened is not None and opened[0]:
        return ServiceStatus("redis", address, True, pid,
                             f"{opened[1]}, password in {home / REDIS_PASSWORD_FILE}", True)
    return ServiceStatus("redis", address, True, pid, "wants a password that this home does "
                         "not have; put it in AIPIPE_REDIS_URL (redis://:PASSWORD@host:port/0)",
                         True)


def ensure_redis_server() -> str:
    """The path of ``redis-server``, installed with apt-get if it is not on PATH."""
    found = shutil.which("redis-server")
    if found is not None:
        return found
    fix = "install it (`apt-get install -y redis-server`) or point AIPIPE_REDIS_URL elsewhere"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError(f"redis-server is not on PATH and cannot be installed here; {fix}.")
    log.info("redis_installing")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServiceError(f"`{' '.join(cmd)}` failed ({done.stderr.strip()[-300:]}); {fix}.")
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def start_redis(host: str, port: int, home: Path, timeout: float = 30,
                password: str | None = None) -> ServiceStatus:
    """Start an in-memory Redis (no persistence) on loopback host:port, in protected mode
    with a password, unless one already answers there.

    The password is ``password`` if given, else the one kept under ``home`` (so clients
    keep working across restarts), else a new one; it is kept in ``<home>/redis.json``.
    A Redis that answers without a password is left running (other clients may be using
    it), with a warning and the way to protect it.
    """
    status = redis_status(host, port, home, password)
    if status.running:
        if not status.protected:
            log.warning("redis_unprotected", address=status.address, pid=status.pid,
                        fix="aipipe down; aipipe up")
        return status
    if host not in LOOPBACK:
        raise ServiceError(f"aipipe starts Redis on loopback only, not on {host}; point "
                           "AIPIPE_REDIS_URL at 127.0.0.1, or at a Redis that runs already.")
    server = ensure_redis_server()
    started = time.monotonic()
    rdir = home / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    pid_file, redis_log, conf = rdir / "redis.pid", rdir / "redis.log", rdir / "redis.conf"
    password = password or home_redis_password(home, host, port) or secrets.token_urlsafe(24)
    _write_private(conf, "".join(f"{key} {_conf_value(value)}\n" for key, value in (
        ("bind", host), ("port", str(port)), ("protected-mode", "yes"),
        ("requirepass", password), ("dir", str(rdir)), ("save", ""), ("appendonly", "no"),
        ("daemonize", "no"))))
    _write_private(home / REDIS_PASSWORD_FILE, json.dumps(
        {"host": host, "port": port, "password": password}))
    pid = _live_pid(pid_file, REDIS_COMM) or _spawn([server, str(conf)], redis_log, pid_file)
    _wait(lambda: (_redis_answer(host, port, password) or (False, ""))[0],
          pid, timeout, f"Redis at {host}:{port}", [redis_log])
    status = redis_status(host, port, home, password)
    log.info("redis_started", address=status.address, pid=status.pid, protected=True,
             seconds=round(time.monotonic() - started, 1))
    return status


def _conf_value(value: str) -> str:
    """A redis.conf argument: double-quoted, with backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by this user only (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def stop_redis(home: Path, timeout: float = 10) -> bool:
    """SIGTERM the Redis started under ``home`` (SIGKILL after ``timeout``)."""
    return _stop(home / "redis" / "redis.pid", REDIS_COMM, timeout)


def kill_redis(home: Path, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Send ``sig`` to the Redis started under ``home``; True if a process got it.

    After SIGKILL this waits until the process is gone and removes the pid file, so a
    fault test can restart at once; other signals (SIGSTOP, SIGCONT) return at once.
    """
    return _kill(home / "redis" / "redis.pid", REDIS_COMM, sig)


# --- processes ---------------------------------------------------------------------

def _spawn(cmd: list[str], out_path: Path, pid_file: Path) -> int:
    with out_path.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    _children[proc.pid] = proc
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _alive(pid: int, comm: str | None = None) -> bool:
    """Whether ``pid`` runs and, if ``comm`` is given, has that name in /proc/<pid>/stat.

    For our own children only waitpid is trusted: a JVM's main thread can show as a zombie
    (and its cmdline read empty) while its other threads still run.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, state = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2]
    if comm not in (None, name):
        return False
    return _children[pid].poll() is None if pid in _children else state != "Z"


def _live_pid(pid_file: Path, comm: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive and named ``comm``."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, comm) else None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    _children.pop(pid, None)
    return True


def _kill(pid_file: Path, comm: str, sig: signal.Signals) -> bool:
    pid = _live_pid(pid_file, comm)
    if pid is None:
        return False
    _signal(pid, sig)
    if sig == signal.SIGKILL:
        _wait_gone(pid, 10)
        pid_file.unlink(missing_ok=True)
    log.info("service_signalled", pid=pid, signal=sig.name)
    return True


def _stop(pid_file: Path, comm: str, timeout: float) -> bool:
    pid = _live_pid(pid_file, comm)
    if pid is not None:
        _signal(pid, signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 10)
        log.info("service_stopped", pid=pid, pid_file=str(pid_file))
    pid_file.unlink(missing_ok=True)
    return pid is not None


def _wait(ready: Callable[[], bool], pid: int, timeout: float, what: str,
          logs: list[Path]) -> None:
    """Poll ``ready`` until the deadline; fail fast if the process ``pid`` exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        log_file = next((p for p in logs if p.exists() and p.stat().st_size), logs[-1])
        if not _alive(pid):
            raise ServiceError(f"{what} exited while starting; read {log_file}, fix what it "
                               f"reports (often a port in use) and start again:\n"
                               f"{_tail(log_file)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} did not answer within {timeout:.0f}s; read {log_file}, "
                               f"then stop it (pid {pid}) or raise the timeout.")
        time.sleep(POLL)


def _tail(path: Path, lines: int = 8) -> str:
    """The log's last error lines (exceptions included), else its last lines."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log written)"
    errors = [ln for ln in text if re.search(r" (ERROR|FATAL) |^\S*(Exception|Error)\b", ln)]
    return "\n".join(list(dict.fromkeys(errors or text))[-lines:])


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
