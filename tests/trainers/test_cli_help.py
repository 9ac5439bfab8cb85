"""`bmvae --help` answers at once: building the parser imports neither TensorFlow nor Beam;
every option says what it does and shows its default; TensorFlow's start-up noise stays off
stderr unless --verbose."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from bmvae_tf.trainers import choices, cli

HEAVY = ("tensorflow", "apache_beam", "keras", "matplotlib", "tensorflow_probability", "optuna", "sqlalchemy")


def _leaf_parsers(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) of every parser that takes options, the top one included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _leaf_parsers(child, path + (name,))


COMMANDS = [path for path, _ in _leaf_parsers(cli.build_parser())]


def test_every_help_runs_without_importing_tensorflow_or_beam():
    script = (
        "import sys\n"
        "from bmvae_tf.trainers import cli\n"
        f"for path in {COMMANDS!r}:\n"
        "    try:\n"
        "        cli.main([*path, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (path, e.code)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: bmvae data build mnist-svhn-text" in result.stdout
    assert len(COMMANDS) >= 12  # bmvae, data, build, 5 datasets, train, evaluate, analyze, ...


def test_every_option_has_help_and_shows_its_default():
    for path, parser in _leaf_parsers(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), (path, action.dest)
        text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if action.option_strings and isinstance(default, (int, float, str)) and \
                    not isinstance(default, bool) and default != argparse.SUPPRESS:
                assert re.search(rf"default:? [^)]*{re.escape(str(default))}", text.replace("\n", " ")
                                 .replace("  ", " ")), (path, action.dest, default)


def test_defaults_are_shown():
    text = cli.build_parser()._subparsers._group_actions[0].choices["analyze"].format_help()
    assert "(default: 0.5)" in " ".join(text.split())
    assert "(default: demo)" in " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["demo"].format_help().split())


def test_light_names_match_the_models_and_strategies():
    from bmvae_tf.models import MODELS
    from bmvae_tf.trainers import config as config_lib

    assert sorted(choices.MODEL_NAMES) == sorted(MODELS)
    assert tuple(choices.STRATEGIES) == tuple(config_lib.STRATEGIES)


def test_dataset_commands_match_the_jobs():
    """Each declared `data build NAME` has its job in the module it names, with its options."""
    import importlib

    from bmvae_tf.pipeline.commands import DATASET_COMMANDS

    for declared in DATASET_COMMANDS:
        jobs = importlib.import_module(f"bmvae_tf.pipeline.{declared.module}").COMMANDS
        [job] = [j for j in jobs if j.name == declared.name]
        assert job.help == declared.help and job.add_arguments is declared.add_arguments


def _bmvae(*argv, env=None):
    """The console script on a run directory that does not exist: TensorFlow is imported, then
    the command fails with its one-line error."""
    code = "import sys; from bmvae_tf.trainers import cli; sys.exit(cli.main(sys.argv[1:]))"
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=300, env=environment)


NOISE = re.compile(r"absl::InitializeLog|^[IWE]\d{4} |oneDNN|cuInit|cuda", re.M)


@pytest.mark.slow
def test_start_up_noise_is_off_by_default_and_back_with_verbose(tmp_path):
    quiet = _bmvae("export", "--workdir", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [line for line in quiet.stderr.strip().splitlines()
                                                 if line.startswith("bmvae: error:")], quiet.stderr
    assert not NOISE.search(quiet.stderr)

    loud = _bmvae("export", "--workdir", str(tmp_path / "missing"), "--output", str(tmp_path / "out"),
                  "--verbose")
    assert loud.returncode == 2 and "bmvae: error:" in loud.stderr
    # What TensorFlow's C++ libraries print on start-up depends on the machine (oneDNN on x86,
    # CUDA drivers); some of it always appears.
    assert NOISE.search(loud.stderr), loud.stderr
