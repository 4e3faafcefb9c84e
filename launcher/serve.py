"""`mtl serve`: one version behind HTTP with Ray Serve.

    POST /{task}     {"inputs": [row, ...], "options": {...}}   (or one row, or a list of rows)
    POST /predict    {"task": T, "inputs": [...], "options": {...}}
    GET  /tasks      each task's type, fields and labels
    GET  /health     the version served and its tasks

Answers are JSON: {"task", "version", "outputs": [...]} with the pipeline's results
(trainer.pipeline). A request is checked before it waits for a batch, so a bad one gets its
own 4xx and never fails the requests batched with it: 400 for a body that is not JSON or not
shaped as above, 404 for an unknown task, 413 for too many rows or too long a field, 422 for a
row that lacks a field the task reads or for options that are not the task's decoding options.
Rows of concurrent requests for the same task and options run through the model together
(`serve.batch`).

Every replica loads the same version: the driver resolves `latest`, `best` or a tag once, so
a version committed while the server starts does not split replicas between two models.
"""


import asyncio
import json
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from trainer.errors import UserError

api = FastAPI(title="mtl", description="a multitask version's predictions per task")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch_size: int = 16  # rows of concurrent requests run together
    batch_wait_ms: float = 10.0  # how long a batch waits for more requests
    max_inputs: int = 64  # rows per request
    max_input_chars: int = 20_000  # characters per field of a row


class RequestProblem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _json_body(request: Request):
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise RequestProblem(400, f"the body is not JSON: {exc}") from None


def _error(problem: RequestProblem) -> JSONResponse:
    return JSONResponse({"error": str(problem)}, status_code=problem.status)


@serve.deployment
@serve.ingress(api)
class MultitaskServer:
    def __init__(self, storage, name: str, version: str, options: ServeOptions):
        from trainer.pipeline import MultitaskPipeline

        self.pipe = MultitaskPipeline.from_version((storage, name), version=version)
        self.name, self.options = name, options
        self._batched.set_max_batch_size(options.max_batch_size)
        self._batched.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "experiment": self.name, "version": self.pipe.version, "tasks": self.pipe.tasks}

    @api.get("/tasks")
    def tasks(self) -> dict:
        return {task: {"type": info["type"], "inputs": list(self.pipe.task_type(task).prompt_fields),
                       **({"labels": info["labels"]} if info.get("labels") else {})}
                for task, info in self.pipe.manifest["tasks"].items()}

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            body = await _json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("task"), str):
                raise RequestProblem(400, 'the body must be {"task": NAME, "inputs": [...]}')
            return await self._answer(body["task"], body)
        except RequestProblem as problem:
            return _error(problem)

    @api.post("/{task}")
    async def predict_task(self, task: str, request: Request) -> JSONResponse:
        try:
            return await self._answer(task, await _json_body(request))
        except RequestProblem as problem:
            return _error(problem)

    async def _answer(self, task: str, body) -> JSONResponse:
        rows, options = self._check(task, body)
        outputs = await self._batched((task, json.dumps(options, sort_keys=True), rows))
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
        if len(rows) > self.options.max_inputs:
            raise RequestProblem(413, f"{len(rows)} inputs in one request; at most {self.options.max_inputs}")
        for number, row in enumerate(rows, 1):
            for field, value in (row.items() if isinstance(row, dict) else ()):
                if isinstance(value, str) and len(value) > self.options.max_input_chars:
                    raise RequestProblem(413, f"input {number}: '{field}' has {len(value)} characters; "
                                              f"at most {self.options.max_input_chars}")
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
            outputs = await asyncio.to_thread(self.pipe, task, rows, self.options.max_batch_size, json.loads(options))
            for p in positions:
                answers[p], outputs = outputs[:len(requests[p][2])], outputs[len(requests[p][2]):]
        return answers


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
    from trainer.registry import pick_version

    chosen = pick_version(storage, name, version)
    with ray_session(address) as started_here:  # a Python caller's own Ray stays up, as it was
        serve.start(http_options={"host": options.host, "port": options.port})
        deployment = MultitaskServer.options(
            num_replicas=options.replicas,
            ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica})
        serve.run(deployment.bind(storage, name, chosen, options), name=app_name(name), route_prefix="/")
        try:
            yield chosen, f"http://{options.host}:{options.port}"
        finally:
            serve.delete(app_name(name)) if address or not started_here else serve.shutdown()


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
