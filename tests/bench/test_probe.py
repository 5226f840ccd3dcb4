"""`python -m ssapo.bench.probe`: a bad preset or JSON is one line naming the argument, exit 2."""

from ssapo.bench import probe


def test_unknown_preset_names_the_argument(tmp_path, capsys):
    assert probe.main([str(tmp_path), "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--preset: unknown 'nope'" in err and "power" in err
    assert not (tmp_path / "probe.txt").exists()  # nothing ran


def test_bad_json_is_an_error(tmp_path, capsys):
    assert probe.main([str(tmp_path), "--run", "{beta: 0.5"]) == 2
    assert capsys.readouterr().err.startswith("probe: error:")
