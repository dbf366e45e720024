"""scripts/mutation.py keeps mutmut's verdicts in the repo, so a run stopped part way, or one on a fresh clone, goes
on where the last one stopped instead of starting over (mutmut's own state lives in the git-ignored mutants/)."""

import gzip
import json
from pathlib import Path

import pytest

from module_from_file import module_from_file

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tomllib")  # the script reads [tool.mutmut] with it (Python 3.11+)


@pytest.fixture(scope="module")
def mutation():
    return module_from_file("mutation_script", ROOT / "scripts" / "mutation.py")


@pytest.fixture
def project(tmp_path):
    """A project laid out as mutmut sees this one: two mutated files, their meta files in mutants/."""
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nonly_mutate = ["onpolicy_kd/objectives/*", '
                                             '"onpolicy_kd/rollout/engine.py"]\n')
    for source in ("onpolicy_kd/objectives/pg.py", "onpolicy_kd/rollout/engine.py"):
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_text("")
    return tmp_path


def write_meta(root: Path, source: str, exit_codes: dict, hashes: dict) -> Path:
    path = root / "mutants" / (source + ".meta")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": exit_codes, "hash_by_function_name": hashes,
                                "type_check_error_by_key": {}, "durations_by_key": {},
                                "estimated_durations_by_key": {}}))
    return path


PG = "onpolicy_kd.objectives.pg.x_pg_returns__mutmut_"
ENGINE_IN = "onpolicy_kd.rollout.engine.x__draw__mutmut_"
ENGINE_OUT = "onpolicy_kd.rollout.engine.x_cached_decoding__mutmut_"  # mutated by mutmut, not in the scope


def test_the_record_keeps_decided_in_scope_verdicts_and_restores_them_on_a_fresh_machine(mutation, project):
    record = project / "verdicts.json.gz"
    write_meta(project, "onpolicy_kd/objectives/pg.py", {PG + "1": 1, PG + "2": 0, PG + "3": None},
               {"x_pg_returns": "abc"})
    write_meta(project, "onpolicy_kd/rollout/engine.py", {ENGINE_IN + "1": 1, ENGINE_OUT + "1": 0},
               {"x__draw": "d", "x_cached_decoding": "e"})
    assert mutation.save_verdicts(project, record, version="3.8.1") == 3
    files = json.loads(gzip.decompress(record.read_bytes()))["files"]
    assert files["onpolicy_kd/objectives/pg.py"] == {"hash_by_function_name": {"x_pg_returns": "abc"},
                                                     "exit_code_by_key": {PG + "1": 1, PG + "2": 0}}
    assert files["onpolicy_kd/rollout/engine.py"]["exit_code_by_key"] == {ENGINE_IN + "1": 1}

    # another machine: no mutants/; the meta files come back in mutmut's format, with only the decided verdicts
    for meta in (project / "mutants").rglob("*.meta"):
        meta.unlink()
    assert mutation.restore_verdicts(project, record, version="3.8.1") == 3
    meta = json.loads((project / "mutants" / "onpolicy_kd/objectives/pg.py.meta").read_text())
    assert meta["exit_code_by_key"] == {PG + "1": 1, PG + "2": 0}
    assert meta["hash_by_function_name"] == {"x_pg_returns": "abc"}
    assert set(meta) == {"exit_code_by_key", "hash_by_function_name", "type_check_error_by_key", "durations_by_key",
                         "estimated_durations_by_key"}


def test_a_meta_file_mutmut_already_has_is_not_overwritten(mutation, project):
    record = project / "verdicts.json.gz"
    write_meta(project, "onpolicy_kd/objectives/pg.py", {PG + "1": 1}, {"x_pg_returns": "abc"})
    mutation.save_verdicts(project, record, version="3.8.1")
    newer = write_meta(project, "onpolicy_kd/objectives/pg.py", {PG + "1": 0, PG + "2": 1}, {"x_pg_returns": "new"})
    assert mutation.restore_verdicts(project, record, version="3.8.1") == 0
    assert json.loads(newer.read_text())["hash_by_function_name"] == {"x_pg_returns": "new"}


def test_a_file_without_a_meta_file_keeps_its_recorded_verdicts(mutation, project):
    # a run that made only some files' mutants must not erase the others' verdicts from the record
    record = project / "verdicts.json.gz"
    write_meta(project, "onpolicy_kd/objectives/pg.py", {PG + "1": 1}, {"x_pg_returns": "abc"})
    write_meta(project, "onpolicy_kd/rollout/engine.py", {ENGINE_IN + "1": 0}, {"x__draw": "d"})
    mutation.save_verdicts(project, record, version="3.8.1")
    (project / "mutants" / "onpolicy_kd/rollout/engine.py.meta").unlink()
    write_meta(project, "onpolicy_kd/objectives/pg.py", {PG + "1": 1, PG + "2": 1}, {"x_pg_returns": "abc"})
    assert mutation.save_verdicts(project, record, version="3.8.1") == 3
    files = json.loads(gzip.decompress(record.read_bytes()))["files"]
    assert files["onpolicy_kd/rollout/engine.py"]["exit_code_by_key"] == {ENGINE_IN + "1": 0}


def test_a_record_of_another_mutmut_version_is_not_used(mutation, project, capsys):
    # another version may name mutants or hash functions differently: its verdicts could land on other mutants
    record = project / "verdicts.json.gz"
    write_meta(project, "onpolicy_kd/objectives/pg.py", {PG + "1": 1}, {"x_pg_returns": "abc"})
    mutation.save_verdicts(project, record, version="3.8.1")
    (project / "mutants" / "onpolicy_kd/objectives/pg.py.meta").unlink()
    assert mutation.restore_verdicts(project, record, version="3.9.0") == 0
    assert "made by mutmut 3.8.1" in capsys.readouterr().out
    assert not (project / "mutants" / "onpolicy_kd/objectives/pg.py.meta").exists()
