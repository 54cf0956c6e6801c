import re
import subprocess
import sys
from pathlib import Path

from memreason.cli import VERB_MODULES, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_verb_without_importing_torch():
    code = ("import sys; from memreason.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'memreason --help imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for verb in VERB_MODULES:
        assert re.search(rf"^\s+{verb}\s", result.stdout, re.MULTILINE), verb


def test_no_verb_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: memreason" in capsys.readouterr().out


def test_every_verb_has_examples_in_its_help():
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for name, sub in verbs.items():
        assert sub.epilog and "memreason" in sub.epilog, f"`memreason {name} --help` has no examples"


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up commands.*?```bash\n(.*?)```", readme, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["./run.sh demo", "./run.sh test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run.sh test" in ci
    run_sh = (ROOT / "run.sh").read_text()
    assert "torch==2.13.0" in run_sh and "--no-deps" in run_sh
