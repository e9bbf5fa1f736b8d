"""The engine without HTTP: its adapter scheduler is fair and exact, it drops what its clients abandon, and it
survives a failed step and reports a dead process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import openvino_genai as ov_genai
import pytest

import modelrepo
from demo.data import REFERENCE_PROMPT
from modelrepo.mapped import mapped_ranges, resident_bytes
from serving.engine import YIELD_NICENESS, Engine, Request
from serving.engine_core import (
    AdapterSpec,
    Cancelled,
    Delta,
    EngineCore,
    EngineSettings,
    Failed,
    Finished,
    Job,
    build_config,
    config_fields,
)
from serving.errors import EngineClosed
from serving.modelinfo import read_model_info
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
    config = engine.info.generation_config()
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
    flooders_n = 6
    flooding = asyncio.Event()  # every flooder's first request is running
    started_flooding: set[int] = set()
    sql_runs: list[tuple[float, Request, float]] = []  # (submitted, request, finished), monotonic seconds

    async def flood(i: int, max_tokens: int) -> int:
        # Staggered lengths keep "sql" requests always running and waiting: without time slices the
        # pipeline would never empty, and the base request would wait for ever.
        done = 0
        while not stop.is_set():
            r = _request(engine, REFERENCE_PROMPT, "sql", max_tokens, ignore_eos=True)
            submitted = time.monotonic()
            engine.submit(r)
            await r.events.get()  # its first token: it runs
            started_flooding.add(i)
            if len(started_flooding) == flooders_n:
                flooding.set()
            await _text(r)
            sql_runs.append((submitted, r, time.monotonic()))
            done += 1
        return done

    flooders = [asyncio.create_task(flood(i, 40 + 23 * i)) for i in range(flooders_n)]
    await asyncio.wait_for(flooding.wait(), timeout=60)
    switches = engine.switches  # the sql group is active now
    r = _request(engine, REFERENCE_PROMPT, None, 30)
    started = time.monotonic()
    engine.submit(r)
    got, _ = await asyncio.wait_for(_text(r), timeout=60)
    stop.set()
    served = sum(await asyncio.gather(*flooders))
    assert got == alone  # exact: the base request ran with no adapter active
    assert engine.switches >= switches + 1
    assert served > 0
    # The documented bound (serving/engine_core.py): a request waits at most one time slice plus the
    # requests running then, which the slice lets finish. They are the sql requests that started before
    # the base request's first token and ended after it arrived; each took `finished - submitted`.
    assert r.first_token_at is not None
    waited = r.first_token_at - started
    running = [(finished - submitted, s.config.max_new_tokens) for submitted, s, finished in sql_runs
               if s.first_token_at is not None and s.first_token_at < r.first_token_at and finished > started]
    assert running, "no sql request was running when the base request came: nothing was tested"
    longest, tokens = max(running)
    # Beyond them, two engine steps: the one-token adapter switch and the base request's own first step,
    # each at most what the longest took a token (it ran exactly `tokens`: EOS ignored).
    bound = engine.settings.time_slice + longest + 2 * longest / tokens
    print(f"\nfairness: first token after {waited:.3f} s; bound {bound:.3f} s (slice, longest running {longest:.3f} s)")
    assert waited <= bound, f"waited {waited:.3f} s for its first token, bound {bound:.3f} s"


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


def _core_text(core: EngineCore, job: Job) -> str:
    assert core.add(job) == []
    parts: list[str] = []
    while True:
        for job_id, event in core.step():
            assert job_id == job.id
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                assert isinstance(event, Finished), event
                return "".join(parts)


def test_a_failed_step_fails_its_requests_and_the_core_goes_on(demo_repository: DemoRepository) -> None:
    repo = demo_repository.root
    base = modelrepo.read_index(repo).entries["base_model"]
    core = EngineCore(repo / base.path, [], EngineSettings())
    tokenizer = ov_genai.Tokenizer(str(repo / base.path))
    config = ov_genai.GenerationConfig(str(repo / base.path / "generation_config.json"))
    config.max_new_tokens = 30
    ids = list(tokenizer.encode(REFERENCE_PROMPT).input_ids.data[0])
    expected = _core_text(core, Job(0, ids, config_fields(config), None))
    core._pipe = _FailingOnce(core._pipe)
    assert core.add(Job(1, ids, config_fields(config), None)) == []
    [(job_id, event)] = core.step()
    assert job_id == 1 and isinstance(event, Failed) and "device lost" in event.message
    assert not core.busy  # its cancelled sequence leaves with the next request's step: no spin on a broken pipeline
    assert _core_text(core, Job(2, ids, config_fields(config), None)) == expected


def test_an_engine_on_one_thread_computes_the_same_text(demo_repository: DemoRepository) -> None:
    """--engine-threads reaches the plugin as INFERENCE_NUM_THREADS and changes no token (its effect on the CPU an
    engine uses shows on a model large enough to spread: bench/ANALYSIS.md, "--engine-threads")."""
    repo = demo_repository.root
    base = modelrepo.read_index(repo).entries["base_model"]
    tokenizer = ov_genai.Tokenizer(str(repo / base.path))
    config = ov_genai.GenerationConfig(str(repo / base.path / "generation_config.json"))
    config.max_new_tokens = 30
    ids = list(tokenizer.encode(REFERENCE_PROMPT).input_ids.data[0])
    job = Job(0, ids, config_fields(config), None)
    every_core, one = (_core_text(EngineCore(repo / base.path, [], EngineSettings(threads=t)), job) for t in (None, 1))
    assert every_core and one == every_core


def test_a_cancelled_request_does_not_fail_the_adapter_group_that_runs_next(demo_repository: DemoRepository) -> None:
    """A cancelled sequence stays in the pipeline until the next step: switching adapters waits for that step."""
    repo, sql = demo_repository.root, demo_repository.sources.sql_adapter
    base = modelrepo.read_index(repo).entries["base_model"]
    alpha = json.loads((sql / "adapter_config.json").read_text())
    core = EngineCore(
        repo / base.path,
        [AdapterSpec("sql", sql / "adapter_model.safetensors", alpha["lora_alpha"] / alpha["r"])],
        EngineSettings(),
    )
    config = ov_genai.GenerationConfig(str(repo / base.path / "generation_config.json"))
    config.max_new_tokens = 24
    ids = list(ov_genai.Tokenizer(str(repo / base.path)).encode(REFERENCE_PROMPT).input_ids.data[0])
    expected = _core_text(core, Job(0, ids, config_fields(config), "sql"))
    assert core.add(Job(1, ids, config_fields(config), None)) == []
    core.step()  # the base's request runs
    assert core.add(Job(2, ids, config_fields(config), "sql")) == []
    [(_, cancelled)] = core.cancel(1)  # its client went away: the adapter's request may run next
    assert isinstance(cancelled, Cancelled)
    parts: list[str] = []
    while core.busy:
        for job_id, event in core.step():
            assert job_id == 2 and isinstance(event, Delta | Finished), event
            parts.append(event.text if isinstance(event, Delta) else "")
    assert "".join(parts) == expected


def test_adapters_set_on_a_running_core_serve_and_the_unwanted_go_once_idle(
    demo_repository: DemoRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, sources = demo_repository.root, demo_repository.sources
    base = modelrepo.read_index(repo).entries["base_model"]

    def spec(name: str, folder: Path) -> AdapterSpec:
        config = json.loads((folder / "adapter_config.json").read_text())
        return AdapterSpec(name, folder / "adapter_model.safetensors", config["lora_alpha"] / config["r"])

    sql, spell = spec("sql@v1", sources.sql_adapter), spec("spell@v1", sources.spell_adapter)
    tokenizer = ov_genai.Tokenizer(str(repo / base.path))
    config = ov_genai.GenerationConfig(str(repo / base.path / "generation_config.json"))
    config.max_new_tokens = 24
    ids = list(tokenizer.encode(REFERENCE_PROMPT).input_ids.data[0])
    job = iter(range(100))

    def answer(core: EngineCore, adapter: str | None) -> str:
        return _core_text(core, Job(next(job), ids, config_fields(config), adapter))

    built_with_both = EngineCore(repo / base.path, [sql, spell], EngineSettings())
    expected = {a: answer(built_with_both, a) for a in ("sql@v1", "spell@v1", None)}
    del built_with_both
    assert expected["sql@v1"] != expected["spell@v1"]

    core = EngineCore(repo / base.path, [sql], EngineSettings())
    monkeypatch.setattr("serving.engine_core.ADAPTER_GRACE_S", 0.5)
    core.set_adapters([spell])  # a new adapter, and sql no longer wanted
    assert answer(core, "spell@v1") == expected["spell@v1"]
    assert answer(core, "sql@v1") == expected["sql@v1"]  # within its grace: still served
    time.sleep(0.6)
    core.step()  # idle: sql goes
    [(_, refused)] = core.add(Job(next(job), ids, config_fields(config), "sql@v1"))
    assert isinstance(refused, Failed) and "not registered" in refused.message
    assert answer(core, None) == expected[None]
    assert answer(core, "spell@v1") == expected["spell@v1"]

    plain = EngineCore(repo / base.path, [], EngineSettings())
    with pytest.raises(ValueError, match="built without adapters"):
        plain.set_adapters([spell])


def test_the_core_releases_the_mapped_weights_the_plugin_has_copied(demo_repository: DemoRepository) -> None:
    # merged_model: no other core of this process maps its .bin (the test above serves base_model).
    repo = demo_repository.root
    folder = repo / modelrepo.read_index(repo).entries["merged_model"].path
    weights = folder / "openvino_model.bin"
    core = EngineCore(folder, [], EngineSettings())
    config = ov_genai.GenerationConfig(str(folder / "generation_config.json"))
    config.max_new_tokens = 8
    ids = list(ov_genai.Tokenizer(str(folder)).encode(REFERENCE_PROMPT).input_ids.data[0])
    assert mapped_ranges([weights]), "OpenVINO no longer maps the IR's weights: nothing to release"
    assert _core_text(core, Job(0, ids, config_fields(config), None))
    # Without the release, every page the first inference read (all the weights it copied) stays resident.
    assert resident_bytes([weights]) < weights.stat().st_size / 10


def test_a_versions_generation_defaults_are_read_once_at_load(demo_repository: DemoRepository, tmp_path: Path) -> None:
    """A request never reads the version's folder: a replica evicts it as soon as the version is replaced, while a
    request that routed to it may still be preparing its GenerationConfig."""
    repo = demo_repository.root
    folder = shutil.copytree(repo / modelrepo.read_index(repo).entries["merged_model"].path, tmp_path / "version")
    on_disk = json.loads((folder / "generation_config.json").read_text())
    info = read_model_info(folder)
    shutil.rmtree(folder)  # evicted
    config = info.generation_config()
    assert config.eos_token_id == on_disk["eos_token_id"]
    config.max_new_tokens = 3  # a new config for every request: the defaults stay
    assert info.generation_config().max_new_tokens != 3


def test_a_generation_config_crosses_the_process_boundary_unchanged() -> None:
    config = ov_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample, config.temperature, config.top_p, config.top_k = 17, True, 0.7, 0.9, 5
    config.rng_seed, config.stop_strings, config.stop_token_ids, config.logprobs = 42, {"END", ";"}, {2, 3}, 1
    config.presence_penalty, config.frequency_penalty, config.repetition_penalty = 0.5, 0.25, 1.1
    config.ignore_eos, config.include_stop_str_in_output, config.min_p = True, True, 0.05
    fields = config_fields(config)
    assert fields["stop_strings"] == {"END", ";"} and fields["rng_seed"] == 42
    assert config_fields(build_config(fields)) == fields


async def test_a_dead_engine_process_fails_its_requests_and_refuses_new_ones(demo_repository: DemoRepository) -> None:
    repo = demo_repository.root
    base = modelrepo.read_index(repo).entries["base_model"]
    engine = Engine("base_model", base.version, repo / base.path, [], EngineSettings())
    died = threading.Event()
    engine.when_dead(died.set)
    try:
        assert await _run(engine, REFERENCE_PROMPT, None)
        # Frozen, the engine cannot finish the request before it dies: the kill always finds it in flight.
        os.kill(engine._process.pid, signal.SIGSTOP)
        r = _request(engine, REFERENCE_PROMPT, None, 30)
        engine.submit(r)
        os.kill(engine._process.pid, signal.SIGKILL)  # the OOM killer, say
        _, event = await asyncio.wait_for(r.events.get(), 30)
        assert isinstance(event, Failed) and "engine process exited" in event.message, event
        assert engine.dead and engine.pending == 0 and died.wait(5)
        with pytest.raises(EngineClosed, match="stopped and restarts"):
            engine.submit(_request(engine, REFERENCE_PROMPT, None, 5))
        late = threading.Event()
        engine.when_dead(late.set)  # asked after the death: called at once
        assert late.is_set()
    finally:
        engine.close()


def test_a_load_takes_the_spare_engine_process_and_starts_the_next_one(demo_repository: DemoRepository) -> None:
    from serving import engine as engine_module

    repo = demo_repository.root
    base = modelrepo.read_index(repo).entries["base_model"]
    first = Engine("base_model", base.version, repo / base.path, [], EngineSettings())
    try:
        spare = engine_module._spare
        assert spare is not None and spare[0].poll() is None, "no spare waits after a load"
        second = Engine("base_model", base.version, repo / base.path, [], EngineSettings())
        try:
            assert second._process is spare[0], "the load started a process of its own beside the spare"
            assert engine_module._spare is not None and engine_module._spare[0] is not spare[0]
        finally:
            second.close()
    finally:
        first.close()
    waiting = engine_module._spare[0]
    engine_module.close_spare()
    assert waiting.poll() is not None, "the spare engine process did not exit with its socket"


def test_an_engine_being_replaced_yields_the_cpu_and_takes_it_back(demo_repository: DemoRepository) -> None:
    repo = demo_repository.root
    base = modelrepo.read_index(repo).entries["base_model"]
    engine = Engine("base_model", base.version, repo / base.path, [], EngineSettings())

    def niceness() -> set[int]:
        tids = os.listdir(f"/proc/{engine._process.pid}/task")
        return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in tids}

    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert niceness() == {own}
        engine.yield_cpu()
        assert niceness() == {min(own + YIELD_NICENESS, 19)}, "a thread of the engine process kept its priority"
        engine.yield_cpu(False)
        if os.geteuid() == 0:  # raising a priority back needs the privilege
            assert niceness() == {own}
    finally:
        engine.close()
