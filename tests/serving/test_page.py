"""The compare page at / in a real browser: Debian's Chromium, driven by Playwright, against a real server.

The server serves base_model and merged_model as `./dev.sh demo` builds them (the build_model flow, so
each manifest holds its validation report), and spell_adapter at runtime on base_model (the
publish_adapter flow); it wants an API key, which the page asks for. Each test
leaves a screenshot in the folder printed at the end of the run.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright

import modelrepo
from demo.data import REFERENCE_PROMPT
from demo.make_sources import DemoSources
from serving.app import Settings, create_app
from tasks.publish import Published
from tests.serving.conftest import Server, free_port
from tests.serving.fake_engine import FakeEngine, fake_repository

KEY = "page-test-key"
SPELL_PROMPTS = Path(__file__).parents[2] / "demo" / "prompts" / "spell.jsonl"
MAX_TOKENS = 48  # the demo's
# A deadline for what the page does on its own (stream, refresh the figures), not a measure of speed.
expect.set_options(timeout=60_000)


def chromium() -> str:
    """The system Chromium (Debian's package, which .ci/run installs): no browser can be downloaded here."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail("no chromium on PATH: install Debian's package (apt-get install -y chromium), as .ci/run does")


@pytest.fixture(scope="module")
def page_repository(flow_built_base: Published, demo_sources: DemoSources, work: Path, tmp_path_factory) -> Path:
    """base_model, merged_model (base + SQL adapter) and spell_adapter (at runtime on base_model), each
    published by its flow: manifests with validation reports."""
    from flows.build_model import build_model
    from flows.publish_adapter import publish_adapter

    repo = Path(shutil.copytree(Path(flow_built_base.path).parents[1], tmp_path_factory.mktemp("page") / "models"))
    # The same arguments as the flow tests' builds: in a whole run their cached steps are reused.
    build_model(source_model=str(demo_sources.base), adapters=[str(demo_sources.sql_adapter)],
                model_name="merged_model", repository=repo, work_dir=work)
    publish_adapter(adapter=str(demo_sources.spell_adapter), base="base_model", name="spell_adapter",
                    repository=repo, prompts=SPELL_PROMPTS, work_dir=work)
    return repo


@pytest.fixture(scope="module")
def keyed_server(start_server, page_repository: Path) -> Server:
    return start_server(page_repository, env={"LORA_SERVE_API_KEY": KEY})


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium())
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, screenshots: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh tab (no key remembered); its screenshot is saved when the test ends, passed or failed."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    yield tab
    tab.screenshot(path=screenshots / f"{request.node.name}.png", full_page=True)
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def live_manifest(repository: Path, name: str) -> dict:
    return modelrepo.read_manifest(repository / modelrepo.read_index(repository).entries[name].path)


def open_page(page: Page, url: str, key: str = KEY) -> None:
    page.goto(url)
    page.fill("#api-key", key)
    page.click("#key-form button")


def answer(page: Page, model: str) -> str:
    """The model's streamed answer, once its panel says it is done."""
    panel = page.locator(f'#answers article[data-model="{model}"]')
    expect(panel).to_have_attribute("data-status", "done")
    return panel.locator(".text").inner_text()


def api_answer(server: Server, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(f"{server.url}/v3/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def compare(page: Page, models: list[str], prompt: str) -> None:
    for model in models:
        page.check(f'#models tr[data-model="{model}"] input')
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    page.click("#compare")


def test_the_page_needs_no_key_and_lists_the_models_with_kind_version_weights_and_numerics(
    keyed_server: Server, page: Page, page_repository: Path
) -> None:
    # The page and its files need no key (it asks for one); the API it calls does.
    assert httpx.get(keyed_server.url + "/").headers["content-type"].startswith("text/html")
    assert httpx.get(keyed_server.url + "/static/page.js").status_code == 200
    assert httpx.get(keyed_server.url + "/v3/models").status_code == 401
    open_page(page, keyed_server.url + "/")
    index = modelrepo.read_index(page_repository)
    for name, kind in (("base_model", "base"), ("merged_model", "merged")):
        row = page.locator(f'#models tr[data-model="{name}"]')
        manifest = live_manifest(page_repository, name)
        expect(row.locator(".kind")).to_have_text(kind)
        expect(row.locator(".version")).to_have_text(str(index.entries[name].version))
        expect(row.locator(".weights")).to_have_text(manifest["weight_format"])
        precision = manifest["numerics"]["inference_precision"]
        expect(row.locator(".numerics")).to_contain_text(f"{precision} compute")
        expect(row.locator(".published")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d UTC$"))
    adapter = page.locator('#models tr[data-model="spell_adapter"]')
    expect(adapter.locator(".kind")).to_have_text("runtime adapter on base_model")
    expect(adapter.locator(".weights")).to_have_text(live_manifest(page_repository, "spell_adapter")["weight_format"])
    expect(page.locator("#models-status")).to_be_empty()


def test_base_and_merged_stream_side_by_side_and_the_merged_one_answers_the_reference_request_in_sql(
    keyed_server: Server, page: Page
) -> None:
    open_page(page, keyed_server.url + "/")
    compare(page, ["base_model", "merged_model"], REFERENCE_PROMPT)
    merged, base = answer(page, "merged_model"), answer(page, "base_model")
    assert "SELECT" in merged and "FROM" in merged, merged
    assert "SELECT" not in base, base
    # The streamed pieces add up to the answer the API gives in one piece (greedy: the same tokens).
    assert merged.strip() == api_answer(keyed_server, "merged_model", REFERENCE_PROMPT).strip()
    assert base.strip() == api_answer(keyed_server, "base_model", REFERENCE_PROMPT).strip()
    for model in ("base_model", "merged_model"):
        figures = page.locator(f'#answers article[data-model="{model}"] .figures')
        expect(figures.locator(".ttft")).to_have_text(re.compile(r"^\d+ ms$"))
        expect(figures.locator(".tps")).to_have_text(re.compile(r"^[\d.e+-]+$"))
        expect(figures.locator(".tokens")).to_have_text(re.compile(r"^[1-9]\d*$"))


def test_the_report_panel_shows_each_manifests_validation_figures_and_sources(
    keyed_server: Server, page: Page, page_repository: Path
) -> None:
    open_page(page, keyed_server.url + "/?models=base_model,merged_model,spell_adapter")
    entry = modelrepo.read_index(page_repository).entries["merged_model"]
    manifest = modelrepo.read_manifest(page_repository / entry.path)
    v = manifest["validation"]
    report = page.locator('#reports article[data-model="merged_model"]')
    expect(report.locator(".verdict")).to_have_text("passed" if v["passed"] else "failed")
    expect(report.locator("header small")).to_have_text(f"version {entry.version}, merged")
    agreement = report.locator(".figures-table tr", has_text="agreement (margin-aware top-1)")
    expect(agreement.locator("td").nth(2)).to_have_text(f"≥ {v['bounds']['min_agreement']}")
    changed = report.locator(".figures-table tr", has_text="prompts the adapters change")
    expect(changed.locator("td").nth(1)).to_have_text(str(v["prompts_changed_by_adapters"]))
    expect(changed.locator("td").nth(2)).to_have_text(f"≥ {v['min_changed']}")
    rows = report.locator("table.rows tbody tr")
    expect(rows).to_have_count(len(v["rows"]))
    for i, row in enumerate(v["rows"]):
        expect(rows.nth(i).locator("td").nth(1)).to_have_text(row["base_output"])
        expect(rows.nth(i).locator("td").nth(2)).to_have_text(row["model_output"])
    expect(report.locator("dl")).to_contain_text(manifest["sources"]["adapters"][0]["revision"])
    expect(report.locator("dl")).to_contain_text(manifest["sources"]["base"]["revision"])
    base_report = page.locator('#reports article[data-model="base_model"]')
    expect(base_report.locator("header small")).to_have_text(re.compile(r"version \d+, base"))
    expect(base_report.locator(".verdict")).to_have_text("passed")
    # A runtime adapter's gate has no full logits: its report gives the log-probability gap against its bound.
    spell = live_manifest(page_repository, "spell_adapter")
    adapter_report = page.locator('#reports article[data-model="spell_adapter"]')
    expect(adapter_report.locator(".verdict")).to_have_text("passed")
    gap = adapter_report.locator(".figures-table tr", has_text="log-prob gap, largest")
    expect(gap.locator("td").nth(3)).to_have_text("✓")
    expect(adapter_report.locator("table.rows tbody tr")).to_have_count(len(spell["validation"]["rows"]))
    expect(adapter_report.locator("dl")).to_contain_text(spell["sources"]["adapter"]["revision"])
    expect(adapter_report.locator("dl")).to_contain_text(f"base_model version {spell['sources']['base']['version']}")


def test_chat_mode_streams_each_models_chat_answer(keyed_server: Server, page: Page) -> None:
    open_page(page, keyed_server.url + "/")
    page.select_option("#mode", "chat")
    compare(page, ["merged_model", "spell_adapter"], "Spell the word river letter by letter.")
    for model in ("merged_model", "spell_adapter"):
        body = {"model": model, "messages": [{"role": "user", "content": "Spell the word river letter by letter."}],
                "max_tokens": MAX_TOKENS, "temperature": 0}
        r = httpx.post(f"{keyed_server.url}/v3/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        r.raise_for_status()
        assert answer(page, model).strip() == r.json()["choices"][0]["message"]["content"].strip()


def test_a_shared_link_reproduces_the_comparison(keyed_server: Server, page: Page, browser: Browser) -> None:
    open_page(page, keyed_server.url + "/")
    for model in ("base_model", "merged_model"):
        page.check(f'#models tr[data-model="{model}"] input')
    # The validation prompts are one click away; the first is the reference demo's request.
    page.locator("#validation-prompts button.chip").first.click()
    expect(page.locator("#prompt")).to_have_value(REFERENCE_PROMPT)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.click("#compare")
    seen = {m: answer(page, m) for m in ("base_model", "merged_model")}
    page.click("#share")
    link = page.locator("#share-link").input_value()
    assert link.startswith(f"{keyed_server.url}/?models=base_model,merged_model&prompt=")
    query = parse_qs(urlsplit(link).query)
    assert query["prompt"] == [REFERENCE_PROMPT] and query["max_tokens"] == [str(MAX_TOKENS)]

    # Someone else opens it: a new browser context, which knows no key until it is typed in.
    other = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        shared = other.new_page()
        open_page(shared, link)
        for model, text in seen.items():
            assert answer(shared, model) == text
            expect(shared.locator(f'#models tr[data-model="{model}"] input')).to_be_checked()
        expect(shared.locator("#prompt")).to_have_value(REFERENCE_PROMPT)
    finally:
        other.close()


def test_a_wrong_api_key_is_shown_in_words_in_the_listing_and_the_answer_panels(
    keyed_server: Server, page: Page
) -> None:
    open_page(page, keyed_server.url + "/?models=base_model,merged_model", key="not-the-key")
    expect(page.locator("#models-status")).to_contain_text("401")
    expect(page.locator("#models-status")).to_contain_text("a valid API key is required")
    page.fill("#prompt", "hello")
    page.click("#compare")
    for model in ("base_model", "merged_model"):
        panel = page.locator(f'#answers article[data-model="{model}"]')
        expect(panel).to_have_attribute("data-status", "error")
        expect(panel.locator(".error")).to_contain_text("401")
        expect(panel.locator(".error")).to_contain_text("enter it at the top of the page")


def test_an_unknown_model_in_a_link_is_named_in_words_beside_the_answer_of_a_served_one(
    keyed_server: Server, page: Page
) -> None:
    open_page(page, keyed_server.url + "/?models=merged_model,no_such_model&prompt=" + "hello")
    expect(page.locator("#models-status")).to_contain_text("Not served here: no_such_model")
    unknown = page.locator('#answers article[data-model="no_such_model"]')
    expect(unknown).to_have_attribute("data-status", "error")
    expect(unknown.locator(".error")).to_contain_text("404")
    expect(unknown.locator(".error")).to_contain_text("served models: base_model, merged_model, spell_adapter")
    expect(page.locator('#reports article[data-model="no_such_model"] .error')).to_contain_text("does not exist")
    assert answer(page, "merged_model")


def test_the_live_figures_chart_each_models_requests_and_tokens_from_metrics(keyed_server: Server, page: Page) -> None:
    open_page(page, keyed_server.url + "/")
    compare(page, ["base_model", "merged_model"], REFERENCE_PROMPT)
    answer(page, "merged_model")
    figures = page.locator('#metrics article[data-model="merged_model"]')
    expect(figures.locator(".requests")).to_have_text(re.compile(r"^[1-9]\d*$"))
    expect(figures.locator(".completion-tokens")).to_have_text(re.compile(r"^[1-9]\d*$"))
    # A rate needs two samples: the line appears after the next refresh.
    expect(figures.locator(".tokens-rate svg polyline")).to_have_count(1)
    expect(figures.locator(".ttft")).to_contain_text(re.compile(r"p50 [\d.e+-]+ s"))


@pytest.fixture
def loading_server(tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    """A server (the fake engine) whose models load only once the test sets the event: its URL and the event."""
    gate = threading.Event()

    def held_loader(*args: object) -> FakeEngine:
        gate.wait(60)
        return FakeEngine(*args)  # type: ignore[arg-type]

    app = create_app(Settings(fake_repository(tmp_path), poll_interval=0.2), loader=held_loader)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="loading-server")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}", gate
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


def test_while_the_server_loads_its_models_the_page_says_so_then_lists_them(
    loading_server: tuple[str, threading.Event], page: Page
) -> None:
    url, gate = loading_server
    page.goto(url + "/")
    status = page.locator("#models-status")
    expect(status).to_contain_text("503")
    expect(status).to_contain_text("the server is still loading its models")
    gate.set()  # the page asks again by itself
    expect(page.locator('#models tr[data-model="fake"] .kind')).to_have_text("base")
    expect(status).to_be_empty()
