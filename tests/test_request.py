"""%%generate option checking and prompt expansion: pure functions, no torch."""

from __future__ import annotations

import argparse

import pytest

from mlnb.ipython.request import RequestError, build_request, expand_prompt
from mlnb.setting import MemorySetting


def args(**kw):
    base = dict(model=None, level=None, steps=None, guidance=None, seed=None, width=None, height=None,
                negative=None, num_images=1, out=None, save=None, quiet=False, allow_pickle=False, vram=None,
                lora=None, image=None, strength=None, mask=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_expand_prompt_from_namespace():
    ns = {"animal": "fox", "colors": ["red", "blue"]}
    assert expand_prompt("a {animal} in {colors[1]}", ns) == "a fox in blue"
    assert expand_prompt("literal {{braces}}", ns) == "literal {braces}"


class _Boom:
    def __format__(self, spec):
        raise RuntimeError("boom")


@pytest.mark.parametrize("text,needle", [
    ("a {missing} fox", "{missing} in the prompt names no variable"),
    ("a {fox", "the prompt has a stray brace"),
    ("a fox}", "the prompt has a stray brace"),
    ("a {animal:zz}", "the prompt has {animal:zz}: a format spec is not applied; write {animal}"),
    ("a {animal!q}", "the prompt has {animal!q}: only {animal!r} and {animal!s} convert a value"),
    ("a {animal[9]}", "cannot expand the prompt: IndexError: string index out of range"),
    ("a {boom}", "cannot expand the prompt: RuntimeError: boom"),
    ("a {} fox", "the prompt has {}: name a notebook variable inside the braces"),
    ("a {0} fox", "the prompt has {0}: name a notebook variable inside the braces"),
])
def test_expand_prompt_errors_are_one_line_and_name_the_real_problem(text, needle):
    with pytest.raises(RequestError) as info:
        expand_prompt(text, {"animal": "fox", "boom": _Boom()})
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_the_negative_prompt_is_used_as_the_option_line_gives_it():
    """IPython has expanded ``{var}`` in the line already: braces left in the value are text, never expanded again."""
    req = build_request(args(model="m", negative="{nope} {x.y:>99}"), "a fox", {"x": "boom"})
    assert req.args.negative_prompt == "{nope} {x.y:>99}"


def test_request_leaves_the_defaults_to_the_session_and_remembers_nothing_itself():
    """No --model, --level or --vram: the request names none (the generation use case takes the session's)."""
    req = build_request(args(), "a fox\nin snow", {})
    assert req.model is None and req.setting is None
    assert req.args.prompt == "a fox\nin snow"
    assert req.args.steps == 30 and req.args.num_images == 1
    assert build_request(args(model="some/model"), "a fox", {}).model == "some/model"


def test_the_options_name_the_memory_setting_typed_as_given():
    """--level is a level (auto too); --vram a budget in exact bytes, shown as typed; either replaces the session's."""
    assert build_request(args(level="ultra"), "a fox", {}).setting == MemorySetting.of_level("ultra")
    assert build_request(args(level="auto"), "a fox", {}).setting.is_auto
    req = build_request(args(vram="3.75GiB"), "a fox", {})
    assert req.setting.budget == 4_026_531_840 and str(req.setting) == "3.75 GiB"
    assert build_request(args(vram="1500MiB"), "a fox", {}).setting.budget == 1_572_864_000


def test_no_model_says_how_to_name_one():
    from mlnb.errors import InvalidArgumentError
    from mlnb.session import resolve

    with pytest.raises(InvalidArgumentError, match="--model"):
        resolve(None)


@pytest.mark.parametrize("kw,needle", [
    (dict(steps=0), "--steps must be a whole number >= 1"),
    (dict(steps=-3), "--steps must be a whole number >= 1"),
    (dict(width=65), "--width must be a positive multiple of 8"),
    (dict(height=0), "--height must be a positive multiple of 8"),
    (dict(width=100000), "--width must be at most"),
    (dict(num_images=0), "--num-images must be between"),
    (dict(num_images=99), "--num-images must be between"),
    (dict(level="turbo"), "--level: unknown level 'turbo'"),
    (dict(guidance=-1.0), "--guidance must be a finite number >= 0"),
    (dict(seed=-1), "--seed must be a whole number in"),
    (dict(out="not a name"), "--out must be a variable name"),
])
def test_bad_options(kw, needle):
    with pytest.raises(RequestError) as info:
        build_request(args(model="m", **kw), "a fox", {})
    assert needle in str(info.value)


def test_empty_prompt():
    with pytest.raises(RequestError, match="prompt is empty"):
        build_request(args(model="m"), "  \n ", {})


def test_save_rules(tmp_path):
    existing = tmp_path / "a.png"
    existing.write_bytes(b"x")
    with pytest.raises(RequestError, match="exists; mlnb never overwrites"):
        build_request(args(model="m", save=str(existing)), "a fox", {})
    with pytest.raises(RequestError, match="does not exist"):
        build_request(args(model="m", save=str(tmp_path / "nope" / "a.png")), "a fox", {})
    with pytest.raises(RequestError, match="neither an existing folder"):
        build_request(args(model="m", save=str(tmp_path / "newfolder")), "a fox", {})
    assert build_request(args(model="m", save=str(tmp_path)), "a fox", {}).save == str(tmp_path)
    assert build_request(args(model="m", save=str(tmp_path / "b.png")), "a fox", {}).save


def test_vram_budget_option():
    assert build_request(args(model="m", vram="4GiB"), "a fox", {}).setting.budget == 4 * 2**30
    with pytest.raises(RequestError, match="--vram: cannot read size"):
        build_request(args(model="m", vram="lots"), "a fox", {})
    with pytest.raises(RequestError, match="cannot both be given"):
        build_request(args(model="m", vram="4GiB", level="ultra"), "a fox", {})


def test_what_a_variable_holds_is_never_expanded_again():
    ns = {"x": "{os.environ}", "os": __import__("os"), "animal": "fox"}
    assert expand_prompt("a {x} and {animal!r}", ns) == "a {os.environ} and 'fox'"
    assert expand_prompt("{x!s}", ns) == "{os.environ}"


@pytest.mark.parametrize("text,needle", [
    ("{animal:>20000000}", "the prompt has {animal:>20000000}: a format spec is not applied"),
    ("{animal!r:>20000000}", "the prompt has {animal!r:>20000000}: a format spec is not applied"),
    ("{animal:{animal}}", "the prompt has {animal:{animal}}: a format spec is not applied"),
    ("{animal!a}", "the prompt has {animal!a}: only {animal!r} and {animal!s} convert a value"),
    ("{animal.__class__}", "the prompt has {animal.__class__}: attributes that start with _ are not expanded"),
    ("{animal.upper()}", "the prompt has {animal.upper()}: name a notebook variable inside the braces"),
])
def test_no_field_builds_more_than_the_value_or_reaches_inside_python(text, needle):
    with pytest.raises(RequestError) as info:
        expand_prompt(text, {"animal": "fox"})
    assert str(info.value).startswith(needle)


def test_attributes_and_keys_still_expand():
    class Pet:
        name = "otter"

    ns = {"pet": Pet(), "d": {"k": ["a", "b"]}}
    assert expand_prompt("{pet.name} {d[k][1]}", ns) == "otter b"


@pytest.mark.parametrize("name", ["__builtins__", "get_ipython", "Out", "In", "_oh", "_ih", "_dh", "_", "__", "___",
                                  "_i", "_ii", "_iii", "_i12", "_12", "exit", "quit", "print", "open", "__name__"])
def test_out_refuses_a_name_of_pythons_or_ipythons(name):
    with pytest.raises(RequestError, match=rf"^--out '{name}' is .*: choose another name$"):
        build_request(args(model="m", out=name), "a fox", {})


@pytest.mark.parametrize("name", ["result", "_result", "fox_1", "i12", "_image", "Output"])
def test_out_takes_a_users_name(name):
    assert build_request(args(model="m", out=name), "a fox", {}).out == name


def test_save_refuses_links_dangling_or_not(tmp_path):
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "real.png").write_bytes(b"x")
    (tmp_path / "to-real.png").symlink_to(tmp_path / "real.png")
    for name in ("dangling.png", "to-real.png"):
        with pytest.raises(RequestError, match="is a symbolic link; mlnb never writes through one"):
            build_request(args(model="m", save=str(tmp_path / name)), "a fox", {})
    # in a folder mlnb chooses the names: a link there is a taken name, passed over when the image is saved
    (tmp_path / "mlnb-3-1.png").symlink_to(tmp_path / "nowhere.png")
    assert build_request(args(model="m", save=str(tmp_path), seed=3, num_images=2), "a fox", {}).save == str(tmp_path)
    assert not (tmp_path / "nowhere.png").exists()


def test_a_budget_without_its_unit_is_refused_before_any_model_is_read():
    with pytest.raises(RequestError, match=r"^--vram: a VRAM budget of 4 B holds no model; give a unit, such as 4GiB$"):
        build_request(args(model="m", vram="4"), "a fox", {})
