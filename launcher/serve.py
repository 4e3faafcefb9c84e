"""`mtl serve`: one version behind HTTP with Ray Serve.

    POST /{task}     {"inputs": [row, ...], "options": {...}}   (or one row, or a list of rows)
    POST /predict    {"task": T, "inputs": [...], "options": {...}}
    GET  /tasks      each task's type, fields and labels
    GET  /health     the version served and its tasks

Answers are JSON: {"task", "version", "outputs": [...]} with the pipeline's results
(trainer.inference.pipeline). A request is checked before it waits for a batch, so a bad one gets its
own 4xx and never fails the requests batched with it: 401 without the server's token (when it
has one), 400 for a body that is not JSON or not shaped as above, 404 for an unknown task, 413
for a body, a row count or a field over the limits, 422 for a row that lacks a field the task
reads or for options that are not the task's decoding options or exceed the caps. A request
not answered in `serve.timeout_s` gets 504 and its generation stops there, so no request holds
a replica longer than that. Rows of concurrent requests for the same task and options run
through the model together (`serve.batch`).

The limits are the served version's job's `serve:` section (trainer.spec.ServeSpec), each
overridable on the command line. Serving beyond loopback needs a token (`--token-file`); the
replicas hold only its SHA-256, so no secret travels to them or shows in Ray's state.

Every replica loads the same version: the driver resolves `latest`, `best` or a tag once, so
a version committed while the server starts does not split replicas between two models.
"""


import asyncio
import hashlib
import hmac
import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from launcher.ray_auth import LOOPBACK
from trainer.errors import UserError
from trainer.evaluation import DeadlineExceeded, generation_deadline
from trainer.spec import ServeSpec

api = FastAPI(title="mtl", description="a multitask version's predictions per task")
# Request options and the ServeSpec cap each is held to.
CAPPED_OPTIONS = {"max_new_tokens": "max_new_tokens", "num_beams": "max_beams"}


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch_size: int = 16  # rows of concurrent requests run together
    batch_wait_ms: float = 10.0  # how long a batch waits for more requests
    limits: dict = field(default_factory=dict)  # ServeSpec fields that override the version's job's
    token_sha256: str | None = None  # clients must send the token whose SHA-256 this is


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_token_file(path: str) -> str:
    try:
        token = open(path).read().strip()
    except OSError as exc:
        raise UserError(f"--token-file {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise UserError(f"--token-file {path}: the token must have at least 16 characters (e.g. "
                        f"`python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}`)")
    return token


class RequestProblem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _json_body(request: Request, max_bytes: int):
    """The body as JSON, refused unread when its Content-Length is over `max_bytes` and as soon as
    a body without one grows past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestProblem(400, f"Content-Length '{declared}' is not a number of bytes")
        if int(declared) > max_bytes:
            raise RequestProblem(413, f"the body has {int(declared)} bytes; at most {max_bytes} (serve.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestProblem(413, f"the body is over {max_bytes} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise RequestProblem(400, f"the body is not JSON: {exc}") from None


def _error(problem: RequestProblem) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if problem.status == 401 else None
    return JSONResponse({"error": str(problem)}, status_code=problem.status, headers=headers)


def _consume(task: asyncio.Task) -> None:
    """A batch whose requests already timed out: its outcome is nobody's; never 'never retrieved'."""
    if not task.cancelled():
        task.exception()


@serve.deployment
@serve.ingress(api)
class MultitaskServer:
    def __init__(self, storage, name: str, version: str, options: ServeOptions):
        from trainer.inference import MultitaskPipeline

        self.pipe = MultitaskPipeline.from_version((storage, name), version=version)
        self.name, self.options = name, options
        self.limits = ServeSpec(**{**self.pipe.spec.serve.model_dump(), **options.limits})
        self._batched.set_max_batch_size(options.max_batch_size)
        self._batched.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)

    def _authorize(self, request: Request) -> None:
        if self.options.token_sha256 is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), self.options.token_sha256):
            raise RequestProblem(401, "this server needs its token: send 'Authorization: Bearer TOKEN'")

    @api.get("/health")
    def health(self, request: Request):
        try:
            self._authorize(request)
        except RequestProblem as problem:
            return _error(problem)
        return {"status": "ok", "experiment": self.name, "version": self.pipe.version, "tasks": self.pipe.tasks}

    @api.get("/tasks")
    def tasks(self, request: Request):
        try:
            self._authorize(request)
        except RequestProblem as problem:
            return _error(problem)
        return {task: {"type": info["type"], "inputs": list(self.pipe.task_type(task).prompt_fields),
                       **({"labels": info["labels"]} if info.get("labels") else {})}
                for task, info in self.pipe.manifest["tasks"].items()}

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            body = await _json_body(request, self.limits.max_body_bytes)
            if not isinstance(body, dict) or not isinstance(body.get("task"), str):
                raise RequestProblem(400, 'the body must be {"task": NAME, "inputs": [...]}')
            return await self._answer(body["task"], body)
        except RequestProblem as problem:
            return _error(problem)

    @api.post("/{task}")
    async def predict_task(self, task: str, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            return await self._answer(task, await _json_body(request, self.limits.max_body_bytes))
        except RequestProblem as problem:
            return _error(problem)

    async def _answer(self, task: str, body) -> JSONResponse:
        rows, options = self._check(task, body)
        # Shielded: a request that times out leaves its batch (and the other requests in it) running;
        # the batch itself stops generating at the same deadline (_batched).
        batch = asyncio.ensure_future(self._batched((task, json.dumps(options, sort_keys=True), rows)))
        batch.add_done_callback(_consume)
        try:
            outputs = await asyncio.wait_for(asyncio.shield(batch), self.limits.timeout_s)
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise RequestProblem(504, f"not answered within {self.limits.timeout_s:g}s (serve.timeout_s); ask for "
                                      f"fewer rows or tokens") from None
        return JSONResponse({"task": task, "version": self.pipe.version, "outputs": outputs})

    def _check(self, task: str, body) -> tuple[list[dict], dict]:
        if task not in self.pipe.manifest["tasks"]:
            raise RequestProblem(404, f"unknown task '{task}'; this version knows: {', '.join(self.pipe.tasks)}")
        options = {}
        if isinstance(body, dict) and "inputs" in body:
            inputs, options = body["inputs"], body.get("options") or {}
            if not isinstance(options, dict):
                raise RequestProblem(400, '"options" must be an object, e.g. {"max_new_tokens": 20}')
        else:
            inputs = body
        rows = [inputs] if isinstance(inputs, dict) else inputs
        if not isinstance(rows, list) or not rows:
            raise RequestProblem(400, "inputs must be a row object or a non-empty list of them")
        limits = self.limits
        if len(rows) > limits.max_inputs:
            raise RequestProblem(413, f"{len(rows)} inputs in one request; at most {limits.max_inputs}")
        for number, row in enumerate(rows, 1):
            for name, value in (row.items() if isinstance(row, dict) else ()):
                if isinstance(value, str) and len(value) > limits.max_input_chars:
                    raise RequestProblem(413, f"input {number}: '{name}' has {len(value)} characters; "
                                              f"at most {limits.max_input_chars}")
        for option, cap_name in CAPPED_OPTIONS.items():
            value, cap = options.get(option), getattr(limits, cap_name)
            if isinstance(value, int) and value > cap:
                raise RequestProblem(422, f"options.{option} is {value}; this server allows at most {cap} "
                                          f"(serve.{cap_name})")
        try:
            checked = self.pipe.check(task, rows)
            self.pipe.context(task, options)
        except UserError as exc:
            raise RequestProblem(422, str(exc)) from None
        return checked, options

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple[str, str, list[dict]]]) -> list[list[dict]]:
        """Requests for the same task and options go through the model as one list of rows."""
        groups: dict[tuple[str, str], list[int]] = {}
        for position, (task, options, _) in enumerate(requests):
            groups.setdefault((task, options), []).append(position)
        answers: list[list[dict]] = [[] for _ in requests]
        for (task, options), positions in groups.items():
            rows = [row for p in positions for row in requests[p][2]]
            outputs = await asyncio.to_thread(self._run, task, rows, json.loads(options))
            for p in positions:
                answers[p], outputs = outputs[:len(requests[p][2])], outputs[len(requests[p][2]):]
        return answers

    def _run(self, task: str, rows: list[dict], options: dict) -> list[dict]:
        with generation_deadline(self.limits.timeout_s):  # no batch holds the replica longer than a request waits
            return self.pipe(task, rows, self.options.max_batch_size, options)


def app_name(experiment: str) -> str:
    return f"mtl-{experiment}"


@contextmanager
def serving(storage, name: str, version: str, options: ServeOptions, *, address: str | None = None):
    """Serve `version` of experiment `name` until the block ends; yields (the version, its URL).

    Without an address an embedded local Ray is started and shut down afterwards; on a cluster
    (or in a process already connected to Ray) only this app is deleted at the end, never
    Serve's other apps or the cluster.
    """
    from launcher.run import ray_session
    from trainer.versions import pick_version

    _require_token_beyond_loopback(options.host, options)
    chosen = pick_version(storage, name, version)
    with ray_session(address) as started_here:  # a Python caller's own Ray stays up, as it was
        serve.start(http_options={"host": options.host, "port": options.port})
        host, port = _serving_address(options)
        _require_token_beyond_loopback(host, options)  # Serve that was already up keeps its own host
        deployment = MultitaskServer.options(
            num_replicas=options.replicas,
            ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica})
        serve.run(deployment.bind(storage, name, chosen, options), name=app_name(name), route_prefix="/")
        try:
            yield chosen, f"http://{host}:{port}"
        finally:
            serve.delete(app_name(name)) if address or not started_here else serve.shutdown()


def _require_token_beyond_loopback(host: str, options: ServeOptions) -> None:
    if host not in LOOPBACK and options.token_sha256 is None:
        raise UserError(f"--host {host} serves beyond this machine: give --token-file FILE (clients then send "
                        f"'Authorization: Bearer <its content>'), or serve on 127.0.0.1 behind your own gateway")


def _serving_address(options: ServeOptions) -> tuple[str, int]:
    """Where Serve's HTTP proxy really listens. Serve already running in this Ray (another app, an
    earlier `serving` in this process) keeps its own host and port and ignores the ones asked for;
    the URL printed must be the one that answers."""
    try:
        from ray.serve.context import _get_global_client  # no public way to read the running config

        config = _get_global_client().http_config
        host, port = config.host, config.port
    except Exception:  # noqa: BLE001 - a Serve without this internal: what was asked is what it took
        return options.host, options.port
    if (host, port) != (options.host, options.port):
        print(f"[mtl] Ray Serve already runs here with HTTP on {host}:{port}; --host/--port are not applied to it",
              file=sys.stderr, flush=True)
    return host, port


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
