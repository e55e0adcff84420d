"""What a user types, typed into a real IPython shell: quoted and escaped options, ``{var}`` expanded once, and
nothing of the user's overwritten (files, links, names, ``_``). Runs on both stacks (IPython 9 and 7.34)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mlnb
from mlnb.device import use_device
from mlnb.testing import FakeDevice
from fakes import run_cell as run
from fakes import usage_error as one_line

pytestmark = pytest.mark.usefixtures("fresh_defaults")

FAST = "--steps 1 --width 64 --height 64 --seed 1"


@pytest.fixture(scope="module")
def spaced_model(tiny_root):
    """The tiny SD pipeline in a folder whose path has spaces, as users' model folders do."""
    from mlnb.testing import tiny_pipeline

    return tiny_pipeline("sd", tiny_root / "my models" / "tiny sd")


# ----------------------------------------------------------------------------------------------------------------
# Options read as a shell reads them


@pytest.mark.parametrize("form", ["double", "single", "escaped"])
def test_a_model_folder_with_spaces_loads_quoted_or_escaped(ip, spaced_model, form):
    typed = {"double": f'"{spaced_model}"', "single": f"'{spaced_model}'",
             "escaped": str(spaced_model).replace(" ", "\\ ")}[form]
    result = run(ip, f"%%generate --model {typed} {FAST} --quiet --out r\na fox")
    assert result.error_in_exec is None, result.error_in_exec
    assert ip.user_ns["r"].model == str(spaced_model)
    assert mlnb.session.defaults.model == str(spaced_model)


def test_a_quoted_negative_prompt_reaches_the_pipeline_without_its_quotes(ip, spaced_model):
    cell = f'%%generate --model "{spaced_model}" {FAST} --quiet --out r --negative "blurry, low quality"\na fox'
    assert run(ip, cell).error_in_exec is None
    assert ip.user_ns["r"].params["negative_prompt"] == "blurry, low quality"


def test_every_option_takes_a_quoted_value(ip, spaced_model, tmp_path, monkeypatch):
    (tmp_path / "my pictures").mkdir()
    monkeypatch.chdir(tmp_path)
    cell = (f"%%generate --model \"{spaced_model}\" --level 'none' --steps \"1\" --guidance '7.5' --seed \"3\" "
            "--width '64' --height \"64\" --negative 'dull, grey' --num-images \"2\" --out \"pair\" "
            "--save 'my pictures/fox.png' --quiet --allow-pickle\na fox")
    assert run(ip, cell).success
    result = ip.user_ns["pair"]
    assert (result.level.value, result.seed, len(result.images)) == ("none", 3, 2)
    assert {k: result.params[k] for k in ("steps", "guidance", "width", "height", "negative_prompt")} == {
        "steps": 1, "guidance": 7.5, "width": 64, "height": 64, "negative_prompt": "dull, grey"}
    assert sorted(p.name for p in (tmp_path / "my pictures").iterdir()) == ["fox-0.png", "fox-1.png"]
    assert run(ip, f"%%generate --model '{spaced_model}' {FAST} --vram \"1 GiB\" --quiet --out planned\na fox").success
    planned = ip.user_ns["planned"]
    assert planned.plan is not None and planned.plan.budget == 2**30 and "plan for 1 GiB" in planned.plan_line()
    assert len(ip.run_line_magic("vram", "'history' -n \"1\"").rows) == 1


def test_save_into_a_folder_with_a_space(ip, spaced_model, tmp_path, monkeypatch):
    (tmp_path / "out dir").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run(ip, f'%%generate --model "{spaced_model}" {FAST} --quiet --save "out dir/x.png"\na fox').success
    assert run(ip, f"%%generate --model '{spaced_model}' {FAST} --quiet --save out\\ dir/y.png\na fox").success
    assert sorted(p.name for p in (tmp_path / "out dir").iterdir()) == ["x.png", "y.png"]
    assert (tmp_path / "out dir" / "x.png").read_bytes().startswith(b"\x89PNG")


def test_a_cell_run_again_into_a_folder_takes_the_next_free_name(ip, spaced_model, tmp_path, monkeypatch, capsys):
    """In a folder mlnb names the images: the same cell run again (same seed) saves beside its earlier picture
    instead of failing on it, and a file or a link of the user's under that name is left as it is."""
    folder = tmp_path / "my pictures"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    (folder / "mlnb-1-0-1.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link is a taken name too
    cell = f'%%generate --model "{spaced_model}" {FAST} --quiet --save "my pictures"\na fox'
    for _ in range(3):
        assert run(ip, cell).success
    assert sorted(p.name for p in folder.iterdir()) == ["mlnb-1-0-1.png", "mlnb-1-0-2.png", "mlnb-1-0-3.png",
                                                         "mlnb-1-0.png"]
    assert f"saved my pictures/mlnb-1-0-3.png" in capsys.readouterr().out
    assert not (tmp_path / "nowhere.png").exists()
    assert (folder / "mlnb-1-0-2.png").read_bytes().startswith(b"\x89PNG")
    named = f'%%generate --model "{spaced_model}" {FAST} --quiet --save "my pictures/mlnb-1-0.png"\na fox'
    assert one_line(ip, named, capsys) == (
        "UsageError: --save: 'my pictures/mlnb-1-0.png' exists; mlnb never overwrites, choose another name")


@pytest.mark.parametrize("options,line", [
    ("--guidance -1", "UsageError: --guidance must be a finite number >= 0, got -1.0"),
    ("--guidance -1e3", "UsageError: --guidance must be a finite number >= 0, got -1000.0"),
    ("--guidance -inf", "UsageError: --guidance must be a finite number >= 0, got -inf"),
    ("--vram -4GiB", "UsageError: --vram: cannot read size '-4GiB': use a number with a unit such as 4GiB, 4GB or 512MiB"),
    ("--vram 4", "UsageError: --vram: a VRAM budget of 4 B holds no model; give a unit, such as 4GiB"),
    ("--negative 'blurry", "UsageError: %%generate: No closing quotation in the options"),
    ("--model", "UsageError: argument --model: expected one argument"),
], ids=["minus-one", "minus-exponent", "minus-inf", "negative-budget", "budget-without-unit", "unclosed", "no-value"])
def test_a_value_that_starts_with_a_minus_is_a_value_and_gets_the_rule(ip, tiny_sd, capsys, monkeypatch, options,
                                                                        line):
    import mlnb.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "load_pipeline", lambda *a, **k: pytest.fail("a refused line loads nothing"))
    assert one_line(ip, f"%%generate --model {tiny_sd} --steps 1 {options}\na fox", capsys) == line


def test_vram_reads_negative_values_as_values(ip, capsys):
    assert one_line(ip, "%vram level -4GiB", capsys).startswith("UsageError: %vram level: unknown level '-4GiB'")
    assert one_line(ip, "%vram level 4", capsys) == (
        "UsageError: %vram level: a VRAM budget of 4 B holds no model; give a unit, such as 4GiB")
    assert one_line(ip, "%vram who --top -2", capsys) == "UsageError: %vram who: -n must be >= 1, got -2"
    assert one_line(ip, '%vram level "ultra', capsys) == "UsageError: %vram: No closing quotation in the options"
    assert str(ip.run_line_magic("vram", "level 'ultra'")) == "default level for %%generate: ultra"


def test_help_is_shown_for_help_and_for_the_question_mark(ip, capsys):
    capsys.readouterr()
    assert run(ip, "%%generate --help\na fox").success
    out = capsys.readouterr().out
    assert "%%generate [-h] [--model MODEL]" in out and "--negative NEGATIVE" in out
    assert run(ip, "%vram -h").success
    assert "%vram [-h]" in capsys.readouterr().out
    assert run(ip, "%%generate?").success
    out = capsys.readouterr().out
    assert "%%generate [-h]" in out and "%generate [" not in out.replace("%%generate [", "")


# ----------------------------------------------------------------------------------------------------------------
# {var} expands once


def test_text_from_a_variable_is_never_expanded_again(ip, spaced_model, monkeypatch):
    monkeypatch.setenv("MLNB_TEST_TOKEN", "hf_must_not_leak")
    run(ip, 'import os\nx = "{os.environ}"')
    assert run(ip, f"%%generate --model '{spaced_model}' {FAST} --quiet --out r --negative {{x}}\na {{x}} fox").success
    params = ip.user_ns["r"].params
    assert params["prompt"] == "a {os.environ} fox"  # the body is expanded by mlnb once, never by IPython
    assert params["negative_prompt"] == "{os.environ}"  # the line is expanded by IPython once, never by mlnb
    assert "hf_must_not_leak" not in params["prompt"] + params["negative_prompt"]


def test_a_format_spec_cannot_build_a_huge_prompt(ip, spaced_model, capsys):
    ip.user_ns["x"] = "fox"
    text = one_line(ip, f"%%generate --model '{spaced_model}' {FAST}\na {{x:>20000000}}", capsys)
    assert text == "UsageError: the prompt has {x:>20000000}: a format spec is not applied; write {x}, or {{ and }} for braces"
    assert run(ip, f"%%generate --model '{spaced_model}' {FAST} --quiet --out r --negative '{{x:>20000000}}'\na fox").success
    assert ip.user_ns["r"].params["negative_prompt"] == "{x:>20000000}"


# ----------------------------------------------------------------------------------------------------------------
# Nothing of the user's is overwritten


@pytest.mark.parametrize("name", ["__builtins__", "get_ipython", "Out", "In", "_oh", "_ih", "_", "__", "___", "_i",
                                  "_i3", "_3", "exit", "quit", "print", "len", "__name__"])
def test_out_refuses_names_that_belong_to_python_or_ipython(ip, tiny_sd, capsys, name):
    before = ip.user_ns.get(name, KeyError)
    text = one_line(ip, f"%%generate --model {tiny_sd} {FAST} --out {name}\na fox", capsys)
    assert text.startswith(f"UsageError: --out {name!r} is ") and "choose another name" in text
    if name != "_i":  # IPython itself moves _i to each new cell's source
        assert ip.user_ns.get(name, KeyError) is before


@pytest.mark.parametrize("kind", ["dangling", "to-a-file"])
def test_save_never_writes_through_a_symbolic_link(ip, tiny_sd, tmp_path, capsys, kind):
    target = tmp_path / "elsewhere.png"
    if kind == "to-a-file":
        target.write_bytes(b"my picture")
    link = tmp_path / "fox.png"
    link.symlink_to(target)
    text = one_line(ip, f"%%generate --model {tiny_sd} {FAST} --save {link}\na fox", capsys)
    assert text == f"UsageError: --save: {str(link)!r} is a symbolic link; mlnb never writes through one, choose another name"
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target.read_bytes() == b"my picture") if kind == "to-a-file" else not target.exists()


def test_free_outputs_drops_only_ipythons_references(ip):
    """The docs' promise: ``%vram free --outputs`` drops output-cache entries; your own variables are never touched,
    also those named like IPython's (``_``, ``_N``)."""
    device = FakeDevice()
    with use_device(device):
        ip.user_ns["fake"] = device
        run(ip, "kept = fake.track(__import__('torch').zeros(1024))")
        run(ip, "kept")  # Out[n] and IPython's _ now pin it too
        n = ip.execution_count - 1
        run(ip, "fake.track(__import__('torch').zeros(512))")
        m = ip.execution_count - 1
        run(ip, "mine = fake.track(__import__('torch').zeros(2048))")
        run(ip, f"_ = mine\n_{m} = mine")  # the user's own _ and _N
        report = ip.run_line_magic("vram", "free --outputs")
        assert {f"Out[{n}]", f"Out[{m}]"} <= set(report.outputs_dropped)
        assert n not in ip.user_ns["Out"] and m not in ip.user_ns["Out"] and f"_{n}" not in ip.user_ns
        mine, kept = ip.user_ns["mine"], ip.user_ns["kept"]
        assert ip.user_ns["_"] is mine and ip.user_ns[f"_{m}"] is mine
        assert isinstance(kept, torch.Tensor) and kept.numel() == 1024
        assert not ip.displayhook._ is kept and not ip.displayhook.__ is kept
        for name in ("fake", "kept", "mine", "_", f"_{m}"):
            del ip.user_ns[name]


# ----------------------------------------------------------------------------------------------------------------
# Small items


def test_the_progress_bar_starts_at_the_steps_of_the_request(ip, tiny_sd, capsys):
    capsys.readouterr()
    assert run(ip, f"%%generate --model {tiny_sd} --steps 2 --width 64 --height 64 --seed 1\na fox").success
    captured = capsys.readouterr()
    assert "0/2" in captured.err and "0/1" not in captured.err, captured.err
    assert "64×64 · 2 steps ·" in captured.out


def test_one_step_is_singular(ip, tiny_sd, capsys):
    capsys.readouterr()
    assert run(ip, f"%%generate --model {tiny_sd} {FAST}\na fox").success
    assert "64×64 · 1 step ·" in capsys.readouterr().out


def test_doctor_says_a_cpu_build_has_no_cuda(monkeypatch):
    from mlnb.cli import doctor_report

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert dict(doctor_report())["torch"] == f"{torch.__version__} (CPU build, no CUDA)"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert dict(doctor_report())["torch"] == f"{torch.__version__} (CUDA 13.0)"


def demo(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "mlnb.cli", "demo", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLNB_CACHE": str(tmp_path / "cache")},
    )


def test_the_demo_never_replaces_an_existing_picture(tmp_path, spaced_model):
    out = tmp_path / "demo out"
    out.mkdir()
    (out / "mlnb-7-0.png").write_bytes(b"my picture")
    (out / "mlnb-7-0-1.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link is taken too
    done = demo(tmp_path, "--model", str(spaced_model), "--steps", "1", "--prompt", "a {fox}", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "mlnb-7-0.png").read_bytes() == b"my picture"
    assert not (tmp_path / "nowhere.png").exists()
    assert (out / "mlnb-7-0-2.png").read_bytes().startswith(b"\x89PNG")
    assert f"saved {out / 'mlnb-7-0-2.png'}" in done.stdout


def test_the_demo_out_naming_a_file_is_one_line(tmp_path):
    (tmp_path / "picture.png").write_bytes(b"my picture")
    done = demo(tmp_path, "--out", str(tmp_path / "picture.png"))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"mlnb demo: error: --out {str(tmp_path / 'picture.png')!r} is a file, not a folder: give a folder for the PNG")
    assert (tmp_path / "picture.png").read_bytes() == b"my picture"
