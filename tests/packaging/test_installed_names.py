"""The installed package claims one import name, bmvae_tf: a user's own `pipeline.py` or
`trainers/` package beside their work neither breaks the project nor is broken by it."""

import subprocess
import sys
import textwrap

# Run in the user's folder, which `python -c` and `python -m` put first on sys.path.
PROBE = textwrap.dedent("""
    import contextlib, io, os
    import pipeline, trainers
    assert pipeline.OWNER == "user" and trainers.OWNER == "user", "the user's modules were shadowed"
    from bmvae_tf.trainers import cli
    from bmvae_tf.pipeline import digits
    assert not cli.__file__.startswith(os.getcwd()), cli.__file__
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main(["--help"])
    assert "data" in out.getvalue() and "train" in out.getvalue(), out.getvalue()
    print("ok", cli.__name__, digits.__name__)
""")


def test_user_modules_named_pipeline_and_trainers_do_not_collide(tmp_path):
    (tmp_path / "pipeline.py").write_text('OWNER = "user"\n')
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "__init__.py").write_text('OWNER = "user"\n')
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok bmvae_tf.trainers.cli bmvae_tf.pipeline.digits" in result.stdout


def test_cli_module_runs_from_a_folder_with_colliding_names(tmp_path):
    # `python -m` puts the working directory first on sys.path too.
    (tmp_path / "pipeline.py").write_text('raise ImportError("the project imported the user\'s pipeline.py")\n')
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "__init__.py").write_text(
        'raise ImportError("the project imported the user\'s trainers/")\n')
    result = subprocess.run([sys.executable, "-m", "bmvae_tf.trainers.cli", "train", "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--workdir" in result.stdout
