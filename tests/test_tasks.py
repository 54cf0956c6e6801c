import pytest

from memreason.tasks import CORRECT, UNPARSEABLE, WRONG, Task, get_task, option_letters, register_task, task_names

SQA = get_task("strategyqa")
CSQA = get_task("commonsenseqa")
TQA = get_task("truthfulqa")
FREE = get_task("freeform")


@pytest.mark.parametrize("generated,expected", [
    ("step one\nThe answer is: True", "True"),
    ("The answer is: false.", "False"),
    ("The answer is: TRUE", "True"),                         # case-insensitive for True/False
    ("The answer is:   **False**", "False"),
    ("The answer is: True\nThe answer is: False", "False"),  # two markers: the last one counts
    ("no marker at all, but True", None),                   # no marker → unparseable, no fallback
    ("The answer is: Truely not", None),                    # a word that starts with "true"
    ("The answer is:\nTrue", None),                         # the answer must be on the marker's line
    ("The answer is: maybe", None),
    ("the answer is: True", None),                          # the marker itself is exact
])
def test_strategyqa_extraction(generated, expected):
    assert SQA.extract(generated) == expected


@pytest.mark.parametrize("generated,expected", [
    ("The answer is: B", "B"),
    ("The answer is: B.library", "B"),
    ("The answer is: (C)", "C"),
    ("The answer is: E) new york", "E"),
    ("The answer is: THE library", None),        # letters inside words never count ("THE" is not E)
    ("The answer is: the bank, A", None),         # the answer must come first
    ("The answer is: b", None),                   # lower case is not a letter answer ("a" is an article)
    ("The answer is: F", None),                   # beyond commonsenseqa's A-E
    ("E is my guess", None),                      # no marker
    ("The answer is: A\nsome more\nThe answer is: D", "D"),
])
def test_commonsenseqa_extraction(generated, expected):
    assert CSQA.extract(generated) == expected


def test_truthfulqa_allows_letters_up_to_m():
    assert TQA.extract("The answer is: M") == "M"
    assert TQA.extract("The answer is: N") is None


def test_answer_in_prompt_only_is_unparseable():
    prompt = "Question: Is it? The answer is: True\n"
    generated = "I am not sure."
    assert SQA.score(generated, "True") == UNPARSEABLE
    assert SQA.score(prompt + generated, "True") == CORRECT  # why callers must pass only the generated part


def test_score_outcomes():
    assert SQA.score("The answer is: True", "True") == CORRECT
    assert SQA.score("The answer is: False", "True") == WRONG
    assert CSQA.score("The answer is: THE", "E") == UNPARSEABLE
    assert FREE.score("The answer is: Paris.", "paris") == CORRECT
    assert FREE.score("The answer is: Lyon", "Paris") == WRONG


def test_option_letters_reads_both_option_styles():
    assert option_letters("Question: Where? Options: A.bank B.library C.mall D.shop E.new york ") == tuple("ABCDE")
    assert option_letters("Is the U.S. large? A. Yes. B. No. C. It depends. ") == tuple("ABC")
    assert option_letters("No options here.") == ()


def test_canonical_answer_checks_the_answer_space():
    assert SQA.canonical_answer(True) == "True"
    assert SQA.canonical_answer(" false ") == "False"
    with pytest.raises(ValueError):
        SQA.canonical_answer("Yes")
    q = "Question: x? Options: A.a B.b C.c D.d E.e "
    assert CSQA.canonical_answer("C", q) == "C"
    with pytest.raises(ValueError):
        CSQA.canonical_answer("F", q)
    with pytest.raises(ValueError):
        TQA.canonical_answer("D", "Is it? A. yes B. no C. maybe ")


def test_unknown_task_suggests_close_name():
    with pytest.raises(KeyError) as info:
        get_task("strategyqa2")
    assert "Did you mean: strategyqa" in str(info.value)
    assert "truthfulqa" in str(info.value)


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError):
        register_task(Task(name="strategyqa", answer_type="free", instruction="x"))
    assert {"strategyqa", "commonsenseqa", "truthfulqa", "freeform"} <= set(task_names())


def test_plain_prompt_does_not_double_the_question_prefix():
    assert SQA.plain_prompt("Is it?") == "Question: Is it?\n"
    assert CSQA.plain_prompt("Question: Where? Options: A.x ") == "Question: Where? Options: A.x\n"


# MMLU (registered for memreason.experiments.rebalance_mmlu and `memreason eval --task mmlu`)
MMLU = get_task("mmlu")


@pytest.mark.parametrize("text,expected", [
    ("A is wrong because ... B fits.\nThe answer is: B", "B"),
    ("The answer is: A\nOn reflection... The answer is: C. Paris", "C"),  # the last answer line counts
    ("Option A looks right. Answer: A", None),  # no marker: unparseable, never guessed
    ("The answer is: E", None),  # outside A-D
    ("The answer is: a", None),  # the article, not option A
    ("The answer is D.", None),
])
def test_strict_parser_reads_only_the_last_answer_line(text, expected):
    assert MMLU.extract(text) == expected


def test_mmlu_answers_are_the_four_letters_and_score_strictly():
    assert MMLU.answer_space() == ("A", "B", "C", "D")
    assert MMLU.answer_space("Which?\nA. x\nB. y\nC. z\nD. w") == ("A", "B", "C", "D")
    assert MMLU.score("The answer is: C", "C") == CORRECT
    assert MMLU.score("The answer is: B", "C") == WRONG
    assert MMLU.score("C", "C") == UNPARSEABLE
    assert "mmlu" in task_names()
