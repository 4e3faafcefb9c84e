"""What bounds a request to `mtl serve` before any model runs: a token beyond loopback, the
caps' settings, and a deadline that generation itself obeys (the HTTP side is exercised on a real
server in test_train_e2e's serve_and_ask)."""

from __future__ import annotations

import asyncio

import pytest

from launcher.serve import ServeOptions, read_token_file, serving
from trainer.errors import UserError
from trainer.evaluation.per_task import DeadlineExceeded, _time_left, generation_deadline
from trainer.spec import ServeSpec


def test_serving_beyond_loopback_needs_a_token():
    with pytest.raises(UserError, match="--host 0.0.0.0 serves beyond this machine: give --token-file"):
        with serving(None, "demo", "latest", ServeOptions(host="0.0.0.0")):
            pass


def test_a_token_file_must_hold_a_real_token(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(UserError, match="at least 16 characters"):
        read_token_file(str(short))
    with pytest.raises(UserError, match="--token-file .*missing"):
        read_token_file(str(tmp_path / "missing"))
    good = tmp_path / "good"
    good.write_text("0123456789abcdef0123\n")
    assert read_token_file(str(good)) == "0123456789abcdef0123"


def test_the_caps_have_bounded_defaults():
    limits = ServeSpec()
    assert limits.max_new_tokens == 256 and limits.max_beams == 4 and limits.timeout_s == 60
    assert limits.max_body_bytes == 1_000_000 and limits.max_inputs == 64
    with pytest.raises(ValueError):
        ServeSpec(timeout_s=0)


def test_generation_gets_the_time_left_and_none_once_it_is_gone():
    assert _time_left() == {}  # evaluation and predict: no deadline
    with generation_deadline(5.0):
        assert 4.0 < _time_left()["max_time"] <= 5.0

        async def in_a_thread():  # the server runs the model with asyncio.to_thread
            return await asyncio.to_thread(_time_left)

        assert 4.0 < asyncio.run(in_a_thread())["max_time"] <= 5.0
    with generation_deadline(0.0):
        with pytest.raises(DeadlineExceeded):
            _time_left()
    assert _time_left() == {}
