"""`--set` mistakes a newcomer makes end in one error line that says the fix (exit code 2)."""

from __future__ import annotations

import pytest

from dcablate.cli import main
from dcablate.config.overrides import parse_override, quote_words, spaced_set
from dcablate.errors import UserError
from tests.test_cli_errors import OK

# the small recipe of the CLI error tests, swept over the mixer and the learning rate (a dry run takes a moment)
SWEEP = OK.replace('out_dir = "out"\n', 'out_dir = "out"\nname = "s"\n', 1) + \
    '[sweep]\n"model.mixer" = ["attention", "gated_deltanet"]\n"train.lr" = [1e-3, 3e-3]\n'


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text(SWEEP)
    return tmp_path / "s.toml"


def error_line(capsys, *argv: str) -> str:
    """The one stderr line of `dcablate run s.toml --dry-run ARGV`, which must exit with code 2."""
    assert main(["run", "s.toml", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.mark.parametrize("value, got", [
    ("123", "int 123"),
    ("2024-01-01", "a TOML date 2024-01-01"),
    ("2024-01-01T10:00:00", "a TOML date-time 2024-01-01T10:00:00"),
    ("10:30:00", "a TOML time 10:30:00"),
    ("1.5", "float 1.5"),
    ("true", "boolean true"),
    ("0x1F", "int 31"),  # the hint quotes what was typed, not the number it reads as
])
def test_a_string_key_given_a_number_date_or_boolean_says_how_to_quote_it(recipe, capsys, value, got):
    assert error_line(capsys, "--set", f"run.name={value}") == \
        f"""error: --set: run.name: must be a string, got {got} (quote it: --set 'run.name="{value}"')"""


def test_a_later_set_of_the_table_drops_the_earlier_text(recipe, capsys):
    assert error_line(capsys, "--set", "run.name=7", "--set", "run={name = 5}") == \
        'error: --set: run.name: must be a string, got int 5 (quote it: "5")'


def test_a_string_key_in_a_file_says_to_quote_it(recipe, capsys):
    (recipe.parent / "n.toml").write_text('extends = "s.toml"\n[run]\nname = 2024-01-01\n')
    assert main(["run", "n.toml", "--dry-run"]) == 2
    assert capsys.readouterr().err == \
        f'error: {recipe.parent / "n.toml"}: run.name: must be a string, got a TOML date 2024-01-01 ' \
        f'(quote it: "2024-01-01")\n'


def test_a_swept_string_value_says_to_quote_it(recipe, capsys):
    assert error_line(capsys, "--set", "sweep.task.lm.data=[1, 2]") == \
        'error: --set: sweep.task.lm.data: value 1: must be a string, got int 1 (quote it: "1")'


def test_a_key_with_choices_lists_them_rather_than_quoting(recipe, capsys):
    assert error_line(capsys, "--set", "run.device=1") == \
        "error: --set: run.device: must be one of auto|cpu|cuda, got int 1"


def test_a_date_given_to_a_number_key_is_named_as_a_date(recipe, capsys):
    assert error_line(capsys, "--set", "train.steps=2024-01-01") == \
        "error: --set: train.steps: must be an integer, got a TOML date 2024-01-01"


def test_a_list_of_bare_words_gets_the_parsers_message_and_the_quoted_form(recipe, capsys):
    assert error_line(capsys, "--set", "sweep.model.mixer=[attention,gated_deltanet]") == \
        "error: --set sweep.model.mixer=[attention,gated_deltanet]: value is not valid TOML: invalid value at " \
        "character 2 ('attention,gated_d...'); words in a list or table need quotes: " \
        """--set 'sweep.model.mixer=["attention", "gated_deltanet"]'"""


def test_a_text_holding_an_equals_sign_gets_the_quoted_form(recipe, capsys):
    """A sweep point's folder name (`tpp=2`) copied into run.name: the value to type, quoted."""
    assert error_line(capsys, "--set", "run.name=tpp=2") == \
        "error: --set run.name=tpp=2: value is not valid TOML: invalid value at character 1 ('tpp=2'); a text " \
        """with '=' in it needs quotes: --set 'run.name="tpp=2"'"""


def test_an_inline_table_keeps_its_keys_bare_and_quotes_its_words(recipe, capsys):
    assert error_line(capsys, "--set", "task.mqar.test=[{seq_len=16, filler=zero}]") == \
        "error: --set task.mqar.test=[{seq_len=16, filler=zero}]: value is not valid TOML: invalid value at " \
        "character 22 ('zero}]'); words in a list or table need quotes: " \
        """--set 'task.mqar.test=[{seq_len = 16, filler = "zero"}]'"""


@pytest.mark.parametrize("text, line", [
    ("run.name=\"abc", "--set run.name=\"abc: value is not valid TOML: unterminated string at the end of the value"),
    ("train.lr=", '--set train.lr=: value is not valid TOML: empty (write a value after "=", or "" for an empty '
                  'string)'),
    ("model.mixer=[attention", "--set model.mixer=[attention: value is not valid TOML: invalid value at character "
                               "2 ('attention')"),  # quoting alone does not close the bracket: no quoted form
    ("train.lr=[1, 2", "--set train.lr=[1, 2: value is not valid TOML: unclosed array at the end of the value"),
])
def test_other_invalid_values_carry_the_parsers_message(text, line):
    with pytest.raises(UserError) as e:
        parse_override(text)
    assert str(e.value) == line


@pytest.mark.parametrize("raw, fixed", [
    ("[attention, gated_deltanet]", '["attention", "gated_deltanet"]'),
    ('[attention, "gated_deltanet"]', '["attention", "gated_deltanet"]'),
    ("[1e-3, -inf, true, 2024-01-01, x]", '[1e-3, -inf, true, 2024-01-01, "x"]'),
    ("[[model.d_model, train.lr]]", '[["model.d_model", "train.lr"]]'),
    ("{kind = dynamic, rank = 4}", '{kind = "dynamic", rank = 4}'),
])
def test_quote_words_quotes_only_bare_values(raw, fixed):
    assert quote_words(raw) == fixed


def test_best_lr_seeds_names_the_bad_element(recipe, capsys):
    assert error_line(capsys, "--set", 'sweep.best_lr_seeds=[5, "6"]') == \
        'error: --set: sweep.best_lr_seeds: must be a non-empty list of seeds (integers >= 0), e.g. [1, 2]; ' \
        'element 1 is the string "6" (write 6, without quotes)'
    assert error_line(capsys, "--set", "sweep.best_lr_seeds=[5, -1]") == \
        "error: --set: sweep.best_lr_seeds: must be a non-empty list of seeds (integers >= 0), e.g. [1, 2]; " \
        "element 1 is -1, below 0"
    assert error_line(capsys, "--set", "sweep.best_lr_seeds=[true]") == \
        "error: --set: sweep.best_lr_seeds: must be a non-empty list of seeds (integers >= 0), e.g. [1, 2]; " \
        "element 0 is boolean true"


def test_a_key_every_point_gets_wrong_is_named_without_a_sweep_point(recipe, capsys):
    assert error_line(capsys, "--set", "run.name=../escape") == \
        "error: --set: run.name: '../escape' must name a folder inside run.out_dir (not empty, absolute or with '..')"


def test_a_key_only_one_point_gets_wrong_keeps_the_point(recipe, capsys):
    """The recipe's own Gated DeltaNet takes heads of 15 channels; only the swept attention (RoPE) does not."""
    text = SWEEP.replace("d_model = 32\n", 'd_model = 32\nmixer = "gated_deltanet"\n')
    (recipe.parent / "p.toml").write_text(text.replace('["attention", "gated_deltanet"]',
                                                       '["gated_deltanet", "attention"]'))
    assert main(["run", "p.toml", "--dry-run", "--set", "model.d_model=30", "--set", "model.n_heads=2"]) == 2
    assert capsys.readouterr().err == "error: --set: model.d_model: RoPE needs an even head dim, got 15 = d_model / " \
                                      "n_heads (with sweep.model.mixer = 'attention')\n"


def test_two_points_with_one_name_name_the_file_by_its_full_path(recipe, capsys):
    twice = SWEEP.replace('"train.lr" = [1e-3, 3e-3]', '"train.lr" = [1e-3, 1e-3]')
    (recipe.parent / "s9.toml").write_text(twice)
    assert main(["run", "s9.toml", "--dry-run"]) == 2
    assert capsys.readouterr().err == \
        f"error: {recipe.parent / 's9.toml'}: sweep: points 1 and 2 both get the name 'mixer=attention,lr=0.001' " \
        "(the same values: an axis lists a value twice); make each point's swept values differ\n"


def test_two_points_with_one_name_from_set_name_set(recipe, capsys):
    assert error_line(capsys, "--set", "sweep.train.lr=[0.1, 0.1]").startswith(
        "error: --set: sweep: points 1 and 2 both get the name 'mixer=attention,lr=0.1'")


@pytest.mark.parametrize("argv, line", [
    (["--set", "train.lr", "3e-3"], "--set train.lr 3e-3: expected KEY=VALUE as one argument, without spaces: "
                                    "--set train.lr=3e-3"),
    (["--set", "train.lr", "=", "3e-3"], "--set train.lr = 3e-3: expected KEY=VALUE as one argument, without "
                                         "spaces: --set train.lr=3e-3"),
    (["--set", "train.lr", "=3e-3"], "--set train.lr =3e-3: expected KEY=VALUE as one argument, without spaces: "
                                     "--set train.lr=3e-3"),
    (["--set", "train.lr=", "3e-3"], "--set train.lr= 3e-3: expected KEY=VALUE as one argument, without spaces: "
                                     "--set train.lr=3e-3"),
    (["--set", "run.name", "my run"], "--set run.name my run: expected KEY=VALUE as one argument, without spaces: "
                                      "--set 'run.name=my run'"),
])
def test_a_value_given_apart_from_its_key_is_recognised(argv, line):
    assert str(spaced_set(["run", "s.toml", *argv, "--dry-run"])) == line


@pytest.mark.parametrize("argv", [
    ["--set", "train.lr=3e-3", "extra"],  # a whole --set, then a stray argument: not this mistake
    ["--set", "train.lr", "--dry-run"],
    ["extra"],
])
def test_other_extra_arguments_are_not_blamed_on_set(argv):
    assert spaced_set(["run", "s.toml", *argv]) is None


def test_a_misspelt_swept_section_of_a_suite_recipe_gets_a_did_you_mean(tmp_path, capsys, monkeypatch):
    """The suite recipes sweep whole task sections, other tasks' than the recipe's own task.kind (their sweep sets
    it): a misspelt section is a recipe key too, and its hint looks among every task's sections."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "paper/suite_gated_deltanet", "--dry-run", "--set", "sweep.task.recal=[{}]"]) == 2
    assert capsys.readouterr().err.strip().endswith("sweep.task.recal: not a recipe key (did you mean 'task.recall'?)")


def test_a_key_of_a_known_section_is_matched_against_that_sections_keys():
    """`train.foo` shares `train.` with `train.lr`, which made the whole paths alike enough for a did-you-mean;
    within the section, 'foo' is like no key. A misspelt key of the section is still found."""
    from dcablate.config.loading import _key_hint

    assert _key_hint("train.foo") == ""
    assert _key_hint("train.weight_decy") == " (did you mean 'train.weight_decay'?)"


@pytest.mark.parametrize("text, key, value", [
    ('sweep."model.conv.kind"=["none", "dynamic"]', "sweep.model.conv.kind", ["none", "dynamic"]),
    ("sweep.'train.lr' = [1e-3]", "sweep.train.lr", [1e-3]),
    ('"train".lr=1', "train.lr", 1),
    ('run.name="a=b"', "run.name", "a=b"),  # an `=` inside the value is the value's
    ("task.mqar.train=[{seq_len=64}]", "task.mqar.train", [{"seq_len": 64}]),
])
def test_a_key_in_tomls_quotes_is_the_same_key_unquoted(text, key, value):
    """A recipe's `[sweep]` table quotes its axes (`"model.conv.kind" = [...]`); the same form after --set was
    refused as an unknown key whose did-you-mean looked like what was typed."""
    assert parse_override(text) == (key, value)


def test_a_long_key_without_an_equals_sign_is_refused_at_once():
    """The quoted-key reading must not backtrack over the spaces between a key's parts (seconds to minutes)."""
    import time

    start = time.perf_counter()
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_override('"x". a  . b  . c  . d  . e  . f  . g  . h  . i  . j  . k  .l')
    assert time.perf_counter() - start < 1.0



def test_a_set_table_that_resets_the_recipes_keys_says_so(recipe, capsys):
    """`--set 'train={lr=1e-3}'` replaces the whole table: the recipe's other train keys go back to their defaults.
    That is said in a note (the run goes on as asked); `--set 'sweep={}'` drops the sweep on purpose, silently."""
    assert main(["run", "s.toml", "--dry-run", "--set", "sweep={}", "--set", "train={lr=1e-3, steps=2, batch_size=4}"
                 ]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: --set train={...} replaces the whole table: train.warmup_steps "
                          f"(set in {recipe}) goes back to its default; to change one key and keep the rest, "
                          "--set train.NAME=VALUE"), err
    assert "sweep={...}" not in err


@pytest.mark.parametrize("typed, meant", [("sweep.best_lr_seed=[1]", "sweep.best_lr_seeds"),
                                          ('sweep.zips=[["model.mixer", "train.lr"]]', "sweep.zip")])
def test_a_misspelt_sweep_option_gets_a_did_you_mean(recipe, capsys, typed, meant):
    assert error_line(capsys, "--set", typed) == \
        f"error: --set: {typed.split('=')[0]}: not a recipe key (did you mean '{meant}'?)"
