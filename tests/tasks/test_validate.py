"""Validation: prompt sets are checked, and an IR that is not the reference's build fails with the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.make_sources import DemoSources
from tasks.errors import SourceError
from tasks.validate import DEFAULT_PROMPTS, load_prompts, validate_ir
from tests.support import DemoRepository


def test_shipped_prompt_sets_match_the_demo_generator(demo_sources: DemoSources) -> None:
    assert DEFAULT_PROMPTS.read_text() == demo_sources.sql_prompts.read_text()
    assert (DEFAULT_PROMPTS.parent / "spell.jsonl").read_text() == demo_sources.spell_prompts.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a"}\nnot json\n', r"line 2: not JSON"),
        ('{"question": "a"}\n', r'line 1: expected \{"prompt": str, "reference": str\}'),
        ('{"prompt": "a", "reference": 3}\n', r"line 1: reference must be a string, got int"),
        ("\n\n", r"holds no prompts"),
    ],
)
def test_bad_prompt_set_is_named_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(SourceError, match=message):
        load_prompts(path)


def test_prompts_without_reference_use_the_reference_models_continuation(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "[user] hello [/user] [assistant]"}\n')
    assert load_prompts(path)[0].reference is None


def test_an_ir_of_another_merge_fails_against_the_peft_reference(demo_repository: DemoRepository) -> None:
    src = demo_repository.sources
    # merged_model is base + sql; checked as if it were base + spell.
    report = validate_ir(
        demo_repository.root / "merged_model" / "1", src.base, [src.spell_adapter], src.spell_prompts, "fp16"
    )
    assert not report.passed
    assert report.agreement < report.min_agreement and report.gap > report.max_gap
    assert "agrees with the PEFT reference on" in report.failures[0]
    assert len(report.table()) == 6 and set(report.table()[0]) >= {
        "prompt",
        "base output",
        "merged output",
        "agreement",
    }
