"""The engine in process: its adapter scheduler is fair, exact, and drops what its clients abandon."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import openvino_genai as ov_genai
import pytest

import modelrepo
from demo.data import REFERENCE_PROMPT
from serving.engine import AdapterSpec, Delta, Engine, EngineSettings, Failed, Finished, Request
from tests.support import DemoRepository

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(demo_repository: DemoRepository) -> Engine:
    repo = demo_repository.root
    base = modelrepo.read_index(repo).entries["base_model"]
    sql = demo_repository.sources.sql_adapter
    config = json.loads((sql / "adapter_config.json").read_text())
    spec = AdapterSpec("sql", sql / "adapter_model.safetensors", config["lora_alpha"] / config["r"])
    e = Engine("base_model", base.version, repo / base.path, [spec], EngineSettings(time_slice=0.1))
    yield e
    e.close()


def _request(engine: Engine, prompt: str, adapter: str | None, max_tokens: int, ignore_eos: bool = False) -> Request:
    config = ov_genai.GenerationConfig(engine.info.generation_config)
    config.max_new_tokens = max_tokens
    config.ignore_eos = ignore_eos
    ids = list(engine.tokenizer.encode(prompt).input_ids.data[0])
    return Request(ids, config, adapter, asyncio.get_running_loop(), events=asyncio.Queue())


async def _text(r: Request) -> tuple[str, Finished]:
    parts = []
    while True:
        _, event = await r.events.get()
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event
        else:
            assert isinstance(event, Failed)
            raise AssertionError(event.message)


async def _run(engine: Engine, prompt: str, adapter: str | None, max_tokens: int = 30) -> str:
    r = _request(engine, prompt, adapter, max_tokens)
    engine.submit(r)
    return (await _text(r))[0]


async def test_a_waiting_adapter_group_is_served_while_another_keeps_arriving(
    engine: Engine, demo_repository: DemoRepository
) -> None:
    alone = await _run(engine, REFERENCE_PROMPT, None)
    stop = asyncio.Event()

    async def flood(max_tokens: int) -> int:
        # Staggered lengths keep "sql" requests always running and waiting: without time slices the
        # pipeline would never empty, and the base request would wait for ever.
        done = 0
        while not stop.is_set():
            r = _request(engine, REFERENCE_PROMPT, "sql", max_tokens, ignore_eos=True)
            engine.submit(r)
            await _text(r)
            done += 1
        return done

    flooders = [asyncio.create_task(flood(40 + 23 * i)) for i in range(6)]
    await asyncio.sleep(0.3)
    switches = engine.switches
    started = time.monotonic()
    got = await asyncio.wait_for(_run(engine, REFERENCE_PROMPT, None), timeout=60)
    waited = time.monotonic() - started
    stop.set()
    served = sum(await asyncio.gather(*flooders))
    assert got == alone  # exact: the base request ran with no adapter active
    assert engine.switches >= switches + 1
    assert served > 0
    assert waited < 30


async def test_runtime_adapter_equals_the_merged_model_in_process(
    engine: Engine, demo_repository: DemoRepository
) -> None:
    repo: Path = demo_repository.root
    merged = modelrepo.read_index(repo).entries["merged_model"]
    other = Engine("merged_model", merged.version, repo / merged.path, [], EngineSettings())
    try:
        assert await _run(engine, REFERENCE_PROMPT, "sql") == await _run(other, REFERENCE_PROMPT, None)
    finally:
        other.close()


async def test_a_cancelled_request_leaves_the_engine(engine: Engine) -> None:
    r = _request(engine, REFERENCE_PROMPT, None, 1000, ignore_eos=True)
    engine.submit(r)
    _, first = await r.events.get()
    assert isinstance(first, Delta)
    cancelled = engine.cancelled
    engine.cancel(r)
    deadline = time.monotonic() + 10
    while engine.pending:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert engine.cancelled == cancelled + 1


class _FailingOnce:
    """The real pipeline, whose next step() raises once (a device error, say)."""

    def __init__(self, pipe: object) -> None:
        self.pipe, self.failed = pipe, False

    def step(self) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("device lost")
        self.pipe.step()

    def __getattr__(self, name: str) -> object:
        return getattr(self.pipe, name)


async def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(engine: Engine) -> None:
    expected = await _run(engine, REFERENCE_PROMPT, None)
    real = engine._pipe
    engine._pipe = _FailingOnce(real)
    try:
        r = _request(engine, REFERENCE_PROMPT, None, 30)
        engine.submit(r)
        _, event = await asyncio.wait_for(r.events.get(), 10)
        assert isinstance(event, Failed) and "device lost" in event.message
        assert await _run(engine, REFERENCE_PROMPT, None) == expected
        assert engine.pending == 0
    finally:
        engine._pipe = real
