"""What the driver's console shows of the workers' output.

Ray copies every worker line to the driver. Most are useful (our step lines, a worker's
traceback, Ray's own warnings); a few are noise a user cannot act on, printed once per worker
or per run. Those are dropped here, by pattern, and nothing else: an unknown line is shown. In
output that is not a terminal (a log file, CI), Ray's colour codes are left out too.
"""

from __future__ import annotations

import re
import sys

NOISE = [
    # Ray Train's own watcher actor, on every run (ray-project/ray#53727): nothing to do about it.
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'.*constructor arguments"),
    # DeepSpeed's JIT op build, once per worker and run.
    re.compile(r"DeepSpeed \S+ built successfully$"),
    re.compile(r"Setting accelerator to CPU\. If you have GPU or other accelerator"),
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_noise(line: str) -> bool:
    plain = ANSI.sub("", line)
    return any(p.search(plain) for p in NOISE)


class _PlainText:
    """A logging filter that takes the colour codes out of a record's message."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        if "\x1b[" in message:
            record.msg, record.args = ANSI.sub("", message), None
        return True


class _DropNoise:
    def filter(self, record) -> bool:
        return not is_noise(record.getMessage())


def quiet_driver_libraries() -> None:
    """The driver imports DeepSpeed too (to check its config); its CPU notice is noise there as well."""
    import logging

    from trainer.reporting import quiet_library_warnings

    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
    quiet_library_warnings()


def plain_ray_logging() -> None:
    """Outside a terminal, Ray's own log lines lose their colour codes ("View the dashboard at ...")."""
    import logging

    if sys.stderr.isatty():
        return
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _PlainText) for f in handler.filters):
            handler.addFilter(_PlainText())


RANK_LINE = r"\[mtl\] rank \d+ "  # a line one rank says of itself


def keep_rank_lines() -> None:
    """Ray folds lines from different processes that differ only in their numbers into one: "[mtl]
    rank 1 data: ..." went behind rank 0's as "[repeated 2x across cluster]", printed up to 5 s
    later, or never when the run ended first (one rank's data line of two reached the console in a
    test run). Each rank's own lines are kept; a RAY_DEDUP_LOGS_ALLOW_REGEX of the user's still counts."""
    import ray._private.ray_logging as ray_logging

    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        allowed = dedup.allow_re
        if allowed is None or RANK_LINE not in allowed.pattern:
            dedup.allow_re = re.compile(RANK_LINE if allowed is None else f"(?:{allowed.pattern})|{RANK_LINE}")


def tidy_worker_output() -> None:
    """Filter the worker lines Ray prints on this driver (call after ray.init)."""
    import functools

    import ray._private.ray_logging as ray_logging
    import ray._private.worker as ray_worker

    keep_rank_lines()
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # log_to_driver=False
        return
    if not sys.stderr.isatty():
        ray_logging._color = lambda message: message  # "[repeated 2x across cluster]" in green
    printer = functools.partial(ray_worker.print_to_stdstream,
                                ignore_prefix=ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker))

    def print_kept(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not is_noise(line)]
        if lines:
            printer({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_kept)
