"""otface-demo (otface_plugin/demo.py): it runs, and its expected failures are one line on stderr
and a non-zero exit (issue 9 case 7)."""
import pytest

from otface_plugin import available_losses
from otface_plugin import demo


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-5"], "--steps must be at least 1, got -5"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--held-out", "1"], "--held-out must be at least 2, got 1"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["-P", "1"], "-P and -K must be at least 2"),
])
def test_demo_bad_numbers_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        demo.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"otface-demo: error: {message}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_demo_unknown_loss_lists_the_registered_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--loss", "foo"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err == f"otface-demo: error: --loss 'foo' is not a registered loss; registered losses: " \
                  f"{', '.join(available_losses())}\n"
    assert "otface" in available_losses()


def test_demo_divergence_is_one_line_and_exit_1(capsys):
    rc = demo.main(["--steps", "3", "--lr", "1e30", "--identities", "8", "--held-out", "4", "-P", "4",
                    "--pairs", "20", "--log-every", "100"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("otface-demo: error: ")
    assert "NaN/inf" in err or "loss became" in err


def test_demo_runs(capsys):
    assert demo.main(["--steps", "2", "--identities", "8", "--held-out", "4", "-P", "4", "--pairs", "20"]) == 0
    assert "held-out verification accuracy" in capsys.readouterr().out
