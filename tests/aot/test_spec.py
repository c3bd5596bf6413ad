"""Build specs and spec files: bad input gets an error naming the field."""

import pytest

import sparseforge as sf
from sparseforge.aot.spec import load_spec_file, select_specs, split_spec_argument

GOOD = dict(name="layer", pattern=sf.causal(), q_len=1024, kv_len=1024, head_dim=64)


@pytest.mark.parametrize("change, error, match", [
    ({"name": "has space"}, ValueError, "name="),
    ({"name": ""}, ValueError, "name="),
    ({"pattern": "causal()"}, TypeError, "pattern"),
    ({"q_len": 0}, ValueError, "q_len"),
    ({"kv_len": 2.5}, ValueError, "kv_len"),
    ({"head_dim": 512}, ValueError, "head_dim"),
    ({"head_dim": True}, ValueError, "head_dim"),
    ({"dtype": "float64"}, ValueError, "dtype"),
    ({"heads": 0}, ValueError, "heads"),
    ({"heads": 6, "kv_heads": 4}, ValueError, "kv_heads=4"),
    ({"pattern": sf.per_head([sf.causal(), sf.full()]), "heads": 3}, ValueError, "per_head"),
    ({"backward": "yes"}, TypeError, "backward"),
    ({"value_dim": 0}, ValueError, "value_dim"),
])
def test_build_spec_rejects_bad_fields(change, error, match):
    with pytest.raises(error, match=match):
        sf.BuildSpec(**{**GOOD, **change})


def test_build_spec_plans_and_describes_itself():
    spec = sf.BuildSpec(**{**GOOD, "heads": 8, "kv_heads": 2})
    assert spec.plan("sm_90").block_m >= 16
    assert spec.to_dict()["kv_heads"] == 2 and spec.to_dict()["pattern"] == "causal()"
    assert spec.to_dict()["value_dim"] == 64
    mla = sf.BuildSpec(**{**GOOD, "head_dim": 192, "value_dim": 128})
    assert mla.plan("sm_90").value_dim == 128 and mla.to_dict()["value_dim"] == 128


def _write(tmp_path, body):
    path = tmp_path / "specs.py"
    path.write_text("import sparseforge as sf\n" + body)
    return path


def test_spec_file_loads_and_selects(tmp_path):
    path = _write(tmp_path, "SPECS = [sf.BuildSpec('a', sf.causal(), 64, 64, 32),\n"
                            "         sf.BuildSpec('b', sf.sliding_window(8), 64, 64, 32)]\n")
    specs = load_spec_file(path)
    assert [s.name for s in specs] == ["a", "b"]
    file, name = split_spec_argument(f"{path}:b")
    assert file == path and name == "b"
    assert [s.name for s in select_specs(specs, name)] == ["b"]
    with pytest.raises(ValueError, match="no spec named 'c'"):
        select_specs(specs, "c")


@pytest.mark.parametrize("body, error, match", [
    ("X = 1\n", ValueError, "SPECS"),
    ("SPECS = []\n", ValueError, "SPECS"),
    ("SPECS = [sf.causal()]\n", TypeError, r"SPECS\[0\]"),
    ("SPECS = [sf.BuildSpec('a', sf.causal(), 8, 8, 16)] * 2\n", ValueError, "duplicate"),
])
def test_bad_spec_files(tmp_path, body, error, match):
    with pytest.raises(error, match=match):
        load_spec_file(_write(tmp_path, body))


def test_missing_spec_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_spec_file(tmp_path / "nope.py")
