"""The layers of the code (.importlinter) hold, and the check is real: a contract the code breaks
fails it, naming the import."""
from __future__ import annotations

import configparser
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"


def lint(config: Path, monkeypatch) -> int:
    monkeypatch.chdir(ROOT)  # root packages are found from the working folder
    return lint_imports(config_filename=str(config), no_cache=True, no_logo=True)


def test_every_contract_holds(monkeypatch, capsys):
    assert lint(CONFIG, monkeypatch) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    contracts = [s for s in parser.sections() if s.startswith("importlinter:contract:")]
    assert len(contracts) >= 4 and f"Contracts: {len(contracts)} kept, 0 broken." in out


def test_a_broken_contract_fails_the_check(tmp_path, monkeypatch, capsys):
    """The runs layer imports training (the worker trains): forbidding that must fail."""
    config = tmp_path / "broken.ini"
    config.write_text(CONFIG.read_text() + "\n[importlinter:contract:broken-on-purpose]\n"
                      "name = runs never import training (false on purpose)\ntype = forbidden\n"
                      "source_modules =\n    core.runs.worker\nforbidden_modules =\n    core.training.loop\n")
    assert lint(config, monkeypatch) == 1
    out = capsys.readouterr().out
    assert "runs never import training (false on purpose) BROKEN" in out
    assert "core.runs.worker -> core.training.loop" in out
