"""The command line and its environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.__main__ import parse


def test_flags_win_over_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    monkeypatch.setenv("LORA_SERVE_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("LORA_SERVE_PORT", "9001")
    monkeypatch.setenv("LORA_SERVE_API_KEY_FILE", str(key))
    monkeypatch.setenv("LORA_SERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("LORA_SERVE_ENGINE_THREADS", "1")
    args, settings = parse([])
    assert settings.repository == tmp_path.resolve() and args.port == 9001
    assert settings.api_key == "s3cret" and "s3cret" not in repr(settings)
    assert settings.engine.max_queue == 7 and settings.engine.threads == 1
    args, settings = parse(["--port", "9002", "--engine-threads", "3"])
    assert args.port == 9002 and settings.engine.threads == 3
    monkeypatch.delenv("LORA_SERVE_ENGINE_THREADS")
    assert parse([])[1].engine.threads is None  # OpenVINO's own choice: every core


def test_engine_threads_must_be_positive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORA_SERVE_REPOSITORY", str(tmp_path))
    with pytest.raises(SystemExit):
        parse(["--engine-threads", "0"])
    assert "--engine-threads must be positive, got 0" in capsys.readouterr().err


def test_a_missing_repository_or_empty_key_file_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LORA_SERVE_REPOSITORY", raising=False)
    with pytest.raises(SystemExit):
        parse([])
    assert "--repository" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--repository", str(tmp_path / "absent")])
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").write_text("")
    with pytest.raises(SystemExit):
        parse(["--repository", str(tmp_path), "--api-key-file", str(tmp_path / "empty")])
    assert "is empty" in capsys.readouterr().err


def test_a_bucket_repository_is_kept_as_a_url_with_its_cache_folder_and_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORA_SERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_SERVE_POLL_INTERVAL", "5")
    _, settings = parse(["--repository", "s3://bucket/models"])
    assert settings.repository == "s3://bucket/models"
    assert settings.cache_dir == (tmp_path / "cache").resolve() and settings.poll_interval == 5.0
    _, settings = parse(["--repository", "s3://bucket/models", "--cache-dir", str(tmp_path / "c2"), "--poll-interval",
                         "0.5"])
    assert settings.cache_dir == (tmp_path / "c2").resolve() and settings.poll_interval == 0.5
    for bad, message in ((["--repository", "gs://bucket/models"], "only folders and s3://"),
                         (["--repository", "s3://b/m", "--poll-interval", "0"], "--poll-interval must be positive")):
        with pytest.raises(SystemExit):
            parse(bad)
        assert message in capsys.readouterr().err
