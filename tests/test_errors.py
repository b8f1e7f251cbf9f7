"""The "did you mean" hint every one-line error shares."""

from dcablate.errors import did_you_mean


def test_a_name_cut_short_is_completed_before_spelling_neighbours():
    names = ["paper/mqar_base", "paper/mqar_gated_deltanet", "paper/mqar_mamba2"]
    assert did_you_mean("paper/mqar_gated", names) == " (did you mean 'paper/mqar_gated_deltanet'?)"
    assert did_you_mean("paper/mqar_mamba", names) == " (did you mean 'paper/mqar_mamba2'?)"


def test_a_prefix_of_several_names_or_a_misspelling_falls_back_to_the_closest():
    names = ["d_model", "d_state", "n_heads"]
    assert did_you_mean("d_modle", names) == " (did you mean 'd_model'?)"
    # "d_s" starts one name only; "d_" starts two, so spelling decides (difflib finds neither close enough)
    assert did_you_mean("d_s", names) == " (did you mean 'd_state'?)"
    assert did_you_mean("d_", names) == ""
    assert did_you_mean("zzz", names) == ""


def test_other_names_for_a_choice_are_understood():
    """'gpu' is nearer 'cpu' than 'cuda' by spelling; what was meant is known."""
    assert did_you_mean("gpu", ["auto", "cpu", "cuda"]) == " (did you mean 'cuda'?)"
    assert did_you_mean("GPU", ["auto", "cpu", "cuda"]) == " (did you mean 'cuda'?)"
    assert did_you_mean("gdn", ["attention", "gated_deltanet", "mamba2"]) == " (did you mean 'gated_deltanet'?)"
    assert did_you_mean("gpu", ["tokens", "steps"]) == ""  # an alias only where its meaning is a choice
