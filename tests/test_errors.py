"""The helpers that word error messages (llmkit.errors)."""

from llmkit.errors import did_you_mean, first_line


def test_did_you_mean_names_the_closest_choice_or_nothing():
    assert did_you_mean("lerning_rate", ["learning_rate", "batch_size"], "train.") == " (did you mean 'train.learning_rate'?)"
    assert did_you_mean("zzz", ["learning_rate", "batch_size"]) == ""


def test_first_line_of_a_long_message_or_the_type_of_an_empty_one():
    assert first_line(ValueError("  cannot load\nTraceback details\nmore")) == "cannot load"
    assert first_line(KeyError()) == "KeyError"
